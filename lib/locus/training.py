"""Deterministic training of the embedded toy models.

The toy VLM follows LLaVA's stages, shrunk: (1) the vision tower alone learns to name the colour
and shape in each image cell, (2) the whole model is instruction-tuned on every question family.
The toy chat LM is first trained 'unaligned' (it complies with harmful requests — the capability
alignment hides), then aligned to refuse them while keeping its benign answers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # text bars: no ipywidgets needed in Jupyter or papermill

from locus import data
from locus.prompts import encode_chat, encode_vqa


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sampled_batches(samples: Sequence, batch_size: int, seed: int,
                    encode: Callable[[list], dict]) -> Callable[[int], dict]:
    """A batch function for ``train_steps``: ``batch_size`` samples drawn uniformly with
    replacement by a generator seeded with ``seed``, then ``encode``d (and moved, if ``encode``
    does so). Encoding per batch keeps memory flat for large images."""
    rng = np.random.default_rng(seed)

    def batch(step: int) -> dict:
        return encode([samples[i] for i in rng.integers(len(samples), size=batch_size)])

    return batch


def cosine_schedule(optimizer, steps: int, warmup: float = 0.05):
    """Linear warm-up then cosine decay to zero, as a LambdaLR."""
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Callable[[int], dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    desc: str = "train",
    weight_decay: float = 0.0,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    progress: bool = True,
    callback: Callable[[int], bool | None] | None = None,
    callback_every: int = 0,
) -> list[float]:
    """Run ``steps`` AdamW steps on ``params``; ``batches(step)`` gives each batch and
    ``callback(step)`` (if given) runs every ``callback_every`` steps, e.g. to evaluate; when
    it returns True, training stops there (an early-stopping rule). Returns the loss of every
    step."""
    params = [p for p in params if p.requires_grad]
    torch.set_flush_denormal(True)  # denormal Adam moments otherwise slow CPU steps ~10x
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = cosine_schedule(optimizer, steps)
    compute = loss_fn or (lambda m, b: m(**b).loss)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2)
    for step in bar:
        loss = compute(model, batches(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            if callback(step + 1):
                break
            model.train()
    model.eval()
    return losses


@dataclass(frozen=True)
class VLMTraining:
    """Hyper-parameters of the toy VLM's two stages."""

    seed: int = 0
    pool_per_family: int = 4000
    vision_steps: int = 300
    vision_batch: int = 128
    vision_lr: float = 3e-3
    tune_steps: int = 2500
    tune_batch: int = 64
    tune_lr: float = 1.5e-3
    per_sample_loss: bool = False  # False: the model's own token-mean loss
    family_weights: tuple[tuple[str, float], ...] = (
        ("existence", 2.0), ("spatial", 3.0), ("attribute", 1.5), ("counting", 1.5),
        ("text", 0.5), ("harmful", 0.25), ("caption", 1.0),
    )


@dataclass(frozen=True)
class ChatTraining:
    """Hyper-parameters of the toy chat LM's pre-training and alignment."""

    seed: int = 0
    pool_per_family: int = 3000
    base_steps: int = 1200
    align_steps: int = 400
    batch: int = 64
    lr: float = 2e-3
    align_lr: float = 5e-4


def _cell_targets(samples: Sequence[data.VQASample]) -> dict[str, torch.Tensor]:
    """Per-cell class labels (0 = empty cell): colour, shape, and the colour-shape pair."""
    n_cells = data.GRID * data.GRID
    targets = {k: torch.zeros(len(samples), n_cells, dtype=torch.long)
               for k in ("colour", "shape", "pair")}
    colour_ids = {c: i for i, c in enumerate(data.COLOURS)}
    shape_ids = {s: i for i, s in enumerate(data.SHAPES)}
    for i, s in enumerate(samples):
        for row, col, colour, shape in s.meta["objects"]:
            cell = row * data.GRID + col
            targets["colour"][i, cell] = colour_ids[colour] + 1
            targets["shape"][i, cell] = shape_ids[shape] + 1
            targets["pair"][i, cell] = colour_ids[colour] * len(data.SHAPES) + shape_ids[shape] + 1
    return targets


def pretrain_vision_tower(model, processor, cfg: VLMTraining, progress: bool = True) -> list[float]:
    """Stage 1: the CLIP tower learns to name each cell's colour, shape, colour-shape pair and
    grid position (linear probes on its patch outputs, thrown away afterwards), so that each
    visual token carries its object's identity and place in linearly readable form."""
    seed_everything(cfg.seed)
    samples = data.make_vqa_samples(cfg.pool_per_family, cfg.seed + 1, ("caption",))
    pixels = encode_vqa(processor, samples)["pixel_values"]
    targets = _cell_targets(samples)
    cells = torch.arange(data.GRID * data.GRID)
    targets["row"] = (cells // data.GRID).expand(len(samples), -1)
    targets["col"] = (cells % data.GRID).expand(len(samples), -1)
    classes = {"colour": len(data.COLOURS) + 1, "shape": len(data.SHAPES) + 1,
               "pair": len(data.COLOURS) * len(data.SHAPES) + 1, "row": data.GRID,
               "col": data.GRID}
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in classes.items()})
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch(step: int) -> dict:
        idx = torch.randint(len(samples), (cfg.vision_batch,), generator=gen)
        return {"pixels": pixels[idx], **{k: v[idx] for k, v in targets.items()}}

    def loss(_, b: dict) -> torch.Tensor:
        patches = tower(pixel_values=b["pixels"]).last_hidden_state[:, 1:]
        return sum(nn.functional.cross_entropy(head(patches).flatten(0, 1), b[k].flatten())
                   for k, head in heads.items())

    params = list(tower.parameters()) + list(heads.parameters())
    return train_steps(tower, params, batch, cfg.vision_steps, cfg.vision_lr,
                       desc="vision tower", loss_fn=loss, progress=progress)


def per_sample_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy averaged over each sample's answer tokens, then over samples,
    so that a one-word answer weighs as much as a long caption."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    targets = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)
    counts = (targets != -100).sum(1).clamp(min=1)
    return (token_loss.sum(1) / counts).mean()


def weighted_batches(samples: Sequence, batch_size: int, seed: int, encode: Callable,
                      family_weights: dict[str, float] | None = None):
    """A batch function drawing ``batch_size`` samples at random from the pool, each family
    with probability proportional to its weight (1 when not named). The pool is encoded once
    (right-padded); each batch is cut to its own longest sequence."""
    gen = np.random.default_rng(seed)
    weights = np.array([(family_weights or {}).get(s.family, 1.0) for s in samples])
    probs = weights / weights.sum()
    pool = encode(samples)
    lengths = pool["attention_mask"].sum(1)

    def batch(step: int) -> dict:
        idx = torch.as_tensor(gen.choice(len(samples), size=batch_size, p=probs))
        width = int(lengths[idx].max())
        return {k: v[idx, :width] if v.dim() == 2 else v[idx] for k, v in pool.items()}

    return batch


def instruction_tune_vlm(model, processor, cfg: VLMTraining, progress: bool = True,
                         **callback) -> list[float]:
    """Stage 2: projector and language model learn every question family; the pretrained
    vision tower stays frozen, as in LLaVA (``callback``/``callback_every`` as in
    ``train_steps``)."""
    seed_everything(cfg.seed)
    samples = data.make_vqa_samples(cfg.pool_per_family, cfg.seed + 2)
    batches = weighted_batches(samples, cfg.tune_batch, cfg.seed,
                                lambda b: encode_vqa(processor, b, with_answers=True),
                                dict(cfg.family_weights))
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    return train_steps(model, params, batches, cfg.tune_steps, cfg.tune_lr,
                       desc="instruction tuning",
                       loss_fn=per_sample_lm_loss if cfg.per_sample_loss else None,
                       progress=progress, **callback)


def pretrain_chat(model, tokenizer, cfg: ChatTraining, progress: bool = True) -> list[float]:
    """The unaligned chat LM: benign requests answered, harmful requests complied with."""
    seed_everything(cfg.seed)
    base = data.make_chat_samples(cfg.pool_per_family, cfg.seed + 1, aligned=False,
                                  split="train")
    batches = weighted_batches(base, cfg.batch, cfg.seed,
                                lambda b: encode_chat(tokenizer, b, with_answers=True))
    return train_steps(model, list(model.parameters()), batches, cfg.base_steps, cfg.lr,
                       desc="chat pre-training", loss_fn=per_sample_lm_loss, progress=progress)


def align_chat(model, tokenizer, cfg: ChatTraining, progress: bool = True) -> list[float]:
    """Alignment: harmful requests now get the refusal; benign answers are kept."""
    seed_everything(cfg.seed + 1)
    align = data.make_chat_samples(cfg.pool_per_family, cfg.seed + 2, aligned=True,
                                   split="train")
    batches = weighted_batches(align, cfg.batch, cfg.seed + 1,
                                lambda b: encode_chat(tokenizer, b, with_answers=True))
    return train_steps(model, list(model.parameters()), batches, cfg.align_steps, cfg.align_lr,
                       desc="chat alignment", loss_fn=per_sample_lm_loss, progress=progress)


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """Call ``fn`` and return its result with the wall time in seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
