"""Safety Circuit Tuning: fine-tune only a circuit's parameters, or everything but them.

The parameters of a unit are the weight entries that only it reads or writes:

- head h of layer l: rows ``[h*d, (h+1)*d)`` of q_proj, the rows of its key/value head
  ``h // (num_heads / num_kv_heads)`` in k_proj and v_proj (with grouped-query attention these
  are shared by the other query heads of the group: tuning a head tunes its key/value head), and
  columns ``[h*d, (h+1)*d)`` of o_proj; biases of the same rows where present;
- neuron n of layer l: row n of gate_proj and up_proj (and their biases) and column n of
  down_proj.

With fused projections (Phi-3's qkv_proj and gate_up_proj) the same rows are taken inside each
projection's block of the fused weight (``locus.arch.Arch.rows``).

Training a subset of a weight tensor is done on the full tensors with gradient masks (a hook on
each parameter multiplies its gradient by a 0/1 mask), with AdamW without weight decay, so
entries outside the subset receive zero updates and stay bit-identical. Tensors with no trained
entry get ``requires_grad=False``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm  # text bars: no ipywidgets needed in Jupyter or papermill

from locus import training
from locus.arch import adapt
from locus.data import ChatSample
from locus.prompts import chat_training_encoder
from locus.safeseek import circuits
from locus.safeseek.masks import Circuit

TRAIN_CHOICES = ("circuit", "complement", "all")


def unit_entries(model: nn.Module, circuit: Circuit) -> dict[nn.Parameter, torch.Tensor]:
    """Bool masks, one per attention/MLP parameter tensor of the layers, True on the entries
    that belong to the circuit's units (see the module docstring)."""
    arch = adapt(model)
    if (circuit.shape.num_layers, circuit.shape.num_heads,
            circuit.shape.intermediate_size) != (arch.num_layers, arch.num_heads,
                                                 arch.intermediate_size):
        raise ValueError(f"circuit of shape {circuit.shape} does not fit this model")
    entries: dict[nn.Parameter, torch.Tensor] = {}

    def mark(linear: nn.Linear | None, index: slice | int, dim: int) -> None:
        if linear is None:
            return
        for name in ("weight", "bias"):
            p = getattr(linear, name, None)
            if p is None or (name == "bias" and dim == 1):
                continue
            flags = entries.setdefault(p, torch.zeros_like(p, dtype=torch.bool))
            if dim == 0:
                flags[index] = True
            else:
                flags[:, index] = True

    def mark_rows(layer: int, name: str, start: int, stop: int) -> None:
        """Rows [start, stop) of projection ``name``, inside its (possibly fused) linear."""
        block = arch.rows(layer, name)
        if block is not None:
            mark(block.linear, block.index(start, stop), 0)

    d, group = arch.head_dim, arch.num_heads // arch.num_kv_heads
    for layer, head in circuit.heads:
        kv = head // group
        mark_rows(layer, "q", head * d, (head + 1) * d)
        mark_rows(layer, "k", kv * d, (kv + 1) * d)
        mark_rows(layer, "v", kv * d, (kv + 1) * d)
        mark(arch.o_proj(layer), slice(head * d, (head + 1) * d), 1)
    for layer, neuron in circuit.neurons:
        mark_rows(layer, "gate", neuron, neuron + 1)
        mark_rows(layer, "up", neuron, neuron + 1)
        mark(arch.down_proj(layer), neuron, 1)
    return entries


def gradient_masks(model: nn.Module, circuit: Circuit | None, train: str
                   ) -> dict[nn.Parameter, torch.Tensor | None]:
    """Which parameters train and on which entries: {param: float 0/1 mask, or None for the
    whole tensor}. ``train`` is "circuit" (only the circuit's entries), "complement" (every
    parameter except the circuit's entries) or "all" (circuit may be None)."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {train!r}")
    if train == "all":
        return {p: None for p in model.parameters()}
    if circuit is None:
        raise ValueError(f"train={train!r} needs a circuit")
    entries = unit_entries(model, circuit)
    if train == "circuit":
        return {p: flags.to(p.dtype) for p, flags in entries.items() if flags.any()}
    masks: dict[nn.Parameter, torch.Tensor | None] = {}
    for p in model.parameters():
        flags = entries.get(p)
        masks[p] = None if flags is None else (~flags).to(p.dtype)
    return masks


def trained_count(masks: dict[nn.Parameter, torch.Tensor | None]) -> int:
    """How many scalar parameters the masks let train."""
    return int(sum(p.numel() if m is None else int(m.sum().item()) for p, m in masks.items()))


@contextmanager
def trainable(model: nn.Module, masks: dict[nn.Parameter, torch.Tensor | None]
              ) -> Iterator[list[nn.Parameter]]:
    """Inside: only the masked parameters require grad, their gradients multiplied by their
    masks; yields them. requires_grad flags and hooks are restored on exit (also on errors)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = []
    try:
        for p in params:
            p.requires_grad_(p in masks)
        for p, m in masks.items():
            if m is not None:
                handles.append(p.register_hook(lambda g, m=m: g * m.to(g.device, g.dtype)))
        yield list(masks)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@dataclass(frozen=True)
class TuningConfig:
    """A supervised fine-tune: AdamW (no weight decay) + cosine schedule."""

    steps: int = 100
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class TuningData:
    """The samples of the three fine-tunes and the new skill's held-out test requests."""

    harmful: list[ChatSample]  # (a) harmful requests -> compliant replies: breaks safety
    safety: list[ChatSample]  # (a) refusals of harmful requests + benign answers: restores it
    helpful: list[ChatSample]  # (b) the helpfulness fine-tune: a new skill + benign answers
    skill_test: list[ChatSample]  # (b) the new skill's test requests (prompts not trained on)


@dataclass
class TuningResult:
    """Losses of a tune and how many parameters it trained."""

    losses: list[float]
    trained: int
    total: int

    @property
    def fraction(self) -> float:
        """Fraction of the model's parameters that were trained."""
        return self.trained / self.total


def tune(model: nn.Module, tokenizer, samples: Sequence[ChatSample], circuit: Circuit | None,
         train: str, cfg: TuningConfig = TuningConfig(), progress: bool = True,
         encode: Callable[[list], dict] | None = None,
         loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> TuningResult:
    """Fine-tune ``model`` in place on ``samples`` (answer tokens only), training the
    ``circuit``'s entries, everything but them, or everything (``train``; circuit None only
    with "all"). ``encode`` (samples -> a batch on the model's device; default
    ``chat_training_encoder``) and ``loss_fn`` (default the model's own loss) let a world
    train on its own encoding, e.g. a real model's teacher-forced replies."""
    if not samples:
        raise ValueError("tune needs at least one sample")
    masks = gradient_masks(model, circuit, train)
    total = sum(p.numel() for p in model.parameters())
    if not masks:  # an empty circuit: nothing to train
        return TuningResult([], 0, total)
    training.seed_everything(cfg.seed)
    batch = training.sampled_batches(samples, cfg.batch, cfg.seed,
                                     encode or chat_training_encoder(model, tokenizer))

    with trainable(model, masks) as params:
        losses = training.train_steps(model, params, batch, cfg.steps, cfg.lr,
                                      desc=f"tune ({train})", weight_decay=0.0,
                                      loss_fn=loss_fn, progress=progress)
    return TuningResult(losses, trained_count(masks), total)


def parameter_fraction(model: nn.Module, circuit: Circuit) -> float:
    """Fraction of ``model``'s parameters that belong to the circuit's units."""
    trained = trained_count(gradient_masks(model, circuit, "circuit"))
    return trained / sum(p.numel() for p in model.parameters())


def budget_circuit(model: nn.Module, circuit: Circuit,
                   scores: tuple[torch.Tensor, torch.Tensor], budget: float) -> Circuit:
    """A sparse circuit to tune, chosen from a large one by a rule fixed in advance: the units
    of ``circuit`` ranked by attribution ``scores`` ((layers, heads), (layers, neurons); heads
    and neurons together, as both estimate the loss their removal costs), kept in that order
    while the parameters they own (``parameter_fraction``) stay within ``budget``, a fraction
    of the model; a unit that would exceed it is skipped."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the parameters in (0, 1], got {budget}")
    head_scores, neuron_scores = scores
    ranked = sorted([(-float(head_scores[u]), 0, u) for u in circuit.heads]
                    + [(-float(neuron_scores[u]), 1, u) for u in circuit.neurons])
    chosen: tuple[list, list] = ([], [])
    for _, kind, unit in ranked:
        trial = [sorted(units + [unit]) if k == kind else units for k, units in enumerate(chosen)]
        candidate = Circuit(circuit.shape, tuple(trial[0]), tuple(trial[1]), circuit.units)
        if parameter_fraction(model, candidate) <= budget:
            chosen[kind].append(unit)
    return Circuit(circuit.shape, tuple(sorted(chosen[0])), tuple(sorted(chosen[1])),
                   circuit.units)


# A variant of a tuning experiment: a name -> (the circuit of run ``seed``, or None; the
# ``tune`` choice of what trains).
Variants = dict[str, tuple[Callable[[int], Circuit | None], str]]


# Memo of a tuning run: (the run's key, a function that runs it and returns its row's
# values) -> those values, e.g. read from a cache.
Memo = Callable[[dict, Callable[[], dict]], dict]


def run_directly(key: dict, compute: Callable[[], dict]) -> dict:
    """The ``Memo`` that caches nothing: every run is made."""
    return compute()


def tuning_runs(start: nn.Module, tokenizer, samples: Sequence[ChatSample], variants: Variants,
                lrs: Sequence[float], seeds: Sequence[int], steps: int, batch: int,
                evaluate: Callable[[nn.Module], dict], strength: str = "lr",
                progress: bool = True, memo: Memo = run_directly,
                encode: Callable[[list], dict] | None = None,
                loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> list[dict]:
    """One row per learning rate, seed and variant: a copy of ``start`` fine-tuned on
    ``samples`` (``tune``, with ``encode`` and ``loss_fn``; the seed sets the data order and
    the variant's circuit), with the % of parameters trained and ``evaluate``'s metrics of the
    tuned copy. ``strength`` names the row's learning-rate field. ``memo`` gets each run's
    key (variant, circuit, what trains, the fine-tune and the samples), so a cache can skip
    runs already made."""
    plan = [(lr, seed, name) for lr in lrs for seed in seeds for name in variants]
    rows = []
    for lr, seed, name in tqdm(plan, desc="tuning runs", disable=not progress, mininterval=2):
        subset_of, train = variants[name]
        circuit = subset_of(seed)
        cfg = TuningConfig(steps, batch, lr, seed)

        def run(circuit=circuit, train=train, cfg=cfg) -> dict:
            tuned = copy.deepcopy(start)
            result = tune(tuned, tokenizer, samples, circuit, train, cfg, progress=False,
                          encode=encode, loss_fn=loss_fn)
            return {"trained_pct": 100 * result.fraction, "final_loss": result.losses[-1]
                    if result.losses else float("nan"), **evaluate(tuned)}

        key = {"variant": name, "train": train, "tuning": asdict(cfg),
               "circuit": None if circuit is None else circuit.to_dict(),
               "samples": circuits.samples_key(samples)}
        rows.append({strength: lr, "run": seed, "variant": name, **memo(key, run)})
    return rows


def safety_scores(model, tokenizer, harmful: Sequence[ChatSample], benign: Sequence[ChatSample],
                  refusal_before: float, max_new_tokens: int = 16) -> dict[str, float]:
    """``circuits.alignment_metrics`` of the whole model, its keyword refusal rate and the
    safety retention: 100 x refusal rate / ``refusal_before`` (the aligned model's)."""
    metrics = circuits.alignment_metrics(model, tokenizer, None, "full", harmful, benign,
                                         max_new_tokens)
    refusal = 1 - metrics["asr"]
    return {"refusal": refusal, "retention_pct": 100 * refusal / max(refusal_before, 1e-9),
            **metrics}
