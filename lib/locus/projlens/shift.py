"""The embedding shift of "ProjLens": what a fine-tuned projector adds to each image token.

ΔE = E_ft − E_base are the projector outputs of the fine-tuned minus the base projector on the
same vision features, one (tokens, hidden) matrix per image. The paper finds ΔE nearly rank 1–2
(one shared direction for clean and triggered images), that direction decoding to the target's
tokens through the LM head, and each token's shift coefficient growing linearly with the norm
of its base embedding.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from locus.arch import adapt
from locus.projlens import lowrank
from locus.projlens.projector import State, projector_forward


@dataclass(frozen=True)
class EmbeddingShift:
    """Base and fine-tuned projector outputs (images, tokens, hidden), float32."""

    base: torch.Tensor = field(repr=False)
    finetuned: torch.Tensor = field(repr=False)

    @property
    def delta(self) -> torch.Tensor:
        """ΔE = E_ft − E_base."""
        return self.finetuned - self.base

    @property
    def base_norms(self) -> torch.Tensor:
        """‖E_base[t]‖ per image and token."""
        return self.base.norm(dim=-1)


def embedding_shift(model: nn.Module, inputs: torch.Tensor, base: State,
                    finetuned: State) -> EmbeddingShift:
    """ΔE of two projector states on the same projector ``inputs`` (see
    ``projector.projector_inputs``)."""
    _, e_base = projector_forward(model, inputs, base)
    _, e_ft = projector_forward(model, inputs, finetuned)
    if e_base.ndim != 3:
        raise ValueError(f"expected projector outputs (images, tokens, hidden), got "
                         f"{tuple(e_base.shape)}")
    return EmbeddingShift(e_base, e_ft)


def per_image_energy(delta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """E(1) and E(2) of each image's ΔE (images, tokens, hidden)."""
    spectra = [lowrank.embedding_shift_svd(d) for d in delta]
    return (np.array([s.energy_top1 for s in spectra]),
            np.array([s.energy_top2 for s in spectra]))


def shift_coefficients(delta: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """⟨ΔE[t], v⟩ per image and token: each token's shift along the unit direction ``v``."""
    v = direction.detach().to(torch.float64)
    return delta.detach().to(torch.float64) @ (v / v.norm())


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """|cos| between two directions (singular vectors have no sign)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a @ b).abs() / (a.norm() * b.norm()))


@dataclass(frozen=True)
class ShiftReport:
    """ΔE statistics of one projector on one set of images.

    ``e1``/``e2``: mean per-image E(1)/E(2); ``svd``: the SVD of ΔE stacked over images (its
    ``v[0]`` is the shared direction); ``fit``: the pooled regression of each token's
    coefficient along ``v[0]`` on its base-embedding norm (the x-axis of the authors' code: the
    norm of the *base projector's output*, not of the projector's input); ``robust``: the
    pooled Spearman ρ and the r without the largest 10% of norms; ``median_image_r`` /
    ``median_image_abs_r`` / ``median_image_rho``: the median over images of the per-image
    Pearson r / |r| (the authors' per-image measure) / Spearman ρ.
    """

    e1: float
    e2: float
    svd: lowrank.ShiftSVD = field(repr=False)
    fit: lowrank.LinearFit
    robust: lowrank.RobustCorrelation
    median_image_r: float
    median_image_abs_r: float
    median_image_rho: float
    mean_norm: float
    coefficients: np.ndarray = field(repr=False)
    norms: np.ndarray = field(repr=False)


def analyse_shift(shift: EmbeddingShift) -> ShiftReport:
    """Energies, shared direction and norm scaling of an embedding shift."""
    delta = shift.delta
    e1, e2 = per_image_energy(delta)
    svd = lowrank.embedding_shift_svd(delta)
    coefficients = shift_coefficients(delta, svd.v[0]).numpy()
    norms = shift.base_norms.to(torch.float64).numpy()
    images = [(c, n) for c, n in zip(coefficients, norms, strict=True) if np.ptp(n) > 0]
    image_r = [lowrank.shift_norm_regression(c, n).r for c, n in images]
    image_rho = [lowrank.robust_correlation(c, n).spearman for c, n in images]
    return ShiftReport(
        e1=float(e1.mean()), e2=float(e2.mean()), svd=svd,
        fit=lowrank.shift_norm_regression(coefficients, norms),
        robust=lowrank.robust_correlation(coefficients, norms),
        median_image_r=float(np.median(image_r)) if image_r else float("nan"),
        median_image_abs_r=float(np.median(np.abs(image_r))) if image_r else float("nan"),
        median_image_rho=float(np.median(image_rho)) if image_rho else float("nan"),
        mean_norm=float(norms.mean()), coefficients=coefficients, norms=norms,
    )


@dataclass(frozen=True)
class LensReadout:
    """Logit-lens tokens of a direction, both signs, and where the target's words rank."""

    positive: list[str]
    negative: list[str]
    target_rank: int | None
    target_sign: str | None
    target_token: str | None


def content_token_ids(tokenizer, text: str) -> list[int]:
    """Ids of the tokens of ``text`` that contain a letter or digit (no bare punctuation), and
    of each of its words that a subword tokenizer spells as one token with or without a leading
    space (SmolLM2 has both "cat" and " cat"; a lens hit on either is the word)."""
    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]

    ids = encode(text) + [ids[0] for word in re.findall(r"\w+", text)
                          for ids in (encode(word), encode(f" {word}")) if len(ids) == 1]
    return [i for i in dict.fromkeys(ids) if any(ch.isalnum() for ch in tokenizer.decode([i]))]


def lens_readout(model: nn.Module, tokenizer, direction: torch.Tensor, target_text: str,
                 k: int = 10) -> LensReadout:
    """Decode ``direction`` through the final norm and LM head (both signs); report the top-k
    tokens and the best rank (1-based, within the top-k) reached by a content token of
    ``target_text``, or None when none is in either top-k."""
    arch = adapt(model)
    lens = lowrank.logit_lens(direction, arch.lm_head.weight, arch.final_norm, k=k)
    wanted = set(content_token_ids(tokenizer, target_text))
    best: tuple[int, str, int] | None = None
    for sign, ids in (("+", lens.positive_ids), ("-", lens.negative_ids)):
        for rank, token in enumerate(ids, 1):
            if token in wanted and (best is None or rank < best[0]):
                best = (rank, sign, token)
    return LensReadout(
        positive=[tokenizer.decode([i]) for i in lens.positive_ids],
        negative=[tokenizer.decode([i]) for i in lens.negative_ids],
        target_rank=None if best is None else best[0],
        target_sign=None if best is None else best[1],
        target_token=None if best is None else tokenizer.decode([best[2]]),
    )


def chance_of_hit(vocab_size: int, n_target_tokens: int, k: int) -> float:
    """Probability that a random ranking puts ≥ 1 of ``n_target_tokens`` among its top-k or
    bottom-k (2k distinct tokens: the two signs of a direction through an odd norm) — the
    baseline for a lens 'hit'."""
    if not 0 < n_target_tokens <= vocab_size or k < 1:
        raise ValueError("need 0 < n_target_tokens ≤ vocab_size and k ≥ 1")
    drawn = min(2 * k, vocab_size)
    miss = np.prod([(vocab_size - n_target_tokens - i) / (vocab_size - i) for i in range(drawn)])
    return float(1 - max(miss, 0.0))


@dataclass(frozen=True)
class ImageLens:
    """The authors' logit lens: per image, the top right singular vector v0 of the
    mean-centred ΔE, decoded through the LM head alone (no final norm), both signs.
    ``top_positive`` / ``top_negative``: the most frequent first token over images of +v0 /
    −v0; ``target_share``: the share of images whose first token of +v0 or −v0 is a content
    word of the target; ``target_on_top``: one of the two most frequent first tokens is."""

    top_positive: str
    top_negative: str
    target_share: float
    target_on_top: bool


def image_lens(model: nn.Module, tokenizer, delta: torch.Tensor, target_text: str) -> ImageLens:
    """The authors' per-image logit lens of ΔE (images, tokens, hidden)."""
    weight = adapt(model).lm_head.weight.detach().float().cpu()
    wanted = set(content_token_ids(tokenizer, target_text))
    firsts: list[tuple[int, int]] = []
    for d in delta.detach().float():
        v0 = lowrank.factorize(d - d.mean(dim=0)).Vh[0]
        logits = weight @ v0
        firsts.append((int(logits.argmax()), int(logits.argmin())))  # of +v0 and of −v0
    top_pos = Counter(p for p, _ in firsts).most_common(1)[0][0]
    top_neg = Counter(n for _, n in firsts).most_common(1)[0][0]
    return ImageLens(tokenizer.decode([top_pos]), tokenizer.decode([top_neg]),
                     float(np.mean([p in wanted or n in wanted for p, n in firsts])),
                     top_pos in wanted or top_neg in wanted)
