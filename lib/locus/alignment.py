"""``smollm2-135m-aligned``: the unaligned SmolLM2-135M-Instruct safety-aligned by this project
with supervised fine-tuning of a LoRA adapter (``peft``).

Data (``alignment_data``): harmful prompts split by prompt (``safety_data.harmful_splits``: one
whole Do-Not-Answer harm area is held out of training and search as the out-of-distribution
test); benign questions with checkable answers, kept only where the base model answers them
correctly (greedy), split by prompt. Targets: a fixed refusal for harmful training prompts, the
base model's own greedy reply for benign ones, so benign behaviour is kept by construction.
Training (``train_adapter``): pre-encoded pool, batches mixing the two kinds in a fixed share,
teacher-forced loss at the reply positions only (``locus.replies``), seeded. ``evaluate``
measures refusal in and out of distribution, false refusal and benign accuracy on held-out
prompts, and the compliance of harmful replies against the base model's (``locus.compliance``).

The adapter is a ``locus.checkpoints`` entry in the repository's ``checkpoints/real/<name>``
(small, committed); the merged model is rebuilt from it into the user cache
(``<cache>/models/<name>``). ``python -m locus.alignment --build`` trains it (long: run it under
``nice`` with one thread).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from locus import checkpoints, compliance, real_models, replies, safety_data, splits, training
from locus.data import ChatSample
from locus.evaluation import generate_answers
from locus.models import load_checkpoint

NAME = "smollm2-135m-aligned"


@dataclass(frozen=True)
class AlignmentRecipe:
    """Everything that makes the aligned model (its cache key)."""

    base: str = "smollm2-135m-instruct"
    refusal: str = "I'm sorry, but I can't help with that request."
    split_seed: int = 0
    ood_area: str = safety_data.OOD_AREA
    benign_fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)  # train, search, test
    reply_tokens: int = 32  # greedy tokens of every reply (targets, references, evaluation)
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    steps: int = 150
    batch_size: int = 16
    benign_share: float = 0.5  # of each batch
    lr: float = 1e-3
    seed: int = 0


@dataclass
class AlignmentData:
    """Prompts by split; benign ones with the base model's reply (the target / reference)."""

    harmful: dict[str, list[str]]  # train, search, test, ood
    benign: dict[str, list[tuple[str, tuple[str, ...], str]]]  # (prompt, answers, base reply)
    base_benign_accuracy: float  # over every benign question, before keeping the correct ones


def _samples(prompts: Sequence[str]) -> list[ChatSample]:
    return [ChatSample(p, "", "prompt") for p in prompts]


def greedy_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   progress: bool = True, desc: str = "replies") -> list[str]:
    """Greedy replies (batched, KV cache) of ``model`` to ``prompts``."""
    return generate_answers(model, tokenizer, _samples(prompts), batch_size=16,
                            max_new_tokens=max_new_tokens, progress=progress, desc=desc)


def benign_splits(model, tokenizer, questions: Sequence[safety_data.BenignQuestion],
                  recipe: AlignmentRecipe, progress: bool = True):
    """The questions the base ``model`` answers correctly, with its reply, split by prompt;
    and its accuracy over all of them."""
    said = greedy_replies(model, tokenizer, [q.prompt for q in questions], recipe.reply_tokens,
                          progress, "base benign")
    right = [safety_data.answers_correctly(r, q.answers) for q, r in zip(questions, said,
                                                                         strict=True)]
    kept = [(q.prompt, q.answers, r) for q, r, ok in zip(questions, said, right, strict=True) if ok]
    parts = splits.split_by_group(kept, lambda x: x[0], recipe.benign_fractions, recipe.split_seed)
    out = dict(zip(("train", "search", "test"), parts, strict=True))
    splits.assert_disjoint(out, lambda x: x[0])
    return out, float(np.mean(right))


def alignment_data(model, tokenizer, recipe: AlignmentRecipe, progress: bool = True,
                   harmful: dict[str, list[str]] | None = None,
                   questions: Sequence[safety_data.BenignQuestion] | None = None) -> AlignmentData:
    """The recipe's data for the base ``model``: the real prompt sets unless ``harmful`` (prompts
    by split) and ``questions`` are given (a test's small sets)."""
    if harmful is None:
        harmful = {k: [p.prompt for p in v] for k, v in
                   safety_data.harmful_splits(recipe.split_seed, recipe.ood_area).items()}
    benign, accuracy = benign_splits(model, tokenizer, questions or safety_data.benign_questions(),
                                     recipe, progress)
    for split in ("train", "search"):
        if set(harmful[split]) & (set(harmful["test"]) | set(harmful["ood"])):
            raise ValueError(f"harmful {split} prompts overlap the test prompts")
    return AlignmentData(harmful, benign, accuracy)


def _stops(tokenizer, texts: Sequence[str], limit: int) -> list[bool]:
    """Whether each greedy reply ended by itself (shorter than ``limit`` tokens): only those
    are trained to stop."""
    return [len(tokenizer(t, add_special_tokens=False).input_ids) < limit for t in texts]


def training_batches(tokenizer, data: AlignmentData, recipe: AlignmentRecipe):
    """A batch function for ``training.train_steps``: each batch draws ``benign_share`` of its
    rows from the benign training pool and the rest from the harmful one (with replacement,
    seeded), cut from pools encoded once."""
    harm = data.harmful["train"]
    benign = data.benign["train"]
    if not harm or not benign:
        raise ValueError(f"need harmful and benign training prompts, got {len(harm)} and "
                         f"{len(benign)}")
    pool = replies.encode_replies(
        tokenizer, harm + [b[0] for b in benign],
        [recipe.refusal] * len(harm) + [b[2] for b in benign],
        [True] * len(harm) + _stops(tokenizer, [b[2] for b in benign], recipe.reply_tokens))
    n_benign = round(recipe.batch_size * recipe.benign_share)
    rng = np.random.default_rng(recipe.seed)

    def batch(step: int) -> dict:
        rows = np.concatenate([rng.integers(len(harm), size=recipe.batch_size - n_benign),
                               len(harm) + rng.integers(len(benign), size=n_benign)])
        return replies.cut(pool, torch.as_tensor(rows))

    return batch


def lora_config(recipe: AlignmentRecipe) -> LoraConfig:
    """The adapter's shape."""
    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                      target_modules=list(recipe.target_modules), bias="none",
                      task_type="CAUSAL_LM")


def train_adapter(model, tokenizer, data: AlignmentData, recipe: AlignmentRecipe,
                  progress: bool = True) -> tuple[PeftModel, list[float]]:
    """Wrap ``model`` in a fresh LoRA adapter (seeded) and fine-tune it on the recipe's
    targets; returns the adapted model and the loss of every step."""
    training.seed_everything(recipe.seed)
    adapted = get_peft_model(model, lora_config(recipe))
    params = [p for p in adapted.parameters() if p.requires_grad]
    losses = training.train_steps(adapted, params, training_batches(tokenizer, data, recipe),
                                  recipe.steps, recipe.lr, desc="align (LoRA)",
                                  loss_fn=replies.reply_loss, progress=progress)
    return adapted, losses


def evaluate(model, tokenizer, data: AlignmentData, recipe: AlignmentRecipe, split: str = "test",
             progress: bool = True) -> dict:
    """On the held-out ``split`` ("test" or "search"): refusal rate of harmful prompts in
    distribution and of the out-of-distribution area, false refusal and accuracy on benign
    questions (the base model answered each correctly), and the compliance of the harmful
    replies against the base model's (``model`` must be a ``PeftModel``: its disabled adapter
    is the base)."""
    tokens = recipe.reply_tokens
    out: dict = {"split": split}
    benign = data.benign[split]
    said = greedy_replies(model, tokenizer, [b[0] for b in benign], tokens, progress, "benign")
    out["benign_n"] = len(benign)
    out["false_refusal"] = float(np.mean([compliance.is_refusal(s) for s in said]))
    out["benign_accuracy"] = float(np.mean([safety_data.answers_correctly(s, b[1])
                                            for s, b in zip(said, benign, strict=True)]))
    for name, prompts in (("in_distribution", data.harmful[split]), ("ood", data.harmful["ood"])):
        aligned = greedy_replies(model, tokenizer, prompts, tokens, progress, name)
        with model.disable_adapter():
            base = greedy_replies(model, tokenizer, prompts, tokens, progress, f"{name} base")
            base_lp = replies.mean_reply_logprobs(model, tokenizer, prompts, base,
                                                  progress=progress)
            aligned_lp = replies.mean_reply_logprobs(model, tokenizer, prompts, aligned,
                                                     progress=progress)
        rows = compliance.score_replies(aligned, base, aligned_lp, base_lp)
        out[name] = {"refusal": float(np.mean([compliance.is_refusal(a) for a in aligned])),
                     "base_refusal": float(np.mean([compliance.is_refusal(b) for b in base])),
                     **compliance.summary(rows)}
    return out


def adapter_folder(name: str = NAME) -> Path:
    """The committed adapter entry."""
    return checkpoints.checkpoint_root() / "real" / name


def adapter_config(recipe: AlignmentRecipe) -> dict:
    """The adapter's cache key: the recipe, the base model's provenance and the data's."""
    return {"recipe": asdict(recipe), "base": real_models.spec(recipe.base).config(),
            "prompts": safety_data.PROVENANCE,
            "benign_sha256": hashlib.sha256(safety_data.BENIGN_FILE.read_bytes()).hexdigest()}


def build_adapter(recipe: AlignmentRecipe = AlignmentRecipe(), progress: bool = True) -> Path:
    """Train the adapter from the base model, evaluate it on the test splits (the search split
    is left to the circuit searches) and write it, with its numbers and build time, to
    ``adapter_folder``."""
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(real_models.folder(recipe.base))
    data = alignment_data(model, tokenizer, recipe, progress)
    adapted, losses = train_adapter(model, tokenizer, data, recipe, progress)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(adapted, tokenizer, data, recipe, "test", progress)
    extra = {"train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
             "final_loss": float(np.mean(losses[-10:])), "first_loss": losses[0],
             "base_benign_accuracy": data.base_benign_accuracy,
             "sizes": {f"harmful_{k}": len(v) for k, v in data.harmful.items()}
             | {f"benign_{k}": len(v) for k, v in data.benign.items()},
             "metrics": metrics, "eval_seconds": round(time.perf_counter() - start
                                                       - train_seconds, 1)}
    return checkpoints.write_entry(adapter_folder(), adapter_config(recipe),
                                   lambda tmp: adapted.save_pretrained(tmp), extra)


def folder(name: str = NAME, recipe: AlignmentRecipe = AlignmentRecipe()) -> Path:
    """The merged aligned model in the user cache, rebuilt from the committed adapter when it is
    missing, stale or corrupt (the adapter is trained first, saying so, when it is missing)."""
    config = adapter_config(recipe)
    adapter = adapter_folder(name)
    if checkpoints.entry_status(adapter, config) != "valid":
        print(f"[locus] {name}: no valid adapter in {adapter}; training it (about 30 min on "
              "2 cores)", file=sys.stderr)
        build_adapter(recipe)
    target = real_models.models_root() / name
    merged_config = config | {"adapter_key": checkpoints.read_manifest(adapter)["key"]}
    if checkpoints.entry_status(target, merged_config) != "valid":
        base, tokenizer = load_checkpoint(real_models.folder(recipe.base))
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()

        def write(tmp: Path) -> None:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        checkpoints.write_entry(target, merged_config, write)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Train {NAME}'s LoRA adapter, merge it.")
    parser.add_argument("--build", action="store_true", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = build_adapter()
    record = checkpoints.read_manifest(adapter)
    print({k: record[k] for k in ("train_seconds", "eval_seconds", "sizes", "metrics")})
    print(f"merged: {folder()}")


if __name__ == "__main__":
    main()
