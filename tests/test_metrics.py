"""Known-answer tests of the Lost-in-Attention geometry metrics (locus.lost_in_attention.metrics)
and the shared linear algebra under them (locus.linalg)."""

import math

import numpy as np
import pytest
import torch

from locus.linalg import effective_rank, numerical_rank, spectral_effective_rank, svdvals, thin_svd
from locus.lost_in_attention.metrics import (
    TME_VARIANTS,
    LayerMetricTable,
    RIDResult,
    gaussian_like_weights,
    mixig,
    noise_like_update,
    rid,
    tme_lower_bound,
    token_mixing_entropies,
    token_mixing_entropy,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _entropy_erank(s):
    p = np.asarray(s, dtype=float) / np.sum(s)
    return math.exp(-(p * np.log(p)).sum())


def _low_rank(rows, cols, rank, dtype=torch.float64):
    A = torch.randn(rows, rank, dtype=dtype)
    B = torch.randn(rank, cols, dtype=dtype)
    return A, B


# --- effective and numerical rank ------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_effective_rank_of_identity_is_n(n):
    assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-12)


def test_effective_rank_of_rank_one_is_one():
    X = torch.outer(torch.randn(7), torch.randn(4))
    assert effective_rank(X) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_known_spectrum_and_scale_invariance():
    X = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    expected = _entropy_erank([3, 2, 1])
    assert effective_rank(X) == pytest.approx(expected, rel=1e-12)
    assert effective_rank(10 * X) == pytest.approx(expected, rel=1e-12)


def test_effective_rank_of_zero_matrix_is_zero():
    assert effective_rank(torch.zeros(3, 4)) == 0.0
    assert spectral_effective_rank(torch.zeros(3)) == 0.0


def test_numerical_rank_default_and_relative_floor():
    A, B = _low_rank(6, 5, 2)
    X = A @ B
    assert numerical_rank(X) == 2
    noisy = X + 1e-6 * torch.randn(6, 5, dtype=torch.float64)
    assert numerical_rank(noisy) == 5
    assert numerical_rank(noisy, rtol=1e-3) == 2
    assert numerical_rank(noisy, atol=1e-3) == 2


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (4, 4)])
def test_thin_svd_reconstructs_wide_and_tall_matrices(shape):
    X = torch.randn(*shape, dtype=torch.float64)
    U, s, Vh = thin_svd(X)
    k = min(shape)
    assert U.shape == (shape[0], k) and Vh.shape == (k, shape[1])
    torch.testing.assert_close(U * s @ Vh, X)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(svdvals(X), s)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        effective_rank(np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        effective_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="dtype"):
        effective_rank(torch.eye(2), dtype=torch.float16)
    with pytest.raises(ValueError, match="same shape"):
        rid(torch.eye(2), torch.eye(3))


# --- RID --------------------------------------------------------------------------------------


def test_update_inside_row_and_column_space_has_zero_delta_d():
    A, B = _low_rank(7, 5, 2)
    X = A @ B
    X_new = X + A @ torch.randn(2, 2, dtype=torch.float64) @ B
    result = rid(X, X_new)
    assert result.rank == 2
    assert not result.col_degenerate and not result.row_degenerate
    assert result.delta_d == pytest.approx(0.0, abs=1e-12)
    assert result.delta_d_col == pytest.approx(0.0, abs=1e-12)
    assert result.delta_d_row == pytest.approx(0.0, abs=1e-12)


def test_update_orthogonal_to_row_space_hand_computed():
    # X spans rows e1, e2 of R^3 (S = 2 <= H = 3, full row rank: column term is degenerate).
    X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    X_new = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    result = rid(X, X_new)
    # (I - P_R) keeps the e3 component: [[0, 0, 1], [0, 0, 0]], norm 1; ‖X_new‖_F = sqrt(3).
    assert result.delta_d_row == pytest.approx(1 / (2 * math.sqrt(3)), rel=1e-12)
    assert result.delta_d_col == 0.0
    assert result.col_degenerate and not result.row_degenerate
    # X_new X_newᵀ = diag(2, 1): singular values sqrt(2), 1; eRank(X) = 2, min(S, H) = 2.
    delta_s = abs(_entropy_erank([math.sqrt(2), 1]) - 2) / 2
    assert result.delta_s == pytest.approx(delta_s, rel=1e-12)
    assert result.rid == pytest.approx(delta_s + 1 / (2 * math.sqrt(3)), rel=1e-12)


def test_update_outside_column_space_hand_computed():
    # S = 3 > H = 2: X's column space is span(e1, e2) of R^3 and its row space is all of R^2.
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    X_new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    result = rid(X, X_new)
    assert result.delta_d_col == pytest.approx(math.sqrt(2) / 4, rel=1e-12)
    assert result.delta_d_row == pytest.approx(0.0, abs=1e-15)
    assert not result.col_degenerate and result.row_degenerate
    assert result.delta_d == pytest.approx(result.delta_d_col + result.delta_d_row)


def test_col_degenerate_flag():
    assert rid(torch.randn(4, 8), torch.randn(4, 8)).col_degenerate
    assert rid(torch.randn(8, 8), torch.randn(8, 8)).col_degenerate
    assert not rid(torch.randn(9, 8), torch.randn(9, 8)).col_degenerate
    A, B = _low_rank(4, 8, 2)  # S <= H but rank-deficient: column space is a real subspace
    assert not rid(A @ B, torch.randn(4, 8)).col_degenerate


def test_rid_in_unit_range_for_varied_updates():
    for shape in [(5, 12), (12, 5), (6, 6)]:
        X = torch.randn(*shape)
        for X_new in [X + torch.randn(*shape), -X, torch.randn(*shape) * 100, torch.zeros(*shape)]:
            if X_new.abs().sum() == 0:
                X_new = torch.ones(*shape)
            result = rid(X, X_new)
            assert isinstance(result, RIDResult)
            assert 0.0 <= result.rid <= 2.0
            assert 0.0 <= result.delta_s < 1.0
            assert 0.0 <= result.delta_d <= 1.0
    zero_state = rid(torch.zeros(3, 4), torch.randn(3, 4))
    assert zero_state.delta_d == pytest.approx(1.0) and zero_state.rid <= 2.0


def test_rid_of_unchanged_state_is_zero():
    X = torch.randn(6, 10)
    assert rid(X, X).rid == pytest.approx(0.0, abs=1e-12)


def test_rid_rejects_zero_update():
    with pytest.raises(ValueError, match="zero matrix"):
        rid(torch.randn(3, 4), torch.zeros(3, 4))


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float64_results(low):
    X, X_new = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    X_new = X + 0.3 * X_new
    exact, rounded = rid(X, X_new), rid(X.to(low), X_new.to(low))
    assert isinstance(rounded.rid, float) and isinstance(rounded.delta_d, float)
    assert rounded.rid == pytest.approx(exact.rid, abs=2e-2)
    # The computation itself is float64: same as casting the rounded inputs by hand.
    assert rounded == rid(X.to(low).double(), X_new.to(low).double())
    assert effective_rank(X.to(low)) == pytest.approx(effective_rank(X), rel=1e-2)
    assert token_mixing_entropy(X.to(low)) == pytest.approx(token_mixing_entropy(X), abs=1e-3)


# --- TME and MixIG -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mean", "sharpened", "last_row", "last_row_sharpened"])
def test_identical_rows_give_maximal_tme(variant):
    X = torch.randn(1, 8).repeat(5, 1) * torch.arange(1.0, 6.0)[:, None]
    assert token_mixing_entropy(X, variant=variant) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_rows_hand_computed_tme():
    # cos = 0 between distinct rows: weights 1 on the diagonal, 1/2 elsewhere, so each row is
    # p_self = 2/(S+1), p_other = 1/(S+1) and its entropy is log(S+1) - 2 log 2 / (S+1).
    S = 3
    X = torch.eye(5)[:S] * torch.tensor([[2.0], [0.5], [7.0]])
    expected = (math.log(S + 1) - 2 * math.log(2) / (S + 1)) / math.log(S)
    assert expected == pytest.approx(1.5 * math.log(2) / math.log(3))
    assert token_mixing_entropy(X) == pytest.approx(expected, rel=1e-12)
    assert token_mixing_entropy(X, variant="last_row") == pytest.approx(expected, rel=1e-12)
    # Sharpened: off-diagonal weights (1/2)^8.
    w = np.array([1.0, 0.5**8, 0.5**8])
    p = w / w.sum()
    sharp = -(p * np.log(p)).sum() / math.log(S)
    assert token_mixing_entropy(X, variant="sharpened") == pytest.approx(sharp, rel=1e-12)
    assert token_mixing_entropy(X, variant="last_row_sharpened") == pytest.approx(sharp,
                                                                                rel=1e-12)


def test_last_row_sharpened_is_the_sharpened_entropy_of_the_last_row_only():
    x = torch.randn(6, dtype=torch.float64)
    X = torch.stack([x, x, -x, torch.randn(6, dtype=torch.float64)])
    Xn = X / X.norm(dim=1, keepdim=True)
    w = ((Xn[-1] @ Xn.T + 1) / 2) ** 8
    p = w / w.sum()
    expected = float(-(p * p.log()).sum()) / math.log(4)
    assert token_mixing_entropy(X, "last_row_sharpened") == pytest.approx(expected, rel=1e-12)
    every = token_mixing_entropies(X)
    assert set(every) == set(TME_VARIANTS)
    assert all(every[v] == pytest.approx(token_mixing_entropy(X, v), rel=1e-12)
               for v in TME_VARIANTS)
    with pytest.raises(ValueError, match="variant"):
        token_mixing_entropies(X, ("mean", "max"))


def test_tme_lower_bound_is_the_real_worst_case_not_the_orthogonal_one():
    from scipy.optimize import minimize

    S = 26
    orthogonal = (math.log(S + 1) - 2 * math.log(2) / (S + 1)) / math.log(S)
    assert orthogonal == pytest.approx(0.9958, abs=1e-4)
    assert tme_lower_bound(S) == pytest.approx(0.98169, abs=1e-5)
    assert tme_lower_bound(S) < orthogonal

    def row_tme(w):  # one row: self-weight 1, the others in [1/2, 1]
        p = np.concatenate([[1.0], w])
        p = p / p.sum()
        return -(p * np.log(p)).sum() / math.log(S)

    rng = np.random.default_rng(0)
    found = min(minimize(row_tme, rng.uniform(0.5, 1, S - 1), bounds=[(0.5, 1)] * (S - 1)).fun
                for _ in range(20))
    assert tme_lower_bound(S) - 1e-9 <= found < tme_lower_bound(S) + 1e-3  # none lower
    # Reached by mutually orthogonal clusters of k identical rows when k divides S (S = 9, k = 3).
    S, k = 9, 3
    values = [math.log(S + j) - 2 * j * math.log(2) / (S + j) for j in range(1, S + 1)]
    assert int(np.argmin(values)) + 1 == k
    X = torch.eye(S // k, 5, dtype=torch.float64).repeat_interleave(k, dim=0)
    assert token_mixing_entropy(X) == pytest.approx(tme_lower_bound(S), rel=1e-12)
    # States with non-negative cosines never go below it.
    for _ in range(20):
        Y = torch.rand(S, 8, dtype=torch.float64) ** 4
        assert token_mixing_entropy(Y) >= tme_lower_bound(S) - 1e-12
    with pytest.raises(ValueError, match="n_tokens"):
        tme_lower_bound(1)


def test_antipodal_rows_have_zero_tme_and_last_row_differs_from_mean():
    x = torch.randn(6)
    assert token_mixing_entropy(torch.stack([x, -x])) == pytest.approx(0.0, abs=1e-12)
    # Rows a, a, -a: the first two rows are split 1/2-1/2 with weight 0 on the third.
    X = torch.stack([x, x, -x])
    assert token_mixing_entropy(X, variant="mean") == pytest.approx(
        (2 * math.log(2) / 3) / math.log(3), rel=1e-12
    )
    assert token_mixing_entropy(X, variant="last_row") == pytest.approx(0.0, abs=1e-12)


def test_tme_rejects_single_token_zero_rows_and_unknown_variant():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_mixing_entropy(torch.randn(1, 4))
    with pytest.raises(ValueError, match="all-zero row"):
        token_mixing_entropy(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="variant"):
        token_mixing_entropy(torch.randn(3, 4), variant="max")


def test_mixig_is_difference_of_tme():
    X_orth = torch.eye(4)[:3]
    X_same = torch.ones(3, 4)
    expected = 1.0 - 1.5 * math.log(2) / math.log(3)
    assert mixig(X_orth, X_same) == pytest.approx(expected, rel=1e-12)
    assert mixig(X_same, X_orth) == pytest.approx(-expected, rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        mixig(torch.randn(3, 4), torch.randn(4, 4))


# --- noise controls ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noise_like_update_has_equal_norm_and_is_seeded(dtype):
    delta = (3 * torch.randn(5, 16)).to(dtype)
    noise = noise_like_update(delta, torch.Generator().manual_seed(1))
    assert noise.dtype == dtype and noise.shape == delta.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.linalg.vector_norm(noise.double()) == pytest.approx(
        float(torch.linalg.vector_norm(delta.double())), rel=tol
    )
    again = noise_like_update(delta, torch.Generator().manual_seed(1))
    assert torch.equal(noise, again)
    assert torch.count_nonzero(noise_like_update(torch.zeros(2, 3))) == 0


def test_gaussian_like_weights_match_mean_and_std():
    weight = 0.02 * torch.randn(512, 256) + 0.5
    noise = gaussian_like_weights(weight, torch.Generator().manual_seed(2))
    assert noise.shape == weight.shape and noise.dtype == weight.dtype
    assert float(noise.mean()) == pytest.approx(float(weight.mean()), abs=1e-3)
    assert float(noise.std()) == pytest.approx(float(weight.std()), rel=1e-2)
    assert not torch.allclose(noise, weight)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_like_weights(torch.ones(1))


# --- accumulator -------------------------------------------------------------------------------


def test_layer_metric_table_means_stds_and_summary():
    table = LayerMetricTable()
    for sample_value in (1.0, 3.0):
        table.add(0, "attn", "all", mixig=sample_value)
    table.add(2, "attn", "all", mixig=5.0)
    X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    result = rid(X, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    table.add(1, "ffn", "visual", result)

    stats = table.layer_stats("attn", "all", "mixig")
    np.testing.assert_array_equal(stats.layers, [0, 2])
    np.testing.assert_allclose(stats.mean, [2.0, 5.0])
    np.testing.assert_allclose(stats.std[0], math.sqrt(2.0))
    assert np.isnan(stats.std[1])
    np.testing.assert_array_equal(stats.count, [2, 1])
    assert table.overall_mean("attn", "all", "mixig") == pytest.approx(3.0)
    assert table.overall_mean("attn", "all", "mixig", layers=[2, 3]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no recorded layer"):
        table.overall_mean("attn", "all", "mixig", layers=[1])

    assert table.layer_stats("ffn", "visual", "delta_d_row").mean[0] == result.delta_d_row
    assert table.layer_stats("ffn", "visual", "col_degenerate").mean[0] == 1.0
    rows = table.summary()
    assert {row["metric"] for row in rows if row["update_kind"] == "ffn"} == {
        "rid", "delta_s", "delta_d", "delta_d_col", "delta_d_row", "col_degenerate",
        "row_degenerate",
    }  # fmt: skip
    assert all(isinstance(row["mean"], np.ndarray) for row in rows)


def test_layer_metric_table_rejects_bad_input():
    table = LayerMetricTable()
    with pytest.raises(ValueError, match="nothing to add"):
        table.add(0, "attn", "all")
    with pytest.raises(ValueError, match="layer"):
        table.add(-1, "attn", "all", mixig=0.1)
    with pytest.raises(ValueError, match="not finite"):
        table.add(0, "attn", "all", mixig=float("nan"))
    with pytest.raises(TypeError, match="RIDResult"):
        table.add(0, "attn", "all", 0.3)
    with pytest.raises(KeyError, match="no values"):
        table.layer_stats("attn", "all", "rid")
