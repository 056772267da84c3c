"""``smol-llava``: a real ``LlavaForConditionalGeneration`` whose decoder is the real, cached
SmolLM2-135M-Instruct (``real_models``), with a CLIP vision tower and LLaVA-1.5's 2-layer GELU
MLP projector trained here on the toy world, in LLaVA's prompt order (the image before the
question), through SmolLM2's own chat format and a real ``LlavaProcessor``.

``build`` assembles the untrained model: SmolLM2's decoder and tied LM head bit for bit, a fresh
tower (32x32 images, patch 8: 16 visual tokens + CLS) and projector (64 -> 576 -> 576). The image
placeholder is one of SmolLM2's reserved special tokens (``IMAGE_TOKEN``), so the vocabulary and
every decoder weight stay the base's (its embedding row is never read: LLaVA writes the projected
patches over it). The processor's chat template is SmolLM2's with a short default system message
(``SmolLlavaRecipe.system``: the base's default one is 20 tokens longer) and image parts before
text parts; for a text-only conversation with a system message it renders exactly as SmolLM2's.

Training (``train``), LLaVA's stages, every step teacher-forced on pre-encoded pools: (0) the
tower alone learns each cell's colour, shape and place (``training.pretrain_vision_tower``, as
toy-vlm's), then stays frozen, so its patch features are computed once for the whole pool;
(1) projector alignment, the decoder frozen; (2) instruction tuning of the projector and a LoRA
adapter (``peft``) on the decoder's attention. Logits are computed only at the answer positions
(``answer_loss``: the decoder body on the spliced embeddings, the LM head on the last ``keep``
positions), under bfloat16 autocast (measured: 2x faster than float32 on this CPU; pure
bfloat16 weights were slower). The pool (``pools``) is split by image into training and
validation; the held-out test images (``HELD_OUT_SEED``) are a seed no pool uses, checked
disjoint. The step is chosen on the VALIDATION split by a rule fixed before measuring: every
``eval_every`` steps of stage 2 the teacher-forced exact match per family (``exact_by_family``:
every answer token and the end-of-turn token are the argmax, which is what greedy decoding
reproduces) is measured; training stops at the first check whose every family reaches
``min_val_accuracy``, else the check with the best mean over families is kept (``fallback``;
the first build kept the best worst family, which a family stuck at chance turns into noise).
``evaluate`` then scores the merged float32 model on the held-out images by greedy generation
and exact match, per family with Wilson intervals, and the controls that show it reads the
image: the same visual questions with a blank image and with another sample's image, beside each
family's majority-answer rate.

The small trained parts (tower + projector, adapter) are a ``locus.checkpoints`` entry committed
in ``checkpoints/real/smol-llava`` with the recipe, hashes, numbers and build time; ``folder``
merges them into the cached base in the user cache (``<cache>/models/smol-llava``) in seconds,
never training. ``python -m locus.smol_llava --build`` rebuilds the parts (60 min on one thread
of a shared machine, load about 3: run it under ``nice``); it is deterministic (a rebuilt tower is
bit-identical to the committed one, and two short runs of every stage give identical parts).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from locus import checkpoints, data, real_models, replies, splits, stats, training
from locus.data import VQASample
from locus.evaluation import exact_match, generate_answers
from locus.models import IMAGE_MEAN, IMAGE_STD
from locus.prompts import vqa_prompt

NAME = "smol-llava"
IMAGE_TOKEN = "<empty_output>"  # a reserved special token of SmolLM2's vocabulary, unused in text
PARTS_FILE = "tower_projector.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
HELD_OUT_SEED = 10_000  # the zoo's held-out seed of the toy world (``zoo.HELD_OUT_SEED``)
VISUAL_FAMILIES = ("existence", "attribute", "counting", "spatial", "caption")


@dataclass(frozen=True)
class SmolLlavaRecipe:
    """Everything that makes smol-llava (its cache key)."""

    base: str = "smollm2-135m-instruct"
    system: str = "Answer briefly."
    vision_width: int = 64  # toy-vlm's tower
    vision_layers: int = 2
    vision_heads: int = 4
    seed: int = 0
    tower_pool: int = 4000  # captioned images of the tower's pre-training
    tower_steps: int = 300
    tower_batch: int = 128
    tower_lr: float = 3e-3
    pool_seed: int = 102  # the training + validation images (toy-vlm's pools: seeds 1, 2)
    pool_per_family: int = 1500
    val_fraction: float = 0.04  # of the pool's images, the validation split
    family_weights: tuple[tuple[str, float], ...] = training.VLMTraining().family_weights
    batch_size: int = 16
    align_steps: int = 150  # stage 1: projector only, decoder frozen
    align_lr: float = 2e-3
    tune_steps: int = 1000  # stage 2: projector + LoRA
    tune_lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    eval_every: int = 100
    min_val_accuracy: float = 0.95  # the step rule's bar, every family (validation split)
    fallback: str = "mean"  # no check meets the bar: keep the best "mean" or "worst" family
    compute_dtype: str = "bfloat16"  # autocast of the training steps and validation checks

    def __post_init__(self) -> None:
        if self.fallback not in ("mean", "worst"):
            raise ValueError(f"fallback must be 'mean' or 'worst', got {self.fallback!r}")


def recipe_from(config: dict) -> SmolLlavaRecipe:
    """The recipe a manifest stores (JSON lists back to tuples)."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return SmolLlavaRecipe(**{f.name: tup(config[f.name]) for f in fields(SmolLlavaRecipe)})


def chat_template(system: str) -> str:
    """SmolLM2's chat template with ``system`` as the default system message and a message's
    image parts (the image token) before its text parts, as LLaVA-1.5 orders them."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "{{ '" + IMAGE_TOKEN + "\\n' }}{% endif %}{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def build_processor(tokenizer, recipe: SmolLlavaRecipe) -> LlavaProcessor:
    """A ``LlavaProcessor`` around SmolLM2's tokenizer (left padding, the recipe's template)."""
    template = chat_template(recipe.system)
    tokenizer.chat_template = template
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=data.CELL, vision_feature_select_strategy="default",
                          chat_template=template, num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def build(recipe: SmolLlavaRecipe = SmolLlavaRecipe()
          ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained smol-llava and its processor: the cached base's decoder and LM head
    (bit-identical), a fresh tower and projector (seeded by ``recipe.seed``)."""
    base_folder = real_models.folder(recipe.base)
    lm = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_width, intermediate_size=2 * recipe.vision_width,
        num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
        image_size=data.IMAGE_SIZE, patch_size=data.CELL)
    config = LlavaConfig(vision_config=vision, text_config=lm.config,
                         image_token_id=image_token_id, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    training.seed_everything(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    model.generation_config = lm.generation_config
    return model.eval(), build_processor(tokenizer, recipe)


@dataclass
class Pool:
    """Samples encoded once: left-padded prompt + answer ids (``replies.cut`` format), the
    frozen tower's patch features, and each sample's family."""

    samples: list[VQASample]
    batch: dict[str, torch.Tensor]
    features: torch.Tensor  # (samples, patches, tower width)
    families: list[str]


def image_key(sample: VQASample) -> str:
    """A sample's image, as the group of the splits by image."""
    return hashlib.sha256(np.ascontiguousarray(sample.image).tobytes()).hexdigest()


def pools(recipe: SmolLlavaRecipe) -> dict[str, list[VQASample]]:
    """The training and validation samples (the pool split by image, seeded) and the held-out
    test samples (``HELD_OUT_SEED``), checked disjoint by image."""
    pool = data.make_vqa_samples(recipe.pool_per_family, recipe.pool_seed)
    train, val = splits.split_by_group(pool, image_key, (1 - recipe.val_fraction,
                                                         recipe.val_fraction), recipe.seed)
    out = {"train": train, "val": val, "test": held_out(200)}
    splits.assert_disjoint(out, image_key)
    return out


def held_out(n_per_family: int) -> list[VQASample]:
    """The toy world's held-out samples (the zoo's: ``zoo.held_out_samples("vlm")``)."""
    return data.make_vqa_samples(n_per_family, HELD_OUT_SEED)


@torch.no_grad()
def tower_features(model, processor, images: Sequence[np.ndarray], batch_size: int = 512
                   ) -> torch.Tensor:
    """The frozen tower's patch features (CLS dropped, the layer LLaVA selects) of ``images``."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(list(images[start:start + batch_size]),
                                           return_tensors="pt")["pixel_values"]
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states[layer]
        out.append(hidden[:, 1:])
    return torch.cat(out)


def encode_answers(processor, samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
    """Left-padded prompt + answer + end-of-turn sequences, labels at the answer tokens only,
    in ``replies.encode_replies``'s format (``keep``: the final positions carrying answers)."""
    tokenizer = processor.tokenizer
    prompts = [vqa_prompt(processor, s.question) for s in samples]
    heads = processor(text=prompts, images=[s.image for s in samples])["input_ids"]
    rows, tails = [], []
    for head, s in zip(heads, samples, strict=True):
        tail = tokenizer(s.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(list(head) + tail)
        tails.append(len(tail))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, tails, strict=True)):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
        labels[i, width - n:] = ids[i, width - n:]
    keep = max(tails) + 1
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0), "labels": labels[:, -keep:],
            "keep": torch.tensor(keep)}


def encode_pool(model, processor, samples: Sequence[VQASample]) -> Pool:
    """``samples`` encoded once, with the frozen tower's features."""
    return Pool(list(samples), encode_answers(processor, samples),
                tower_features(model, processor, [s.image for s in samples]),
                [s.family for s in samples])


def answer_logits(model, batch: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Logits at the last ``keep`` positions only: the projected ``features`` spliced into the
    token embeddings at the image tokens, the decoder body over the sequence, the LM head on
    the answer positions alone (what the full forward pass gives there)."""
    inner = model.model
    ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    projected = inner.multi_modal_projector(features.to(embeds.dtype))
    where = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(where, projected.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"]).last_hidden_state
    return model.lm_head(hidden[:, -int(batch["keep"]):])


def answer_loss(model, batch: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each sample's answer tokens, then over samples."""
    logits = answer_logits(model, batch, features)[:, :-1].float()
    targets = batch["labels"][:, 1:]
    per_token = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                            ignore_index=-100, reduction="none")
    per_token = per_token.view_as(targets)
    counts = (targets != -100).sum(1).clamp(min=1)
    return (per_token.sum(1) / counts).mean()


def _autocast(recipe: SmolLlavaRecipe):
    return torch.autocast("cpu", dtype=getattr(torch, recipe.compute_dtype),
                          enabled=recipe.compute_dtype != "float32")


@torch.no_grad()
def exact_by_family(model, pool: Pool, recipe: SmolLlavaRecipe, batch_size: int = 32
                    ) -> dict[str, float]:
    """Teacher-forced exact match per family: a sample counts when every answer token and the
    end-of-turn token are the argmax given the tokens before (so greedy decoding says exactly
    the answer); one forward pass a batch, logits at the answer positions only."""
    model.eval()
    hits = []
    for start in range(0, len(pool.samples), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(pool.samples)))
        part = replies.cut(pool.batch, rows)
        with _autocast(recipe):
            logits = answer_logits(model, part, pool.features[rows])[:, :-1]
        targets = part["labels"][:, 1:]
        right = (logits.argmax(-1) == targets) | (targets == -100)
        hits += right.all(1).tolist()
    return {f: float(np.mean([h for h, g in zip(hits, pool.families, strict=True) if g == f]))
            for f in dict.fromkeys(pool.families)}


def weighted_batches(pool: Pool, recipe: SmolLlavaRecipe, seed: int):
    """A batch function for ``training.train_steps``: ``batch_size`` rows drawn with replacement,
    each family with probability proportional to its weight (seeded), cut from the pool."""
    weights = dict(recipe.family_weights)
    probs = np.array([weights.get(f, 1.0) for f in pool.families])
    probs = probs / probs.sum()
    rng = np.random.default_rng(seed)

    def batch(step: int) -> dict:
        rows = torch.as_tensor(rng.choice(len(pool.families), size=recipe.batch_size, p=probs))
        return replies.cut(pool.batch, rows) | {"features": pool.features[rows]}

    return batch


def _loss_fn(recipe: SmolLlavaRecipe, losses: list[float]):
    def loss(model, batch: dict) -> torch.Tensor:
        with _autocast(recipe):
            value = answer_loss(model, batch, batch["features"])
        losses.append(value.item())
        return value

    return loss


def lora_config(recipe: SmolLlavaRecipe) -> LoraConfig:
    """The adapter's shape: the decoder's attention projections (not the tower's)."""
    names = "|".join(recipe.target_modules)
    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                      target_modules=rf".*language_model.*\.({names})", bias="none")


def _worst(check: dict) -> float:
    return min(v for k, v in check.items() if k != "step")


def _mean(check: dict) -> float:
    values = [v for k, v in check.items() if k != "step"]
    return sum(values) / len(values)


FALLBACKS = {"worst": _worst, "mean": _mean}


class _TargetsMet(Exception):
    """Raised by the step rule's callback to stop at the first good validation check."""


def train(model, processor, recipe: SmolLlavaRecipe, samples: dict[str, list[VQASample]],
          progress: bool = True) -> tuple[PeftModel, dict]:
    """LLaVA's stages on ``samples`` ("train", "val"); returns the model with its adapter (the
    checkpoint the step rule keeps) and the record: losses, validation checks, chosen step."""
    log = print if progress else (lambda *a, **k: None)
    start = time.perf_counter()
    tower_cfg = training.VLMTraining(seed=recipe.seed, pool_per_family=recipe.tower_pool,
                                     vision_steps=recipe.tower_steps,
                                     vision_batch=recipe.tower_batch, vision_lr=recipe.tower_lr)
    tower_losses = training.pretrain_vision_tower(model, processor, tower_cfg, progress)
    model.requires_grad_(False)
    seconds = {"tower": time.perf_counter() - start}
    train_pool = encode_pool(model, processor, samples["train"])
    val_pool = encode_pool(model, processor, samples["val"])
    seconds["encode"] = time.perf_counter() - start - seconds["tower"]
    projector = list(model.model.multi_modal_projector.parameters())
    for p in projector:
        p.requires_grad_(True)
    align_losses: list[float] = []
    training.train_steps(model, projector, weighted_batches(train_pool, recipe, recipe.seed),
                         recipe.align_steps, recipe.align_lr, desc="align (projector)",
                         loss_fn=_loss_fn(recipe, align_losses), progress=progress)
    aligned = exact_by_family(model, val_pool, recipe)
    log(f"[smol-llava] after alignment (decoder frozen): validation {aligned}", file=sys.stderr)
    seconds["align"] = time.perf_counter() - start - seconds["tower"] - seconds["encode"]
    training.seed_everything(recipe.seed + 1)
    adapted = get_peft_model(model, lora_config(recipe))  # injects LoRA into ``model`` in place
    for p in projector:
        p.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tune_losses: list[float] = []
    checks: list[dict] = []
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def check(step: int) -> None:
        found = exact_by_family(model, val_pool, recipe)
        checks.append(found | {"step": step})
        saved[step] = {n: p.detach().clone() for n, p in params.items()}
        log(f"[smol-llava] step {step}: validation {found}", file=sys.stderr)
        if _worst(found) >= recipe.min_val_accuracy:
            raise _TargetsMet

    try:
        training.train_steps(model, list(params.values()),
                             weighted_batches(train_pool, recipe, recipe.seed + 1),
                             recipe.tune_steps, recipe.tune_lr, desc="tune (projector + LoRA)",
                             loss_fn=_loss_fn(recipe, tune_losses), progress=progress,
                             callback=check, callback_every=recipe.eval_every)
    except _TargetsMet:
        pass
    chosen = max(checks, key=lambda c: (_worst(c) >= recipe.min_val_accuracy,
                                        -c["step"] if _worst(c) >= recipe.min_val_accuracy
                                        else FALLBACKS[recipe.fallback](c)))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[chosen["step"]][n])
    model.eval()
    seconds["tune"] = time.perf_counter() - start - sum(seconds.values())
    return adapted, {"tower_losses": tower_losses[::10], "align_losses": align_losses,
                     "tune_losses": tune_losses, "validation_after_alignment": aligned,
                     "validation_checks": checks, "chosen_step": chosen["step"],
                     "targets_met_on_validation": _worst(chosen) >= recipe.min_val_accuracy,
                     "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
                     "sizes": {k: len(v) for k, v in samples.items()}}


def blank_image(rng: np.random.Generator) -> np.ndarray:
    """An image of the toy world with no object (its noisy background alone)."""
    return data.draw_scene(data.Scene([]), rng)


def _scored(model, processor, samples: Sequence[VQASample], progress: bool, desc: str
            ) -> list[bool]:
    tokenizer = processor.tokenizer
    longest = max(len(tokenizer(s.answer, add_special_tokens=False).input_ids) for s in samples)
    said = generate_answers(model, processor, samples, batch_size=64,
                            max_new_tokens=longest + 2, progress=progress, desc=desc)
    return [exact_match(p, s.answer) for p, s in zip(said, samples, strict=True)]


def evaluate(model, processor, samples: Sequence[VQASample], n_control: int = 100,
             seed: int = 0, progress: bool = True) -> dict:
    """Greedy exact match per family on ``samples`` (Wilson intervals), and for the visual
    families, on their first ``n_control`` samples: the same questions with a blank image and
    with the next sample's image (shuffled), beside the family's majority-answer rate."""
    out: dict = {}
    rng = np.random.default_rng(seed)
    for family in dict.fromkeys(s.family for s in samples):
        chosen = [s for s in samples if s.family == family]
        scored = _scored(model, processor, chosen, progress, family)
        out[family] = {"accuracy": stats.rate_record(scored)}
        if family not in VISUAL_FAMILIES:
            continue
        asked = chosen[:n_control]
        blank = [replace(s, image=blank_image(rng)) for s in asked]
        shuffled = [replace(s, image=asked[(i + 1) % len(asked)].image)
                    for i, s in enumerate(asked)]
        answers = [s.answer for s in asked]
        out[family] |= {
            "blank_image": stats.rate_record(
                _scored(model, processor, blank, progress, f"{family} blank")),
            "shuffled_image": stats.rate_record(
                _scored(model, processor, shuffled, progress, f"{family} shuffled")),
            "majority_answer_rate": max(answers.count(a) for a in set(answers)) / len(answers)}
    return out


def parts_folder() -> Path:
    """The committed parts' entry."""
    return checkpoints.checkpoint_root() / "real" / NAME


def parts_config(recipe: SmolLlavaRecipe) -> dict:
    """The parts' cache key: the recipe, the base model's provenance and the toy world."""
    return {"recipe": asdict(recipe), "base": real_models.spec(recipe.base).config(),
            "world": data.world_vocabulary()}


def small_parts(model) -> dict[str, torch.Tensor]:
    """The tower's and projector's weights (what the parts file holds)."""
    inner = model.model
    return ({f"vision_tower.{k}": v for k, v in inner.vision_tower.state_dict().items()}
            | {f"multi_modal_projector.{k}": v
               for k, v in inner.multi_modal_projector.state_dict().items()})


def load_small_parts(model, tensors: dict[str, torch.Tensor]) -> None:
    """Put the parts file's tower and projector weights into ``model``."""
    inner = model.model
    for prefix, module in (("vision_tower.", inner.vision_tower),
                           ("multi_modal_projector.", inner.multi_modal_projector)):
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)}, strict=True)


def build_parts(recipe: SmolLlavaRecipe = SmolLlavaRecipe(), progress: bool = True) -> Path:
    """Assemble, train with the step rule, evaluate the merged model on the held-out images
    and write the parts, with their numbers, timings and the machine's load, to
    ``parts_folder``."""
    start, load_before = time.perf_counter(), os.getloadavg()
    model, processor = build(recipe)
    samples = pools(recipe)
    adapted, record = train(model, processor, recipe, samples, progress)
    train_seconds = time.perf_counter() - start
    staged = Path(tempfile.mkdtemp(prefix=f"{NAME}-parts-"))
    adapted.save_pretrained(staged)
    (staged / "README.md").unlink(missing_ok=True)  # peft's empty model card
    save_file({k: v.contiguous() for k, v in small_parts(model).items()}, staged / PARTS_FILE)

    def write(tmp: Path) -> None:
        for path in staged.iterdir():
            shutil.copy2(path, tmp / path.name)

    merged = adapted.merge_and_unload().eval()  # the served model: the adapter merged
    metrics = evaluate(merged, processor, samples["test"], progress=progress)
    extra = {"build_seconds": round(time.perf_counter() - start, 1),
             "train_seconds": round(train_seconds, 1),
             "eval_seconds": round(time.perf_counter() - start - train_seconds, 1),
             "threads": torch.get_num_threads(),
             "load_average": {"start": load_before, "end": os.getloadavg()},
             "parameters": sum(p.numel() for p in merged.parameters()), **record,
             "metrics": metrics}
    try:
        return checkpoints.write_entry(parts_folder(), parts_config(recipe), write, extra)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def verified_parts() -> dict:
    """The committed parts' manifest, their files checked against its hashes; missing or
    corrupt parts are an error naming the command that builds them."""
    folder_ = parts_folder()
    hint = "rebuild them with `python -m locus.smol_llava --build` (about an hour on one core)"
    if not (folder_ / checkpoints.MANIFEST).is_file():
        raise FileNotFoundError(f"{NAME}: no trained parts in {folder_}; {hint}")
    record = checkpoints.read_manifest(folder_)
    if checkpoints.entry_status(folder_, record["config"]) != "valid":
        raise ValueError(f"{NAME}: the parts in {folder_} do not match their manifest's "
                         f"hashes (corrupt); {hint}")
    return record


def parts_status(recipe: SmolLlavaRecipe = SmolLlavaRecipe()) -> str:
    """Whether the committed parts were built by ``recipe`` ("valid") or are "missing",
    "stale" or "corrupt"."""
    return checkpoints.entry_status(parts_folder(), parts_config(recipe))


def assemble(record: dict) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained smol-llava from verified parts: ``build`` by their recipe, the tower and
    projector loaded, the adapter merged into the decoder (no training)."""
    model, processor = build(recipe_from(record["config"]["recipe"]))
    load_small_parts(model, load_file(parts_folder() / PARTS_FILE))
    merged = PeftModel.from_pretrained(model, parts_folder()).merge_and_unload()
    return merged.eval(), processor


def folder(root: str | os.PathLike | None = None) -> Path:
    """The merged smol-llava in ``real_models.models_root(root)`` (the user cache), merged from
    the committed parts (verified by hash, seconds) when it is missing, stale or corrupt."""
    record = verified_parts()
    base = record["config"]["recipe"]["base"]
    config = {"parts_key": record["key"], "parts_files": record["files"],
              "base": real_models.spec(base).config()}
    target = real_models.models_root(root) / NAME
    status = checkpoints.entry_status(target, config)
    if status != "valid":
        print(f"[locus] {NAME}: the merged model in {target} is {status}; merging it from the "
              f"committed parts {parts_folder()} (seconds)", file=sys.stderr)
        model, processor = assemble(record)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        checkpoints.write_entry(target, config, write)
    return target


def provenance() -> dict:
    """Where smol-llava comes from, for notebooks to show: the base's provenance, the recipe,
    the parts' key and hashes, the chosen step, the build time and the held-out numbers."""
    record = verified_parts()
    keys = ("chosen_step", "targets_met_on_validation", "build_seconds", "threads",
            "load_average", "stage_seconds", "sizes", "parameters", "metrics")
    return {"recipe": record["config"]["recipe"], "parts_key": record["key"],
            "parts_sha256": record["files"], "parts_up_to_date": parts_status() == "valid",
            "merged_folder": str(folder()),
            "base": real_models.provenance(record["config"]["recipe"]["base"]),
            **{k: record.get(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Train {NAME}'s small parts, merge them.")
    parser.add_argument("--build", action="store_true", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = checkpoints.read_manifest(build_parts())
    print({k: record[k] for k in ("build_seconds", "chosen_step", "stage_seconds", "metrics")})
    print(f"merged: {folder()}")


if __name__ == "__main__":
    main()
