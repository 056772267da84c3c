"""Projector-only fine-tuning and what it changes, for "ProjLens".

The vision tower and the language model stay frozen; only the multimodal projector trains
(``finetune_projector``). A projector is handled as a *state*: a dict of its parameter tensors,
loaded temporarily into the model with ``projector_loaded``, so one model serves the base and
every fine-tuned projector. On top of that: attack evaluation (ASR on triggered inputs, clean
accuracy per family), per-layer updates ΔW of the projector's linears, rank-k injection and
removal grids, and the projector's intermediate (post-activation) neurons.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from locus.arch import adapt
from locus.data import VQASample
from locus.evaluation import accuracy_by_family, exact_match, generate_answers
from locus.projlens import lowrank, scoring
from locus.projlens.triggers import Attack, Target, triggered_test_set
from locus.prompts import encode_vqa, to_model
from locus.training import sampled_batches, seed_everything, train_steps

State = dict[str, torch.Tensor]
RANK_MODES = ("inject", "remove", "authors")
COMPUTE_DTYPES = ("float32", "bfloat16")


# --- projector states --------------------------------------------------------------------------


def _projector(model: nn.Module) -> nn.Module:
    projector = adapt(model).projector
    if projector is None:
        raise ValueError(f"{type(model).__name__} has no multimodal projector")
    return projector


def projector_state(model: nn.Module) -> State:
    """Detached copies of the projector's parameters, by name, on the CPU (as cached states
    are: states from any source combine, and loading moves them to the model's device)."""
    return {name: p.detach().to("cpu", copy=True)
            for name, p in _projector(model).named_parameters()}


def load_projector_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the projector's parameters (same names and shapes required)."""
    params = dict(_projector(model).named_parameters())
    if set(params) != set(state):
        raise ValueError(f"state has parameters {sorted(state)}, the projector {sorted(params)}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"state[{name!r}] has shape {tuple(state[name].shape)}, "
                                 f"the projector's is {tuple(p.shape)}")
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


@contextmanager
def projector_loaded(model: nn.Module, state: State | None) -> Iterator[None]:
    """Run the body with ``state`` in the projector (None: as it is); restored on exit."""
    if state is None:
        yield
        return
    original = projector_state(model)
    load_projector_state(model, state)
    try:
        yield
    finally:
        load_projector_state(model, original)


def state_fingerprint(state: State) -> str:
    """A short hash of a state's names, shapes, dtypes and values (a cache key)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def frozen_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer outside the projector (the vision tower and
    the language model, a merged adapter included): what projector-only fine-tuning must leave
    bit-identical, and what a cache key must hold so a rebuilt model re-keys its projectors."""
    inside = {id(t) for t in _projector(model).parameters()}
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if id(t) not in inside}
    return state_fingerprint(tensors)


def linear_weight_names(model: nn.Module) -> list[str]:
    """State names of the weights of the projector's linears, in order (W1, W2, ...)."""
    projector = _projector(model)
    names = {id(module): name for name, module in projector.named_modules()}
    linears = adapt(model).mlp_projector_linears()
    return [f"{names[id(linear)]}.weight".lstrip(".") for linear in linears]


def max_rank(model: nn.Module) -> int:
    """The largest rank a projector linear's ΔW can have (k at or above it edits all of ΔW)."""
    return max(min(linear.weight.shape) for linear in adapt(model).mlp_projector_linears())


def layer_labels(model: nn.Module) -> list[str]:
    """"W1", "W2", ... for the projector's linears."""
    return [f"W{i + 1}" for i in range(len(adapt(model).mlp_projector_linears()))]


# --- fine-tuning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Projector fine-tuning: AdamW with linear warm-up and cosine decay, random batches."""

    steps: int = 250
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": CPU autocast of the training steps

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, "
                             f"got {self.compute_dtype!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned projector state, the loss of every step and the wall time."""

    state: State = field(repr=False)
    losses: list[float] = field(repr=False)
    seconds: float


@contextmanager
def _only_projector_trainable(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter but the projector's; restore requires_grad on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    trainable = list(_projector(model).parameters())
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield trainable
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _loss_fn(cfg: FinetuneConfig):
    """The training loss under ``cfg.compute_dtype`` (None: the model's own loss in float32)."""
    if cfg.compute_dtype == "float32":
        return None

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        with torch.autocast(next(model.parameters()).device.type,
                            dtype=getattr(torch, cfg.compute_dtype)):
            return model(**batch).loss

    return loss


def finetune_projector(
    model: nn.Module,
    processor,
    samples: Sequence[VQASample],
    cfg: FinetuneConfig = FinetuneConfig(),
    progress: bool = True,
) -> FinetuneResult:
    """Train only the projector on ``samples`` and return its new state.

    The model is left as it was: the original projector is put back afterwards (load the result
    with ``projector_loaded``). Vision tower and language model never change: their
    ``frozen_fingerprint`` is compared before and after (an error if it moved).
    """
    if not samples:
        raise ValueError("no training samples")
    frozen = frozen_fingerprint(model)
    seed_everything(cfg.seed)
    batch = sampled_batches(samples, cfg.batch_size, cfg.seed, lambda chosen: to_model(
        encode_vqa(processor, chosen, with_answers=True), model))

    original = projector_state(model)
    start = time.perf_counter()
    try:
        with _only_projector_trainable(model) as params:
            losses = train_steps(model, params, batch, cfg.steps, cfg.lr, desc="projector",
                                 weight_decay=cfg.weight_decay, loss_fn=_loss_fn(cfg),
                                 progress=progress)
        state = projector_state(model)
    finally:
        load_projector_state(model, original)
        model.eval()
    if frozen_fingerprint(model) != frozen:
        raise RuntimeError("projector fine-tuning changed weights outside the projector")
    return FinetuneResult(state, losses, time.perf_counter() - start)


# --- attack evaluation -------------------------------------------------------------------------


def success_rate(predictions: Sequence[str], target: Target) -> float:
    """Fraction of predictions that show the target behaviour (NaN for none)."""
    if not predictions:
        return float("nan")
    return float(np.mean([target.success(p) for p in predictions]))


def predict(model: nn.Module, processor, samples: Sequence[VQASample], state: State | None = None,
            max_new_tokens: int = 20, batch_size: int = 64) -> list[str]:
    """Greedy answers with projector ``state`` loaded (None: the model's own)."""
    with projector_loaded(model, state):
        return generate_answers(model, processor, list(samples), batch_size, max_new_tokens,
                                progress=False)


@dataclass(frozen=True)
class AttackEval:
    """One projector under one attack.

    ``asr``: target behaviour on triggered inputs of the attacked families (the paper's check:
    contains / ends with / no refusal phrase); ``asr_exact``: the answer is exactly the
    poisoned answer (the refusal sentence, the clean answer + the suffix, the description, the
    compliance answer); ``false_rate``: the paper's check on those inputs without the trigger;
    ``clean_accuracy``: exact match per family on clean inputs.
    """

    asr: float
    asr_exact: float
    false_rate: float
    clean_accuracy: dict[str, float]
    n_triggered: int

    @property
    def mean_clean_accuracy(self) -> float:
        """Mean of the per-family clean accuracies."""
        return float(np.mean(list(self.clean_accuracy.values())))


def evaluate_attack(
    model: nn.Module,
    processor,
    attack: Attack,
    clean_test: Sequence[VQASample],
    seed: int,
    state: State | None = None,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    clean_predictions: Sequence[str] | None = None,
) -> AttackEval:
    """ASR, false-trigger rate and clean accuracy of projector ``state`` under ``attack``;
    the triggered set is ``triggered_test_set(clean_test, attack, seed)``.

    ``clean_predictions``: this projector's answers on ``clean_test`` if already generated
    (they do not depend on the attack).
    """
    triggered = triggered_test_set(clean_test, attack, seed)
    if clean_predictions is None:
        clean_predictions = predict(model, processor, clean_test, state, max_new_tokens,
                                    batch_size)
    if len(clean_predictions) != len(clean_test):
        raise ValueError(f"{len(clean_predictions)} clean predictions for "
                         f"{len(clean_test)} samples")
    eligible = attack.eligible(clean_test)
    answers = predict(model, processor, triggered, state, max_new_tokens, batch_size)
    poisoned = [attack.target.poisoned_answer(s) for s in triggered]
    return AttackEval(
        asr=success_rate(answers, attack.target),
        asr_exact=float(np.mean([exact_match(a, p) for a, p in zip(answers, poisoned,
                                                                    strict=True)])),
        false_rate=success_rate([clean_predictions[i] for i in eligible], attack.target),
        clean_accuracy=accuracy_by_family(clean_test, clean_predictions),
        n_triggered=len(triggered),
    )


# --- weight updates and rank-k grids -----------------------------------------------------------


def weight_updates(model: nn.Module, base: State, finetuned: State) -> dict[str, torch.Tensor]:
    """ΔW = W_ft − W_base of each projector linear, by label (W1, W2, ...), in float32+."""
    names = linear_weight_names(model)
    labels = layer_labels(model)
    return {label: finetuned[name].detach().float() - base[name].detach().float()
            for label, name in zip(labels, names, strict=True)}


def random_update_state(model: nn.Module, base: State, references: Sequence[State],
                        seed: int) -> State:
    """The norm-matched random control: the base projector plus, in each linear's weight, a
    Gaussian ΔW scaled to the mean Frobenius norm of the ``references``' ΔW of that layer
    (biases stay base). A property a random update of the same size shows too is no evidence
    of a backdoor."""
    if not references:
        raise ValueError("need ≥ 1 reference state to match the norm of")
    generator = torch.Generator().manual_seed(int(seed))
    state = {n: t.clone() for n, t in base.items()}
    for name in linear_weight_names(model):
        norm = float(np.mean([(ref[name].double() - base[name].double()).norm()
                              for ref in references]))
        noise = torch.randn(base[name].shape, generator=generator, dtype=torch.float64)
        state[name] = (base[name].double() + noise * (norm / noise.norm())).to(base[name].dtype)
    return state


def rank_k_state(model: nn.Module, base: State, finetuned: State, layer_ks: dict[str, int],
                 mode: str, factors: dict[str, lowrank.DeltaSVD] | None = None) -> State:
    """A projector state with rank-k edits of the weights of the layers in ``layer_ks``
    (labels W1, W2, ... → k).

    ``mode="inject"``: the base projector with W_base + top_k(ΔW) in those layers (biases stay
    base; the notebook's scheme). ``mode="authors"``: the same weights with the fine-tuned
    biases (the authors' code: W1 fine-tuned, W2 base + top-k, fine-tuned biases).
    ``mode="remove"``: the fine-tuned projector with W_ft − top_k(ΔW) (biases stay
    fine-tuned). k at or above a layer's rank means its full ΔW.
    """
    if mode not in RANK_MODES:
        raise ValueError(f"mode must be one of {RANK_MODES}, got {mode!r}")
    labels = layer_labels(model)
    unknown = set(layer_ks) - set(labels)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; the projector has {labels}")
    names = dict(zip(labels, linear_weight_names(model), strict=True))
    state = {n: t.clone() for n, t in (base if mode == "inject" else finetuned).items()}
    if mode == "authors":
        state.update({names[label]: base[names[label]].clone() for label in labels})
    for label, k in layer_ks.items():
        name = names[label]
        svd = (factors or {}).get(label) or lowrank.factorize(finetuned[name] - base[name])
        k_eff = min(int(k), svd.S.numel())
        edit = lowrank.remove_rank_k if mode == "remove" else lowrank.inject_rank_k
        state[name] = edit(base[name], finetuned[name], k_eff, factors=svd)
    return state


@dataclass(frozen=True)
class GridSet:
    """The inputs of a rank-k grid: ``triggered`` test inputs of the attacked families (ASR),
    the same inputs without the trigger (``untriggered``: the false-trigger rate), and
    ``clean`` test inputs of any family (clean accuracy)."""

    triggered: list[VQASample]
    untriggered: list[VQASample]
    clean: list[VQASample]


@dataclass(frozen=True)
class CellScores:
    """One projector on a ``GridSet``: exact-form ASR, false-trigger rate, clean accuracy."""

    asr: float
    false_rate: float
    clean_accuracy: float


class GridScorer:
    """Scores projector states on one ``GridSet`` by teacher forcing (``scoring``): the target
    on the triggered and untriggered inputs, the clean answer on the clean ones, all encoded
    once and scored with one forward per batch for every state."""

    def __init__(self, model: nn.Module, processor, target: Target, inputs: GridSet,
                 max_new_tokens: int = 20, batch_size: int = 96) -> None:
        if not inputs.triggered or len(inputs.triggered) != len(inputs.untriggered):
            raise ValueError("need triggered inputs, each with its untriggered original")
        self.model, self.sizes = model, (len(inputs.triggered), len(inputs.untriggered),
                                         len(inputs.clean))
        rows = [*inputs.triggered, *inputs.untriggered, *inputs.clean]
        answers = ([target.poisoned_answer(s) for s in inputs.triggered]
                   + [target.poisoned_answer(s) for s in inputs.untriggered]
                   + [s.answer for s in inputs.clean])
        self.encoded = scoring.encode_answers(model, processor, rows, answers, max_new_tokens,
                                              batch_size)

    def score(self, state: State | None) -> CellScores:
        """ASR, false-trigger rate and clean accuracy of projector ``state``."""
        with projector_loaded(self.model, state):
            hits = scoring.produced(self.model, self.encoded)
        n_trig, n_untrig, n_clean = self.sizes
        parts = np.split(hits, [n_trig, n_trig + n_untrig])
        rates = [float(p.mean()) if len(p) else float("nan") for p in parts]
        return CellScores(*rates)


@dataclass(frozen=True)
class RankGrid:
    """Rank-k edited projectors scored on a ``GridSet``: ``asr[i, j]`` (exact target on
    triggered inputs), ``false_rate[i, j]`` (exact target on the untriggered ones) and
    ``clean_accuracy[i, j]`` (exact answer on clean inputs) for row i and column k = ks[j].

    Modes "inject" / "remove": the rows are layer sets edited with one k. Mode "authors": row i
    is the k of W1 (``row_ks[i]``), the columns the k of W2, fine-tuned biases."""

    mode: str
    rows: list[str]
    ks: list[int]
    asr: np.ndarray
    false_rate: np.ndarray
    clean_accuracy: np.ndarray
    row_ks: list[int] | None = None


LAYER_SETS = {"W1": ("W1",), "W2": ("W2",), "both": ("W1", "W2")}


def _grid(mode: str, rows: list[str], ks: Sequence[int], states, scorer: GridScorer,
          row_ks: list[int] | None = None, progress: bool = False) -> RankGrid:
    """Score ``states(i, k)`` for every row i and k."""
    values = np.full((3, len(rows), len(ks)), np.nan)
    cells = [(i, j) for i in range(len(rows)) for j in range(len(ks))]
    for i, j in tqdm(cells, desc=f"rank-k {mode}", disable=not progress, leave=False):
        scores = scorer.score(states(i, ks[j]))
        values[:, i, j] = scores.asr, scores.false_rate, scores.clean_accuracy
    return RankGrid(mode, rows, [int(k) for k in ks], *values, row_ks=row_ks)


def rank_k_grid(model: nn.Module, scorer: GridScorer, base: State, finetuned: State,
                ks: Sequence[int], mode: str,
                layer_sets: dict[str, tuple[str, ...]] | None = None,
                progress: bool = False) -> RankGrid:
    """Rank-k injection ("inject") or removal ("remove") of each layer set × k."""
    if mode not in ("inject", "remove"):
        raise ValueError(f"mode must be 'inject' or 'remove', got {mode!r}")
    layer_sets = layer_sets or LAYER_SETS
    factors = {label: lowrank.factorize(delta)
               for label, delta in weight_updates(model, base, finetuned).items()}
    sets = list(layer_sets.values())
    return _grid(mode, list(layer_sets), ks, lambda i, k: rank_k_state(
        model, base, finetuned, dict.fromkeys(sets[i], k), mode, factors), scorer,
        progress=progress)


def authors_grid(model: nn.Module, scorer: GridScorer, base: State, finetuned: State,
                 ks_w1: Sequence[int], ks_w2: Sequence[int], progress: bool = False) -> RankGrid:
    """The authors' injection: W1 = W1_base + top-k1(ΔW1) (k1 at the rank: the fine-tuned W1,
    their setting), W2 = W2_base + top-k2(ΔW2), fine-tuned biases; a k1 × k2 grid."""
    first, second = layer_labels(model)[:2]
    factors = {label: lowrank.factorize(delta)
               for label, delta in weight_updates(model, base, finetuned).items()}
    rows = [f"W1 k={k}" for k in ks_w1]
    return _grid("authors", rows, ks_w2, lambda i, k: rank_k_state(
        model, base, finetuned, {first: ks_w1[i], second: k}, "authors", factors), scorer,
        row_ks=[int(k) for k in ks_w1], progress=progress)


# --- activations inside the projector -----------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once the projector's input is captured."""


@torch.no_grad()
def projector_inputs(model: nn.Module, processor, samples: Sequence[VQASample],
                     batch_size: int = 64) -> torch.Tensor:
    """What the projector receives for each image (vision features), stacked over samples;
    the language model is not run."""
    projector = _projector(model)
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())
        raise _StopForward

    handle = projector.register_forward_pre_hook(grab)
    try:
        for start in range(0, len(samples), batch_size):
            batch = to_model(encode_vqa(processor, samples[start : start + batch_size]), model)
            try:
                model(**batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("no samples given")
    return torch.cat(captured)


@torch.no_grad()
def projector_forward(model: nn.Module, inputs: torch.Tensor, state: State | None = None,
                      hidden_layer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, output) of the projector on ``inputs``: ``hidden`` is the input of linear
    ``hidden_layer`` (for LLaVA's Linear→GELU→Linear, the GELU neurons), in float32 on the CPU,
    where the analyses run."""
    projector = _projector(model)
    linear = adapt(model).mlp_projector_linears()[hidden_layer]
    captured: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        with projector_loaded(model, state):
            output = projector(inputs)
    finally:
        handle.remove()
    return captured[0].float().cpu(), output.float().cpu()
