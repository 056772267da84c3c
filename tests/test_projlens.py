"""Tests of the ProjLens notebook glue (locus.projlens.experiment): parameters, data split,
cache reuse, probes and verdict rules."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from locus import data, models
from locus.projlens import experiment as L
from locus.projlens import over_seeds as O
from locus.projlens import projector as P
from locus.projlens import triggers as T


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_parameter_checks():
    assert L.check_rate("pair") == "pair" and L.check_rate(0.25) == 0.25
    assert L.check_rate(0, allow_zero=True) == 0.0
    for bad in (0, 1.0, -0.1, True, "half"):
        with pytest.raises(ValueError, match="poisoning rate"):
            L.check_rate(bad)
    assert L.check_variants(["refusal", "jailbreak"]) == ["refusal", "jailbreak"]
    for bad in ("refusal", [], ["backdoor"]):
        with pytest.raises(ValueError, match="variants must be"):
            L.check_variants(bad)
    with pytest.raises(ValueError, match="seeds must be"):
        L.check_seeds(0)
    with pytest.raises(FileNotFoundError):
        L.check_common("toy-vlm", "/no/such.jsonl", [0], "cpu", None, None, 2)
    with pytest.raises(TypeError, match="n_images"):
        L.check_common("toy-vlm", None, [0], "cpu", None, None, 2, n_images=0)
    assert L.model_tag("/some/where/llava-1.5-7b-hf/") == "llava-1.5-7b-hf"


@pytest.mark.parametrize("bad, message", [
    ({"lr": 0}, "lr must be"), ({"lr": "fast"}, "lr must be"),
    ({"noise_std": -1.0}, "noise_std must be"), ({"logo_fraction": 1.5}, "logo_fraction must be"),
    ({"variants": ["cat"]}, "variants must be"), ({"poison_rate": 2}, "poisoning rate"),
])
def test_prepare_refuses_bad_shared_parameters_before_loading(bad, message):
    shared = dict(model="toy-vlm", data=None, seeds=[0], device="cpu", dtype=None,
                  figures_dir=None, threads=1, variants=["refusal"], poison_rate="pair",
                  n_train_per_family=4, n_test_per_family=2, steps=1, batch_size=2, lr=1e-3,
                  max_new_tokens=2, noise_std=50.0, logo_fraction=0.25,
                  injection_suffix="blue circle .", hijack_text="red square .")
    with pytest.raises(ValueError, match=message):
        L.prepare(**{**shared, **bad})


def test_prepare_builds_attacks_and_splits(tiny_llava_dir, tiny_vqa_jsonl):
    run = L.prepare(model=str(tiny_llava_dir), data=str(tiny_vqa_jsonl), seeds=[0, 1],
                    device="cpu", dtype=None, figures_dir=None, threads=1,
                    variants=["hijack"], poison_rate=0.2, n_train_per_family=4,
                    n_test_per_family=2, steps=3, batch_size=2, lr=1e-3, max_new_tokens=2,
                    noise_std=50.0, logo_fraction=0.25, injection_suffix="blue circle .",
                    hijack_text="red square .")
    assert list(run.attacks) == ["hijack"] and run.attacks["hijack"].trigger.size_fraction == 0.25
    assert run.poison_rate == 0.2 and set(run.splits) == {0, 1}
    assert run.finetune_config(1) == P.FinetuneConfig(steps=3, batch_size=2, lr=1e-3, seed=1)


def test_jsonl_split_per_family(tiny_vqa_jsonl):
    train, test = L.vqa_data(str(tiny_vqa_jsonl), n_train_per_family=5, n_test_per_family=5,
                             seed=0)
    assert len(train) == len(test) == 7  # 2 samples per family: one each
    assert sorted(s.family for s in test) == sorted(data.VQA_FAMILIES)
    assert not {L.image_key(s) for s in train} & {L.image_key(s) for s in test}
    again = L.vqa_data(str(tiny_vqa_jsonl), 5, 5, seed=0)
    assert [s.question for s in again[1]] == [s.question for s in test]
    toy_train, toy_test = L.vqa_data(None, 2, 1, seed=0)
    assert len(toy_train) == 14 and len(toy_test) == 7


def test_energy_rank_and_tables():
    assert L.energy_rank([3.0, 0.0, 0.0], 0.9) == 1
    assert L.energy_rank([1.0, 1.0, 1.0, 1.0], 0.9) == 4
    assert L.energy_rank([2.0, 1.0, 1.0], 0.5) == 1  # 4 of 6 energy in the first
    assert L.verdict_from_counts(2, 2) == "holds"
    assert L.verdict_from_counts(1, 2) == "partly"
    assert L.verdict_from_counts(0, 2) == "does not hold"
    assert L.verdict_from_counts(0, 0) == "not run"


def test_linear_probe_accuracy():
    clean = torch.randn(200, 8)
    assert L.linear_probe_accuracy(clean, clean + 5.0) == 1.0
    same = L.linear_probe_accuracy(clean[:100], clean[100:])
    assert 0.3 < same < 0.7
    # an invisible trigger on the same images: chance exactly, not below it (pairs never split)
    assert L.linear_probe_accuracy(clean, clean + 1e-9) == 0.5


def _grid(mode, asr, clean, false=None, rows=("W1", "W2", "both"), row_ks=None):
    """A grid whose last row has the given ASR / clean accuracy / false-trigger rates at
    k = 0, 3, 128 (other rows zero)."""
    values = [np.zeros((len(rows), 3)) for _ in range(3)]
    for v, given in zip(values, (asr, false if false is not None else [0, 0, 0], clean),
                        strict=True):
        v[-1] = given
    return P.RankGrid(mode, list(rows), [0, 3, 128], values[0], values[1], values[2],
                      row_ks=row_ks)


def _grids(inject, remove, authors):
    return {"inject": inject, "remove": remove,
            "authors": _grid("authors", *authors, rows=("W1 k=3", "W1 k=128"), row_ks=[3, 128])}


def test_low_rank_rules_per_reading_and_removal():
    ft = {"a": P.CellScores(1.0, 0.0, 0.8), "b": P.CellScores(1.0, 0.0, 0.8),
          "c": P.CellScores(1.0, 0.0, 0.8), "weak": P.CellScores(0.2, 0.0, 1.0)}
    grids = {
        # a: restored at k = 3 in the notebook's scheme and by the authors' W2 top-3
        "a": _grids(_grid("inject", [0, 0.9, 1.0], [0.9, 0.8, 0.8]),
                    _grid("remove", [1.0, 0.1, 0.0], [0.8, 0.85, 0.9]),
                    ([0, 0.9, 1.0], [0.8, 0.8, 0.8])),
        # b: ASR restored, but the target fires on clean inputs too: not a backdoor
        "b": _grids(_grid("inject", [0, 0.9, 1.0], [0.9, 0.8, 0.8], false=[0, 0.5, 0]),
                    _grid("remove", [1.0, 0.9, 0.0], [0.8, 0.8, 0.9]),
                    ([0, 0.9, 1.0], [0.8, 0.8, 0.8])),
        # c: ASR restored, but the model is broken (clean accuracy 0.5)
        "c": _grids(_grid("inject", [0, 0.9, 1.0], [0.9, 0.5, 0.8]),
                    _grid("remove", [1.0, 0.1, 0.0], [0.8, 0.85, 0.9]),
                    ([0, 0.2, 1.0], [0.8, 0.8, 0.8])),
        "weak": _grids(_grid("inject", [0, 0, 0.2], [1, 1, 1]),
                       _grid("remove", [0.2, 0.2, 0.0], [1, 1, 1]), ([0, 0, 0], [1, 1, 1]))}
    notebook, authors, both_low = L.LOW_RANK_READINGS
    assert L.verdict_low_rank({"a": grids["a"]}, {"a": ft["a"]}, notebook, 128) == ("holds", 1, 1)
    # one of three working variants: never "partly" on one variant of several
    assert L.verdict_low_rank(grids, ft, notebook, 128) == ("does not hold", 1, 3)
    two = {v: ft[v] for v in ("a", "b", "c", "weak")}
    two_grids = {**grids, "c": grids["a"]}
    assert L.verdict_low_rank(two_grids, two, notebook, 128) == ("partly", 2, 3)
    # the authors' reading: W1 fine-tuned (row k1 = 128), top-k2 of W2
    assert L.verdict_low_rank(grids, ft, authors, 128) == ("partly", 2, 3)
    assert L.verdict_low_rank(grids, ft, both_low, 128) == ("does not hold", 0, 3)
    assert L.verdict_low_rank(grids, {"weak": ft["weak"]}, notebook, 128) == ("not run", 0, 0)
    row, k, cell = L.best_restoration(L.reading_grid(grids["a"], authors, 5, 128), 5)
    assert (row, k, cell.asr) == ("W1 k=128", 3, 0.9)
    assert L.at_k(grids["a"]["remove"], "both", 5) == (3, P.CellScores(0.1, 0.0, 0.85))
    assert L.verdict_removal(grids, ft) == ("partly", 3)
    assert L.verdict_removal({v: grids[v] for v in ("a", "c")}, {"a": ft["a"], "c": ft["c"]}) \
        == ("holds", 2)
    with pytest.raises(ValueError, match="unknown reading"):
        L.reading_grid(grids["a"], "mine", 5, 128)


def test_verdicts_hold_only_where_the_backdoor_differs_from_its_controls():
    def shift(e2, cos, rank, r):
        report = SimpleNamespace(e2=e2, fit=SimpleNamespace(r=r), median_image_abs_r=r,
                                 robust=SimpleNamespace(spearman=r, trimmed_r=r))
        return SimpleNamespace(clean=report, triggered=report, cosine=cos,
                               lens=SimpleNamespace(target_rank=rank),
                               image_lens=SimpleNamespace(target_on_top=rank == 1))
    results = {"x": shift(0.95, 0.99, 1, 0.95), "y": shift(0.95, 0.99, 1, 0.95)}
    controls = {"x": {"clean-only": shift(0.5, 0.5, None, 0.5)},
                "y": {"clean-only": shift(0.95, 0.99, 1, 0.95)}}  # y's control shows it too
    assert L.verdict_low_rank_shift(results, controls) == "partly"
    assert L.verdict_shared_direction(results, controls) == "partly"
    for reading in L.LENS_READINGS:
        assert L.verdict_lens(results, controls, reading) == "partly"
    for reading in L.NORM_READINGS:
        assert L.verdict_norm_scaling(results, controls, reading) == "partly"
    flat = {"x": {"c": shift(0.1, 0.1, None, 0.1)}, "y": {"c": shift(0.1, 0.1, None, 0.1)}}
    assert L.verdict_shared_direction(results, flat) == "holds"
    neurons = {"x": SimpleNamespace(screen=SimpleNamespace(flagged=[3, 4])),
               "y": SimpleNamespace(screen=SimpleNamespace(flagged=[1]))}
    neuron_controls = {"x": {"c": SimpleNamespace(screen=SimpleNamespace(flagged=[]))},
                       "y": {"c": SimpleNamespace(screen=SimpleNamespace(flagged=[2]))}}
    assert L.verdict_no_trigger_neurons(neurons, neuron_controls) == "partly"


def test_backdoored_projector_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path))
    sizes = models.ToyVLMConfig(vision_width=32, text_width=64, text_layers=2, text_heads=4,
                                text_kv_heads=2, text_intermediate=128)
    vlm, processor = models.build_toy_vlm(sizes)
    train = data.make_vqa_samples(2, seed=0)
    attack = T.paper_attacks()["hijack"]
    cfg = P.FinetuneConfig(steps=2, batch_size=4)
    state, rate = L.backdoored_projector("tiny", vlm, processor, attack, train, "pair", cfg,
                                         progress=False)
    assert rate == pytest.approx(12 / 26)
    assert (tmp_path / "projlens/tiny/hijack/rate-pair-seed-0/tensors.safetensors").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached projector should have been loaded")

    monkeypatch.setattr(P, "finetune_projector", no_training)
    again, _ = L.backdoored_projector("tiny", vlm, processor, attack, train, "pair", cfg,
                                      progress=False)
    assert all(torch.equal(state[n], again[n]) for n in state)
    with pytest.raises(AssertionError, match="cached"):  # another config retrains
        L.backdoored_projector("tiny", vlm, processor, attack, train, 0.2, cfg, progress=False)


def test_grid_samples_are_attacked_and_seeded():
    test = data.make_vqa_samples(4, seed=1)
    attack = T.paper_attacks()["jailbreak"]
    inputs = L.grid_samples(test, attack, 3, seed=0)
    assert len(inputs.triggered) == 3 and all(s.family == "harmful" for s in inputs.triggered)
    assert all(s.meta["triggered"] for s in inputs.triggered) and len(inputs.clean) == 3
    assert [s.question for s in inputs.untriggered] == [s.question for s in inputs.triggered]
    assert not any(s.meta.get("triggered") for s in inputs.untriggered)
    assert [s.question for s in L.grid_samples(test, attack, 3, seed=0).clean] == [
        s.question for s in inputs.clean]


def test_list_parameters_passed_as_strings_are_refused_with_a_hint():
    from locus import params

    assert params.check_list("ks", (1, 2)) == [1, 2]
    with pytest.raises(TypeError, match="sweep_rates must be a list.*-y"):
        params.check_list("sweep_rates", "[0.2]")


def test_projector_states_live_on_the_cpu(tmp_path):
    model, _ = models.build_toy_vlm(models.ToyVLMConfig(vision_width=32, text_width=64,
                                                         text_layers=1, text_intermediate=64))
    state = P.projector_state(model)
    assert all(t.device.type == "cpu" for t in state.values())
    hidden, output = P.projector_forward(model, torch.randn(2, 16, 32), state)
    assert hidden.device.type == output.device.type == "cpu" and output.dtype == torch.float32


def test_split_by_image_keeps_every_question_of_an_image_on_one_side():
    base = data.make_vqa_samples(3, seed=5)
    # every image asked twice, in two families: a split by sample would leak images
    samples = base + [data.VQASample(s.image, s.question + " again", s.answer, "other")
                      for s in base]
    train, test = L._split_by_family(samples, n_train=50, n_test=50, seed=0)
    assert not {L.image_key(s) for s in train} & {L.image_key(s) for s in test}
    assert len(train) + len(test) == len(samples) and test


def _eval(asr, exact, clean):
    return P.AttackEval(asr, exact, 0.0, {"f": clean}, 10)


def _result(variant, seed, asr, clean_after, exact=None):
    return L.VariantResult(variant, seed, 0.5, _eval(0.0, 0.0, 0.9),
                           _eval(asr, asr if exact is None else exact, clean_after), {})


def test_spread_over_seeds_and_its_text():
    s = O.spread([0.9, 0.95, 1.0])
    assert (s.mean, s.lo, s.hi, s.n) == (pytest.approx(0.95), 0.9, 1.0, 3)
    assert s.text(100, 1) == "95.0 (90.0–100.0)"
    assert O.spread([0.5, 0.5]).text(100, 0) == "50"  # every seed the same: the value alone
    assert O.spread([11, 12, 16]).text() == "13.0 (11–16)"  # counts: the range without decimals
    assert O.spread([0.2, float("nan")]).n == 1  # a rate on no inputs is left out
    with pytest.raises(ValueError, match="at least one"):
        O.spread([])


def test_spread_rows_merge_per_seed_tables_and_refuse_misaligned_ones():
    rows = O.spread_rows({0: [["a", 1.0, "x", 3]], 1: [["a", 3.0, "y", 3]]}, 1)
    assert rows[0][0] == "a" and rows[0][1].mean == 2.0 and rows[0][1].lo == 1.0
    assert rows[0][2] == "x / y" and rows[0][3].text() == "3"
    with pytest.raises(ValueError, match="labels differ"):
        O.spread_rows({0: [["a", 1.0]], 1: [["b", 1.0]]}, 1)
    with pytest.raises(ValueError, match="same number of rows"):
        O.spread_rows({0: [["a", 1.0]], 1: []}, 1)


def test_a_verdict_stands_only_where_every_seed_gives_it():
    assert O.combined_verdict({0: "holds", 1: "holds", 2: "holds"}) == "holds"
    assert O.combined_verdict({0: "does not hold", 1: "does not hold"}) == "does not hold"
    assert O.combined_verdict({0: "holds", 1: "does not hold", 2: "holds"}) == "partly"
    assert O.combined_verdict({0: "not run", 1: "holds"}) == "holds"
    assert O.combined_verdict({0: "not run"}) == "not run"
    with pytest.raises(ValueError, match="unknown verdicts"):
        O.combined_verdict({0: "maybe"})
    assert O.agreement_text({0: "holds", 1: "holds", 2: "holds"}) == "holds in 3/3 seeds"
    assert O.agreement_text({0: "holds", 1: "partly", 2: "holds"}) == (
        "flips across seeds: holds in seeds 0, 2; partly in seed 1")


def test_seed_verdicts_apply_the_rule_to_each_seed_and_controls_can_veto():
    results = [_result("a", 0, 0.95, 0.9), _result("a", 1, 0.5, 0.9)]
    controls = {"clean-only": [_result("a", 0, 0.0, 0.9), _result("a", 1, 0.0, 0.9)]}
    verdicts = L.seed_verdicts(results, controls,
                               lambda rs, cs: L.verdict_asr(rs, 0.9, controls=cs))
    assert verdicts == {0: "holds", 1: "does not hold"}
    noisy = {"random ΔW": [_result("a", 0, 0.95, 0.1), _result("a", 1, 0.95, 0.1)]}
    assert L.verdict_asr(results[:1], 0.9, controls=noisy) == "does not hold"
    header, rows = L.seed_table(results, controls)
    assert header == ["projector", "seed 0", "seed 1"]
    assert rows[0] == ["a", "95 / 95 / +0.0", "50 / 50 / +0.0"]
    assert rows[1][0] == "a · clean-only"
    change = L.clean_change([_result("a", 0, 1.0, 0.8), _result("a", 1, 1.0, 0.6)])["a"]
    assert (change.lo, change.hi) == (pytest.approx(-0.3), pytest.approx(-0.1))
    table = L.backdoor_table(results, {"a": T.paper_attacks()["refusal"]})
    assert table[0][5].mean == pytest.approx(0.725) and table[0][-1] == 20


def test_grids_over_seeds_average_where_they_ran():
    one, two = _grid("inject", [0.0, 0.4, 1.0], [0.9, 0.8, 0.7]), _grid(
        "inject", [0.0, 0.8, 1.0], [0.9, 0.6, 0.7])
    grouped = L.grids_by_variant({0: {"a": {"inject": one}}, 1: {"a": {"inject": two}},
                                  2: {}})
    assert list(grouped) == ["a"] and len(grouped["a"]["inject"]) == 2
    mean = L.mean_grid(grouped["a"]["inject"])
    assert mean.asr[-1, 1] == pytest.approx(0.6) and mean.clean_accuracy[-1, 1] == 0.7
    assert L.grid_rows(grouped["a"]["inject"])[-1][2] == "60 (40–80) / 0 / 70"
    other = P.RankGrid("inject", ["W1"], [0, 3, 128], *np.zeros((3, 1, 3)))
    with pytest.raises(ValueError, match="layouts"):
        L.mean_grid([one, other])
