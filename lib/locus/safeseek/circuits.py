"""SafeSeek: finding a circuit by optimising unit masks, its baselines, and its evaluation.

Objectives (each owns its ``UnitMask``s and returns a total loss and a *task* loss, the part
that picks the best epoch on validation data):

- ``FaithfulnessObjective`` (the paper): KL(p(y|x; full) || p(y|x; circuit only)) on the answer
  tokens plus a sparsity term on the circuit (L1 of the soft gates, or the expected L0 norm);
  the circuit starts as the whole model and shrinks.
- ``AlignmentObjective`` (the authors' code): with the circuit removed the model must comply with
  a harmful request, with only the circuit kept it must refuse; plus the circuit's size.
  The circuit starts empty and grows. Weights 2 / 2 / 0.1 as in the code.
- ``BackdoorObjective`` (the authors' code): two mask sets. The *removed* set is the backdoor
  circuit: with it removed (the authors' "main" path) the model gives clean answers on clean and
  triggered prompts; the *carrier* set, with only it kept, produces the backdoor output on
  triggered prompts and not on clean ones; an overlap penalty keeps the carrier out of the main
  path. Sizes are penalised (removed set 0.1, carrier 1.0).

``search_circuit`` trains the mask logits only (AdamW, lr 1e-2), the model frozen, until the
circuit's size has settled (``SearchConfig``), then anneals the learning rate and keeps the
anneal's epoch with the best validation task loss. Baselines: ``random_circuit`` (same size) and
``top_k_circuit`` over ``attribution_scores`` (gradient x activation on the same units).
Backdoor injection and the backdoor circuit live in ``locus.safeseek.backdoor``, Safety Circuit
Tuning in ``locus.safeseek.circuit_tuning``, the notebooks' data splits, tables, verdict rules
and figures in ``locus.safeseek.experiment``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # text bars: no ipywidgets needed in Jupyter or papermill

from locus import checkpoints, data, real_models, splits
from locus.data import ChatSample
from locus.evaluation import generate_answers
from locus.prompts import encode_chat, to_model
from locus.safeseek.masks import UNITS, Circuit, UnitMask, UnitShape, apply_circuit, gated_units

Batch = dict[str, torch.Tensor]
Encoder = Callable[[object, Sequence[ChatSample]], Batch]


def chat_answers(tokenizer, samples: Sequence[ChatSample]) -> Batch:
    """The toy world's teacher-forced encoding: prompt + " answer <eos>" (``encode_chat``)."""
    return encode_chat(tokenizer, samples, True)


# --------------------------------------------------------------------------------------------
# Losses on teacher-forced batches
# --------------------------------------------------------------------------------------------


def _answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, or float64 for a float64 model) at the positions that predict answer
    tokens, and those tokens. A ``locus.replies`` batch (left padded, with ``keep``) gets its
    position ids and logits only at its last ``keep`` positions."""
    logits = _batch_logits(model, batch)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits[:, :-1][keep].to(dtype), labels[keep]


def _batch_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The logits of a teacher-forced batch: every position (``encode_chat``), or the last
    ``keep`` ones of a ``locus.replies.encode_replies`` batch (its labels are as wide)."""
    if "keep" not in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], logits_to_keep=int(batch["keep"])).logits


def answer_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (teacher forced), in float32."""
    logits, targets = _answer_logits(model, batch)
    return nn.functional.cross_entropy(logits, targets)


def answer_unlikelihood(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean -log(1 - p(answer token)): low when the model does *not* say the answer."""
    logits, targets = _answer_logits(model, batch)
    p = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return -torch.log1p(-p.clamp(max=1 - 1e-6)).mean()


def answer_kl(model: nn.Module, batch: Batch, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) averaged over the answer positions (reference from the full
    model on the same batch, as returned by ``_answer_logits``)."""
    logits, _ = _answer_logits(model, batch)
    return nn.functional.kl_div(logits.log_softmax(-1), reference_logits.log_softmax(-1),
                                log_target=True, reduction="batchmean")


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


class Objective(nn.Module):
    """Mask logits and a loss over named batches; ``circuit()`` is the reported circuit."""

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        """(total loss, task loss) on one group of named batches."""
        raise NotImplementedError

    def circuit(self) -> Circuit:
        """The circuit this objective finds."""
        raise NotImplementedError


class FaithfulnessObjective(Objective):
    """The paper: KL(full || circuit only) on batch "task" + ``sparsity`` x circuit size
    (``UnitMask.size(norm)``). ``mask_options`` go to ``UnitMask`` (gate, temperature, units,
    device)."""

    def __init__(self, shape: UnitShape, sparsity: float = 1e-3, norm: str = "sum",
                 init: float = 3.0, **mask_options) -> None:
        super().__init__()
        self.mask = UnitMask(shape, init=init, **mask_options)
        self.sparsity, self.norm = sparsity, norm

    def loss(self, model, batches):
        batch = batches["task"]
        with torch.no_grad():
            reference, _ = _answer_logits(model, batch)
        with apply_circuit(model, self.mask, "circuit only"):
            task = answer_kl(model, batch, reference)
        return task + self.sparsity * self.mask.size(self.norm), task

    def circuit(self) -> Circuit:
        return self.mask.circuit()


class AlignmentObjective(Objective):
    """The authors' alignment objective: ``comply_weight`` x CE(circuit removed, batch "comply")
    + ``refuse_weight`` x CE(circuit only, batch "refuse") + ``sparsity`` x circuit size;
    optionally ``retain_weight`` x CE(circuit removed, batch "retain") to keep benign answers.
    The code's weights are 2 / 2 / 0.1 with ``norm="mean"``."""

    def __init__(self, shape: UnitShape, comply_weight: float = 2.0, refuse_weight: float = 2.0,
                 sparsity: float = 0.1, norm: str = "mean", retain_weight: float = 0.0,
                 init: float = -1.0, **mask_options) -> None:
        super().__init__()
        self.mask = UnitMask(shape, init=init, **mask_options)
        self.weights = {"comply": comply_weight, "refuse": refuse_weight,
                        "retain": retain_weight}
        self.sparsity, self.norm = sparsity, norm

    def loss(self, model, batches):
        with apply_circuit(model, self.mask, "circuit removed"):
            task = self.weights["comply"] * answer_ce(model, batches["comply"])
            if self.weights["retain"]:
                task = task + self.weights["retain"] * answer_ce(model, batches["retain"])
        if self.weights["refuse"]:
            with apply_circuit(model, self.mask, "circuit only"):
                task = task + self.weights["refuse"] * answer_ce(model, batches["refuse"])
        return task + self.sparsity * self.mask.size(self.norm), task

    def circuit(self) -> Circuit:
        return self.mask.circuit()


@dataclass(frozen=True)
class BackdoorWeights:
    """Loss weights of ``BackdoorObjective``; the authors' code uses these with
    ``norm="mean"`` (removed size 0.1, carrier size 1.0)."""

    main_clean: float = 1.0
    main_triggered: float = 1.0
    carrier_triggered: float = 1.0
    carrier_clean: float = 1.0
    removed_size: float = 0.1
    carrier_size: float = 1.0
    overlap: float = 1.0


class BackdoorObjective(Objective):
    """Two mask sets over the same units (see the module docstring). Batches: "clean"
    (clean prompt -> clean answer), "triggered_clean" (triggered prompt -> clean answer),
    "triggered_target" (triggered prompt -> backdoor answer), "clean_target" (clean prompt ->
    backdoor answer). The carrier's "not on clean prompts" term is an unlikelihood loss (the
    code's negated cross-entropy is unbounded). Carrier weights of 0 skip the carrier's passes.
    Initial logits -0.1 / +0.1 (the code's 0.1 on keep-masks): both start near the boundary."""

    def __init__(self, shape: UnitShape, weights: BackdoorWeights = BackdoorWeights(),
                 norm: str = "mean", removed_init: float = -0.1, carrier_init: float = 0.1,
                 carrier_units: tuple[str, ...] = ("heads",), **mask_options) -> None:
        super().__init__()
        self.removed = UnitMask(shape, init=removed_init, **mask_options)
        carrier_options = {**mask_options, "units": carrier_units}
        self.carrier = UnitMask(shape, init=carrier_init, **carrier_options)
        self.weights, self.norm = weights, norm

    def loss(self, model, batches):
        w = self.weights
        with apply_circuit(model, self.removed, "circuit removed"):
            task = (w.main_clean * answer_ce(model, batches["clean"])
                    + w.main_triggered * answer_ce(model, batches["triggered_clean"]))
        penalty = w.removed_size * self.removed.size(self.norm)
        if w.carrier_triggered or w.carrier_clean:
            with apply_circuit(model, self.carrier, "circuit only"):
                task = task + w.carrier_triggered * answer_ce(model, batches["triggered_target"])
                if w.carrier_clean:
                    task = task + w.carrier_clean * answer_unlikelihood(
                        model, batches["clean_target"])
            penalty = (penalty + w.carrier_size * self.carrier.size(self.norm)
                       + w.overlap * self.overlap())
        return task + penalty, task

    def overlap(self) -> torch.Tensor:
        """100 x the share of the main path (units not removed) that the carrier also holds,
        averaged over the carrier's kinds of unit (soft gates), as in the authors' code."""
        ratios = []
        for removed, carrier in zip(self.removed.soft(), self.carrier.soft(), strict=True):
            if removed is None or carrier is None:
                continue
            main = 1.0 - removed
            ratios.append((main * carrier).sum() / (main.sum() + 1e-8))
        if not ratios:
            return torch.zeros((), device=self.removed.head_logits.device)
        return 100.0 * torch.stack(ratios).mean()

    def circuit(self) -> Circuit:
        """The removed set: the units whose ablation takes the backdoor away."""
        return self.removed.circuit()

    def carrier_circuit(self) -> Circuit:
        """The carrier set: the units that alone (with the kinds it does not cover) produce the
        backdoor output."""
        return self.carrier.circuit()


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig:
    """Mask training: AdamW on the mask logits, at most ``epochs`` epochs in all.

    Schedule: the learning rate stays at ``lr`` until the stopping rule is met, then decays
    linearly to 0 over ``anneal`` epochs (the authors' Trainer decays linearly; here the decay
    follows convergence, not the budget). A search whose rule is not met by epoch ``epochs -
    anneal`` anneals over its last ``anneal`` epochs and is reported ``converged=False``.

    Stopping rule (``settled``), judged at the constant learning rate on the hard mask, over
    the epochs since the circuit first left its initial state: the mean number of heads and the
    mean number of neurons in the circuit over the last ``patience`` epochs each differ from
    their means over the ``patience`` epochs before by at most max(1, ``tolerance`` x the recent
    mean): the circuit has stopped growing or shrinking. (A rule on the exact membership cannot
    be met: with straight-through gates and Adam the units at the margin flip in and out at any
    learning rate, so ``search_summary`` counts them instead: ``marginal``.) ``patience`` None:
    the rule is never judged.

    Kept epoch: among the anneal's epochs, the one with the lowest validation task loss
    (``keep="best"``, the authors' rule) or the last one (``keep="last"``: a pure-KL task loss
    is lowest when nothing is pruned, so only the last mask can be sparse)."""

    epochs: int = 300
    lr: float = 1e-2
    seed: int = 0
    patience: int | None = 10
    keep: str = "best"
    anneal: int = 10
    tolerance: float = 0.02


def settled(history: Sequence[dict], start: tuple[int, int], window: int,
            tolerance: float) -> bool:
    """The stopping rule of ``SearchConfig`` on a search's per-epoch sizes (dicts with "heads"
    and "neurons"): over the epochs since the sizes first left ``start`` (heads, neurons before
    training), the mean of each over the last ``window`` epochs is within max(1, ``tolerance``
    x that mean) of its mean over the ``window`` epochs before."""
    moved = [i for i, h in enumerate(history) if (h["heads"], h["neurons"]) != tuple(start)]
    if not moved or len(history) - moved[0] < 2 * window:
        return False
    for kind in ("heads", "neurons"):
        recent = float(np.mean([h[kind] for h in history[-window:]]))
        before = float(np.mean([h[kind] for h in history[-2 * window:-window]]))
        if abs(recent - before) > max(1.0, tolerance * recent):
            return False
    return True


def marginal_units(window: Sequence[Circuit]) -> int:
    """How many heads and neurons are in some but not all of the circuits of ``window``."""
    heads = [set(c.heads) for c in window]
    neurons = [set(c.neurons) for c in window]
    return sum(len(set.union(*sets) - set.intersection(*sets)) for sets in (heads, neurons))


@dataclass(frozen=True)
class MaskSearch(SearchConfig):
    """What every circuit search spec shares: the gate (``gate``), the mask-search data sizes
    (training and validation requests, batch) and the mask training (``SearchConfig``'s
    fields, ``schedule``)."""

    gate: str = "ste"
    n_train: int = 100
    n_val: int = 50
    batch_size: int = 10

    def schedule(self) -> SearchConfig:
        """The mask training of this search."""
        return SearchConfig(**{f.name: getattr(self, f.name) for f in fields(SearchConfig)})


@dataclass
class SearchResult:
    """The circuit of the kept epoch, with the per-epoch history; ``converged`` tells whether
    the stopping rule ended the search (else the epoch cap did), ``rule_epoch`` the epoch it
    was met at (None), ``marginal`` how many units flipped in or out over the ``patience``
    epochs before the anneal (``marginal_units``)."""

    circuit: Circuit
    best_epoch: int
    best_val_task: float
    history: list[dict] = field(default_factory=list)
    converged: bool = False
    rule_epoch: int | None = None
    marginal: int | None = None


def search_circuit(
    model: nn.Module,
    objective: Objective,
    train: Sequence[dict[str, Batch]],
    val: Sequence[dict[str, Batch]],
    cfg: SearchConfig = SearchConfig(),
    progress: bool = True,
) -> SearchResult:
    """Optimise ``objective``'s mask logits on ``train`` (groups of named batches, visited in
    a seeded random order each epoch) with the model frozen, until the stopping rule is met and
    the learning rate annealed (``SearchConfig``); restore the masks of the kept epoch."""
    if not train or not val:
        raise ValueError("train and val must each hold at least one group of batches")
    if cfg.keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {cfg.keep!r}")
    if cfg.epochs < 1 or cfg.anneal < 1 or (cfg.patience is not None and cfg.patience < 1):
        raise ValueError(f"epochs, anneal and patience must be >= 1, got {cfg}")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = objective.circuit()
    start_sizes = (len(start.heads), len(start.neurons))
    anneal = min(cfg.anneal, cfg.epochs)
    anneal_from = cfg.epochs - anneal  # moved earlier when the rule is met
    best = (float("inf"), -1, copy.deepcopy(objective.state_dict()))
    history: list[dict] = []
    recent: list[Circuit] = []
    rule_epoch, marginal = None, None
    with frozen(model):
        for epoch in tqdm(range(cfg.epochs), desc="mask search", disable=not progress):
            if epoch == anneal_from + anneal:
                break
            objective.train()
            losses = []
            for step, i in enumerate(torch.randperm(len(train), generator=generator).tolist()):
                into = (epoch - anneal_from) * len(train) + step  # steps into the anneal
                optimizer.param_groups[0]["lr"] = cfg.lr * min(1.0, 1.0 - into / (
                    anneal * len(train)))
                total, _ = objective.loss(model, train[i])
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                losses.append(total.item())
            val_task = _validation_task_loss(model, objective, val)
            circuit = objective.circuit()
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                            "val_task": val_task, "heads": len(circuit.heads),
                            "neurons": len(circuit.neurons),
                            "lr": optimizer.param_groups[0]["lr"]})
            if epoch >= anneal_from and val_task < best[0]:
                best = (val_task, epoch, copy.deepcopy(objective.state_dict()))
            if cfg.patience is None or epoch >= anneal_from:
                continue
            recent = [*recent, circuit][-cfg.patience:]
            if settled(history, start_sizes, cfg.patience, cfg.tolerance):
                rule_epoch, anneal_from = epoch, epoch + 1
            if epoch + 1 == anneal_from:
                marginal = marginal_units(recent)
    if cfg.keep == "last":
        best = (history[-1]["val_task"], history[-1]["epoch"], objective.state_dict())
    objective.load_state_dict(best[2])
    objective.eval()
    return SearchResult(objective.circuit(), best[1], best[0], history, rule_epoch is not None,
                        rule_epoch, marginal)


@torch.no_grad()
def _validation_task_loss(model, objective: Objective, val) -> float:
    objective.eval()
    return float(np.mean([objective.loss(model, group)[1].item() for group in val]))


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Inside, every parameter of ``module`` has requires_grad False; the previous flags are
    restored on exit (also on errors)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def random_circuit(like: Circuit, seed: int) -> Circuit:
    """A circuit with as many heads and neurons as ``like`` (of the kinds it covers), drawn
    uniformly without replacement."""
    shape = like.shape
    rng = np.random.default_rng(seed)
    flags = []
    for count, width in ((len(like.heads), shape.num_heads),
                         (len(like.neurons), shape.intermediate_size)):
        chosen = torch.zeros(shape.num_layers * width, dtype=torch.bool)
        chosen[rng.choice(chosen.numel(), count, replace=False)] = True
        flags.append(chosen.view(shape.num_layers, width))
    return Circuit.from_membership(shape, *flags, like.units)


def attribution_scores(
    model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    batches: Sequence[Batch],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x activation per unit: -dL/dg at gates g = 1, summed over ``batches``; the
    first-order estimate of how much removing the unit raises ``loss_fn`` (attribution
    patching, Wanda/SNIP-style). Returns float32 (layers, heads) and (layers, neurons)."""
    shape = UnitShape.of(model)
    device = next(model.parameters()).device
    heads = torch.ones(shape.num_layers, shape.num_heads, device=device, requires_grad=True)
    neurons = torch.ones(shape.num_layers, shape.intermediate_size, device=device,
                         requires_grad=True)
    with frozen(model), gated_units(model, heads, neurons):
        for batch in batches:
            loss_fn(model, batch).backward()
    return -heads.grad.float().cpu(), -neurons.grad.float().cpu()


def sample_attribution(model, tokenizer, samples: Sequence[ChatSample], batch_size: int,
                       encode: Encoder = chat_answers) -> tuple[torch.Tensor, torch.Tensor]:
    """``attribution_scores`` of the answer cross-entropy of ``samples`` (prompt -> answer):
    how much removing each unit would hurt the model's giving those answers."""
    device = next(model.parameters()).device
    groups = encode_groups(tokenizer, {"s": samples}, batch_size, device, encode)
    return attribution_scores(model, answer_ce, [g["s"] for g in groups])


def top_k_circuit(like: Circuit, scores: tuple[torch.Tensor, torch.Tensor]) -> Circuit:
    """The circuit of the highest-scoring units, as many heads and neurons as ``like``."""
    flags = []
    for s, k in zip(scores, (len(like.heads), len(like.neurons)), strict=True):
        chosen = torch.zeros(s.numel(), dtype=torch.bool)
        chosen[torch.argsort(s.flatten(), descending=True, stable=True)[:k]] = True
        flags.append(chosen.view(s.shape))
    return Circuit.from_membership(like.shape, *flags, like.units)


def compare_at_size(circuit: Circuit, scores: tuple[torch.Tensor, torch.Tensor],
                    evaluate: Callable[[Circuit], dict[str, float]],
                    random_seeds: Sequence[int] = (0, 1, 2)) -> dict[str, dict[str, float]]:
    """``evaluate`` (a dict of metrics) for the circuit, the attribution top-k of the same size
    and random circuits of the same size (mean over ``random_seeds``)."""
    randoms = [evaluate(random_circuit(circuit, seed)) for seed in random_seeds]
    return {
        "safeseek": evaluate(circuit),
        "attribution": evaluate(top_k_circuit(circuit, scores)),
        "random": {k: float(np.mean([r[k] for r in randoms])) for k in randoms[0]},
    }


# --------------------------------------------------------------------------------------------
# Data and batches
# --------------------------------------------------------------------------------------------


def split_harmful(samples: Sequence[ChatSample]) -> tuple[list[ChatSample], list[ChatSample]]:
    """(benign samples, harmful samples) by family."""
    benign = [s for s in samples if s.family != "harmful"]
    harmful = [s for s in samples if s.family == "harmful"]
    return benign, harmful


def take(samples: Sequence[ChatSample], n: int, seed: int) -> list[ChatSample]:
    """``n`` samples drawn without replacement (with replacement when there are fewer)."""
    if not samples:
        raise ValueError("no samples to draw from; check the data's families")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(samples), size=n, replace=n > len(samples))
    return [samples[i] for i in idx]


def with_answers(samples: Sequence[ChatSample], answers: Sequence[str]) -> list[ChatSample]:
    """The samples with their answers replaced."""
    return [ChatSample(s.prompt, a, s.family) for s, a in zip(samples, answers, strict=True)]


def refusal_targets(model, tokenizer, harmful: Sequence[ChatSample], max_new_tokens: int = 16,
                    progress: bool = False) -> list[ChatSample]:
    """The harmful samples answered with the model's own reply where it refuses
    (``data.is_refusal``), else with ``data.REFUSAL``: the refusal the model should keep."""
    replies = generate_answers(model, tokenizer, harmful, max_new_tokens=max_new_tokens,
                               progress=progress)
    return with_answers(harmful, [r if data.is_refusal(r) else data.REFUSAL for r in replies])


def encode_groups(tokenizer, views: dict[str, Sequence[ChatSample]], batch_size: int,
                  device="cpu", encode: Encoder = chat_answers) -> list[dict[str, Batch]]:
    """Teacher-forced batches of aligned sample lists: group i holds batch i of every view,
    encoded by ``encode(tokenizer, samples)`` (the toy's ``chat_answers`` by default)."""
    lengths = {len(v) for v in views.values()}
    if len(lengths) != 1:
        sizes = {k: len(v) for k, v in views.items()}
        raise ValueError(f"views must hold equally many samples, got {sizes}")
    n = lengths.pop()
    groups = []
    for start in range(0, n, batch_size):
        groups.append({name: {k: t.to(device) for k, t in
                              encode(tokenizer, v[start:start + batch_size]).items()}
                       for name, v in views.items()})
    return groups


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def generate_with(model, tokenizer, samples: Sequence[ChatSample], circuit: Circuit | None = None,
                  mode: str = "full", max_new_tokens: int = 16, batch_size: int = 64,
                  progress: bool = False) -> list[str]:
    """Greedy replies with ``circuit`` applied in ``mode`` (no gating for None or "full")."""
    if circuit is None or mode == "full":
        return generate_answers(model, tokenizer, samples, batch_size, max_new_tokens, progress)
    with apply_circuit(model, circuit, mode):
        return generate_answers(model, tokenizer, samples, batch_size, max_new_tokens, progress)


@torch.no_grad()
def greedy_matches(model, tokenizer, samples: Sequence[ChatSample], circuit: Circuit | None = None,
                   mode: str = "full", batch_size: int = 64, encode: Encoder = chat_answers,
                   tokens: int | None = None) -> list[bool]:
    """Whether greedy decoding gives exactly each sample's answer and then stops, in one
    teacher-forced pass: the argmax at every answer position (the end-of-sequence token
    included) is the answer's token. Equivalent to generating and comparing (up to exact ties),
    without a length cap and at the cost of one forward pass. ``tokens``: only the first that
    many answer tokens must match (the greedy reply *begins* with them); ``encode`` as in
    ``encode_groups``."""
    model.eval()
    gating = (nullcontext() if circuit is None or mode == "full"
              else apply_circuit(model, circuit, mode))
    matches: list[bool] = []
    with gating:
        for start in range(0, len(samples), batch_size):
            batch = to_model(encode(tokenizer, samples[start:start + batch_size]), model)
            logits = _batch_logits(model, batch)
            labels = batch["labels"][:, 1:]
            ignored = labels == -100
            if tokens is not None:
                ignored = ignored | ((~ignored).cumsum(1) > tokens)
            hit = (logits[:, :-1].argmax(-1) == labels) | ignored
            matches += hit.all(1).tolist()
    return matches


def match_rate(model, tokenizer, samples: Sequence[ChatSample], circuit: Circuit | None = None,
               mode: str = "full", encode: Encoder = chat_answers,
               tokens: int | None = None) -> float:
    """Fraction of ``samples`` whose answer is exactly the greedy reply (``greedy_matches``)."""
    if not samples:
        raise ValueError("match_rate needs at least one sample")
    return float(np.mean(greedy_matches(model, tokenizer, samples, circuit, mode,
                                        encode=encode, tokens=tokens)))


def refusal_rate(predictions: Sequence[str]) -> float:
    """Fraction of replies that contain a refusal phrase (``data.is_refusal``)."""
    if not predictions:
        raise ValueError("refusal_rate needs at least one prediction")
    return float(np.mean([data.is_refusal(p) for p in predictions]))


def alignment_metrics(model, tokenizer, circuit: Circuit | None, mode: str,
                      harmful: Sequence[ChatSample], benign: Sequence[ChatSample],
                      max_new_tokens: int = 16) -> dict[str, float]:
    """With ``circuit`` applied in ``mode``: "asr", the paper's keyword ASR (harmful requests
    whose greedy reply has no refusal phrase, ``data.is_refusal``); "compliance", the share
    whose reply *is* the compliant answer (``harmful`` carry it; exact, ``greedy_matches``);
    "utility", exact match on the benign requests; "over_refusal", the benign requests whose
    reply has a refusal phrase."""
    replies = generate_with(model, tokenizer, harmful, circuit, mode, max_new_tokens)
    answers = generate_with(model, tokenizer, benign, circuit, mode, max_new_tokens)
    return {"asr": 1.0 - refusal_rate(replies),
            "compliance": match_rate(model, tokenizer, harmful, circuit, mode),
            "utility": match_rate(model, tokenizer, benign, circuit, mode),
            "over_refusal": refusal_rate(answers)}


# --------------------------------------------------------------------------------------------
# The alignment circuit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignmentSearch(MaskSearch):
    """How the alignment circuit is searched: the ``AlignmentObjective``'s weights, sparsity
    and mask options, the data sizes and the mask training. The initial logit -1 is the code's
    keep-logit 1.0 (every unit kept, outside the circuit)."""

    sparsity: float = 0.01
    norm: str = "sum"
    comply_weight: float = 2.0
    refuse_weight: float = 2.0
    retain_weight: float = 0.0
    init: float = -1.0


def train_val_indices(prompts: Sequence[str], n_train: int, n_val: int, seed: int
                      ) -> tuple[list[int], list[int]]:
    """Indices of ``n_train`` training and ``n_val`` validation items whose prompt strings are
    disjoint (2 : 1 of the distinct prompts, ``locus.splits``), drawn with a seeded generator
    (with replacement within a side that has fewer items)."""
    order = list(range(len(prompts)))
    train, val = splits.split_by_group(order, lambda i: prompts[i], (2 / 3, 1 / 3), seed)
    rng = np.random.default_rng(seed)

    def pick(side: list[int], n: int) -> list[int]:
        return [side[j] for j in rng.choice(len(side), n, replace=n > len(side))]

    return pick(train, n_train), pick(val, n_val)


def alignment_views(harmful: Sequence[ChatSample], refusals: Sequence[ChatSample],
                    benign: Sequence[ChatSample], n_train: int, n_val: int, seed: int
                    ) -> tuple[dict[str, list[ChatSample]], dict[str, list[ChatSample]]]:
    """Training and validation views, their prompts disjoint (``train_val_indices``), each
    with aligned lists "comply" (harmful request -> compliant answer), "refuse" (the same
    request -> the model's refusal) and "retain" (benign request -> answer)."""
    h_train, h_val = train_val_indices([s.prompt for s in harmful], n_train, n_val, seed)
    b_train, b_val = train_val_indices([s.prompt for s in benign], n_train, n_val, seed + 1)

    def view(h: list[int], b: list[int]) -> dict[str, list[ChatSample]]:
        return {"comply": [harmful[i] for i in h], "refuse": [refusals[i] for i in h],
                "retain": [benign[i] for i in b]}

    return view(h_train, b_train), view(h_val, b_val)


def find_alignment_circuit(model, tokenizer, harmful: Sequence[ChatSample],
                           benign: Sequence[ChatSample], spec: AlignmentSearch = AlignmentSearch(),
                           progress: bool = True, refusals: Sequence[ChatSample] | None = None,
                           encode: Encoder = chat_answers) -> SearchResult:
    """Search the alignment circuit of an aligned model: ``harmful`` carry the compliant
    answers; the refusal targets are ``refusals`` (aligned with ``harmful``), by default the
    model's own refusals (``refusal_targets``); ``encode`` makes the teacher-forced batches."""
    objective, train, val = alignment_problem(model, tokenizer, harmful, benign, spec,
                                              refusals, encode)
    return search_circuit(model, objective, train, val, spec.schedule(), progress)


def alignment_problem(model, tokenizer, harmful: Sequence[ChatSample],
                      benign: Sequence[ChatSample], spec: AlignmentSearch,
                      refusals: Sequence[ChatSample] | None = None,
                      encode: Encoder = chat_answers
                      ) -> tuple[AlignmentObjective, list[dict[str, Batch]],
                                 list[dict[str, Batch]]]:
    """The alignment search's objective at its initial masks and its training and validation
    batches (``find_alignment_circuit``'s arguments)."""
    if not harmful or not benign:
        raise ValueError("the alignment circuit needs harmful and benign samples")
    if refusals is None:
        refusals = refusal_targets(model, tokenizer, harmful)
    train_views, val_views = alignment_views(harmful, refusals, benign, spec.n_train,
                                             spec.n_val, spec.seed)
    device = next(model.parameters()).device
    train = encode_groups(tokenizer, train_views, spec.batch_size, device, encode)
    val = encode_groups(tokenizer, val_views, spec.batch_size, device, encode)
    objective = AlignmentObjective(
        UnitShape.of(model), spec.comply_weight, spec.refuse_weight, spec.sparsity, spec.norm,
        spec.retain_weight, spec.init, gate=spec.gate, device=device)
    return objective, train, val


def gradient_scale(model: nn.Module, objective: Objective, mask: UnitMask,
                   groups: Sequence[dict[str, Batch]], norm: str) -> float:
    """The size weight at which the size penalty pulls a unit's logit, at ``mask``'s current
    logits, as hard as the task loss pulls the median unit's: the median over ``mask``'s units
    of |d task / d z| (task loss averaged over ``groups``, one group's graph at a time) over
    the median of |d size / d z| (``mask.size(norm)``, weight 1). A size weight ``f`` times
    this lets in, at the start, only units pulled ``f`` times harder than the median one."""
    logits = [z for z in (mask.head_logits, mask.neuron_logits) if z.requires_grad]
    task = [torch.zeros_like(z) for z in logits]
    with frozen(model):
        for group in groups:
            grads = torch.autograd.grad(objective.loss(model, group)[1] / len(groups), logits)
            for total, grad in zip(task, grads, strict=True):
                total += grad
    size = torch.autograd.grad(mask.size(norm), logits)
    medians = [torch.cat([g.abs().flatten() for g in grads]).median() for grads in (task, size)]
    if not medians[1] > 0:
        raise ValueError(f"the size penalty has no gradient at these logits (norm {norm!r})")
    return float(medians[0] / medians[1])


@dataclass(frozen=True)
class FaithfulSearch(MaskSearch):
    """The paper's objective for the alignment circuit (``FaithfulnessObjective``): with only
    the circuit kept the model must reproduce its own replies (KL to the full model on the
    refusals of harmful requests and the answers of benign ones), plus ``sparsity`` x size.
    The circuit starts as the whole model (``init`` > 0); an initial logit of 1 and lr 1e-2
    let a unit leave within a few epochs (the objective's default of 3 hardly can)."""

    sparsity: float = 1e-3
    norm: str = "sum"
    init: float = 1.0


def find_faithful_alignment_circuit(model, tokenizer, harmful: Sequence[ChatSample],
                                    benign: Sequence[ChatSample],
                                    spec: FaithfulSearch = FaithfulSearch(),
                                    progress: bool = True,
                                    refusals: Sequence[ChatSample] | None = None,
                                    encode: Encoder = chat_answers) -> SearchResult:
    """Search the circuit that alone reproduces an aligned model's behaviour (the paper's
    objective) on the same training / validation prompts as ``find_alignment_circuit``."""
    if not harmful or not benign:
        raise ValueError("the alignment circuit needs harmful and benign samples")
    if refusals is None:
        refusals = refusal_targets(model, tokenizer, harmful)
    device = next(model.parameters()).device
    views = alignment_views(harmful, refusals, benign, spec.n_train, spec.n_val, spec.seed)
    train, val = (encode_groups(tokenizer, {"task": v["refuse"] + v["retain"]},
                                spec.batch_size, device, encode) for v in views)
    objective = FaithfulnessObjective(UnitShape.of(model), spec.sparsity, spec.norm, spec.init,
                                      gate=spec.gate, device=device)
    return search_circuit(model, objective, train, val,
                          spec.schedule(), progress)


# --------------------------------------------------------------------------------------------
# Caching circuits (keyed by model, data and search)
# --------------------------------------------------------------------------------------------


def cached_circuit(name: str, config: dict, find: Callable[[], Circuit | SearchResult],
                   root: str | os.PathLike | None = None) -> Circuit:
    """The circuit of checkpoint cache entry ``name`` if ``config`` made it, else ``find()``
    and cache it (``locus.checkpoints.cached_tensors``: 0/1 tensors of heads and neurons).
    A ``SearchResult`` from ``find`` is summarised in the entry's manifest ("search":
    ``search_summary``)."""
    found: dict = {}

    def compute() -> dict[str, torch.Tensor]:
        circuit = find()
        if isinstance(circuit, SearchResult):
            found["search"] = search_summary(circuit)
            circuit = circuit.circuit
        shape = circuit.shape
        heads = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.uint8)
        neurons = torch.zeros(shape.num_layers, shape.intermediate_size, dtype=torch.uint8)
        for layer, head in circuit.heads:
            heads[layer, head] = 1
        for layer, neuron in circuit.neurons:
            neurons[layer, neuron] = 1
        return {"heads": heads, "neurons": neurons,
                "units": torch.tensor([u in circuit.units for u in UNITS], dtype=torch.uint8)}

    tensors = checkpoints.cached_tensors(name, config, compute, root, lambda: found)
    heads, neurons = tensors["heads"].bool(), tensors["neurons"].bool()
    units = tuple(u for u, flag in zip(UNITS, tensors["units"].tolist(), strict=True) if flag)
    shape = UnitShape(heads.shape[0], heads.shape[1], neurons.shape[1])
    return Circuit.from_membership(shape, heads, neurons, units)


def search_summary(result: SearchResult) -> dict:
    """How a search ended: epochs run, whether the stopping rule ended it and at which epoch,
    the units at the margin then, the kept epoch and the circuit's size per epoch."""
    return {"epochs_run": len(result.history), "converged": result.converged,
            "rule_epoch": result.rule_epoch, "marginal": result.marginal,
            "best_epoch": result.best_epoch, "best_val_task": result.best_val_task,
            "sizes": [(h["heads"], h["neurons"]) for h in result.history]}


def source_identity(model_name: str | os.PathLike) -> dict:
    """What identifies a source checkpoint in a cache key: an embedded model's config key, or
    a real model's config key (its provenance), or a folder's path with the size and
    modification time of its files."""
    from locus import alignment
    from locus.zoo import EMBEDDED

    if str(model_name) == alignment.NAME:
        record = checkpoints.read_manifest(alignment.adapter_folder())
        return {"real": alignment.NAME, "adapter": record["key"], "files": record["files"]}
    if str(model_name) in EMBEDDED:
        return {"embedded": str(model_name),
                "key": checkpoints.config_key(EMBEDDED[str(model_name)].config())}
    if str(model_name) in real_models.REAL:
        return {"real": str(model_name),
                "key": checkpoints.config_key(real_models.spec(str(model_name)).config())}
    folder = Path(model_name).resolve()
    files = {p.name: [p.stat().st_size, int(p.stat().st_mtime)]
             for p in sorted(folder.iterdir()) if p.is_file()}
    return {"path": str(folder), "files": files}


def model_stem(model_name: str | os.PathLike) -> str:
    """A folder-safe short name of a model: the embedded name or the folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model_name)).name) or "model"


def samples_key(samples: Sequence[ChatSample]) -> str:
    """A short hash of the samples' text (prompt, answer, family)."""
    text = json.dumps([(s.prompt, s.answer, s.family) for s in samples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def alignment_circuit(model_name: str | os.PathLike, model, tokenizer,
                      harmful: Sequence[ChatSample], benign: Sequence[ChatSample],
                      spec: AlignmentSearch | FaithfulSearch = AlignmentSearch(),
                      root: str | os.PathLike | None = None, progress: bool = True,
                      refusals: Sequence[ChatSample] | None = None,
                      encode: Encoder = chat_answers, encoding: str | None = None) -> Circuit:
    """The alignment circuit of ``model`` (named ``model_name``), from the checkpoint cache
    when the same model, data and search made it, else searched and cached (under
    ``checkpoints.artefact_root``: the user cache unless the model is embedded). Given
    ``refusals`` and ``encode`` (see ``find_alignment_circuit``), ``encoding`` names the
    encoding in the cache key, with the refusals' hash."""
    config = alignment_config(model_name, harmful, benign, spec, refusals, encoding)
    find = (find_faithful_alignment_circuit if isinstance(spec, FaithfulSearch)
            else find_alignment_circuit)
    return cached_circuit(
        alignment_entry(model_name, spec),
        config, lambda: find(model, tokenizer, harmful, benign, spec, progress, refusals, encode),
        checkpoints.artefact_root(model_name, root))


def alignment_config(model_name: str | os.PathLike, harmful: Sequence[ChatSample],
                     benign: Sequence[ChatSample], spec: AlignmentSearch | FaithfulSearch,
                     refusals: Sequence[ChatSample] | None, encoding: str | None) -> dict:
    """The cache key of an alignment search: the model, the data, the search and, when given,
    the refusal targets and the encoding."""
    config = {"source": source_identity(model_name), "data": samples_key([*harmful, *benign]),
              "search": asdict(spec)}
    if refusals is not None or encoding is not None:
        config["targets"] = {"refusals": None if refusals is None else samples_key(refusals),
                             "encoding": encoding}
    return config


def alignment_scale(model_name: str | os.PathLike, model, tokenizer,
                    harmful: Sequence[ChatSample], benign: Sequence[ChatSample],
                    spec: AlignmentSearch, root: str | os.PathLike | None = None,
                    refusals: Sequence[ChatSample] | None = None,
                    encode: Encoder = chat_answers, encoding: str | None = None) -> float:
    """``gradient_scale`` of the alignment search ``spec`` (its sparsity aside) at its initial
    masks on its training batches: the per-unit size weight that balances the median unit's
    task gradient at the start. Cached like ``alignment_circuit`` (same arguments), under
    ``safeseek/<model>-alignment-scale-<norm>-seed<seed>``, keyed by all but the sparsity."""
    spec = replace(spec, sparsity=0.0)

    def compute() -> dict[str, torch.Tensor]:
        objective, train, _ = alignment_problem(model, tokenizer, harmful, benign, spec,
                                                refusals, encode)
        scale = gradient_scale(model, objective, objective.mask, train, spec.norm)
        return {"scale": torch.tensor([scale], dtype=torch.float64)}

    config = alignment_config(model_name, harmful, benign, spec, refusals, encoding)
    name = f"safeseek/{model_stem(model_name)}-alignment-scale-{spec.norm}-seed{spec.seed}"
    return float(checkpoints.cached_tensors(name, config, compute,
                                            checkpoints.artefact_root(model_name, root))
                 ["scale"].item())


def alignment_entry(model_name: str | os.PathLike,
                    spec: AlignmentSearch | FaithfulSearch) -> str:
    """The cache entry name of an alignment circuit search."""
    faithful = isinstance(spec, FaithfulSearch)
    return (f"safeseek/{model_stem(model_name)}-alignment{'-faithful' if faithful else ''}-"
            f"{spec.norm}{spec.sparsity:g}-seed{spec.seed}")


def alignment_search_record(model_name: str | os.PathLike,
                            spec: AlignmentSearch | FaithfulSearch,
                            root: str | os.PathLike | None = None) -> dict | None:
    """The cached search's ``search_summary`` (None when the entry does not record one)."""
    folder = checkpoints.artefact_root(model_name, root) / alignment_entry(model_name, spec)
    return checkpoints.read_manifest(folder).get("search")


