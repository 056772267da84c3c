"""Tests for locus.lost_in_attention.benchmark: teacher-forced scoring gives the decoded verdicts
(checked on the toy VLM under every kind of condition before the notebook relies on it), the
paired comparisons call a change only outside the noise, the replacement machinery detects a
model that needs its visual attention, and the readings scale the authors' layers."""

import numpy as np
import pytest

from locus import zoo
from locus.data import make_vqa_samples
from locus.lost_in_attention import attention as A
from locus.lost_in_attention import benchmark as B


@pytest.fixture(scope="module")
def toy_vlm():
    model, processor = zoo.load("toy-vlm", device="cpu", progress=False)
    return model.eval(), processor


@pytest.fixture(scope="module")
def samples():
    return make_vqa_samples(4, zoo.HELD_OUT_SEED + 77)


def test_teacher_forced_verdicts_equal_the_decoded_ones_on_the_toy_vlm(toy_vlm, samples):
    model, processor = toy_vlm
    settings = B.readings(4)
    configs = {
        "vanilla": None,
        "paper, dirichlet": settings["paper (LLaVA-1.5)"].config("dirichlet"),
        "qwen, gaussian, lambda 0.5": settings["Qwen band, λ = 0.5"].config("gaussian"),
        "all heads, uniform": settings["all heads, all but layer 0"].config("uniform"),
        "drop": A.ReplacementConfig(mode="drop", heads="all", layers="all_but_0"),
        "prune from 1": A.pruning_config(4, 1),
    }
    agreement = B.scoring_agreement(model, processor, samples, configs, 20, 3)
    assert agreement == {name: 1.0 for name in configs}
    assert B.scoring_agreement(model, processor, samples, {"vanilla": None}, 20, 1) == {
        "vanilla": 1.0}
    # The conditions differ from each other, so agreement is not agreement on one constant.
    scored = {name: B.correct_teacher_forced(model, processor, samples, c, 16, 3)
              for name, c in configs.items()}
    assert len({tuple(v) for v in scored.values()}) >= 3
    # With max_new_tokens = 1 the two-token answers ("top right") cannot be produced.
    short = B.correct_teacher_forced(model, processor, samples, None, 16, 1)
    two_tokens = np.array([len(s.answer.split()) > 1 for s in samples])
    assert two_tokens.any() and not short[two_tokens].any()


def test_the_machinery_detects_a_model_that_needs_its_visual_attention(toy_vlm):
    model, processor = toy_vlm
    sets = {0: make_vqa_samples(30, zoo.HELD_OUT_SEED + 78, ("attribute", "text"))}
    run = B.Scorer(model, processor, sets, 16, 3)
    drop = A.ReplacementConfig(mode="drop", heads="all", layers="all_but_0")
    scored = run({"vanilla": None, "drop": drop, "no-op": A.ReplacementConfig(lam=0.0),
                  "drop again": A.ReplacementConfig(mode="drop", heads="all",
                                                    layers="all_but_0")})
    assert run.runs == 3 and scored["drop again"] is scored["drop"]
    vanilla, dropped, no_op = scored["vanilla"], scored["drop"], scored["no-op"]
    families = ["attribute", "text"]
    rows = {r.family: r for r in B.compare_to_vanilla(vanilla, dropped, sets, families, 2.0)}
    # The attribute answer is read from the image: dropping the answer token's visual attention
    # loses it. The arithmetic answer does not depend on the image.
    assert rows["attribute"].call == "worse" and rows["attribute"].diff.estimate < -50
    assert rows["text"].diff.estimate == 0 and rows["text"].call == "comparable"
    assert np.array_equal(no_op[0], vanilla[0])


def planted_scores(vanilla_correct, condition_correct):
    return {0: np.array(vanilla_correct, bool)}, {0: np.array(condition_correct, bool)}


def test_paired_comparison_calls_a_change_only_outside_the_noise():
    sets = {0: make_vqa_samples(300, 5, ("text",))}
    n = len(sets[0])
    rng = np.random.default_rng(0)
    base = rng.random(n) < 0.9
    calls = {}
    for name, condition in {
        "same": base.copy(),
        "one more wrong": np.where(np.arange(n) == np.argmax(base), False, base),
        "loses a third": base & (rng.random(n) < 0.67),
        "gains": base | (rng.random(n) < 0.5),
        "noisy": np.where(np.isin(np.arange(n), np.r_[np.flatnonzero(base)[:6],
                                                      np.flatnonzero(~base)[:3]]), ~base, base),
    }.items():
        vanilla, cond = planted_scores(base, condition)
        (row,) = B.compare_to_vanilla(vanilla, cond, sets, ["text"], margin=2.0)
        calls[name] = row.call
        assert row.diff.estimate == pytest.approx(100 * (condition.mean() - base.mean()))
    assert calls == {"same": "comparable", "one more wrong": "comparable", "loses a third":
                     "worse", "gains": "better", "noisy": "inconclusive"}
    with pytest.raises(ValueError, match="same seeds"):
        B.compare_to_vanilla({0: base}, {1: base}, sets, ["text"])


def comparison(family, call, estimate=0.0):
    from locus.stats import Interval

    return B.FamilyComparison(family, Interval(90, 85, 95, 100), 90 + estimate,
                              Interval(estimate, estimate - 1, estimate + 1, 100), call)


def test_verdict_rules():
    rows = [comparison("a", "comparable"), comparison("b", "better"),
            comparison("c", "inconclusive", -1.5), comparison("text", "worse", -20)]
    assert B.majority_verdict(rows) == "partly"  # 2 of 4 comparable, 1 worse
    assert B.majority_verdict(rows[:3]) == "holds"
    assert B.majority_verdict([rows[3], rows[3], rows[0]]) == "does not hold"
    assert B.majority_verdict([rows[2], rows[2], rows[3]]) == "partly"  # inconclusive
    assert B.exception_verdict(rows) == "holds"
    assert B.exception_verdict(rows[:3] + [comparison("text", "inconclusive", -9)]) == "partly"
    assert B.exception_verdict(rows[:3], "text") == "not run"
    assert B.others_verdict({"x": "holds", "y": "partly"}) == "partly"
    assert B.others_verdict({"x": "holds"}) == "holds" and B.others_verdict({}) == "not run"


def test_a_reading_whose_drop_control_also_holds_is_only_partly():
    sets = {0: make_vqa_samples(40, 5, ("text", "attribute"))}
    n = len(sets[0])
    same = {0: np.ones(n, bool)}
    verdicts = B.reading_verdicts(same, {"dirichlet": same, "uniform": same,
                                         B.DROP_CONTROL: same}, sets,
                                  ["text", "attribute"], "dirichlet", "text", 2.0)
    assert verdicts.main_majority == "holds" and verdicts.control == "holds"
    assert verdicts.replacement == "partly" and verdicts.others == {"uniform": "holds"}
    assert verdicts.other_vectors == "partly"
    assert B.percent(B.pooled_accuracy(same, sets, ["text"])) == "100.0 [91.2, 100.0]"
    lost = {0: np.array([s.family == "text" for s in sets[0]])}
    verdicts = B.reading_verdicts(same, {"dirichlet": same, B.DROP_CONTROL: lost}, sets,
                                  ["text", "attribute"], "dirichlet", "text", 2.0)
    assert verdicts.control == "does not hold" and verdicts.replacement == "holds"
    assert B.where_it_flips({"p": "holds", "q": "partly", "r": "holds"}) == (
        "holds: p, r; partly: q")


def test_only_families_whose_vanilla_beats_the_no_image_floor_are_counted():
    sets = {0: make_vqa_samples(30, 6, ("existence", "spatial", "text"))}
    family = np.array([s.family for s in sets[0]])
    vanilla = {0: np.ones(len(family), bool)}
    # Without the image existence falls to half; spatial and text keep vanilla's answers.
    no_image = {0: ~((family == "existence") & (np.arange(len(family)) % 2 == 0))}
    dependence = B.image_dependence(vanilla, no_image, sets, ["existence", "spatial", "text"])
    assert [r.call for r in dependence] == ["better", "comparable", "comparable"]
    assert dependence[0].condition == 100.0 and dependence[0].vanilla.estimate == 50.0
    assert B.counted_families(dependence) == ["existence"]
    # Spatial loses under the replacement and text is unchanged: counted alone, existence
    # (unchanged) holds; with every family counted, 1 comparable of 3 fails the majority.
    lost = {0: family != "spatial"}
    scores = {"dirichlet": vanilla, "uniform": lost, B.DROP_CONTROL: lost}
    families = ["existence", "spatial", "text"]
    counted = B.reading_verdicts(vanilla, scores, sets, families, "dirichlet", "text", 2.0,
                                 counted=["existence"])
    everything = B.reading_verdicts(vanilla, scores, sets, families, "dirichlet", "text", 2.0)
    assert counted.main_majority == "holds" and everything.main_majority == "holds"
    assert counted.others == {"uniform": "holds"}
    assert everything.others == {"uniform": "holds"}  # 2 of 3 comparable
    only_spatial = B.reading_verdicts(vanilla, scores, sets, families, "uniform", "text", 2.0,
                                      counted=["spatial"])
    assert only_spatial.main_majority == "does not hold"
    assert B.reading_verdicts(vanilla, scores, sets, families, "dirichlet", "text", 2.0,
                              counted=[]).replacement == "not run"
    rows = B.reading_rows(vanilla, {"r": {"uniform": lost}}, sets, families, counted=["spatial"])
    assert rows[0]["verdicts"] == {1.0: "does not hold", 2.0: "does not hold",
                                   5.0: "does not hold"}
    assert B.exception_verdict([comparison("text", "worse", -20)]) == "not run"


def test_readings_scale_the_authors_layers_to_the_model_depth():
    assert B.scaled_layers(18, 23, 32, 32) == tuple(range(18, 24))
    assert B.scaled_layers(18, 23, 32, 4) == (2,)
    assert B.scaled_layers(21, 27, 32, 4) == (2, 3)
    assert B.scaled_layers(18, 23, 32, 16) == (9, 10, 11)
    # SmolLM2's 30 layers: every layer overlapping the band (7 and 8 of 30).
    assert B.readings(30)["paper (LLaVA-1.5)"].layers == tuple(range(16, 23))
    assert B.readings(30)["authors' code (LLaVA script)"].layers == tuple(range(19, 27))
    settings = B.readings(4)
    paper = settings["paper (LLaVA-1.5)"]
    assert paper.heads == A.HeadBand(0.3, 0.6) and paper.layers == (2,) and paper.lam == 1.0
    assert paper.moment_matching
    assert not settings["Qwen2.5-VL code (no moment matching)"].moment_matching
    assert B.describe_setting(paper, 4) == (
        "band 0.3–0.6, layers [2], λ 1, moment matching on")
    plan = B.reading_plan(settings, ["dirichlet", "uniform"], full=["paper (LLaVA-1.5)"])
    assert list(plan["paper (LLaVA-1.5)"]) == ["dirichlet", "uniform", B.DROP_CONTROL]
    assert list(plan["Qwen band, λ = 0.5"]) == ["dirichlet", B.DROP_CONTROL]
    drop = plan["Qwen band, λ = 0.5"][B.DROP_CONTROL]
    assert drop.mode == "drop" and drop.heads == A.HeadBand(0.3, 0.9)
    with pytest.raises(ValueError, match="first <= last"):
        B.scaled_layers(23, 18, 32, 4)


def test_parameter_checks():
    assert B.check_modes(["uniform", "dirichlet"]) == ["uniform", "dirichlet"]
    with pytest.raises(ValueError, match="distinct names"):
        B.check_modes(["uniform", "drop"])
    with pytest.raises(TypeError, match="non-empty list"):
        B.check_modes("uniform")
    assert B.check_margin(2) == 2.0
    with pytest.raises(ValueError, match="margin"):
        B.check_margin(-1)
    with pytest.raises(ValueError, match="scoring"):
        B.score(None, None, {}, None, scoring="beam")
    with pytest.raises(ValueError, match="scoring"):
        B.Scorer(None, None, {}, scoring="beam")
