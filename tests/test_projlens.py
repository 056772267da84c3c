"""Tests of the ProjLens notebook glue (locus.projlens.experiment): parameters, data split,
cache reuse, probes and verdict rules."""

import numpy as np
import pytest
import torch

from locus import data, models
from locus.projlens import experiment as L
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


def _grid(mode, asr_both, clean_both):
    asr = np.zeros((3, 3))
    asr[2] = asr_both
    clean = np.full((3, 3), np.nan)
    clean[2] = clean_both
    return P.RankGrid(mode, ["W1", "W2", "both"], [0, 3, 128], asr, clean)


def test_low_rank_and_removal_rules():
    grids = {"a": {"inject": _grid("inject", [0, 0.9, 1.0], [1, 1, 1]),
                   "remove": _grid("remove", [1.0, 0.1, 0.0], [0.8, 0.85, 0.9])},
             "b": {"inject": _grid("inject", [0, 0.5, 1.0], [1, 1, 1]),
                   "remove": _grid("remove", [1.0, 0.9, 0.0], [0.8, 0.8, 0.9])},
             "weak": {"inject": _grid("inject", [0, 0, 0.2], [1, 1, 1]),
                      "remove": _grid("remove", [0.2, 0.2, 0.0], [1, 1, 1])}}
    asr_ft = {"a": 1.0, "b": 1.0, "weak": 0.2}
    assert L.verdict_low_rank({"a": grids["a"]}, {"a": 1.0}) == ("holds", 1)
    assert L.verdict_low_rank(grids, asr_ft) == ("partly", 2)  # b restores 50%: a majority
    assert L.verdict_low_rank(grids, {"weak": 0.2}) == ("not run", 0)
    clean_ft = {"a": 0.8, "b": 0.8, "weak": 1.0}
    assert L.at_k(grids["a"]["remove"], "both", 5) == (3, 0.1, 0.85)
    assert L.verdict_removal(grids, asr_ft, clean_ft) == ("partly", 2)
    assert L.verdict_removal(grids, asr_ft, {"a": 0.99, "b": 0.8}) == ("does not hold", 2)


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
    triggered, clean = L.grid_samples(test, attack, 3, seed=0)
    assert len(triggered) == 3 and all(s.family == "harmful" for s in triggered)
    assert all(s.meta["triggered"] for s in triggered) and len(clean) == 3
    assert [s.question for s in L.grid_samples(test, attack, 3, seed=0)[1]] == [
        s.question for s in clean]


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
