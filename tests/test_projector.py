"""Tests of projector-only fine-tuning, attack evaluation and rank-k edits
(locus.projlens.projector)."""

import numpy as np
import pytest
import torch

from locus import data
from locus.arch import adapt
from locus.evaluation import exact_match
from locus.projlens import projector as P
from locus.projlens import scoring
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
    injected = P.rank_k_state(model, base, ft, {"W2": 2}, "inject")
    torch.testing.assert_close(injected["linear_2.weight"], ft["linear_2.weight"])
    assert torch.equal(injected["linear_1.weight"], base["linear_1.weight"])
    assert torch.equal(injected["linear_2.bias"], base["linear_2.bias"])
    one = P.rank_k_state(model, base, ft, {"W1": 1, "W2": 1}, "inject")
    assert torch.linalg.matrix_rank(one["linear_1.weight"] - base["linear_1.weight"]) == 1
    removed = P.rank_k_state(model, base, ft, {"W1": 100, "W2": 100}, "remove")
    torch.testing.assert_close(removed["linear_1.weight"], base["linear_1.weight"])
    assert torch.equal(removed["linear_1.bias"], ft["linear_1.bias"])
    kept = P.rank_k_state(model, base, ft, {"W1": 0}, "remove")
    assert all(torch.equal(kept[n], ft[n]) for n in ft)
    # the authors' protocol: fine-tuned W1 (k1 at the rank) and biases, base + top-k on W2
    authors = P.rank_k_state(model, base, ft, {"W1": 100, "W2": 1}, "authors")
    torch.testing.assert_close(authors["linear_1.weight"], ft["linear_1.weight"])
    assert torch.equal(authors["linear_2.bias"], ft["linear_2.bias"])
    assert torch.linalg.matrix_rank(authors["linear_2.weight"] - base["linear_2.weight"]) == 1
    w2_only = P.rank_k_state(model, base, ft, {"W2": 1}, "authors")
    assert torch.equal(w2_only["linear_1.weight"], base["linear_1.weight"])
    with pytest.raises(ValueError, match="mode must be"):
        P.rank_k_state(model, base, ft, {"W1": 1}, "swap")
    with pytest.raises(ValueError, match="unknown layers"):
        P.rank_k_state(model, base, ft, {"W3": 1}, "inject")


def test_random_update_is_norm_matched_and_seeded(tiny):
    model, _ = tiny
    base, ft = _rank2_update(model)
    control = P.random_update_state(model, base, [ft], seed=3)
    for label, delta in P.weight_updates(model, base, control).items():
        reference = P.weight_updates(model, base, ft)[label]
        assert float(delta.norm()) == pytest.approx(float(reference.norm()), rel=1e-5)
        assert torch.linalg.matrix_rank(delta) == min(delta.shape)  # full rank, not rank 2
    assert all(torch.equal(control[n], base[n]) for n in ("linear_1.bias", "linear_2.bias"))
    again = P.random_update_state(model, base, [ft], seed=3)
    assert all(torch.equal(control[n], again[n]) for n in control)
    with pytest.raises(ValueError, match="reference"):
        P.random_update_state(model, base, [], seed=0)


def _generated_exact(model, processor, samples, answers, state, max_new_tokens):
    predictions = P.predict(model, processor, samples, state, max_new_tokens)
    return np.array([exact_match(p, a) for p, a in zip(predictions, answers, strict=True)])


def test_teacher_forced_scoring_equals_greedy_generation(tiny, samples):
    """The cheap scoring of the grids gives, per input, what generating and exact-matching
    gives — on answers the model does produce (its own greedy outputs) and on ones it does
    not, under several projector states (grid cells)."""
    model, processor = tiny
    base, ft = _rank2_update(model)
    checked = 0
    for state in (base, ft, P.rank_k_state(model, base, ft, {"W1": 1, "W2": 1}, "inject")):
        own = P.predict(model, processor, samples, state, 3)
        # a random model also emits special tokens, which decoding drops: keep the inputs
        # whose 3 generated tokens are 3 words of the word-level vocabulary
        keep = [i for i, a in enumerate(own) if len(a.split()) == 3][:8]
        test, own = [samples[i] for i in keep], [own[i] for i in keep]
        other = [f"{a} yes" for a in own[:4]] + [" ".join(a.split()[:2]) for a in own[4:]]
        for answers in (own, other):
            with P.projector_loaded(model, state):
                cheap = scoring.greedy_produces(model, processor, test, answers, 3)
            expected = _generated_exact(model, processor, test, answers, state, 3)
            assert cheap.tolist() == expected.tolist()
        assert not cheap[:4].any() and _generated_exact(model, processor, test, own, state,
                                                        3).all()
        checked += len(test)
    assert checked >= 6
    with pytest.raises(ValueError, match="answers"):
        scoring.greedy_produces(model, processor, samples[:2], ["x"], 3)


def test_teacher_forced_scoring_matches_generation_on_the_trained_toy():
    """On the trained toy VLM with a cached backdoored projector, grid cells scored by teacher
    forcing equal generation + exact match, input by input (ASR, false trigger, clean)."""
    from locus import zoo
    from locus.projlens import experiment as L

    vlm, processor = zoo.load("toy-vlm")
    attack = T.paper_attacks(noise_std=50.0)["refusal"]
    test = data.make_vqa_samples(3, seed=L.TEST_SEED_OFFSET)
    inputs = L.grid_samples(test, attack, 8, seed=0)
    scorer = P.GridScorer(vlm, processor, attack.target, inputs, max_new_tokens=20)
    base = P.projector_state(vlm)
    noisy = P.random_update_state(vlm, base, [base | {
        n: t + 0.05 * torch.randn_like(t) for n, t in base.items()}], seed=1)
    for state in (base, noisy):
        cell = scorer.score(state)
        target = [attack.target.poisoned_answer(s) for s in inputs.triggered]
        asr = _generated_exact(vlm, processor, inputs.triggered, target, state, 20).mean()
        false = _generated_exact(vlm, processor, inputs.untriggered, target, state, 20).mean()
        clean = _generated_exact(vlm, processor, inputs.clean,
                                 [s.answer for s in inputs.clean], state, 20).mean()
        assert (cell.asr, cell.false_rate, cell.clean_accuracy) == (asr, false, clean)
    assert scorer.score(base).clean_accuracy > 0.5  # the check sees real answers


def test_rank_k_grid_cells_are_the_scored_states(tiny, samples):
    model, processor = tiny
    base, ft = _rank2_update(model)
    attack = T.paper_attacks()["jailbreak"]
    inputs = P.GridSet(samples[:4], samples[4:8], samples[:6])
    scorer = P.GridScorer(model, processor, attack.target, inputs, max_new_tokens=3)
    grid = P.rank_k_grid(model, scorer, base, ft, [0, 2], "inject")
    assert grid.asr.shape == grid.false_rate.shape == (3, 2)
    assert grid.rows == ["W1", "W2", "both"]
    full = {**ft, "linear_1.bias": base["linear_1.bias"], "linear_2.bias": base["linear_2.bias"]}
    for j, state in enumerate((base, full)):
        cell = scorer.score(state)
        assert (grid.asr[2, j], grid.false_rate[2, j], grid.clean_accuracy[2, j]) == (
            cell.asr, cell.false_rate, cell.clean_accuracy)
    authors = P.authors_grid(model, scorer, base, ft, [1, 64], [0, 1])
    assert authors.rows == ["W1 k=1", "W1 k=64"] and authors.row_ks == [1, 64]
    cell = scorer.score(P.rank_k_state(model, base, ft, {"W1": 64, "W2": 0}, "authors"))
    assert authors.asr[1, 0] == cell.asr and authors.clean_accuracy[1, 0] == cell.clean_accuracy
    with pytest.raises(ValueError, match="untriggered"):
        P.GridScorer(model, processor, attack.target, P.GridSet(samples[:2], [], []))


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
