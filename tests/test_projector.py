"""Tests of projector-only fine-tuning, attack evaluation and rank-k edits
(locus.projlens.projector)."""

import numpy as np
import pytest
import torch

from locus import data
from locus.arch import adapt
from locus.projlens import projector as P
from locus.projlens import triggers as T


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny(make_tiny_vlm):
    model, processor = make_tiny_vlm()
    return model.eval(), processor


@pytest.fixture(scope="module")
def samples():
    return data.make_vqa_samples(3, seed=1)


def _frozen_parts(model):
    projector_ids = {id(p) for p in adapt(model).projector.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if id(p) not in projector_ids}


def test_state_names_and_labels(tiny):
    model, _ = tiny
    assert P.linear_weight_names(model) == ["linear_1.weight", "linear_2.weight"]
    assert P.layer_labels(model) == ["W1", "W2"]
    state = P.projector_state(model)
    assert set(state) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert state["linear_1.weight"].shape == (64, 32)


def test_projector_loaded_restores_also_on_error(tiny):
    model, _ = tiny
    before = P.projector_state(model)
    other = {n: torch.zeros_like(t) for n, t in before.items()}
    with pytest.raises(RuntimeError, match="boom"), P.projector_loaded(model, other):
        assert adapt(model).projector.linear_1.weight.abs().sum() == 0
        raise RuntimeError("boom")
    assert all(torch.equal(before[n], t) for n, t in P.projector_state(model).items())
    with pytest.raises(ValueError, match="state has parameters"):
        P.load_projector_state(model, {"linear_1.weight": before["linear_1.weight"]})
    bad = {**before, "linear_2.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        P.load_projector_state(model, bad)
    assert P.state_fingerprint(before) != P.state_fingerprint(other)
    assert P.state_fingerprint(before) == P.state_fingerprint(P.projector_state(model))


def test_finetune_trains_only_the_projector(tiny, samples):
    model, processor = tiny
    attack = T.paper_attacks()["hijack"]
    train = T.poison(samples, attack, "pair", seed=0).samples
    frozen = _frozen_parts(model)
    base = P.projector_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = P.FinetuneConfig(steps=12, batch_size=8, lr=3e-3, seed=0)
    result = P.finetune_projector(model, processor, train, cfg, progress=False)
    # vision tower and language model bit-identical; the model's projector put back
    after = _frozen_parts(model)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert all(torch.equal(base[n], t) for n, t in P.projector_state(model).items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(not torch.equal(base[n], result.state[n]) for n in base)
    assert len(result.losses) == 12 and np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    again = P.finetune_projector(model, processor, train, cfg, progress=False)
    assert all(torch.equal(result.state[n], again.state[n]) for n in base)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        P.FinetuneConfig(steps=0)


def test_evaluate_attack_counts_and_rates(tiny, samples):
    model, processor = tiny
    attack = T.paper_attacks()["jailbreak"]
    result = P.evaluate_attack(model, processor, attack, samples, seed=0, max_new_tokens=4)
    assert result.n_triggered == 3
    assert set(result.clean_accuracy) == set(data.VQA_FAMILIES)
    assert 0 <= result.asr <= 1 and 0 <= result.false_rate <= 1
    target = T.Target("refusal", "i cannot")
    assert P.success_rate(["x i cannot y", "no", "i cannot", "yes"], target) == 0.5
    assert np.isnan(P.success_rate([], target))


def _rank2_update(model):
    """A base state and a fine-tuned one whose W1 and W2 updates have rank 2 (biases +1)."""
    base = P.projector_state(model)
    ft = {n: t.clone() for n, t in base.items()}
    for name in ("linear_1.weight", "linear_2.weight"):
        rows, cols = base[name].shape
        ft[name] += torch.randn(rows, 2) @ torch.randn(2, cols)
    for name in ("linear_1.bias", "linear_2.bias"):
        ft[name] += 1.0
    return base, ft


def test_rank_k_states(tiny):
    model, _ = tiny
    base, ft = _rank2_update(model)
    deltas = P.weight_updates(model, base, ft)
    assert set(deltas) == {"W1", "W2"}
    torch.testing.assert_close(deltas["W2"], ft["linear_2.weight"] - base["linear_2.weight"])
    injected = P.rank_k_state(model, base, ft, ["W2"], 2, "inject")
    torch.testing.assert_close(injected["linear_2.weight"], ft["linear_2.weight"])
    assert torch.equal(injected["linear_1.weight"], base["linear_1.weight"])
    assert torch.equal(injected["linear_2.bias"], base["linear_2.bias"])
    one = P.rank_k_state(model, base, ft, ["W1", "W2"], 1, "inject")
    assert torch.linalg.matrix_rank(one["linear_1.weight"] - base["linear_1.weight"]) == 1
    removed = P.rank_k_state(model, base, ft, ["W1", "W2"], 100, "remove")
    torch.testing.assert_close(removed["linear_1.weight"], base["linear_1.weight"])
    assert torch.equal(removed["linear_1.bias"], ft["linear_1.bias"])
    kept = P.rank_k_state(model, base, ft, ["W1"], 0, "remove")
    assert all(torch.equal(kept[n], ft[n]) for n in ft)
    with pytest.raises(ValueError, match="mode must be"):
        P.rank_k_state(model, base, ft, ["W1"], 1, "swap")
    with pytest.raises(ValueError, match="unknown layers"):
        P.rank_k_state(model, base, ft, ["W3"], 1, "inject")


def test_rank_k_grid_matches_direct_evaluation(tiny, samples):
    model, processor = tiny
    base, ft = _rank2_update(model)
    target = T.Target("jailbreak")
    test = samples[:6]
    grid = P.rank_k_grid(model, processor, target, test, base, ft, ks=[0, 2], mode="inject",
                         max_new_tokens=3, clean=test)
    assert grid.asr.shape == (3, 2) and grid.layer_sets == ["W1", "W2", "both"]
    base_answers = P.predict(model, processor, test, base, 3)
    assert grid.clean_accuracy[0, 0] == P.exact_match_rate(base_answers, test)
    no_clean = P.rank_k_grid(model, processor, target, test, base, ft, ks=[0], mode="remove",
                             max_new_tokens=3)
    assert np.isnan(no_clean.clean_accuracy).all()
    full = {**ft, "linear_1.bias": base["linear_1.bias"], "linear_2.bias": base["linear_2.bias"]}
    expected = [P.success_rate(P.predict(model, processor, test, s, 3), target)
                for s in (base, full)]
    assert grid.asr[2].tolist() == pytest.approx(expected)
    assert grid.asr[0, 0] == grid.asr[1, 0] == expected[0]


def test_projector_activations(tiny, samples):
    model, processor = tiny
    inputs = P.projector_inputs(model, processor, samples[:5], batch_size=2)
    assert inputs.shape == (5, 16, 32)
    hidden, output = P.projector_forward(model, inputs)
    projector = adapt(model).projector
    with torch.no_grad():
        torch.testing.assert_close(hidden, projector.act(projector.linear_1(inputs)))
        batch = P.encode_vqa(processor, samples[:5])
        features = model.model.get_image_features(pixel_values=batch["pixel_values"])
    torch.testing.assert_close(output, torch.stack(list(features.pooler_output)))
    zero = {n: torch.zeros_like(t) for n, t in P.projector_state(model).items()}
    assert P.projector_forward(model, inputs, zero)[1].abs().max() == 0
