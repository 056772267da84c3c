"""Known-answer tests of the ProjLens low-rank tools (locus.projlens.lowrank)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from locus import linalg
from locus.projlens.lowrank import (
    DeltaSVD,
    compare_neuron_stats,
    cumulative_energy,
    effective_rank,
    embedding_shift_svd,
    factorize,
    inject_rank_k,
    logit_lens,
    neuron_activation_stats,
    quiescent_active,
    remove_rank_k,
    robust_correlation,
    shift_norm_regression,
    singular_values,
    swapped_weights,
    top_k_component,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def rank3_update():
    """W_base and W_ft = W_base + ΔW with ΔW of rank exactly 3."""
    W_base = torch.randn(12, 9)
    delta = torch.randn(12, 3) @ torch.randn(3, 9)
    return W_base, W_base + delta, delta


# --- spectrum ----------------------------------------------------------------------------------


def test_cumulative_energy_hand_computed():
    energy = cumulative_energy(torch.tensor([1.0, 3.0, 2.0]), [0, 1, 2, 3, 10])
    assert energy == pytest.approx({0: 0.0, 1: 9 / 14, 2: 13 / 14, 3: 1.0, 10: 1.0})
    with pytest.raises(ValueError, match="non-negative int"):
        cumulative_energy(torch.ones(3), [-1])
    with pytest.raises(ValueError, match="all singular values are 0"):
        cumulative_energy(torch.zeros(3), [1])


def test_rank3_update_spectrum(rank3_update):
    _, _, delta = rank3_update
    s = singular_values(delta)
    assert s.dtype == torch.float32 and s.shape == (9,)
    assert torch.all(s[:-1] >= s[1:])
    assert s[3:].max() < 1e-5 * s[0]
    energy = cumulative_energy(s, [1, 2, 3])
    assert energy[1] < energy[2] < 1.0
    assert energy[3] == pytest.approx(1.0, abs=1e-9)
    assert effective_rank is linalg.effective_rank
    assert 1.0 < effective_rank(delta) < 3.0


def test_singular_values_in_float32_or_wider():
    W = torch.randn(5, 4)
    assert singular_values(W.to(torch.bfloat16)).dtype == torch.float32
    assert singular_values(W.double()).dtype == torch.float64
    assert singular_values(W, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        singular_values(W, dtype=torch.float16)


# --- rank-k injection and removal --------------------------------------------------------------


def test_top_k_component_of_diagonal_matrix():
    delta = torch.zeros(4, 3)
    delta[0, 0], delta[1, 1], delta[2, 2] = 5.0, -3.0, 1.0
    expected = delta.clone()
    expected[2, 2] = 0.0
    torch.testing.assert_close(top_k_component(delta, 2), expected, atol=1e-6, rtol=0)
    assert torch.count_nonzero(top_k_component(delta, 0)) == 0
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 3\]"):
        top_k_component(delta, 4)


def test_inject_and_remove_rank3_recover_the_weights(rank3_update):
    W_base, W_ft, _ = rank3_update
    torch.testing.assert_close(inject_rank_k(W_base, W_ft, 3), W_ft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remove_rank_k(W_base, W_ft, 3), W_base, atol=1e-5, rtol=1e-5)
    assert torch.equal(inject_rank_k(W_base, W_ft, 0), W_base)
    assert torch.equal(remove_rank_k(W_base, W_ft, 0), W_ft)
    partial = inject_rank_k(W_base, W_ft, 1) - W_base
    assert torch.linalg.matrix_rank(partial) == 1
    torch.testing.assert_close(
        inject_rank_k(W_base, W_ft, 2) + remove_rank_k(W_base, W_ft, 2), W_base + W_ft
    )


def test_precomputed_factors_and_dtype_are_respected(rank3_update):
    W_base, W_ft, delta = rank3_update
    factors = factorize(delta, dtype=torch.float64)
    for k in range(4):
        torch.testing.assert_close(
            inject_rank_k(W_base, W_ft, k, factors=factors), inject_rank_k(W_base, W_ft, k)
        )
    low = inject_rank_k(W_base.to(torch.bfloat16), W_ft.to(torch.bfloat16), 3)
    assert low.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="factors are of a"):
        inject_rank_k(W_base[:5], W_ft[:5], 1, factors=factors)
    with pytest.raises(ValueError, match="same shape"):
        remove_rank_k(W_base, W_ft[:5], 1)


def test_top_k_is_independent_of_singular_vector_signs(rank3_update):
    _, _, delta = rank3_update
    delta = delta + 0.1 * torch.randn_like(delta)  # full rank, distinct singular values
    factors = factorize(delta, dtype=torch.float64)
    signs = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    flipped = DeltaSVD(U=factors.U * signs, S=factors.S, Vh=factors.Vh * signs[:, None])
    torch.testing.assert_close(flipped.U * flipped.S @ flipped.Vh, delta.double())
    for k in range(10):
        torch.testing.assert_close(flipped.top_k(k), factors.top_k(k))
    torch.testing.assert_close(top_k_component(-delta, 2), -top_k_component(delta, 2))


# --- weight swapping ---------------------------------------------------------------------------


def test_swapped_weights_restores_originals_even_on_exception():
    layers = [nn.Linear(4, 3), nn.Linear(3, 2)]
    originals = [layer.weight for layer in layers]
    saved = [layer.weight.detach().clone() for layer in layers]
    new = torch.zeros(3, 4, dtype=torch.float64)
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_weights(layers, [new, None]):
            assert layers[0].weight.dtype == torch.float32
            torch.testing.assert_close(layers[0](x), layers[0].bias.expand(5, 3))
            assert layers[1].weight is originals[1]
            raise RuntimeError("boom")
    for layer, original, values in zip(layers, originals, saved, strict=True):
        assert layer.weight is original
        assert torch.equal(layer.weight, values)
    assert layers[0].weight.requires_grad


def test_swapped_weights_does_not_alias_or_modify_new_weight():
    layer = nn.Linear(2, 2)
    new = torch.ones(2, 2)
    with swapped_weights([layer], [new]), torch.no_grad():
        layer.weight.mul_(3.0)
    assert torch.equal(new, torch.ones(2, 2))


def test_swapped_weights_validates_before_touching_anything():
    layers = [nn.Linear(4, 3), nn.Linear(3, 2)]
    originals = [layer.weight for layer in layers]
    with pytest.raises(ValueError, match=r"new_weights\[1\] has shape"):
        with swapped_weights(layers, [torch.zeros(3, 4), torch.zeros(3, 3)]):
            pass
    assert all(layer.weight is w for layer, w in zip(layers, originals, strict=True))
    with pytest.raises(ValueError, match="2 linears but 1"):
        with swapped_weights(layers, [None]):
            pass
    with pytest.raises(ValueError, match="twice"):
        with swapped_weights([layers[0], layers[0]], [None, None]):
            pass


# --- neuron statistics -------------------------------------------------------------------------


def test_neuron_stats_on_constructed_activations():
    # Neuron 0 always 1.0; neuron 1 fires on half the inputs; neuron 2 never fires on clean
    # inputs and fires on all triggered ones (a "trigger neuron").
    clean = torch.tensor([[1.0, 0.5, -0.1], [1.0, -0.1, -0.1], [1.0, 0.5, 0.0], [1.0, 0.0, -0.2]])
    triggered = clean.clone()
    triggered[:, 2] = 0.3
    stats_c = neuron_activation_stats(clean)
    stats_t = neuron_activation_stats(triggered)
    assert stats_c.count == 4
    torch.testing.assert_close(stats_c.mean, torch.tensor([1.0, 0.225, -0.1], dtype=torch.float64))
    torch.testing.assert_close(
        stats_c.frequency, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    )
    comparison = compare_neuron_stats(stats_c, stats_t)
    assert comparison.n_trigger_only == 1
    assert comparison.max_delta_neuron == 2
    assert comparison.delta_mean_at_max == pytest.approx(0.4)
    assert comparison.max_abs_delta_mean == pytest.approx(0.4)
    assert comparison.r_frequency == pytest.approx(_pearson([1, 0.5, 0], [1, 0.5, 1]))
    same = compare_neuron_stats(stats_c, stats_c)
    assert same.r_mean == pytest.approx(1.0) and same.n_trigger_only == 0
    assert same.max_abs_delta_mean == 0.0


def test_neuron_stats_threshold_and_stacked_input():
    acts = torch.tensor([[[0.2, 0.0], [0.05, 1.0]], [[0.3, -1.0], [0.0, 2.0]]])
    stats = neuron_activation_stats(acts, threshold=0.1)
    assert stats.count == 4
    torch.testing.assert_close(stats.frequency, torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="N, neurons"):
        neuron_activation_stats(torch.ones(3))
    with pytest.raises(ValueError, match="different neurons"):
        compare_neuron_stats(stats, neuron_activation_stats(torch.ones(2, 3)))


def _pearson(x, y):
    return float(np.corrcoef(x, y)[0, 1])


# --- activation shift --------------------------------------------------------------------------


def test_embedding_shift_svd_of_rank1_and_rank2_shifts():
    tokens, hidden = 20, 8
    direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
    coeff = torch.rand(tokens) + 0.5
    shift = embedding_shift_svd(torch.outer(coeff, direction))
    assert shift.energy_top1 == pytest.approx(1.0, abs=1e-6)
    assert shift.u.shape == (tokens, 2) and shift.v.shape == (2, hidden)
    assert shift.singular_values[1] < 1e-5 * shift.singular_values[0]
    # Sign convention: u sums to >= 0, so u0 is aligned with the (positive) coefficients.
    torch.testing.assert_close(shift.u[:, 0], coeff / coeff.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shift.v[0], direction, atol=1e-5, rtol=1e-5)

    other = torch.randn(tokens, 1) @ torch.randn(1, hidden)
    rank2 = torch.outer(coeff, direction) * 10 + other
    shift2 = embedding_shift_svd(rank2)
    assert shift2.energy_top1 < 1.0
    assert shift2.energy_top2 == pytest.approx(1.0, abs=1e-5)
    assert shift2.u.shape == (tokens, 2) and bool((shift2.u.sum(dim=0) >= 0).all())


def test_embedding_shift_svd_flattens_images():
    stacked = torch.randn(3, 5, 4)
    a, b = embedding_shift_svd(stacked), embedding_shift_svd(stacked.reshape(15, 4))
    assert a.energy_top1 == pytest.approx(b.energy_top1)
    torch.testing.assert_close(a.u, b.u)


def test_shift_norm_regression_on_exact_line():
    norms = torch.linspace(1.0, 5.0, 50, dtype=torch.float64)
    fit = shift_norm_regression(2.5 * norms - 1.0, norms)
    assert fit.slope == pytest.approx(2.5, rel=1e-9)
    assert fit.intercept == pytest.approx(-1.0, abs=1e-6)
    assert fit.r == pytest.approx(1.0, rel=1e-12) and fit.r2 == pytest.approx(1.0, rel=1e-12)
    assert fit.n == 50
    assert shift_norm_regression(-norms.numpy(), norms.numpy()).r == pytest.approx(-1.0)
    y = norms + torch.randn(50, dtype=torch.float64)
    noisy = shift_norm_regression(y, norms)
    assert noisy.r == pytest.approx(_pearson(norms.numpy(), y.numpy()), rel=1e-12)
    assert noisy.r2 == pytest.approx(noisy.r**2) and 0 < noisy.r < 1
    slope, intercept = np.polyfit(norms.numpy(), y.numpy(), 1)
    assert (noisy.slope, noisy.intercept) == pytest.approx((slope, intercept), rel=1e-9)
    with pytest.raises(ValueError, match="norms are equal"):
        shift_norm_regression(torch.randn(4), torch.ones(4))
    with pytest.raises(ValueError, match="paired"):
        shift_norm_regression(torch.randn(4), torch.randn(5))


# --- logit lens --------------------------------------------------------------------------------


def test_logit_lens_both_signs():
    hidden = 3
    # Vocabulary rows: +e0, +e1, +e2, -e0 (scaled), then two small noise rows.
    lm_head = torch.cat([torch.eye(hidden), -2 * torch.eye(hidden)[:1], 0.01 * torch.ones(2, 3)])
    result = logit_lens(torch.tensor([1.0, 0.2, 0.0]), lm_head, k=2)
    assert result.positive_ids == [0, 1]
    assert result.negative_ids[0] == 3
    assert result.positive_logits[0] == pytest.approx(1.0)
    assert result.negative_logits[0] == pytest.approx(2.0)


def test_logit_lens_applies_final_norm_to_each_sign():
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    lm_head = torch.eye(4)
    direction = torch.tensor([0.0, 1.0, 0.0, 0.0])
    result = logit_lens(direction, lm_head, final_norm=norm, k=1)
    assert result.positive_ids == [0]  # the bias dominates: norm(d)[0] = 3 - 1/sqrt(3)
    with torch.no_grad():
        expected = float(norm(-direction[None])[0].max())
    assert result.negative_logits[0] == pytest.approx(expected, rel=1e-6)
    rms = nn.RMSNorm(4)
    scaled = logit_lens(10 * direction, lm_head, final_norm=rms, k=1)
    assert scaled.positive_logits[0] == pytest.approx(2.0, rel=1e-4)  # RMS of d is 1/2
    assert math.isfinite(scaled.negative_logits[0])
    with pytest.raises(ValueError, match="LM head expects 4"):
        logit_lens(torch.ones(3), lm_head)


def _gelu_layer(n_inputs: int, neurons: int, seed: int) -> torch.Tensor:
    """GELU activations of a random layer whose neurons differ in scale (as trained ones do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_inputs, 16, generator=g)
    w = torch.randn(16, neurons, generator=g) * torch.exp(torch.randn(neurons, generator=g))
    return torch.nn.functional.gelu(x @ w)


def test_quiescent_active_screen_finds_planted_trigger_neurons():
    clean = _gelu_layer(400, 128, seed=0)
    triggered = _gelu_layer(400, 128, seed=0) * (1 + 0.05 * torch.randn(400, 128))
    stats_c = neuron_activation_stats(clean)
    none = quiescent_active(stats_c, neuron_activation_stats(triggered))
    assert none.flagged == [] and len(none.candidates) == round(0.2 * 128)
    quiet = [int(i) for i in torch.argsort(stats_c.magnitude)[:3]]
    planted = triggered.clone()
    planted[:, quiet] = 5.0 * stats_c.magnitude.max().float()  # wake up on the trigger only
    found = quiescent_active(stats_c, neuron_activation_stats(planted))
    assert sorted(found.flagged) == sorted(quiet) and found.candidates[:3] == found.flagged
    assert found.threshold == pytest.approx(float(np.quantile(stats_c.magnitude.numpy(), 0.8)))
    with pytest.raises(ValueError, match="quiet_fraction"):
        quiescent_active(stats_c, stats_c, quiet_fraction=1.0)


def test_robust_correlation_sees_an_outlier_driven_r():
    rng = np.random.default_rng(0)
    norms = rng.uniform(1, 2, 200)
    coeff = rng.normal(size=200)
    norms[:5], coeff[:5] = 50.0, 100.0  # five huge tokens make Pearson's r high
    assert shift_norm_regression(coeff, norms).r > 0.9
    robust = robust_correlation(coeff, norms)
    assert abs(robust.trimmed_r) < 0.3 and robust.spearman < 0.3 and robust.trim == 0.9
    line = robust_correlation(3 * norms + 1, norms)
    assert line.spearman == pytest.approx(1.0) and line.trimmed_r == pytest.approx(1.0)
    with pytest.raises(ValueError, match="trim"):
        robust_correlation(coeff, norms, trim=0)
