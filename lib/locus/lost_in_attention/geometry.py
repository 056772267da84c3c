"""Per-layer residual-stream geometry of attention and FFN updates ("Lost in Attention", claim 1).

Each decoder layer updates the residual stream twice, ``X_attn = X_in + ΔX_attn`` and
``X_ffn = X_attn + ΔX_ffn``. For every sample, layer and token group ("all", "visual", "text";
padding is always left out) this module records, into a
:class:`~locus.lost_in_attention.metrics.LayerMetricTable`:

- ``"attn"``: RID (with its terms) and MixIG of ``X_in → X_attn``;
- ``"ffn"``: RID and MixIG of ``X_attn → X_ffn`` (the state the FFN updates: the paper's logic);
- ``"ffn_input"``: RID and MixIG of ``X_in → X_ffn`` (the authors' code judges the FFN's RID
  against the layer input; its MixIG is the TME difference of consecutive states, ``"ffn"``);
- ``"noise_delta"``: the Noise Δ control, ``X_in → X_in + N`` with N Gaussian noise of the
  Frobenius norm of that sample's ΔX_attn on the same tokens;
- ``"rope"``: the ε_RoPE null baseline, RID(X_attn, X_attn⁰) where X_attn⁰ = X_in + the same
  layer's attention module run again on the same (normed) input, mask and weights, but with the
  rotary embedding switched off (position embeddings cos = 1, sin = 0, so q and k are not
  rotated). It measures how much a change of position encoding alone moves the attention state;
- ``"noise_qkv"``: the Noise QKV control, the ``"attn"`` update measured on a copy of the model
  whose q/k/v projections are Gaussian with each tensor's own mean and std
  (:func:`noised_qkv_copy`); the noise propagates, so later layers see noised inputs too.

States are streamed layer by layer (:func:`locus.hooks.stream_residuals`) and the metrics are
computed in float64 whatever the model dtype. With S ≤ H (a sample has fewer tokens than the
hidden size) the state X has full row rank, so the column term of ΔD is 0 by construction; the
table's ``col_degenerate`` fraction says where that happened.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from locus import params, zoo
from locus.arch import Arch, adapt
from locus.data import (
    VQA_FAMILIES,
    ChatSample,
    VQASample,
    load_chat_jsonl,
    load_vqa_jsonl,
    make_vqa_samples,
)
from locus.hooks import stream_residuals
from locus.lost_in_attention.metrics import (
    TME_VARIANTS,
    LayerMetricTable,
    gaussian_like_weights,
    noise_like_update,
    rid,
    token_mixing_entropies,
)
from locus.prompts import encode_chat, encode_vqa
from locus.safety_data import benign_questions

TOKEN_GROUPS = ("all", "visual", "text")
# The toy benchmark families: existence (POPE analogue), attribute, counting, spatial and the
# text-heavy family (arithmetic, the MathVista analogue); harmful and caption are left out.
BENCHMARK_FAMILIES = ("existence", "attribute", "counting", "spatial", "text")
UPDATE_KINDS = ("attn", "ffn", "ffn_input", "noise_delta", "noise_qkv", "rope")
# The recorded MixIG metric of each TME variant: "mixig" is the paper's mean-over-rows one.
MIXIG_METRICS = {v: "mixig" if v == "mean" else f"mixig_{v}" for v in TME_VARIANTS}
# The paper's headline table (RID, MixIG), aggregated over 15 models, and its null baseline.
PAPER_TABLE = {
    "attn": (0.06, 0.61),
    "ffn": (0.21, 0.02),
    "noise_delta": (0.61, -0.80),
    "noise_qkv": (0.44, -0.50),
}
PAPER_EPS_ROPE = 0.062
KIND_LABELS = {
    "attn": "Attention",
    "ffn": "FFN",
    "ffn_input": "FFN (vs X_in)",
    "noise_delta": "Noise Δ",
    "noise_qkv": "Noise QKV",
    "rope": "ε_RoPE",
}


@dataclass(frozen=True)
class GeometryConfig:
    """What :func:`record_updates` measures.

    ``groups``: token groups; every MixIG variant of
    :data:`~locus.lost_in_attention.metrics.TME_VARIANTS` is recorded (see :data:`MIXIG_METRICS`),
    sharpened ones with weights to the power ``mixig_power``;
    ``noise_delta``/``rope_baseline``: record those controls; ``rtol``: relative singular-value
    floor of the numerical rank (None: ``min(1e-3, max(S, H) · eps)`` of the model's dtype);
    ``layers``: decoder layers (None: all).
    """

    groups: tuple[str, ...] = TOKEN_GROUPS
    mixig_power: float = 8.0
    noise_delta: bool = True
    rope_baseline: bool = True
    rtol: float | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        groups = (self.groups,) if isinstance(self.groups, str) else tuple(self.groups)
        unknown = [g for g in groups if g not in TOKEN_GROUPS]
        if unknown or not groups:
            raise ValueError(f"groups must be a non-empty subset of {TOKEN_GROUPS}, got {groups}")
        object.__setattr__(self, "groups", groups)
        if not self.mixig_power > 0:
            raise ValueError(f"mixig_power must be > 0, got {self.mixig_power}")
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"rtol must be None or >= 0, got {self.rtol}")


def token_group_masks(
    arch: Arch, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Bool (batch, seq) masks of the groups: "all" = non-padding, "visual" = image tokens,
    "text" = non-padding non-image tokens."""
    valid = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(torch.bool)
    )
    visual = arch.visual_token_mask(input_ids) & valid
    return {"all": valid, "visual": visual, "text": valid & ~visual}


def rank_rtol(model_dtype: torch.dtype, shape: tuple[int, int]) -> float:
    """The default numerical-rank floor: numpy's ``max(S, H) · eps`` in the model's dtype, capped
    at 1e-3, so that rounding noise of a float32/bfloat16 forward pass is not counted as rank."""
    return min(1e-3, max(shape) * torch.finfo(model_dtype).eps)


class _NoRopeTap:
    """Forward hooks that re-run each attention module with the rotary embedding switched off.

    The re-run calls ``module.forward`` (not the module), so no hook sees it, with the layer's own
    keyword arguments except ``position_embeddings = (1, 0)`` and no KV cache; what is kept is
    the residual update of that output (``Arch.attention_update``: Gemma norms it first).
    """

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.outputs: dict[int, torch.Tensor] = {}

    def on_attention(self, i: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        position = kwargs.get("position_embeddings")
        if position is None:
            raise ValueError(
                "the ε_RoPE baseline needs rotary position embeddings, but the attention module "
                f"{type(module).__name__} received no position_embeddings; set "
                "rope_baseline=False for this model"
            )
        cos, sin = position
        flat = {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin)),
                "past_key_values": None}
        rerun = module.forward(*args, **flat)
        rerun = (rerun[0] if isinstance(rerun, tuple) else rerun).detach()
        self.outputs[i] = self.arch.attention_update(i, rerun).detach()


@contextmanager
def _norope_hooks(arch: Arch, layers: Sequence[int], tap: _NoRopeTap):
    handles = []
    try:
        for i in layers:
            hook = partial(tap.on_attention, i)
            handles.append(arch.attention(i).register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


SMALL_MATRIX = 1 << 20


@contextmanager
def _threads_for(state: torch.Tensor):
    """One CPU thread while computing metrics of a small per-sample state: LAPACK threading
    only adds synchronisation there (a 26×128 SVD took 20 ms with 2 threads on a busy 2-core
    machine, 0.4 ms with 1). Large states and GPU tensors keep the current setting."""
    threads = torch.get_num_threads()
    small = state.device.type == "cpu" and state.numel() <= SMALL_MATRIX
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _UpdateRecorder:
    """The stream_residuals callback: per sample and group, the metrics of one layer's updates."""

    def __init__(
        self,
        table: LayerMetricTable,
        config: GeometryConfig,
        masks: dict[str, torch.Tensor],
        generator: torch.Generator,
        model_dtype: torch.dtype,
        attn_kind: str,
        attn_only: bool,
        norope: _NoRopeTap | None,
    ) -> None:
        self.table = table
        self.config = config
        self.masks = masks
        self.generator = generator
        self.model_dtype = model_dtype
        self.attn_kind = attn_kind
        self.attn_only = attn_only
        self.norope = norope

    def __call__(self, layer: int, states: dict[str, torch.Tensor]) -> None:
        x_in, x_attn, x_ffn = states["input"], states["attn"], states["ffn"]
        x_norope = None
        if self.norope is not None:
            x_norope = x_in + self.norope.outputs.pop(layer).to(x_in.dtype)
        with _threads_for(x_in[0]):
            for group in self.config.groups:
                mask = self.masks[group]
                for row in range(x_in.shape[0]):
                    keep = mask[row].to(x_in.device)
                    if int(keep.sum()) < 2:
                        continue
                    self._record_sample(
                        layer, group, x_in[row, keep], x_attn[row, keep], x_ffn[row, keep],
                        None if x_norope is None else x_norope[row, keep],
                    )

    def _record_sample(self, layer, group, x_in, x_attn, x_ffn, x_norope) -> None:
        cfg = self.config
        rtol = cfg.rtol if cfg.rtol is not None else rank_rtol(self.model_dtype, x_in.shape)
        tme_in, tme_attn = self._tme(x_in), self._tme(x_attn)
        self._add(layer, self.attn_kind, group, x_in, x_attn, tme_in, tme_attn, rtol)
        if self.attn_only:
            return
        tme_ffn = self._tme(x_ffn)
        self._add(layer, "ffn", group, x_attn, x_ffn, tme_attn, tme_ffn, rtol)
        self._add(layer, "ffn_input", group, x_in, x_ffn, tme_in, tme_ffn, rtol)
        if cfg.noise_delta:
            x_noise = x_in + noise_like_update(x_attn - x_in, self.generator).to(x_in.device)
            self._add(layer, "noise_delta", group, x_in, x_noise, tme_in, self._tme(x_noise),
                      rtol)
        if x_norope is not None:
            self.table.add(layer, "rope", group, rid(x_attn, x_norope, rtol=rtol))

    def _tme(self, x: torch.Tensor) -> dict[str, float]:
        """Every TME variant of one state, computed once and shared by the updates using it."""
        return token_mixing_entropies(x, TME_VARIANTS, self.config.mixig_power)

    def _add(self, layer, kind, group, x, x_new, tme_x, tme_new, rtol) -> None:
        gains = {MIXIG_METRICS[v]: tme_new[v] - tme_x[v] for v in TME_VARIANTS}
        self.table.add(layer, kind, group, rid(x, x_new, rtol=rtol), **gains)


@torch.no_grad()
def record_updates(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    table: LayerMetricTable,
    config: GeometryConfig = GeometryConfig(),
    generator: torch.Generator | None = None,
    attn_kind: str = "attn",
    attn_only: bool = False,
) -> LayerMetricTable:
    """One forward pass of ``batch`` (model inputs with ``input_ids``, optionally
    ``attention_mask``, ``pixel_values``), adding each sample's per-layer metrics to ``table``.

    ``attn_kind`` names the attention update in the table (``"noise_qkv"`` for a noised copy);
    ``attn_only`` records only it (no FFN, Noise Δ or ε_RoPE). ``generator`` draws Noise Δ.
    """
    if not isinstance(table, LayerMetricTable):
        raise TypeError(f"table must be a LayerMetricTable, got {type(table).__name__}")
    if "input_ids" not in batch:
        raise ValueError(f"batch needs input_ids (to find the token groups); got {sorted(batch)}")
    arch = adapt(model)
    layers = list(range(arch.num_layers)) if config.layers is None else list(config.layers)
    masks = token_group_masks(arch, batch["input_ids"], batch.get("attention_mask"))
    norope = _NoRopeTap(arch) if config.rope_baseline and not attn_only else None
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    recorder = _UpdateRecorder(table, config, masks, generator, model.dtype, attn_kind,
                               attn_only, norope)
    rope_hooks = nullcontext() if norope is None else _norope_hooks(arch, layers, norope)
    with rope_hooks, stream_residuals(
        model, recorder, layers=layers, dtype=torch.float64, input_ids=batch["input_ids"]
    ):
        model(**batch, use_cache=False)
    return table


@torch.no_grad()
def noised_qkv_copy(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """A deep copy of ``model`` whose decoder q/k/v projections (weights, and biases where they
    exist) are Gaussian with each tensor's own mean and std ("Noise QKV"; a fused qkv_proj is
    noised block by block, see ``Arch.rows``); ``model`` is untouched. The vision tower and
    projector are copied unchanged."""
    arch = adapt(model)
    noised = copy.deepcopy(model)
    noised_arch = adapt(noised)
    for i in range(arch.num_layers):
        for proj in (noised_arch.rows(i, name) for name in ("q", "k", "v")):
            proj.weight.copy_(gaussian_like_weights(proj.weight, generator))
            if proj.bias is not None:
                proj.bias.copy_(gaussian_like_weights(proj.bias, generator))
    return noised.eval()


# This project's benign English questions with short answers (4 families of 24), the text
# prompts of a text-only model when no data file is given.
def vqa_batches(
    processor, samples: Sequence[VQASample], batch_size: int, device, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    """Left-padded model inputs of ``samples`` in batches, on ``device``, pixels in ``dtype``."""
    return _batches(partial(encode_vqa, processor), samples, batch_size, device, dtype)


def model_batches(
    companion, samples: Sequence[VQASample] | Sequence[ChatSample], batch_size: int, device,
    dtype: torch.dtype,
) -> list[dict[str, torch.Tensor]]:
    """``vqa_batches`` of image questions, or left-padded chat prompts of text samples (for a
    text-only model, whose ``companion`` is its tokenizer)."""
    if samples and all(isinstance(s, ChatSample) for s in samples):
        return _batches(partial(encode_chat, companion), samples, batch_size, device, dtype)
    return vqa_batches(companion, samples, batch_size, device, dtype)


def _batches(encode, samples: Sequence, batch_size: int, device, dtype: torch.dtype
             ) -> list[dict[str, torch.Tensor]]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batches = []
    for start in range(0, len(samples), batch_size):
        batch = encode(samples[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batches.append(batch)
    return batches


def sample_set(
    data_path: str | Path | None,
    n_per_family: int,
    seed: int,
    families: Sequence[str] = BENCHMARK_FAMILIES,
) -> list[VQASample]:
    """The samples of one seed: generated toy samples (held-out seeds, ``HELD_OUT_SEED + seed``,
    never the training pools) or, from a JSONL file (see :func:`locus.data.load_vqa_jsonl`), a
    seeded random subset of up to ``n_per_family`` per family. Only ``families`` are kept."""
    if data_path is None:
        return make_vqa_samples(n_per_family, zoo.HELD_OUT_SEED + seed, tuple(families))
    loaded = [s for s in load_vqa_jsonl(data_path) if s.family in families]
    if not loaded:
        raise ValueError(f"{data_path} has no samples of the families {tuple(families)}")
    return _per_family_subset(loaded, families, n_per_family, seed)


def _per_family_subset(samples: Sequence, families: Sequence[str], n_per_family: int,
                       seed: int) -> list:
    """A seeded random subset of up to ``n_per_family`` samples of each family, in file order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for family in families:
        members = [s for s in samples if s.family == family]
        keep = sorted(rng.permutation(len(members))[:n_per_family])
        chosen += [members[i] for i in keep]
    return chosen


def text_sample_set(data_path: str | Path | None, n_per_family: int, seed: int
                    ) -> list[ChatSample]:
    """The text prompts of one seed, for a text-only model: a seeded random subset of up to
    ``n_per_family`` prompts of every family of a chat JSONL file (see
    :func:`locus.data.load_chat_jsonl`; None: the project's benign questions,
    :func:`locus.safety_data.benign_questions`, with their first accepted answer). With one
    file, the subsets of different seeds overlap."""
    loaded = (load_chat_jsonl(data_path) if data_path is not None else
              [ChatSample(q.prompt, q.answers[0], q.family) for q in benign_questions()])
    if not loaded:
        raise ValueError(f"{data_path} has no prompts")
    families = list(dict.fromkeys(s.family for s in loaded))
    return _per_family_subset(loaded, families, n_per_family, seed)


def samples_for(arch: Arch, data_path: str | Path | None, n_per_family: int, seed: int,
                families: Sequence[str] = BENCHMARK_FAMILIES) -> list:
    """The samples of one seed for the model ``arch`` describes: ``sample_set`` (image questions
    of ``families``) for a vision-language model, ``text_sample_set`` (every family of the
    text prompts; ``families`` name image-question families only) for a text-only one."""
    if arch.vision_tower is None:
        return text_sample_set(data_path, n_per_family, seed)
    return sample_set(data_path, n_per_family, seed, families)


def residual_geometry(
    model: nn.Module,
    processor,
    samples: Sequence[VQASample],
    config: GeometryConfig = GeometryConfig(),
    seed: int = 0,
    noise_qkv: bool = True,
    batch_size: int = 32,
) -> LayerMetricTable:
    """Every update kind of :data:`UPDATE_KINDS` (Noise QKV when ``noise_qkv``) over ``samples``,
    per layer and token group. ``seed`` fixes the Noise Δ draws and the Noise QKV weights."""
    if not samples:
        raise ValueError("samples is empty: nothing to measure")
    device = next(model.parameters()).device
    batches = model_batches(processor, samples, batch_size, device, model.dtype)
    table = LayerMetricTable()
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        record_updates(model, batch, table, config, generator)
    if noise_qkv:
        noised = noised_qkv_copy(model, torch.Generator().manual_seed(seed + 1))
        for batch in batches:
            record_updates(noised, batch, table, config, generator, "noise_qkv", attn_only=True)
        del noised
    return table


def overall_means(
    table: LayerMetricTable, group: str, metrics: Sequence[str],
    layers: Sequence[int] | None = None,
) -> dict:
    """``{kind: {metric: mean over the layers (None: all) and samples}}`` for the kinds recorded
    for ``group``; metrics a kind lacks (MixIG of ε_RoPE) are NaN."""
    recorded = {(kind, metric) for kind, g, metric in table.keys() if g == group}
    kinds = [k for k in UPDATE_KINDS if any((k, m) in recorded for m in metrics)]
    return {
        kind: {
            metric: table.overall_mean(kind, group, metric, layers)
            if (kind, metric) in recorded else math.nan
            for metric in metrics
        }
        for kind in kinds
    }


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample std over seeds (ddof=1; 0 for one seed) of each kind's overall mean over
    ``layers`` (None: all)."""

    group: str
    layers: tuple[int, ...] | None
    kinds: tuple[str, ...]
    metrics: tuple[str, ...]
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    per_seed: dict[str, dict[str, list[float]]]


def summarize_seeds(
    tables: Sequence[LayerMetricTable],
    group: str = "all",
    metrics: Sequence[str] = ("rid", "delta_s", "delta_d_col", "delta_d_row",
                              *MIXIG_METRICS.values(), "col_degenerate"),
    layers: Sequence[int] | None = None,
) -> SeedSummary:
    """Combine per-seed tables: each seed's mean over ``layers`` (None: all) and samples, then
    mean and std over seeds (the spread between sample sets and noise draws)."""
    if not tables:
        raise ValueError("tables is empty: pass one LayerMetricTable per seed")
    layers = None if layers is None else tuple(layers)
    per_table = [overall_means(t, group, metrics, layers) for t in tables]
    kinds = tuple(k for k in UPDATE_KINDS if all(k in p for p in per_table))
    per_seed = {k: {m: [p[k][m] for p in per_table] for m in metrics} for k in kinds}
    mean = {k: {m: float(np.mean(v)) for m, v in per_seed[k].items()} for k in kinds}
    std = {
        k: {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in per_seed[k].items()}
        for k in kinds
    }
    return SeedSummary(group, layers, kinds, tuple(metrics), mean, std, per_seed)


def layer_curves(
    tables: Sequence[LayerMetricTable], kind: str, group: str, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer (layers, mean over seeds, std over seeds) of one metric, for the figure."""
    stats = [t.layer_stats(kind, group, metric) for t in tables]
    values = np.stack([s.mean for s in stats])
    std = values.std(axis=0, ddof=1) if len(stats) > 1 else np.zeros(values.shape[1])
    return stats[0].layers, values.mean(axis=0), std


def layers_where_below(
    tables: Sequence[LayerMetricTable], group: str, metric: str, lower: str = "attn",
    higher: str = "ffn", margin: float = 0.01,
) -> list[int]:
    """The layers where the seed-mean ``metric`` of update ``lower`` is below that of
    ``higher`` by more than ``margin``."""
    layers, low, _ = layer_curves(tables, lower, group, metric)
    _, high, _ = layer_curves(tables, higher, group, metric)
    return [int(layer) for layer, a, b in zip(layers, low, high, strict=True) if a < b - margin]


def summary_markdown(summary: SeedSummary) -> str:
    """The measured table beside the paper's: update × (RID, its terms, MixIG and its recorded
    variants), mean ± std over seeds."""
    extra = [m for m in list(MIXIG_METRICS.values())[1:] if m in summary.metrics and any(
        not math.isnan(summary.mean[k][m]) for k in summary.kinds)]
    names = {"mixig_sharpened": "MixIG sharpened", "mixig_last_row": "MixIG last row",
             "mixig_last_row_sharpened": "MixIG last row sharpened"}
    columns = ["RID", "ΔS", "ΔD row", "ΔD col", "MixIG"] + [names[m] for m in extra]
    rows = [
        f"| update ({summary.group} tokens) | " + " | ".join(columns)
        + " | paper RID | paper MixIG |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for kind in summary.kinds:
        m, s = summary.mean[kind], summary.std[kind]
        paper = PAPER_TABLE.get(kind, (PAPER_EPS_ROPE, math.nan) if kind == "rope" else None)
        metrics = ["rid", "delta_s", "delta_d_row", "delta_d_col", "mixig", *extra]
        cells = [KIND_LABELS[kind], *(_pm(m[k], s[k]) for k in metrics),
                 _fmt(paper[0]) if paper else "–", _fmt(paper[1]) if paper else "–"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _pm(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


@dataclass(frozen=True)
class Reading:
    """One reading of the decoupling claim: the FFN update whose RID (``rid_ffn``) and MixIG
    (``mixig_ffn``) are judged ("ffn": X_attn → X_ffn, "ffn_input": X_in → X_ffn), the TME
    variant of MixIG and the first layer averaged over (0: all layers; 1: layer 0, which
    rewrites the embeddings, left out)."""

    name: str
    rid_ffn: str = "ffn"
    mixig_ffn: str = "ffn"
    mixig_variant: str = "mean"
    first_layer: int = 0

    def __post_init__(self) -> None:
        if self.rid_ffn not in ("ffn", "ffn_input") or self.mixig_ffn not in ("ffn", "ffn_input"):
            raise ValueError(f"rid_ffn and mixig_ffn must be 'ffn' or 'ffn_input', got "
                             f"{self.rid_ffn!r}, {self.mixig_ffn!r}")
        if self.mixig_variant not in TME_VARIANTS:
            raise ValueError(f"mixig_variant must be one of {TME_VARIANTS}, got "
                             f"{self.mixig_variant!r}")
        if isinstance(self.first_layer, bool) or not isinstance(self.first_layer, int) or (
                self.first_layer < 0):
            raise ValueError(f"first_layer must be an int >= 0, got {self.first_layer!r}")

    @property
    def mixig_metric(self) -> str:
        return MIXIG_METRICS[self.mixig_variant]


# The paper's text: the FFN updates X_attn; TME is the mean over rows; every layer counts.
PAPER_READING = Reading("paper")
# The authors' code: RID of the FFN against the layer input (their novelty uses X_in's SVD for
# both updates), MixIG as the TME difference of consecutive states, TME of the last row
# sharpened with α = 8 (tme_hidden's defaults agg="last", alpha=8), every layer.
CODE_READING = Reading("authors' code", "ffn_input", "ffn", "last_row_sharpened")
FFN_REFERENCE_LABELS = {("ffn", "ffn"): "X_attn", ("ffn_input", "ffn_input"): "X_in",
                        ("ffn_input", "ffn"): "X_in (RID), X_attn (MixIG)"}


def specification_readings() -> list[Reading]:
    """Every combination of FFN reference (X_attn; X_in; the authors' mix), TME variant and
    layers (all; from layer 1): the rows of the decoupling specification curve."""
    readings = []
    for (rid_ffn, mixig_ffn), label in FFN_REFERENCE_LABELS.items():
        for variant in TME_VARIANTS:
            for first in (0, 1):
                name = f"FFN vs {label}; TME {variant}; layers {'all' if first == 0 else '≥ 1'}"
                readings.append(Reading(name, rid_ffn, mixig_ffn, variant, first))
    return readings


@dataclass(frozen=True)
class DecouplingCheck:
    """The rules of the decoupling verdict under one :class:`Reading`, each evaluated on the
    seed means and on every seed, and the control rules beside them."""

    reading: Reading
    rid_attn_below_ffn: bool
    mixig_attn_above_ffn: bool
    rid_rule_every_seed: bool
    mixig_rule_every_seed: bool
    attn_rid_over_eps_rope: float
    controls_rid_above_attn: bool
    controls_mixig_below_attn: bool

    @property
    def verdict(self) -> str:
        """'holds': both orderings hold on the means and in every seed; 'partly': exactly one
        ordering holds (or both on the means but not in every seed); else 'does not hold'."""
        both = self.rid_attn_below_ffn and self.mixig_attn_above_ffn
        if both and self.rid_rule_every_seed and self.mixig_rule_every_seed:
            return "holds"
        if both or self.rid_attn_below_ffn or self.mixig_attn_above_ffn:
            return "partly"
        return "does not hold"

    @property
    def rope_verdict(self) -> str:
        """'holds' when attention RID ≤ ε_RoPE ("adds no more than a position change does"),
        'partly' when ≤ 2 ε_RoPE, else 'does not hold'."""
        ratio = self.attn_rid_over_eps_rope
        if math.isnan(ratio):
            return "not run"
        return "holds" if ratio <= 1 else "partly" if ratio <= 2 else "does not hold"

    @property
    def controls_verdict(self) -> str:
        """'holds' when both noise controls have a higher RID and a lower MixIG than attention,
        'partly' when one of the two orderings holds for both, else 'does not hold'."""
        if self.controls_rid_above_attn and self.controls_mixig_below_attn:
            return "holds"
        if self.controls_rid_above_attn or self.controls_mixig_below_attn:
            return "partly"
        return "does not hold"


def decoupling_check(
    summary: SeedSummary, margin: float = 0.01, reading: Reading = PAPER_READING
) -> DecouplingCheck:
    """Evaluate the decoupling rules of ``reading`` on a :class:`SeedSummary` (averaged over the
    reading's layers; needs "attn" and the reading's FFN kinds). An ordering holds only by more
    than ``margin`` (smaller differences are ties)."""
    missing = {"attn", reading.rid_ffn, reading.mixig_ffn} - set(summary.kinds)
    if missing:
        raise ValueError(f"the summary lacks update kinds {sorted(missing)}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    mix = reading.mixig_metric
    if mix not in summary.metrics:
        raise ValueError(f"MixIG metric {mix!r} is not in the summary {summary.metrics}")

    def below(a: float, b: float) -> bool:
        return a < b - margin

    seeds, mean = summary.per_seed, summary.mean
    rid_ffn, mix_ffn = reading.rid_ffn, reading.mixig_ffn
    rid_seeds = [below(a, f) for a, f in zip(seeds["attn"]["rid"], seeds[rid_ffn]["rid"],
                                             strict=True)]
    mix_seeds = [below(f, a) for a, f in zip(seeds["attn"][mix], seeds[mix_ffn][mix],
                                             strict=True)]
    controls = [k for k in ("noise_delta", "noise_qkv") if k in summary.kinds]
    eps = mean["rope"]["rid"] if "rope" in summary.kinds else math.nan
    return DecouplingCheck(
        reading=reading,
        rid_attn_below_ffn=below(mean["attn"]["rid"], mean[rid_ffn]["rid"]),
        mixig_attn_above_ffn=below(mean[mix_ffn][mix], mean["attn"][mix]),
        rid_rule_every_seed=all(rid_seeds),
        mixig_rule_every_seed=all(mix_seeds),
        attn_rid_over_eps_rope=mean["attn"]["rid"] / eps if eps and not math.isnan(eps)
        else math.nan,
        controls_rid_above_attn=bool(controls)
        and all(below(mean["attn"]["rid"], mean[k]["rid"]) for k in controls),
        controls_mixig_below_attn=bool(controls)
        and all(below(mean[k][mix], mean["attn"][mix]) for k in controls),
    )


def reading_checks(
    tables: Sequence[LayerMetricTable], group: str, readings: Sequence[Reading],
    margin: float = 0.01,
) -> list[tuple[SeedSummary, DecouplingCheck]]:
    """Per reading, the seed summary over its layers and its :class:`DecouplingCheck`."""
    layers = tables[0].layer_stats("attn", group, "rid").layers
    out = []
    for reading in readings:
        chosen = [int(layer) for layer in layers if layer >= reading.first_layer]
        if not chosen:
            raise ValueError(f"reading {reading.name!r} starts at layer {reading.first_layer}, "
                             f"but only layers {layers.tolist()} were recorded")
        summary = summarize_seeds(tables, group, layers=chosen)
        out.append((summary, decoupling_check(summary, margin, reading)))
    return out


def readings_markdown(checks: Sequence[tuple[SeedSummary, DecouplingCheck]]) -> str:
    """The specification curve: per reading, attention, FFN and the two noise controls (RID /
    MixIG, mean ± std over seeds) with the decoupling and noise-control verdicts."""
    rows = ["| reading | attention RID / MixIG | FFN RID / MixIG | Noise Δ RID / MixIG | "
            "Noise QKV RID / MixIG | decoupling | noise controls |", "|---" * 7 + "|"]
    for summary, check in checks:
        r = check.reading
        cells = [_rid_mix_cell(summary, kind_rid, kind_mix, r.mixig_metric) for kind_rid, kind_mix
                 in (("attn", "attn"), (r.rid_ffn, r.mixig_ffn), ("noise_delta", "noise_delta"),
                     ("noise_qkv", "noise_qkv"))]
        rows.append(f"| {r.name} | " + " | ".join(cells)
                    + f" | {check.verdict} | {check.controls_verdict} |")
    return "\n".join(rows)


def _rid_mix_cell(summary: SeedSummary, kind_rid: str, kind_mix: str, mix: str) -> str:
    m, s = summary.mean, summary.std
    if kind_rid not in m or kind_mix not in m:
        return "–"
    return (f"{_pm(m[kind_rid]['rid'], s[kind_rid]['rid'])} / "
            f"{m[kind_mix][mix]:+.4f} ± {s[kind_mix][mix]:.4f}")


def verdict_counts(checks: Sequence[tuple[SeedSummary, DecouplingCheck]], rule: str) -> dict:
    """How many readings give each verdict of ``rule`` ("verdict", "controls_verdict")."""
    counts: dict[str, int] = {}
    for _, check in checks:
        verdict = getattr(check, rule)
        counts[verdict] = counts.get(verdict, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# Notebook plumbing shared by the two Lost-in-Attention notebooks


def check_parameters(
    model, data_path, seeds, device, dtype, figures_dir, threads, families, kind="vlm", **counts
) -> None:
    """Check the parameters both Lost-in-Attention notebooks have; ``model`` must be of ``kind``
    ("vlm"; None: any residual decoder, text-only ones included); ``counts`` must be positive
    ints. Raises TypeError/ValueError/FileNotFoundError saying what is accepted."""
    params.check_model(model, kind)
    params.check_data(data_path)
    if (
        not isinstance(seeds, list | tuple) or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise TypeError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    params.check_device(device)
    params.resolve_dtype(dtype)
    if figures_dir is not None and not isinstance(figures_dir, str | Path):
        raise TypeError(f"figures_dir must be None or a folder path, got {figures_dir!r}")
    params.check_positive_int("threads", threads)
    if isinstance(families, str) or not families or not all(isinstance(f, str) for f in families):
        raise TypeError(f"families must be a non-empty list of family names, got {families!r}")
    if data_path is None:
        unknown = sorted(set(families) - set(VQA_FAMILIES))
        if unknown:
            raise ValueError(f"families {unknown} are not toy-world families {VQA_FAMILIES}")
    for name, value in counts.items():
        params.check_positive_int(name, value)


def load_decoder(model: str, device: str, dtype: str | None,
                 device_map: str | dict | None = None):
    """Any residual decoder the library adapts, a vision-language model (with its processor)
    or a text-only causal LM (with its tokenizer), in eval mode; ``device_map`` spreads a large
    model over devices (``locus.params.check_device_map``)."""
    decoder, companion = zoo.load(model, device=device, dtype=params.resolve_dtype(dtype),
                                  progress=False,
                                  device_map=params.check_device_map(device_map))
    return decoder.eval(), companion


def load_vlm(model: str, device: str, dtype: str | None,
             device_map: str | dict | None = None):
    """A vision-language model (with a vision tower and an image token) and its processor;
    ``device_map`` spreads a large model over devices (``locus.params.check_device_map``)."""
    vlm, processor = zoo.load(model, device=device, dtype=params.resolve_dtype(dtype),
                              progress=False, device_map=params.check_device_map(device_map))
    arch = adapt(vlm)
    if arch.vision_tower is None or arch.image_token_id is None:
        raise ValueError(f"{model} is a {arch.family} model without a vision tower; the "
                         "Lost-in-Attention notebooks need a vision-language model")
    return vlm.eval(), processor


# ----------------------------------------------------------------------------------------------
# Figures


def plot_layer_geometry(
    tables: Sequence[LayerMetricTable], groups: Sequence[str] = TOKEN_GROUPS,
    metrics: Sequence[str] = ("rid", "mixig", "mixig_sharpened"),
):
    """Per-layer ``metrics`` (one row each) of every update kind, one column per token group;
    lines are means over seeds, bands ± one std over seeds; ε_RoPE dashed in the RID row."""
    import matplotlib.pyplot as plt

    colours = {"attn": "C0", "ffn": "C1", "ffn_input": "C5", "noise_delta": "C3",
               "noise_qkv": "C2", "rope": "k"}
    titles = {"rid": "RID", "mixig": "MixIG", "mixig_sharpened": "MixIG (sharpened)",
              "mixig_last_row": "MixIG (last row)",
              "mixig_last_row_sharpened": "MixIG (last row, sharpened)"}
    recorded = set(tables[0].keys())
    metrics = [m for m in metrics if any(key[2] == m for key in recorded)]
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(4.2 * len(groups),
                                                                 3.1 * len(metrics)),
                             squeeze=False, sharex=True)
    for col, group in enumerate(groups):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            for kind in UPDATE_KINDS:
                if (kind, group, metric) not in recorded:
                    continue
                layers, mean, std = layer_curves(tables, kind, group, metric)
                style = "--" if kind == "rope" else "-"
                ax.plot(layers, mean, style, marker="o", ms=3, color=colours[kind],
                        label=KIND_LABELS[kind])
                ax.fill_between(layers, mean - std, mean + std, color=colours[kind], alpha=0.15)
                ax.set_xticks(layers[::max(1, len(layers) // 10)])  # about ten ticks
            ax.set_title(f"{titles[metric]} · {group} tokens")
            if metric != "rid":
                ax.axhline(0, color="grey", lw=0.5)
        axes[-1, col].set_xlabel("decoder layer")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_paper_table(summary: SeedSummary):
    """Bars of the measured RID and MixIG (paper's definition and, where recorded, sharpened)
    per update kind beside the paper's values, with ε_RoPE lines on the RID panel."""
    import matplotlib.pyplot as plt

    kinds = [k for k in ("attn", "ffn", "noise_delta", "noise_qkv") if k in summary.kinds]
    xs = np.arange(len(kinds))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = {
        "rid": [("rid", "measured", "C0")],
        "mixig": [("mixig", "measured", "C0"), ("mixig_sharpened", "measured, sharpened", "C9")],
    }
    for ax, (metric, bars) in zip(axes, panels.items(), strict=True):
        bars = [b for b in bars if b[0] in summary.metrics
                and not math.isnan(summary.mean[kinds[0]][b[0]])]
        width = 0.8 / (len(bars) + 1)
        for i, (name, label, colour) in enumerate(bars):
            ax.bar(xs + (i - len(bars) / 2) * width, [summary.mean[k][name] for k in kinds],
                   width, yerr=[summary.std[k][name] for k in kinds], label=label, color=colour)
        paper = [PAPER_TABLE[k][0 if metric == "rid" else 1] for k in kinds]
        ax.bar(xs + len(bars) / 2 * width, paper, width, label="paper", color="C7")
        if metric == "rid" and "rope" in summary.kinds:
            ax.axhline(summary.mean["rope"]["rid"], color="k", ls="--", lw=1,
                       label="ε_RoPE (measured)")
            ax.axhline(PAPER_EPS_ROPE, color="grey", ls=":", lw=1, label="ε_RoPE (paper)")
        ax.set_xticks(xs, [KIND_LABELS[k] for k in kinds])
        ax.set_title("RID" if metric == "rid" else "MixIG")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(f"update geometry, {summary.group} tokens (mean ± std over seeds)")
    fig.tight_layout()
    return fig
