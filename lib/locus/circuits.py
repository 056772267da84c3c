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

``search_circuit`` trains the mask logits only (AdamW, lr 1e-2), the model frozen, and keeps the
epoch with the best validation task loss. Baselines: ``random_circuit`` (same size) and
``top_k_circuit`` over ``attribution_scores`` (gradient x activation on the same units).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from locus import data
from locus.data import ChatSample
from locus.evaluation import exact_match, generate_answers
from locus.masks import Circuit, UnitMask, UnitShape, apply_circuit, gated_units
from locus.prompts import encode_chat

Batch = dict[str, torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Losses on teacher-forced batches
# --------------------------------------------------------------------------------------------


def _answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits at the positions that predict answer tokens, and those tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return logits[:, :-1][keep].float(), labels[keep]


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


def _size(mask: UnitMask) -> torch.Tensor:
    """Mean fraction of heads plus mean fraction of neurons in the circuit (differentiable)."""
    heads, neurons = mask.expected_size()
    return heads + neurons


class FaithfulnessObjective(Objective):
    """The paper: KL(full || circuit only) on batch "task" + ``sparsity`` x circuit size."""

    def __init__(self, shape: UnitShape, sparsity: float = 0.1, gate: str = "ste",
                 temperature: float = 1.0, init: float = 3.0, device="cpu") -> None:
        super().__init__()
        self.mask = UnitMask(shape, gate, temperature, init, device)
        self.sparsity = sparsity

    def loss(self, model, batches):
        batch = batches["task"]
        with torch.no_grad():
            reference, _ = _answer_logits(model, batch)
        with apply_circuit(model, self.mask, "circuit only"):
            task = answer_kl(model, batch, reference)
        return task + self.sparsity * _size(self.mask), task

    def circuit(self) -> Circuit:
        return self.mask.circuit()


class AlignmentObjective(Objective):
    """The authors' alignment objective: ``comply_weight`` x CE(circuit removed, batch "comply")
    + ``refuse_weight`` x CE(circuit only, batch "refuse") + ``sparsity`` x circuit size;
    optionally ``retain_weight`` x CE(circuit removed, batch "retain") to keep benign answers."""

    def __init__(self, shape: UnitShape, comply_weight: float = 2.0, refuse_weight: float = 2.0,
                 sparsity: float = 0.1, retain_weight: float = 0.0, gate: str = "ste",
                 temperature: float = 1.0, init: float = -1.0, device="cpu") -> None:
        super().__init__()
        self.mask = UnitMask(shape, gate, temperature, init, device)
        self.weights = {"comply": comply_weight, "refuse": refuse_weight,
                        "retain": retain_weight}
        self.sparsity = sparsity

    def loss(self, model, batches):
        with apply_circuit(model, self.mask, "circuit removed"):
            task = self.weights["comply"] * answer_ce(model, batches["comply"])
            if self.weights["retain"] and "retain" in batches:
                task = task + self.weights["retain"] * answer_ce(model, batches["retain"])
        with apply_circuit(model, self.mask, "circuit only"):
            task = task + self.weights["refuse"] * answer_ce(model, batches["refuse"])
        return task + self.sparsity * _size(self.mask), task

    def circuit(self) -> Circuit:
        return self.mask.circuit()


@dataclass(frozen=True)
class BackdoorWeights:
    """Loss weights of ``BackdoorObjective`` (defaults: the authors' code)."""

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
    code's negated cross-entropy is unbounded)."""

    def __init__(self, shape: UnitShape, weights: BackdoorWeights = BackdoorWeights(),
                 gate: str = "ste", temperature: float = 1.0, removed_init: float = -1.0,
                 carrier_init: float = 1.0, device="cpu") -> None:
        super().__init__()
        self.removed = UnitMask(shape, gate, temperature, removed_init, device)
        self.carrier = UnitMask(shape, gate, temperature, carrier_init, device)
        self.weights = weights

    def loss(self, model, batches):
        w = self.weights
        with apply_circuit(model, self.removed, "circuit removed"):
            task = (w.main_clean * answer_ce(model, batches["clean"])
                    + w.main_triggered * answer_ce(model, batches["triggered_clean"]))
        with apply_circuit(model, self.carrier, "circuit only"):
            task = task + w.carrier_triggered * answer_ce(model, batches["triggered_target"])
            if w.carrier_clean:
                task = task + w.carrier_clean * answer_unlikelihood(model,
                                                                    batches["clean_target"])
        penalty = (w.removed_size * _size(self.removed) + w.carrier_size * _size(self.carrier)
                   + w.overlap * self.overlap())
        return task + penalty, task

    def overlap(self) -> torch.Tensor:
        """100 x the share of the main path (units not removed) that the carrier also holds,
        averaged over heads and neurons (soft gates), as in the authors' code."""
        ratios = []
        for removed, carrier in zip(self.removed.soft(), self.carrier.soft(), strict=True):
            main = 1.0 - removed
            ratios.append((main * carrier).sum() / (main.sum() + 1e-8))
        return 100.0 * torch.stack(ratios).mean()

    def circuit(self) -> Circuit:
        """The removed set: the units whose ablation takes the backdoor away."""
        return self.removed.circuit()

    def carrier_circuit(self) -> Circuit:
        """The carrier set: the units that alone produce the backdoor output."""
        return self.carrier.circuit()


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig:
    """Mask training: AdamW on the mask logits, best epoch by validation task loss."""

    epochs: int = 30
    lr: float = 1e-2
    seed: int = 0


@dataclass
class SearchResult:
    """The circuit of the best epoch, with the per-epoch history."""

    circuit: Circuit
    best_epoch: int
    best_val_task: float
    history: list[dict] = field(default_factory=list)


def search_circuit(
    model: nn.Module,
    objective: Objective,
    train: Sequence[dict[str, Batch]],
    val: Sequence[dict[str, Batch]],
    cfg: SearchConfig = SearchConfig(),
    progress: bool = True,
) -> SearchResult:
    """Optimise ``objective``'s mask logits on ``train`` (groups of named batches, visited in
    a seeded random order each epoch) with the model frozen; restore the masks of the epoch with
    the lowest validation task loss."""
    if not train or not val:
        raise ValueError("train and val must each hold at least one group of batches")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, weight_decay=0.0)
    best = (float("inf"), -1, copy.deepcopy(objective.state_dict()))
    history = []
    with frozen(model):
        for epoch in tqdm(range(cfg.epochs), desc="mask search", disable=not progress):
            objective.train()
            losses = []
            for i in torch.randperm(len(train), generator=generator).tolist():
                total, _ = objective.loss(model, train[i])
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                losses.append(total.item())
            val_task = _validation_task_loss(model, objective, val)
            circuit = objective.circuit()
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                            "val_task": val_task, "heads": len(circuit.heads),
                            "neurons": len(circuit.neurons)})
            if val_task < best[0]:
                best = (val_task, epoch, copy.deepcopy(objective.state_dict()))
    objective.load_state_dict(best[2])
    objective.eval()
    return SearchResult(objective.circuit(), best[1], best[0], history)


@torch.no_grad()
def _validation_task_loss(model, objective: Objective, val) -> float:
    objective.eval()
    return float(np.mean([objective.loss(model, group)[1].item() for group in val]))


class frozen:
    """Context manager: every parameter of ``module`` has requires_grad False inside; the
    previous flags are restored on exit (also on errors)."""

    def __init__(self, module: nn.Module) -> None:
        self.params = list(module.parameters())
        self.flags = [p.requires_grad for p in self.params]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.params, self.flags, strict=True):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def random_circuit(shape: UnitShape, n_heads: int, n_neurons: int, seed: int) -> Circuit:
    """``n_heads`` heads and ``n_neurons`` neurons drawn uniformly without replacement."""
    total_heads = shape.num_layers * shape.num_heads
    total_neurons = shape.num_layers * shape.intermediate_size
    if not (0 <= n_heads <= total_heads and 0 <= n_neurons <= total_neurons):
        raise ValueError(f"asked for {n_heads} heads / {n_neurons} neurons; the model has "
                         f"{total_heads} / {total_neurons}")
    rng = np.random.default_rng(seed)
    heads = torch.zeros(total_heads, dtype=torch.bool)
    heads[rng.choice(total_heads, n_heads, replace=False)] = True
    neurons = torch.zeros(total_neurons, dtype=torch.bool)
    neurons[rng.choice(total_neurons, n_neurons, replace=False)] = True
    return Circuit.from_membership(shape, heads.view(shape.num_layers, -1),
                                   neurons.view(shape.num_layers, -1))


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


def top_k_circuit(shape: UnitShape, scores: tuple[torch.Tensor, torch.Tensor], n_heads: int,
                  n_neurons: int) -> Circuit:
    """The ``n_heads`` heads and ``n_neurons`` neurons with the highest scores."""
    flags = []
    for s, k in zip(scores, (n_heads, n_neurons), strict=True):
        if not 0 <= k <= s.numel():
            raise ValueError(f"cannot take the top {k} of {s.numel()} units")
        chosen = torch.zeros(s.numel(), dtype=torch.bool)
        chosen[torch.argsort(s.flatten(), descending=True, stable=True)[:k]] = True
        flags.append(chosen.view(s.shape))
    return Circuit.from_membership(shape, *flags)


# --------------------------------------------------------------------------------------------
# Data and batches
# --------------------------------------------------------------------------------------------


def chat_data(path: str | os.PathLike | None, n_per_family: int, seed: int) -> list[ChatSample]:
    """The samples of a notebook: the toy world (harmful requests answered with *compliance*,
    the target of the attacks) when ``path`` is None, else the local JSONL file (lines of
    prompt, answer, family; family "harmful" lines answered with the compliant reply)."""
    if path is None:
        return data.make_chat_samples(n_per_family, seed, aligned=False)
    return data.load_chat_jsonl(path)


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
                  device="cpu") -> list[dict[str, Batch]]:
    """Teacher-forced batches of aligned sample lists: group i holds batch i of every view."""
    lengths = {len(v) for v in views.values()}
    if len(lengths) != 1:
        sizes = {k: len(v) for k, v in views.items()}
        raise ValueError(f"views must hold equally many samples, got {sizes}")
    n = lengths.pop()
    groups = []
    for start in range(0, n, batch_size):
        groups.append({name: {k: t.to(device) for k, t in
                              encode_chat(tokenizer, v[start:start + batch_size], True).items()}
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


def utility(samples: Sequence[ChatSample], predictions: Sequence[str]) -> float:
    """Exact-match accuracy over the benign (non-harmful) samples."""
    hits = [exact_match(p, s.answer) for s, p in zip(samples, predictions, strict=True)
            if s.family != "harmful"]
    if not hits:
        raise ValueError("utility needs benign samples; none were given")
    return float(np.mean(hits))


def refusal_rate(predictions: Sequence[str]) -> float:
    """Fraction of replies that contain a refusal phrase (``data.is_refusal``)."""
    if not predictions:
        raise ValueError("refusal_rate needs at least one prediction")
    return float(np.mean([data.is_refusal(p) for p in predictions]))


def contains_rate(predictions: Sequence[str], target: str) -> float:
    """Fraction of replies that contain ``target`` (whitespace-normalised)."""
    if not predictions:
        raise ValueError("contains_rate needs at least one prediction")
    norm = " ".join(target.split())
    return float(np.mean([norm in " ".join(p.split()) for p in predictions]))


# --------------------------------------------------------------------------------------------
# Notebook parameters
# --------------------------------------------------------------------------------------------


def check_parameters(model, data_path, counts: dict[str, int], seeds, device, dtype,
                     threads) -> torch.dtype | None:
    """Validate a SafeSeek notebook's parameters with clear errors; returns the torch dtype
    (None keeps the checkpoint's)."""
    from locus.zoo import EMBEDDED

    if not isinstance(model, str | os.PathLike):
        raise TypeError(f"model must be an embedded name or a folder path, got {model!r}")
    if str(model) not in EMBEDDED and not (Path(model) / "config.json").is_file():
        raise ValueError(f"model {str(model)!r} is neither an embedded model "
                         f"({', '.join(sorted(EMBEDDED))}) nor a checkpoint folder with a "
                         "config.json")
    if data_path is not None:
        if not isinstance(data_path, str | os.PathLike):
            raise TypeError(f"data must be None or a JSONL path, got {data_path!r}")
        if not Path(data_path).is_file():
            raise FileNotFoundError(f"data file {data_path} does not exist")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (not isinstance(seeds, list | tuple) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {sorted(DTYPES)}, got {dtype!r}")
    return None if dtype is None else DTYPES[dtype]
