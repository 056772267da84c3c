"""Low-rank tools of "ProjLens": the spectrum of a projector update and what it activates.

ΔW = W_ft - W_base is the update that fine-tuning made to a projector weight. The tools here
measure how its energy spreads over singular directions, inject or remove its top-k directions,
swap weights into nn.Linear modules temporarily, compare per-neuron activation statistics, and
analyse the embedding shift ΔE = E_ft - E_base (its spectrum, its norm scaling, and a logit lens
of its main direction).

SVDs run in float32 or better (``dtype``), whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from locus.linalg import effective_rank, spectral_effective_rank, svdvals, thin_svd

__all__ = [
    "DeltaSVD",
    "LinearFit",
    "LogitLensResult",
    "NeuronComparison",
    "NeuronStats",
    "QuiescentActive",
    "RobustCorrelation",
    "ShiftSVD",
    "compare_neuron_stats",
    "cumulative_energy",
    "effective_rank",
    "embedding_shift_svd",
    "factorize",
    "inject_rank_k",
    "logit_lens",
    "neuron_activation_stats",
    "quiescent_active",
    "remove_rank_k",
    "robust_correlation",
    "shift_norm_regression",
    "singular_values",
    "spectral_effective_rank",
    "swapped_weights",
    "top_k_component",
]


def _compute_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The wider of ``tensor``'s dtype and ``dtype`` (float32 or float64)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return torch.float64 if torch.float64 in (tensor.dtype, dtype) else torch.float32


def _as_matrix(W: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Check that W is a finite 2-D floating tensor; return it detached in the compute dtype."""
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if W.ndim != 2 or W.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(W.shape)}")
    W = W.detach().to(_compute_dtype(W, dtype))
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains NaN or inf")
    return W


def _check_k(k: int, max_k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= max_k:
        raise ValueError(f"k must be an int in [0, {max_k}], got {k!r}")


def singular_values(W: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular values of W in descending order, computed in ``dtype`` or wider."""
    return svdvals(_as_matrix(W, dtype, "W"))


def cumulative_energy(s: torch.Tensor | np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """E(k) = Σ_{i≤k} σ_i² / Σ_i σ_i² for each k (σ sorted descending; E(k ≥ len(s)) = 1)."""
    s = torch.as_tensor(s).detach().to(torch.float64).cpu()
    if s.ndim != 1 or s.numel() == 0 or (s < 0).any():
        raise ValueError("s must be a non-empty 1-D tensor of non-negative singular values")
    energy = torch.sort(s, descending=True).values ** 2
    total = energy.sum()
    if total == 0:
        raise ValueError("all singular values are 0: the energy fractions are undefined")
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), energy.cumsum(0) / total])
    result = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"each k must be a non-negative int, got {k!r}")
        result[int(k)] = float(cumulative[min(int(k), s.numel())])
    return result


@dataclass(frozen=True)
class DeltaSVD:
    """Thin SVD ``delta = U diag(S) Vh``; reuse it to sweep k without recomputing."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def top_k(self, k: int) -> torch.Tensor:
        """U_k Σ_k V_kᵀ: independent of the signs of the singular vectors.

        When σ_k = σ_{k+1} the top-k subspace itself is not unique; this returns one choice.
        """
        _check_k(k, self.S.numel())
        return (self.U[:, :k] * self.S[:k]) @ self.Vh[:k]


def factorize(delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> DeltaSVD:
    """Thin SVD of ``delta`` in ``dtype`` or wider."""
    U, S, Vh = thin_svd(_as_matrix(delta, dtype, "delta"))
    return DeltaSVD(U=U, S=S, Vh=Vh)


def top_k_component(
    delta: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Best rank-k approximation U_k Σ_k V_kᵀ of ``delta`` (k = 0 gives zeros), in float32+."""
    return factorize(delta, dtype).top_k(k)


def _weight_delta(
    W_base: torch.Tensor, W_ft: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    base = _as_matrix(W_base, dtype, "W_base")
    ft = _as_matrix(W_ft, dtype, "W_ft").to(base.dtype)
    if base.shape != ft.shape:
        raise ValueError(
            f"W_base and W_ft must have the same shape, got {tuple(base.shape)}, {tuple(ft.shape)}"
        )
    return base, ft


def _top_k_of_update(
    base: torch.Tensor, ft: torch.Tensor, k: int, factors: DeltaSVD | None, dtype: torch.dtype
) -> torch.Tensor:
    if factors is None:
        factors = factorize(ft - base, dtype)
    if (factors.U.shape[0], factors.Vh.shape[1]) != tuple(base.shape):
        raise ValueError(
            f"factors are of a {factors.U.shape[0]}x{factors.Vh.shape[1]} matrix, "
            f"weights are {tuple(base.shape)}"
        )
    return factors.top_k(k).to(base.dtype)


def inject_rank_k(
    W_base: torch.Tensor,
    W_ft: torch.Tensor,
    k: int,
    factors: DeltaSVD | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W_base + top_k(W_ft - W_base), in W_base's dtype and device; k = 0 gives W_base.

    ``factors``: optional :func:`factorize` of ``W_ft - W_base``, to reuse over a sweep of k.
    """
    base, ft = _weight_delta(W_base, W_ft, dtype)
    return (base + _top_k_of_update(base, ft, k, factors, dtype)).to(W_base.dtype)


def remove_rank_k(
    W_base: torch.Tensor,
    W_ft: torch.Tensor,
    k: int,
    factors: DeltaSVD | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W_ft - top_k(W_ft - W_base), in W_ft's dtype and device; k = 0 gives W_ft."""
    base, ft = _weight_delta(W_base, W_ft, dtype)
    return (ft - _top_k_of_update(base, ft, k, factors, dtype)).to(W_ft.dtype)


@contextmanager
def swapped_weights(
    linears: Sequence[nn.Linear], new_weights: Sequence[torch.Tensor | None]
) -> Iterator[None]:
    """Temporarily replace each ``linears[i].weight`` by ``new_weights[i]`` (None: keep).

    New weights are cast to the original's dtype and device and wrapped as new Parameters; the
    original Parameter objects are put back on exit, also when the body raises.
    """
    if len(linears) != len(new_weights):
        raise ValueError(f"got {len(linears)} linears but {len(new_weights)} new weights")
    if len({id(linear) for linear in linears}) != len(linears):
        raise ValueError("a module appears twice in linears")
    for i, (linear, new) in enumerate(zip(linears, new_weights, strict=True)):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linears[{i}] must be an nn.Linear, got {type(linear).__name__}")
        if new is not None and tuple(new.shape) != tuple(linear.weight.shape):
            raise ValueError(
                f"new_weights[{i}] has shape {tuple(new.shape)}, "
                f"linears[{i}].weight has {tuple(linear.weight.shape)}"
            )
    originals = [linear.weight for linear in linears]
    try:
        for linear, original, new in zip(linears, originals, new_weights, strict=True):
            if new is not None:
                linear.weight = nn.Parameter(
                    new.detach().to(dtype=original.dtype, device=original.device).clone(),
                    requires_grad=original.requires_grad,
                )
        yield
    finally:
        for linear, original in zip(linears, originals, strict=True):
            linear.weight = original


@dataclass(frozen=True)
class NeuronStats:
    """Per-neuron mean activation, mean magnitude (mean |activation|) and firing frequency
    over ``count`` inputs."""

    mean: torch.Tensor
    frequency: torch.Tensor
    count: int
    magnitude: torch.Tensor


def neuron_activation_stats(acts: torch.Tensor, threshold: float = 0.0) -> NeuronStats:
    """Mean and firing frequency (fraction of inputs with activation > threshold) per neuron.

    ``acts`` is (N, neurons), or (..., neurons) — leading axes (images, tokens) are flattened.
    """
    if not isinstance(acts, torch.Tensor) or not acts.is_floating_point():
        raise TypeError("acts must be a floating-point torch.Tensor of shape (N, neurons)")
    if acts.ndim < 2 or acts.numel() == 0:
        raise ValueError(f"acts must be (N, neurons) with N ≥ 1, got shape {tuple(acts.shape)}")
    flat = acts.detach().reshape(-1, acts.shape[-1]).to(torch.float64)
    return NeuronStats(
        mean=flat.mean(dim=0),
        frequency=(flat > threshold).to(torch.float64).mean(dim=0),
        count=flat.shape[0],
        magnitude=flat.abs().mean(dim=0),
    )


@dataclass(frozen=True)
class NeuronComparison:
    """Clean vs triggered neuron statistics (see :func:`compare_neuron_stats`)."""

    r_mean: float
    r_frequency: float
    max_abs_delta_mean: float
    max_delta_neuron: int
    delta_mean_at_max: float
    n_trigger_only: int


def _pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float64; NaN when either input is constant."""
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def compare_neuron_stats(
    clean: NeuronStats,
    triggered: NeuronStats,
    silent_below: float = 1e-3,
    active_above: float = 0.1,
) -> NeuronComparison:
    """Look for trigger neurons: how far triggered inputs change each neuron's statistics.

    ``r_mean``/``r_frequency``: Pearson r across neurons (NaN if one side is constant);
    ``delta_mean_at_max``: the signed change (triggered - clean) of the neuron with the largest
    |Δmean|; ``n_trigger_only``: neurons firing on fewer than ``silent_below`` of clean inputs
    (silent) and on more than ``active_above`` of triggered inputs.
    """
    if clean.mean.shape != triggered.mean.shape:
        raise ValueError(
            f"clean and triggered cover different neurons: {tuple(clean.mean.shape)} vs "
            f"{tuple(triggered.mean.shape)}"
        )
    if not 0 <= silent_below <= active_above <= 1:
        raise ValueError("need 0 ≤ silent_below ≤ active_above ≤ 1")
    mean_c, mean_t = clean.mean.cpu().numpy(), triggered.mean.cpu().numpy()
    freq_c, freq_t = clean.frequency.cpu().numpy(), triggered.frequency.cpu().numpy()
    delta = mean_t - mean_c
    worst = int(np.abs(delta).argmax())
    return NeuronComparison(
        r_mean=_pearson_r(mean_c, mean_t),
        r_frequency=_pearson_r(freq_c, freq_t),
        max_abs_delta_mean=float(abs(delta[worst])),
        max_delta_neuron=worst,
        delta_mean_at_max=float(delta[worst]),
        n_trigger_only=int(((freq_c < silent_below) & (freq_t > active_above)).sum()),
    )


@dataclass(frozen=True)
class QuiescentActive:
    """The authors' trigger-neuron screen: neurons quiet on clean inputs that wake up on
    triggered ones (see :func:`quiescent_active`). ``candidates``: the quiescent neurons ranked
    by triggered magnitude (largest first); ``flagged``: those at or above ``threshold``."""

    candidates: list[int]
    flagged: list[int]
    threshold: float


def quiescent_active(clean: NeuronStats, triggered: NeuronStats, quiet_fraction: float = 0.2,
                     active_quantile: float = 0.8) -> QuiescentActive:
    """Quiescent = the bottom ``quiet_fraction`` of neurons by clean magnitude (mean |a|);
    ranked by their triggered magnitude; flagged when it reaches the ``active_quantile``
    quantile of all neurons' clean magnitudes (with the defaults: from the bottom fifth on
    clean inputs to the top fifth on triggered ones). The threshold is fixed before any
    measurement, so the screen can find trigger neurons — and can find none."""
    if clean.magnitude.shape != triggered.magnitude.shape:
        raise ValueError("clean and triggered cover different neurons")
    if not 0 < quiet_fraction < 1 or not 0 < active_quantile < 1:
        raise ValueError("quiet_fraction and active_quantile must be in (0, 1)")
    quiet_mag = clean.magnitude.cpu().numpy()
    loud_mag = triggered.magnitude.cpu().numpy()
    n_quiet = max(1, int(round(quiet_fraction * quiet_mag.size)))
    quiet = np.argsort(quiet_mag, kind="stable")[:n_quiet]
    ranked = [int(i) for i in quiet[np.argsort(-loud_mag[quiet], kind="stable")]]
    threshold = float(np.quantile(quiet_mag, active_quantile))
    return QuiescentActive(ranked, [i for i in ranked if loud_mag[i] >= threshold], threshold)


@dataclass(frozen=True)
class ShiftSVD:
    """Spectrum of an embedding shift ΔE (rows: tokens, possibly over several images).

    ``u`` (rows, n) are the top left singular vectors (per-token coefficients), ``v`` (n,
    hidden) the top right ones (shared directions), n = min(2, rows, hidden); a pair whose
    singular value is ~0 is arbitrary. Each pair is signed so that ``u[:, i].sum() ≥ 0``.
    """

    energy_top1: float
    energy_top2: float
    singular_values: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def embedding_shift_svd(delta_E: torch.Tensor, dtype: torch.dtype = torch.float32) -> ShiftSVD:
    """E(1), E(2) and top singular vectors of ΔE, (tokens, hidden) or (images, tokens, hidden).

    Stacked input is flattened to (images · tokens, hidden), row-major, so ``u[:, 0]`` reshapes
    back to (images, tokens).
    """
    if not isinstance(delta_E, torch.Tensor) or delta_E.ndim not in (2, 3):
        raise ValueError(
            "delta_E must be a tensor of shape (tokens, hidden) or (images, tokens, hidden)"
        )
    factors = factorize(delta_E.reshape(-1, delta_E.shape[-1]), dtype)
    energy = cumulative_energy(factors.S, (1, 2))
    n = min(2, factors.S.numel())
    u, v = factors.U[:, :n], factors.Vh[:n]
    signs = torch.where(u.sum(dim=0) < 0, -1.0, 1.0).to(u.dtype)
    return ShiftSVD(
        energy_top1=energy[1],
        energy_top2=energy[2],
        singular_values=factors.S,
        u=u * signs,
        v=v * signs[:, None],
    )


@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``y = slope · x + intercept`` with Pearson r and R² (= r²)."""

    slope: float
    intercept: float
    r: float
    r2: float
    n: int


def _paired(coeff, norms) -> tuple[np.ndarray, np.ndarray]:
    """(norms, coefficients) as flat finite float64 arrays of the same size ≥ 2."""
    y = np.asarray(torch.as_tensor(coeff).detach().cpu().to(torch.float64)).ravel()
    x = np.asarray(torch.as_tensor(norms).detach().cpu().to(torch.float64)).ravel()
    if x.size != y.size or x.size < 2:
        raise ValueError(f"need ≥ 2 paired values, got {y.size} coefficients and {x.size} norms")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("coeff and norms must be finite")
    return x, y


@dataclass(frozen=True)
class RobustCorrelation:
    """Outlier-robust companions of Pearson's r: Spearman's ρ and r over the points whose x is
    at or below the ``trim`` quantile (the largest norms left out)."""

    spearman: float
    trimmed_r: float
    trim: float


def robust_correlation(coeff, norms, trim: float = 0.9) -> RobustCorrelation:
    """Spearman ρ and trimmed Pearson r of the shift coefficients against the norms."""
    if not 0 < trim <= 1:
        raise ValueError(f"trim must be in (0, 1], got {trim}")
    x, y = _paired(coeff, norms)
    keep = x <= np.quantile(x, trim)
    spearman = _pearson_r(rankdata(x), rankdata(y))
    return RobustCorrelation(spearman, _pearson_r(x[keep], y[keep]), trim)


def shift_norm_regression(
    coeff: torch.Tensor | np.ndarray, norms: torch.Tensor | np.ndarray
) -> LinearFit:
    """Regress the per-token shift coefficient (u0[t]) on the token's input norm."""
    x, y = _paired(coeff, norms)
    dx = x - x.mean()
    if not (dx * dx).sum() > 0:
        raise ValueError("all norms are equal: the slope is undefined")
    slope = float((dx * (y - y.mean())).sum() / (dx * dx).sum())
    r = _pearson_r(x, y)
    return LinearFit(
        slope=slope, intercept=float(y.mean() - slope * x.mean()), r=r, r2=r * r, n=int(x.size)
    )


@dataclass(frozen=True)
class LogitLensResult:
    """Top-k token ids (and logits) of +direction and of -direction."""

    positive_ids: list[int]
    positive_logits: list[float]
    negative_ids: list[int]
    negative_logits: list[float]


def logit_lens(
    direction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    final_norm: nn.Module | None = None,
    k: int = 10,
) -> LogitLensResult:
    """Decode a hidden-space direction through the LM head, for both of its signs.

    ``final_norm`` (e.g. the decoder's RMSNorm) is applied to each sign separately, since a norm
    with a bias is not odd. Logits are computed in float32 or wider.
    """
    if not isinstance(direction, torch.Tensor) or direction.ndim != 1:
        raise ValueError("direction must be a 1-D tensor of size hidden")
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.ndim != 2:
        raise ValueError("lm_head_weight must be a (vocab, hidden) tensor")
    vocab, hidden = lm_head_weight.shape
    if direction.numel() != hidden:
        raise ValueError(f"direction has size {direction.numel()}, the LM head expects {hidden}")
    _check_k(k, vocab)
    compute = _compute_dtype(lm_head_weight, torch.float32)
    weight = lm_head_weight.detach().to(compute)
    direction = direction.detach().to(device=weight.device)
    results = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            h = sign * direction
            if final_norm is not None:
                param = next(final_norm.parameters(), None)
                h = final_norm(h[None].to(param.dtype if param is not None else compute))[0]
            top = torch.topk(weight @ h.to(compute), k)
            results.append((top.indices.tolist(), top.values.tolist()))
    (pos_ids, pos_logits), (neg_ids, neg_logits) = results
    return LogitLensResult(pos_ids, pos_logits, neg_ids, neg_logits)
