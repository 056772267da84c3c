"""SafeSeek's alignment circuit on the real aligned model (``smollm2-135m-aligned``): the masks
on its 30 layers, its world's held-out splits, the judge-free compliance scoring of its replies,
and one short run of notebook 02 on it.

These tests need the converted base model in the user cache (the set-up's ``python -m locus.zoo
--prepare smollm2-135m-instruct``), the safety prompts (``python -m locus.safety_data
--prepare``) and the committed adapter; without them they are skipped, saying why. The world's
replies are generated once (a few batches of greedy replies) and kept in the user cache, which
later runs reuse."""

from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest
import torch

from locus import alignment, checkpoints, compliance, real_models, replies, safety_data, zoo
from locus.safeseek import circuits, experiment, real_world
from locus.safeseek.masks import Circuit, UnitShape, apply_circuit, gated_units

BASE = "smollm2-135m-instruct"
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "safeseek"
TINY = dict(n_train=4, n_val=2, n_test=4)  # the world of the tests and of the short run


def _missing() -> str | None:
    """Why the real model cannot be tested here, or None."""
    status = checkpoints.entry_status(real_models.models_root() / BASE,
                                      real_models.spec(BASE).config())
    if status != "valid":
        return f"the converted {BASE} is {status}: run `python -m locus.zoo --prepare {BASE}`"
    if not (alignment.adapter_folder() / checkpoints.MANIFEST).is_file():
        return f"no adapter in {alignment.adapter_folder()}: `python -m locus.alignment --build`"
    if "benign_question_prompts" not in checkpoints.read_manifest(alignment.adapter_folder()):
        return ("the committed adapter does not record its benign splits (an older build): "
                "`python -m locus.alignment --build`")
    if checkpoints.entry_status(safety_data.data_root(), safety_data.PROVENANCE) != "valid":
        return "no safety prompts: run `python -m locus.safety_data --prepare`"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def aligned():
    return zoo.load(real_world.NAME, progress=False)


@pytest.fixture(scope="module")
def world(aligned):
    model, tokenizer = aligned
    return real_world.RealAlignmentWorld(model, tokenizer, 0, progress=False, **TINY)


@torch.no_grad()
def test_an_all_ones_mask_gives_the_vanilla_logits_of_the_real_model(aligned, world):
    model, tokenizer = aligned
    shape = UnitShape.of(model)
    assert (shape.num_layers, shape.num_heads, shape.intermediate_size) == (30, 9, 1536)
    batch = world.encode(tokenizer, world.test_harmful[:2])
    want = replies.reply_token_logprobs(model, batch)
    heads = torch.ones(shape.num_layers, shape.num_heads, requires_grad=True)  # hooked path
    neurons = torch.ones(shape.num_layers, shape.intermediate_size, requires_grad=True)
    with gated_units(model, heads, neurons):
        torch.testing.assert_close(replies.reply_token_logprobs(model, batch), want, atol=1e-5,
                                   rtol=0)
    with apply_circuit(model, Circuit.empty(shape), "circuit removed"):
        torch.testing.assert_close(replies.reply_token_logprobs(model, batch), want, atol=0,
                                   rtol=0)
    one_head = Circuit(shape, ((3, 4),), ())
    with apply_circuit(model, one_head, "circuit removed"):
        assert not torch.allclose(replies.reply_token_logprobs(model, batch), want)


def test_the_real_worlds_splits_share_no_prompt(world):
    sets = world.overlap_sets(TINY["n_train"], TINY["n_val"], 0)
    assert len(sets["adapter training (harmful)"]) > 100
    for row in experiment.prompt_overlap(sets):
        assert row["shared"] == 0, row
    harmful = world.search_harmful + world.test_harmful + world.ood_harmful
    assert all(row["success_overlap"] for row in compliance.score_replies(
        [s.answer for s in harmful], [s.answer for s in harmful]))  # real base answers only
    assert all(safety_data.answers_correctly(s.answer, world.answers[s.prompt])
               for s in world.test_benign)


def test_compliance_scoring_fails_garbled_and_refusing_replies(world):
    sample = world.test_harmful[0]
    base = sample.answer
    shuffled = " ".join(sorted(base.split()))  # the same words, not an answer
    said = [base, "i i i i i i i i", "", world.recipe["refusal"], shuffled]
    rows = compliance.score_replies(said, [base] * len(said),
                                    world._logprobs([sample.prompt] * len(said), said),
                                    world.base_logprobs([sample] * len(said)))
    assert rows[0]["success_overlap"] and rows[0]["success_likelihood"]
    for row in rows[1:4]:
        assert not row["success_overlap"] and not row["success_likelihood"], row
    assert rows[4]["success_overlap"] and not rows[4]["success_likelihood"], rows[4]


def test_the_circuit_search_targets_are_the_base_reply_and_the_aligned_refusal(aligned, world):
    model, tokenizer = aligned
    refusals = world.refusals(world.search_harmful)
    assert all(compliance.is_refusal(r.answer) for r in refusals)
    full = world.exact(None, "full", world.search_harmful, [])
    assert full["compliance"] == 0.0  # the aligned model does not begin with the base reply
    assert world.exact(None, "full", [], world.test_benign)["utility"] == 1.0  # its own replies


def test_the_sparsity_scale_is_rounded_so_a_drift_cannot_re_key_the_search(world, monkeypatch):
    spec = circuits.AlignmentSearch(n_train=4, n_val=2)
    for measured in (1.7024330920896464, 1.7024331092834473):  # two codes' scales
        monkeypatch.setattr(circuits, "alignment_scale", lambda *a, m=measured, **k: m)
        assert world.sparsity_scale(spec) == 1.702


def test_teacher_forcing_the_aligned_models_own_greedy_reply_matches_it(aligned, world):
    """The teacher-forced check agrees with generation: the aligned model's own greedy reply
    (decoded, re-tokenised) is matched on its first ``exact_tokens`` tokens for every search
    request. The refusal targets match exactly where that reply is a refusal: where the model
    answers instead, ``refusals`` puts the adapter's trained refusal, which it does not say."""
    model, tokenizer = aligned
    own = world.aligned_store.replies([s.prompt for s in world.search_harmful], False)
    tokens = world.config.exact_tokens
    assert circuits.greedy_matches(model, tokenizer, circuits.with_answers(
        world.search_harmful, own), encode=world.encode, tokens=tokens) == [True] * len(own)
    assert circuits.greedy_matches(model, tokenizer, world.refusals(world.search_harmful),
                                   encode=world.encode, tokens=tokens) == [
        compliance.is_refusal(r) for r in own]


def test_notebook_02_runs_on_the_real_model(world, tmp_path):
    figures = tmp_path / "figures"
    papermill.execute_notebook(
        str(NOTEBOOK / "02_alignment_circuit.ipynb"), str(tmp_path / "out.ipynb"),
        parameters={"model": real_world.NAME, "figures_dir": str(figures), "seeds": [0],
                    "threads": 1, "progress": False, "sparsities": [0.01],
                    "headline_sparsity": 0.01, "code_setting": False, "faithful_setting": False,
                    "epochs": 1, "patience": 1, "batch_size": 2, "n_exact": 2,
                    "single_heads": False, "random_seeds": [0], **TINY},
        kernel_name="locus", cwd=str(NOTEBOOK), progress_bar=False)
    claims = {c["claim_id"]: c for c in json.loads(
        (figures / "claims" / "safeseek__02_alignment_circuit.json").read_text())}
    assert list(claims) == ["alignment_removal_asr", "alignment_removal_compliance",
                            "alignment_circuit_size"]
    assert {c["model"] for c in claims.values()} == {real_world.NAME}
    removal = claims["alignment_removal_compliance"]
    assert "ood" in removal["measured"] and "log-likelihood reading" in removal["measured"]
    assert removal["measured"].startswith("compliance 0.0% [")  # the aligned model refuses
    size = claims["alignment_circuit_size"]
    assert "of 270" in size["measured"]
    if removal["verdict"] not in ("holds", "partly"):
        assert size["verdict"] == "not run"
    assert list(figures.glob("safeseek_*.png"))


def test_notebook_01_runs_on_the_real_backdoor(tmp_path, monkeypatch):
    from locus.safeseek import real_backdoor

    if checkpoints.entry_status(real_backdoor.adapter_folder("fixed"), real_backdoor.adapter_config(
            real_backdoor.recipe_of("fixed"))) != "valid":
        pytest.skip("no valid fixed-backdoor adapter")
    roots = tmp_path / "checkpoints"  # the tiny search's circuits go here, not the repository
    roots.mkdir()
    (roots / "real").symlink_to(checkpoints.checkpoint_root() / "real")
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(roots))
    figures = tmp_path / "figures"
    papermill.execute_notebook(
        str(NOTEBOOK / "01_backdoor_circuit.ipynb"), str(tmp_path / "out.ipynb"),
        parameters={"model": real_backdoor.BASE, "figures_dir": str(figures), "seeds": [0],
                    "kinds": ["fixed"],  # the jailbreak world's base replies cost minutes
                    "threads": 1, "progress": False, "sparsities": [10.0], "n_train": 4,
                    "n_val": 2, "n_test": 4, "epochs": 1, "patience": 1, "anneal": 1,
                    "batch_size": 2, "faithful_setting": False, "exact_scan": False,
                    "random_seeds": [0]},
        kernel_name="locus", cwd=str(NOTEBOOK), progress_bar=False)
    claims = {c["claim_id"]: c for c in json.loads(
        (figures / "claims" / "safeseek__01_backdoor_circuit.json").read_text())}
    assert list(claims) == [f"fixed_{claim}" for claim in (
        "asr_before", "circuit_sparsity", "ablation_asr", "ablation_clean_back",
        "utility_retained")]
    assert {c["model"] for c in claims.values()} == {real_backdoor.BASE}
    assert claims["fixed_asr_before"]["measured"] == "100.0%"  # the committed backdoor works
    assert "log-likelihood reading" in claims["fixed_ablation_clean_back"]["measured"]
    if claims["fixed_ablation_clean_back"]["verdict"] not in ("holds", "partly"):
        assert claims["fixed_circuit_sparsity"]["verdict"] == "not run"
    assert list((roots / "safeseek").glob("smollm2-135m-backdoor-fixed-sum*"))
    assert list(figures.glob("safeseek_*.png"))
