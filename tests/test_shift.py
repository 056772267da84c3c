"""Known-answer tests of the ProjLens embedding-shift analysis (locus.projlens.shift)."""

import numpy as np
import pytest
import torch

from locus import data
from locus.arch import adapt
from locus.projlens import projector as P
from locus.projlens import shift as S


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny(make_tiny_vlm):
    model, processor = make_tiny_vlm()
    inputs = P.projector_inputs(model.eval(), processor, data.make_vqa_samples(1, seed=2))
    return model, processor, inputs


def test_rank1_w2_update_gives_a_rank1_shift_along_u(tiny):
    """W2_ft = W2 + σ u vᵀ  ⇒  ΔE[t] = σ ⟨v, h_t⟩ u: E(1) = 1, direction u, coefficient σ⟨v,h⟩."""
    model, _, inputs = tiny
    base = P.projector_state(model)
    u = torch.randn(64)
    u /= u.norm()
    v = torch.randn(64)
    v /= v.norm()
    ft = {**base, "linear_2.weight": base["linear_2.weight"] + 3.0 * torch.outer(u, v)}
    shift = S.embedding_shift(model, inputs, base, ft)
    assert shift.delta.shape == (7, 16, 64)
    report = S.analyse_shift(shift)
    assert report.e1 == pytest.approx(1.0, abs=1e-5) and report.e2 == pytest.approx(1.0)
    assert S.abs_cosine(report.svd.v[0], u) == pytest.approx(1.0, abs=1e-5)
    hidden, _ = P.projector_forward(model, inputs)
    expected = 3.0 * (hidden.double() @ v.double())
    sign = np.sign(float(report.svd.v[0] @ u))
    np.testing.assert_allclose(report.coefficients, sign * expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(report.norms, shift.base_norms.double().numpy())
    assert report.fit.n == 7 * 16


def test_coefficient_linear_in_norm_when_inputs_are_scaled(tiny):
    """A bias-free projector whose GELU works in its linear range (pre-activations > 5):
    scaling a token's input scales its shift and its norm alike."""
    model, _, inputs = tiny
    base = {n: torch.zeros_like(t) for n, t in P.projector_state(model).items()}
    base["linear_1.weight"] = torch.rand(64, 32)
    base["linear_2.weight"] = torch.randn(64, 64)
    ft = {**base, "linear_2.weight": base["linear_2.weight"] + torch.randn(64, 64) * 0.1}
    one = inputs[:1, :1].abs() + 1.0  # one token with positive features, scaled by 1..8
    scaled = one * torch.arange(1.0, 9.0)[:, None, None]
    report = S.analyse_shift(S.embedding_shift(model, scaled.reshape(1, 8, 32), base, ft))
    assert report.fit.r == pytest.approx(1.0, abs=1e-6) and report.fit.r2 == pytest.approx(1.0)
    assert report.e1 == pytest.approx(1.0, abs=1e-6)


def test_lens_readout_finds_the_lm_head_row(tiny):
    model, processor, _ = tiny
    tokenizer = processor.tokenizer
    arch = adapt(model)
    cat = tokenizer.convert_tokens_to_ids("cat")
    with torch.no_grad():
        arch.final_norm.weight.fill_(1.0)
    readout = S.lens_readout(model, tokenizer, arch.lm_head.weight[cat] * 5, "photo of a cat .")
    assert readout.positive[0] == "cat"
    assert (readout.target_rank, readout.target_sign, readout.target_token) == (1, "+", "cat")
    flipped = S.lens_readout(model, tokenizer, -arch.lm_head.weight[cat], "a cat")
    assert flipped.negative[0] == "cat" and flipped.target_sign == "-"
    assert S.content_token_ids(tokenizer, "photo of a cat .") == [
        tokenizer.convert_tokens_to_ids(w) for w in ("photo", "of", "a", "cat")]


def test_image_lens_reads_a_planted_per_image_direction(tiny):
    model, processor, _ = tiny
    tokenizer = processor.tokenizer
    head = adapt(model).lm_head.weight.detach()
    cat = tokenizer.convert_tokens_to_ids("cat")
    g = torch.Generator().manual_seed(0)
    # per image, tokens shift by varying amounts along the LM-head row of "cat" (the sign of
    # each image's singular vector is arbitrary: both signs are read), plus small noise
    amounts = torch.rand(6, 16, 1, generator=g) * 4
    delta = amounts * head[cat] + 0.01 * torch.randn(6, 16, head.shape[1], generator=g)
    lens = S.image_lens(model, tokenizer, delta, "photo of a cat .")
    assert "cat" in (lens.top_positive, lens.top_negative)
    assert lens.target_share == 1.0 and lens.target_on_top
    noise = S.image_lens(model, tokenizer, torch.randn(6, 16, head.shape[1], generator=g),
                         "photo of a cat .")
    assert noise.target_share < 1.0


def test_chance_of_hit_and_cosine():
    assert S.chance_of_hit(10, 1, 1) == pytest.approx(0.2)
    assert S.chance_of_hit(10, 10, 1) == 1.0
    assert S.chance_of_hit(100, 3, 50) == 1.0
    with pytest.raises(ValueError):
        S.chance_of_hit(10, 0, 1)
    assert S.abs_cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == 1.0
