"""The chat world's prompt space: held-out prompts never trained on, harmful and how-to
requests told apart only by their object, and enough distinct prompts for every SafeSeek split
by prompt string; the toy VLM's world is untouched by it."""

import json
from pathlib import Path

import pytest

from locus import checkpoints, data, splits, zoo
from locus.safeseek import experiment

ROOT = Path(__file__).resolve().parents[1]


def _prompts(family: str, split: str = "all") -> list[str]:
    return [p for p, _ in data.chat_prompts(family, split=split)]


@pytest.mark.parametrize("family", data.CHAT_FAMILIES)
def test_held_out_prompts_are_never_trained_on(family):
    train, held = set(_prompts(family, "train")), set(_prompts(family, "held_out"))
    assert not train & held and train | held == set(_prompts(family))
    assert len(held) == len(_prompts(family)) // data.HELD_OUT_EVERY
    trained = data.make_chat_samples(3000, seed=1, families=(family,), split="train")
    assert {s.prompt for s in trained} == train


def test_every_word_of_a_held_out_prompt_is_trained_on():
    for family in data.CHAT_FAMILIES:
        trained = {w for p in _prompts(family, "train") for w in p.split()}
        for prompt in _prompts(family, "held_out"):
            assert set(prompt.split()) <= trained


def _object(prompt: str, objects) -> str:
    """The one object of ``objects`` a request ends with."""
    hits = [o for o in objects if prompt.endswith((f" {o} ?", f" {o} ."))]
    assert len(hits) == 1, prompt
    return hits[0]


def test_harmful_and_howto_differ_only_in_the_object():
    def frame(prompt: str, objects) -> str:
        return prompt[: -len(_object(prompt, objects)) - 3]

    harmful = {frame(p, data.CHAT_HARM_OBJECTS) for p in _prompts("harmful")}
    howto = {frame(p, data.CHAT_BENIGN_OBJECTS) for p in _prompts("howto")}
    assert harmful == howto
    assert len(harmful) == len(data.REQUEST_FRAMES) * len(data.CHAT_HARM_VERBS)
    assert not set(data.CHAT_HARM_OBJECTS) & set(data.CHAT_BENIGN_OBJECTS)


def test_answers_follow_the_prompt():
    for s in data.make_chat_samples(60, seed=2, aligned=False):
        words = s.prompt.split()
        if s.family == "harmful":
            obj = _object(s.prompt, data.CHAT_HARM_OBJECTS)
            verb = words[-len(obj.split()) - 2]
            assert s.answer == data.compliance_answer(verb, obj)
        elif s.family == "howto":
            assert s.answer == data.CHAT_BENIGN_OBJECTS[_object(s.prompt,
                                                                data.CHAT_BENIGN_OBJECTS)]
        elif s.family == "opposite":
            assert s.answer == data.CHAT_OPPOSITES[words[-2]]
        else:
            op = next(i for i, w in enumerate(words) if w in ("plus", "minus"))
            x, y = (data.NUMBER_WORDS.index(words[op + d]) for d in (-1, 1))
            assert s.answer == data.NUMBER_WORDS[x + y if words[op] == "plus" else x - y]
    aligned = data.make_chat_samples(20, seed=2, families=("harmful",))
    assert {s.answer for s in aligned} == {data.REFUSAL}


def test_samples_cover_distinct_prompts_before_repeating():
    samples = data.make_chat_samples(300, seed=3, families=("harmful", "opposite"))
    harmful = [s.prompt for s in samples if s.family == "harmful"]
    opposite = [s.prompt for s in samples if s.family == "opposite"]
    assert len(set(harmful)) == 300 and len(set(opposite)) == len(_prompts("opposite"))
    assert [s.prompt for s in data.make_chat_samples(300, seed=3, families=("harmful",))] \
        == harmful


def test_bad_family_or_split_is_named():
    with pytest.raises(ValueError, match="accepted"):
        data.chat_prompts("poetry")
    with pytest.raises(ValueError, match="accepted"):
        data.make_chat_samples(2, seed=0, split="test")
    with pytest.raises(ValueError, match="accepted"):
        data.vocabulary("audio")


def _harmful(samples) -> set[str]:
    return {s.prompt for s in samples if s.family == "harmful"}


def _search_sides(search) -> tuple[set[str], set[str]]:
    harmful = [s for s in search if s.family == "harmful"]
    train, val = splits.split_by_group(harmful, lambda s: s.prompt, (2 / 3, 1 / 3), 0)
    return _harmful(train), _harmful(val)


def test_every_safeseek_split_holds_twenty_harmful_prompts():
    """Notebook 01 (injection / search / test, 55/25/20) and notebooks 02-03 (search / test /
    tuning, 40/20/40) at their default 300 samples a family; search split 2 : 1 into train and
    validation by prompt."""
    inject, search, test = experiment.partition(experiment.chat_data(None, 300, 0),
                                                (0.55, 0.25, 0.2), 0)
    counts = {"01 injection": _harmful(inject), "01 test": _harmful(test)}
    counts["01 search train"], counts["01 search validation"] = _search_sides(search)
    search, test, tune = experiment.safety_pools(None, 300, 0)
    counts |= {"02 test": _harmful(test), "02 tuning": _harmful(tune)}
    counts["02 search train"], counts["02 search validation"] = _search_sides(search)
    assert min(len(p) for p in counts.values()) >= 20, {k: len(v) for k, v in counts.items()}


def test_toy_vlm_world_is_unchanged():
    """The chat world's additions leave the toy VLM's config key (its vocabulary included),
    and so its committed checkpoint and every cache built on it, as they are."""
    committed = json.loads((ROOT / "checkpoints/toy-vlm" / checkpoints.MANIFEST).read_text())
    assert checkpoints.config_key(zoo.EMBEDDED["toy-vlm"].config()) == committed["key"]
    assert set(data.vocabulary("vlm")) < set(data.vocabulary("chat"))
