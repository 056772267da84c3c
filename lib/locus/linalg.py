"""Linear algebra shared by the papers' analyses: SVDs on the fast orientation, effective and
numerical rank.

Lost in Attention measures residual states with these (eRank inside RID); ProjLens measures
weight updates and embedding shifts. Inputs are checked and cast to a compute dtype (float64 by
default) whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch

DEFAULT_DTYPE = torch.float64


def as_matrix(X: torch.Tensor, dtype: torch.dtype, name: str = "X") -> torch.Tensor:
    """Check that X is a finite 2-D real tensor and return it cast to the compute dtype."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (S, H), got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (S tokens, H hidden), got shape {tuple(X.shape)}")
    if X.is_complex() or X.dtype == torch.bool:
        raise TypeError(f"{name} must be a real floating or integer tensor, got {X.dtype}")
    if X.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)})")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    X = X.detach().to(dtype)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


def thin_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``X = U diag(s) Vh``, computed on the tall orientation of X.

    LAPACK on CPU is many times slower on wide matrices (600×4096: ~15×), so a wide X is
    decomposed as Xᵀ and the factors are swapped back.
    """
    if X.shape[0] >= X.shape[1]:
        return torch.linalg.svd(X, full_matrices=False)
    U, s, Vh = torch.linalg.svd(X.T, full_matrices=False)
    return Vh.T, s, U.T


def svdvals(X: torch.Tensor) -> torch.Tensor:
    """Singular values of X in descending order, computed on its tall orientation."""
    return torch.linalg.svdvals(X if X.shape[0] >= X.shape[1] else X.T)


def spectral_effective_rank(s: torch.Tensor) -> float:
    """eRank from singular values: exp of the entropy of ``s / s.sum()``.

    The zero matrix (all σ = 0) has eRank 0 by convention (its rank); any non-zero matrix has
    eRank in [1, number of singular values].
    """
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"singular values must be a non-empty 1-D tensor, got {tuple(s.shape)}")
    s = s.to(torch.promote_types(s.dtype, torch.float32)).clamp_min(0)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(X: torch.Tensor, dtype: torch.dtype = DEFAULT_DTYPE) -> float:
    """Effective rank of X (Roy & Vetterli): eRank(I_n) = n, eRank of a rank-1 matrix = 1."""
    return spectral_effective_rank(svdvals(as_matrix(X, dtype)))


def rank_tolerance(
    s: torch.Tensor, shape: tuple[int, int], rtol: float | None = None, atol: float = 0.0
) -> float:
    """Singular-value cut-off ``max(atol, rtol · σ_max)`` used for the numerical rank.

    The default ``rtol`` is numpy.linalg.matrix_rank's: ``max(S, H) · eps`` of ``s``'s dtype.
    Pass a larger ``rtol`` (a relative floor, e.g. 1e-3 for states computed in float16/bfloat16)
    so that rounding noise of a low-precision model is not counted as rank.
    """
    if rtol is None:
        rtol = max(shape) * torch.finfo(s.dtype).eps
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    s_max = float(s.max()) if s.numel() else 0.0
    return max(atol, rtol * s_max)


def rank_from_singular_values(
    s: torch.Tensor, shape: tuple[int, int], rtol: float | None, atol: float
) -> int:
    return int((s > rank_tolerance(s, shape, rtol, atol)).sum())


def numerical_rank(
    X: torch.Tensor,
    rtol: float | None = None,
    atol: float = 0.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> int:
    """Number of singular values of X above :func:`rank_tolerance` (numpy's default rule)."""
    X = as_matrix(X, dtype)
    return rank_from_singular_values(svdvals(X), tuple(X.shape), rtol, atol)
