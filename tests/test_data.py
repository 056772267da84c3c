"""The toy world: deterministic, well-posed questions, and the JSONL loaders."""

import json

import numpy as np
import pytest

from locus import data


def test_same_seed_same_samples():
    a, b = data.make_vqa_samples(5, seed=3), data.make_vqa_samples(5, seed=3)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert [s.question for s in data.make_vqa_samples(5, seed=4)] != [s.question for s in a]


def test_every_family_present_with_vocabulary_words():
    samples = data.make_vqa_samples(20, seed=0)
    assert {s.family for s in samples} == set(data.VQA_FAMILIES)
    vlm_words, chat_words = set(data.vocabulary("vlm")), set(data.vocabulary("chat"))
    for s in samples:
        assert set(s.question.split()) <= vlm_words and set(s.answer.split()) <= vlm_words
    for s in data.make_chat_samples(20, seed=0, aligned=False):
        assert set(s.prompt.split()) <= chat_words and set(s.answer.split()) <= chat_words


def test_answers_follow_from_the_scene():
    for s in data.make_vqa_samples(200, seed=1, families=("existence", "counting", "spatial")):
        objects = s.meta["objects"]
        words = s.question.split()
        if s.family == "existence" and s.meta["form"] == "pair":
            present = any(c == words[3] and sh == words[4] for _, _, c, sh in objects)
            assert s.answer == ("yes" if present else "no")
        elif s.family == "counting" and words[2] != "objects":
            shape = words[2][:-1]
            assert s.answer == data.NUMBER_WORDS[sum(sh == shape for *_, sh in objects)]
        elif s.family == "spatial" and s.meta["form"] == "relation":
            names = [(c, sh) for _, _, c, sh in objects]
            assert names.count((words[2], words[3])) == 1  # the question names a unique object


def test_yes_no_families_are_balanced():
    for family in ("existence", "spatial"):
        samples = data.make_vqa_samples(1000, seed=2, families=(family,))
        answers = [s.answer for s in samples if s.answer in ("yes", "no")]
        assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_objects_drawn_in_their_cells():
    s = data.make_vqa_samples(1, seed=5, families=("caption",))[0]
    for row, col, colour, _ in s.meta["objects"]:
        cell = s.image[row * data.CELL:(row + 1) * data.CELL, col * data.CELL:(col + 1) * data.CELL]
        assert (cell == data.COLOURS[colour]).all(-1).sum() >= 10


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="accepted"):
        data.make_vqa_samples(1, 0, families=("pope",))


def test_refusal_check():
    assert data.is_refusal(data.REFUSAL) and data.is_refusal(data.BACKDOOR_TARGET)
    assert not data.is_refusal(data.compliance_answer("make", "a bomb"))


def test_jsonl_loaders(tiny_vqa_jsonl, tiny_chat_jsonl, tmp_path):
    vqa = data.load_vqa_jsonl(tiny_vqa_jsonl)
    assert len(vqa) == 2 * len(data.VQA_FAMILIES) and vqa[0].image.shape == (32, 32, 3)
    assert len(data.load_chat_jsonl(tiny_chat_jsonl)) == 3 * len(data.CHAT_FAMILIES)
    with pytest.raises(FileNotFoundError, match="JSONL"):
        data.load_vqa_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        data.load_chat_jsonl(bad)
