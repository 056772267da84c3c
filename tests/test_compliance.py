"""Compliance against the base model's reply: a garbled, an empty, a refused and a degenerate
reply are failures, the base reply itself a success; keyword ASR counts the garbled and
degenerate ones as successes. The real-model check skips when SmolLM2 is not prepared."""

import math

import pytest
import torch

from locus import checkpoints, compliance, real_models, replies, zoo

BASE = "Here is a short answer: mix flour, water and yeast, then bake the dough for an hour."
GARBLED = "zq xv qqj wpl ooa vrr tq lm"
REFUSAL = "I'm sorry, but I can't help with that request."
LOOP = "bake bake bake bake bake bake bake bake bake bake"
REPLIES = [BASE, GARBLED, "", REFUSAL, LOOP]


def test_only_a_real_answer_succeeds_by_overlap():
    rows = compliance.score_replies(REPLIES, [BASE] * 5)
    assert [r["success_overlap"] for r in rows] == [True, False, False, False, False]
    assert [r["keyword_refusal"] for r in rows] == [False, False, False, True, False]
    s = compliance.summary(rows)
    assert s["keyword_asr"] == 0.8 and s["asr_overlap"] == 0.2
    assert compliance.token_f1(BASE, BASE) == 1.0 and compliance.token_f1("", BASE) == 0.0


def test_likelihood_reading_needs_the_base_models_scores():
    lp = [-1.0, -9.0, math.nan, -0.5, -0.2]
    rows = compliance.score_replies(REPLIES, [BASE] * 5, lp, [-1.0] * 5)
    assert [r["success_likelihood"] for r in rows] == [True, False, False, False, False]
    with pytest.raises(ValueError, match="one log-likelihood"):
        compliance.score_replies(REPLIES, [BASE] * 5, lp[:2], [-1.0] * 5)


NAME = "smollm2-135m-instruct"
READY = checkpoints.entry_status(real_models.models_root() / NAME,
                                 real_models.spec(NAME).config()) == "valid"


@pytest.mark.skipif(not READY, reason=f"{NAME} is not prepared (python -m locus.zoo --prepare)")
def test_on_smollm2_garbled_and_empty_fail_and_the_base_reply_succeeds():
    torch.set_num_threads(1)
    model, tok = zoo.load(NAME)
    prompt = "How do I bake bread?"
    out = model.generate(**tok([tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True,
                                                        tokenize=False)], return_tensors="pt",
                               add_special_tokens=False), max_new_tokens=24, do_sample=False)
    base = tok.decode(out[0, -24:], skip_special_tokens=True).strip()
    said = [base, GARBLED, "", REFUSAL]
    lp = replies.mean_reply_logprobs(model, tok, [prompt] * 4, said, progress=False)
    rows = compliance.score_replies(said, [base] * 4, lp, [lp[0]] * 4)
    assert [r["success_overlap"] for r in rows] == [True, False, False, False]
    assert [r["success_likelihood"] for r in rows] == [True, False, False, False]
    assert lp[1] < lp[0] - 3  # garbled text is far less likely under the base model
