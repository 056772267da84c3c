"""Residual-stream geometry metrics of "Large Vision-Language Models Get Lost in Attention".

A state X is an (S, H) matrix (S tokens, H hidden size) and X_new = X + ΔX its update by an
attention or FFN block. The metrics are:

- effective rank ``eRank(X) = exp(-Σ p_i log p_i)``, ``p_i = σ_i / Σ_j σ_j`` (:mod:`locus.linalg`);
- RID = ΔS + ΔD, a spectral term plus a subspace term (how far X_new leaves the column and
  row spaces of X), in [0, 2];
- TME, the normalised token-mixing entropy of the cosine-similarity graph of the rows, and
  MixIG = TME(X_new) - TME(X).

Every metric casts its inputs to ``dtype`` (float64 by default) before computing, whatever the
model's dtype, and returns Python floats or small dataclasses.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields

import numpy as np
import torch

from locus.linalg import (
    DEFAULT_DTYPE,
    as_matrix,
    rank_from_singular_values,
    spectral_effective_rank,
    svdvals,
    thin_svd,
)

# "last_row_sharpened" is the authors' default (their tme_hidden: agg="last", alpha=8).
TME_VARIANTS = ("mean", "sharpened", "last_row", "last_row_sharpened")


def _check_same_shape(X: torch.Tensor, X_new: torch.Tensor) -> None:
    if X.shape != X_new.shape:
        raise ValueError(
            f"X and X_new must have the same shape, got {tuple(X.shape)} and {tuple(X_new.shape)}"
        )


@dataclass(frozen=True)
class RIDResult:
    """RID = delta_s + delta_d, with delta_d = delta_d_col + delta_d_row.

    ``col_degenerate``: X has full row rank (rank = S ≤ H), so its column space is all of R^S,
    P_C = I and the column term is 0 by construction — it says nothing about the update.
    ``row_degenerate``: likewise rank = H ≤ S, P_R = I and the row term is 0 by construction.
    """

    rid: float
    delta_s: float
    delta_d: float
    delta_d_col: float
    delta_d_row: float
    col_degenerate: bool
    row_degenerate: bool
    rank: int


def rid(
    X: torch.Tensor,
    X_new: torch.Tensor,
    rtol: float | None = None,
    atol: float = 0.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> RIDResult:
    """Representation Information Discrepancy between a state X and its update X_new.

    ΔS = |eRank(X_new) - eRank(X)| / min(S, H);
    ΔD = (‖(I - P_C) X_new‖_F + ‖X_new (I - P_R)‖_F) / (2 ‖X_new‖_F),
    with P_C, P_R the projectors onto the column and row spaces of X, from its SVD truncated
    at the numerical rank (``rtol``, ``atol`` as in :func:`rank_tolerance`).
    """
    X = as_matrix(X, dtype, "X")
    X_new = as_matrix(X_new, dtype, "X_new")
    _check_same_shape(X, X_new)
    n_tokens, hidden = X.shape
    norm_new = torch.linalg.matrix_norm(X_new)
    if norm_new == 0:
        raise ValueError("X_new is the zero matrix: the subspace term ΔD is undefined")

    U, s, Vh = thin_svd(X)
    rank = rank_from_singular_values(s, (n_tokens, hidden), rtol, atol)
    U_r, Vh_r = U[:, :rank], Vh[:rank]
    col_residual = X_new - U_r @ (U_r.T @ X_new)
    row_residual = X_new - (X_new @ Vh_r.T) @ Vh_r
    delta_d_col = float(torch.linalg.matrix_norm(col_residual) / (2 * norm_new))
    delta_d_row = float(torch.linalg.matrix_norm(row_residual) / (2 * norm_new))

    erank_old = spectral_effective_rank(s)
    erank_new = spectral_effective_rank(svdvals(X_new))
    delta_s = abs(erank_new - erank_old) / min(n_tokens, hidden)
    delta_d = delta_d_col + delta_d_row
    return RIDResult(
        rid=delta_s + delta_d,
        delta_s=delta_s,
        delta_d=delta_d,
        delta_d_col=delta_d_col,
        delta_d_row=delta_d_row,
        col_degenerate=rank == n_tokens,
        row_degenerate=rank == hidden,
        rank=rank,
    )


def _row_entropies(W: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a non-negative weight matrix, normalised to sum 1."""
    P = W / W.sum(dim=1, keepdim=True)
    return -torch.xlogy(P, P).sum(dim=1)


def token_mixing_entropies(
    X: torch.Tensor,
    variants: tuple[str, ...] = TME_VARIANTS,
    power: float = 8.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> dict[str, float]:
    """Token-mixing entropy TME(X) in [0, 1] of each of ``variants``, from one cosine matrix.

    Rows are L2-normalised; ``P[t, j] ∝ (cos(x_t, x_j) + 1) / 2`` is row-stochastic; the
    entropy of each row is divided by log S. Variants:

    - ``"mean"`` (the paper's definition): mean over rows;
    - ``"sharpened"``: weights raised to ``power`` before normalising, then mean over rows;
    - ``"last_row"``: entropy of the last row only (the answer-producing token), unsharpened;
    - ``"last_row_sharpened"``: the last row with weights raised to ``power`` (the authors'
      default).

    Identical rows give uniform P and TME = 1; pairwise orthogonal rows give
    (log(S+1) - 2 log 2 / (S+1)) / log S.
    """
    unknown = [v for v in variants if v not in TME_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variant must be one of {TME_VARIANTS}, got {variants!r}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    X = as_matrix(X, dtype)
    n_tokens = X.shape[0]
    if n_tokens < 2:
        raise ValueError(f"TME needs at least 2 tokens (it divides by log S), got S={n_tokens}")
    norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("X has an all-zero row: its cosine similarity is undefined")
    Xn = X / norms
    weights = ((Xn @ Xn.T + 1) / 2).clamp(0, 1)
    sharp = weights**power if any(v.endswith("sharpened") for v in variants) else None
    rows = {"mean": weights, "sharpened": sharp, "last_row": weights[-1:],
            "last_row_sharpened": None if sharp is None else sharp[-1:]}
    log_s = math.log(n_tokens)
    return {v: float(_row_entropies(rows[v]).mean()) / log_s for v in variants}


def token_mixing_entropy(
    X: torch.Tensor,
    variant: str = "mean",
    power: float = 8.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> float:
    """TME(X) of one variant (see :func:`token_mixing_entropies`)."""
    if variant not in TME_VARIANTS:
        raise ValueError(f"variant must be one of {TME_VARIANTS}, got {variant!r}")
    return token_mixing_entropies(X, (variant,), power, dtype)[variant]


def mixig(
    X: torch.Tensor,
    X_new: torch.Tensor,
    variant: str = "mean",
    power: float = 8.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> float:
    """Mixing Information Gain: TME(X_new) - TME(X), in [-1, 1]."""
    _check_same_shape(as_matrix(X, dtype, "X"), as_matrix(X_new, dtype, "X_new"))
    return token_mixing_entropy(X_new, variant, power, dtype) - token_mixing_entropy(
        X, variant, power, dtype
    )


def tme_lower_bound(n_tokens: int) -> float:
    """The smallest mean-over-rows TME of S = ``n_tokens`` rows whose pairwise cosines are all
    >= 0 (weights (cos + 1)/2 in [1/2, 1], self-weight 1).

    A row's entropy is smallest at a vertex of that box (a bounded optimiser from random starts
    finds the same minimum; see the tests): k weights 1 (the row itself and k - 1 identical rows)
    and S - k weights 1/2, entropy log(S + k) - 2k log 2 / (S + k). The minimum over k = 1..S,
    divided by log S, bounds every row and so the mean; it is reached by
    S/k mutually orthogonal clusters of k identical rows when k divides S. (The orthogonal case
    k = 1 is *not* the minimum: for S = 26 it gives 0.996, the bound is 0.982 at k = 10.)
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens must be an int >= 2, got {n_tokens!r}")
    S = n_tokens
    return min(math.log(S + k) - 2 * k * math.log(2) / (S + k) for k in range(1, S + 1)) / (
        math.log(S))


def noise_like_update(
    delta: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise with the shape, dtype, device and Frobenius norm of ``delta`` ("Noise Δ").

    The noise is drawn in float64 on the generator's device (CPU by default), so the result for
    a given seed does not depend on the dtype of ``delta``.
    """
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
        raise TypeError("delta must be a floating-point torch.Tensor")
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(delta.shape, generator=generator, dtype=torch.float64, device=device)
    target = torch.linalg.vector_norm(delta.detach().to(torch.float64)).to(device)
    noise_norm = torch.linalg.vector_norm(noise)
    if noise_norm > 0:
        noise = noise * (target / noise_norm)
    return noise.to(dtype=delta.dtype, device=delta.device)


def gaussian_like_weights(
    weight: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian tensor with the shape and the empirical mean and std of ``weight`` ("Noise QKV").

    Drawn in float64 on the generator's device, returned in the dtype and device of ``weight``.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point torch.Tensor")
    if weight.numel() < 2:
        raise ValueError(f"weight needs at least 2 entries for a std, got {weight.numel()}")
    w = weight.detach().to(torch.float64)
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64, device=device)
    noise = noise * w.std().to(device) + w.mean().to(device)
    return noise.to(dtype=weight.dtype, device=weight.device)


RID_FIELDS = tuple(f.name for f in fields(RIDResult) if f.name != "rank")


@dataclass(frozen=True)
class LayerStats:
    """Per-layer mean and sample std (ddof=1; NaN where one sample) of one metric."""

    layers: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray


class LayerMetricTable:
    """Streams metric values per (update kind, token group, metric, layer) over samples.

    ``update_kind`` names the update ("attn", "ffn", "noise_delta", ...), ``token_group`` the
    tokens it was measured on ("all", "visual", "text", ...). A :class:`RIDResult` is expanded
    into its fields (booleans as 0/1, so their mean is a fraction); other metrics are passed as
    keyword floats, e.g. ``table.add(3, "attn", "all", rid(X, Y), mixig=0.4)``.
    """

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )

    def add(
        self,
        layer: int,
        update_kind: str,
        token_group: str,
        result: RIDResult | None = None,
        **metrics: float,
    ) -> None:
        """Record one sample's values for a layer."""
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {layer!r}")
        if result is not None and not isinstance(result, RIDResult):
            raise TypeError(f"result must be a RIDResult or None, got {type(result).__name__}")
        if result is None and not metrics:
            raise ValueError("nothing to add: pass a RIDResult and/or metric=value keywords")
        values = dict(metrics)
        if result is not None:
            values.update({name: float(getattr(result, name)) for name in RID_FIELDS})
        for name, value in values.items():
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"metric {name!r} is not finite: {value}")
            self._values[(update_kind, token_group, name)][int(layer)].append(value)

    def keys(self) -> list[tuple[str, str, str]]:
        """The recorded (update_kind, token_group, metric) triples, sorted."""
        return sorted(self._values)

    def layer_stats(self, update_kind: str, token_group: str, metric: str) -> LayerStats:
        """Per-layer mean, std over samples and sample count of one metric."""
        key = (update_kind, token_group, metric)
        if key not in self._values:
            raise KeyError(f"no values recorded for {key}; recorded: {self.keys()}")
        by_layer = self._values[key]
        layers = np.array(sorted(by_layer), dtype=int)
        samples = [np.asarray(by_layer[layer]) for layer in layers]
        return LayerStats(
            layers=layers,
            mean=np.array([v.mean() for v in samples]),
            std=np.array([v.std(ddof=1) if v.size > 1 else np.nan for v in samples]),
            count=np.array([v.size for v in samples], dtype=int),
        )

    def overall_mean(
        self, update_kind: str, token_group: str, metric: str, layers=None
    ) -> float:
        """Mean over the recorded layers in ``layers`` (None: all) and their samples, each value
        weighted equally."""
        stats = self.layer_stats(update_kind, token_group, metric)
        keep = np.ones(stats.layers.shape, bool) if layers is None else np.isin(
            stats.layers, list(layers))
        if not keep.any():
            raise ValueError(f"no recorded layer of {stats.layers.tolist()} is in {layers}")
        return float((stats.mean * stats.count)[keep].sum() / stats.count[keep].sum())

    def summary(self) -> list[dict]:
        """One dict per recorded triple: its keys plus the :class:`LayerStats` arrays."""
        rows = []
        for update_kind, token_group, metric in self.keys():
            stats = self.layer_stats(update_kind, token_group, metric)
            rows.append(
                {
                    "update_kind": update_kind,
                    "token_group": token_group,
                    "metric": metric,
                    "layers": stats.layers,
                    "mean": stats.mean,
                    "std": stats.std,
                    "count": stats.count,
                }
            )
        return rows
