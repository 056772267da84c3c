"""The benchmark's correctness checks on a tiny model: every method the benchmark times must
compute the same captured tensors and the same edited logits as locus (no timing here).
The peers (nnsight, TransformerLens) are optional: their cases skip where they are missing."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
capture_overhead = importlib.import_module("capture_overhead")
methods = importlib.import_module("methods")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
    return capture_overhead.random_llama(TINY)


@pytest.fixture(scope="module")
def batch():
    return capture_overhead.random_batch(TINY["vocab_size"], batch=2, seq=7)


def _peer(name, model):
    build = {"nnsight": methods.nnsight_method,
             "TransformerLens": methods.transformer_lens_method}[name]
    try:
        return build(model)
    except methods.Unavailable as err:
        pytest.skip(str(err))


def test_baselines_match_locus(model, batch):
    found = [methods.locus_method(model), methods.plain_method(model),
             methods.hidden_states_method(model)]
    diffs = methods.check_all(model, found, batch, layer=1, head=2)
    assert diffs["capture: layer inputs", "output_hidden_states"] == 0.0
    assert ("capture: input, attn, ffn", "output_hidden_states") not in diffs


@pytest.mark.parametrize("name", ["nnsight", "TransformerLens"])
def test_peer_computes_what_locus_computes(model, batch, name):
    peer = _peer(name, model)
    diffs = methods.check_all(model, [methods.locus_method(model), peer], batch, layer=1, head=2)
    assert {task for task, _ in diffs} == {"capture: layer inputs", "capture: input, attn, ffn",
                                          "ablation"}
    assert all(diff <= methods.REL_TOL for diff in diffs.values())


def test_a_method_that_computes_something_else_is_caught(model, batch):
    ours = methods.locus_method(model)

    def off_by_one_head(b, layer, head):  # ablates the wrong head
        return ours.ablate(b, layer, head + 1)

    def shifted(b, sites):  # captures layer i+1's input as layer i's
        states = ours.capture(b, sites)
        return {i: states[min(i + 1, len(states) - 1)] for i in states}

    wrong = methods.Method("wrong", shifted, off_by_one_head)
    with pytest.raises(AssertionError, match="differs from locus"):
        methods.check_all(model, [ours, wrong], batch, layer=1, head=2)
    wrong = methods.Method("wrong", ours.capture, off_by_one_head)
    with pytest.raises(AssertionError, match="edited logits differ"):
        methods.check_all(model, [ours, wrong], batch, layer=1, head=2)


def test_an_ablation_without_effect_is_refused(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
    with pytest.raises(AssertionError, match="changes the logits by only"):
        methods.check_logits("locus", logits, logits, logits)


def test_smollm2_config_is_the_real_models_shape():
    config = capture_overhead.SMOLLM2_135M
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"],
            config["vocab_size"]) == (30, 576, 9, 3, 1536, 49152)
    assert config["tie_word_embeddings"]


def test_unavailable_peers_are_reported_not_raised(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnsight", None)  # import nnsight now raises ImportError
    found, unavailable = methods.available_methods(model)
    assert "nnsight" in unavailable and "pip install" in unavailable["nnsight"]
    assert [m.name for m in found][:3] == ["locus", "plain forward", "output_hidden_states"]


def test_markdown_lists_skipped_peers():
    meta = {"batch": 2, "seq": 7, "threads": 1, "repeats": 3, "load_before": (0.5, 0, 0),
            "load_after": (0.6, 0, 0), "versions": {"torch": "2", "nnsight": None}}
    rows = [{"model": "m", "task": "ablation", "method": "locus", "cpu_ms": 1.0, "wall_ms": 1.1,
             "vs_plain": 1.02, "locus_over_method": 1.0, "max_rel_diff": 0.0},
            {"model": "m", "task": "all", "method": "nnsight", "skipped": "not installed"}]
    text = capture_overhead.markdown(rows, meta)
    assert "| m | all | nnsight | skipped: not installed |" in text
    assert "nnsight not installed" in text


def test_train_times_table_judges_each_model_against_the_goal():
    train_times = importlib.import_module("train_times")
    run = {"held_out_accuracy": {}, "committed_threads": 1}
    record = {"cores": 2, "load_before": 0.1, "load_after": 0.2, "models": {
        "fast": {**run, "train_seconds": 599.0, "threads": 1, "same_weights_as_committed": True},
        "slow": {**run, "train_seconds": 601.0, "threads": 2, "same_weights_as_committed": False}}}
    rows = train_times.markdown(record).splitlines()
    assert "| fast | 1 | 599 | meets | yes (1 threads) |" in rows
    assert "| slow | 2 | 601 | misses | no (1 threads) |" in rows


def test_a_benchmark_never_run_has_no_result():
    from locus import paths
    assert paths.benchmark_result("no_such_benchmark") is None
