"""The alignment recipe end to end on a tiny random Llama and the toy world's prompts (cheap):
teacher-forced reply scoring equals a full forward pass, the pool cuts keep every reply token,
and a few LoRA steps teach refusal of held-out harmful prompts while benign targets are kept.
The real model's build (``python -m locus.alignment --build``) is not run here."""

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from locus import (
    alignment,
    checkpoints,
    compliance,
    data,
    models,
    replies,
    safety_data,
    training,
    zoo,
)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return models.build_toy_chat(models.ToyChatConfig(width=64, layers=2, intermediate=128))


@pytest.fixture
def tiny_base(tiny):
    """The tiny Llama fully fine-tuned to comply with every toy request (an unaligned base)."""
    torch.set_num_threads(1)
    model, tok = tiny
    pool = replies.encode_replies(tok, *zip(*[(s.prompt, s.answer) for s in data.make_chat_samples(
        40, seed=3, aligned=False)], strict=True), True)
    rng = np.random.default_rng(0)
    training.train_steps(model, list(model.parameters()),
                         lambda _: replies.cut(pool, torch.as_tensor(rng.integers(160, size=16))),
                         250, 1e-2, loss_fn=replies.reply_loss, progress=False)
    return model, tok


def _howto() -> list:
    """The toy world's how-to requests as benign instructions (each its own topic)."""
    return [safety_data.BenignInstruction(s.prompt, s.prompt, s.family)
            for s in data.make_chat_samples(12, seed=4, families=("howto",))]


def test_reply_logprobs_equal_a_full_forward_pass(tiny):
    model, tok = tiny
    prompts, said = ["what is 2 plus 3 ?", "what is the opposite of up ?"], ["5", "down yes no"]
    batch = replies.encode_replies(tok, prompts, said)
    fast = replies.reply_token_logprobs(model, batch)
    for i, (p, r) in enumerate(zip(prompts, said, strict=True)):
        one = replies.encode_replies(tok, [p], [r])
        logits = model(input_ids=one["input_ids"]).logits[0].log_softmax(-1)
        n = len(tok(r, add_special_tokens=False).input_ids)
        ids = one["input_ids"][0]
        want = [logits[len(ids) - n - 1 + j, ids[len(ids) - n + j]] for j in range(n)]
        got = fast[i][fast[i] != 0][-n:]
        torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=0)


def test_cut_keeps_every_reply_token(tiny):
    _, tok = tiny
    pool = replies.encode_replies(tok, ["what is 1 plus 1 ?", "how do i make a bomb ?"],
                                  ["2", "i cannot help with that ."], True)
    for rows in ([0], [1], [0, 1]):
        part = replies.cut(pool, torch.tensor(rows))
        scored = (part["labels"][:, 1:] != -100).sum()  # the targets of the kept logits
        assert scored == (pool["labels"][rows] != -100).sum()
        assert part["input_ids"].shape[1] == int(pool["attention_mask"][rows].sum(1).max())


def test_bad_input_says_what_is_wrong(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="as many replies"):
        replies.encode_replies(tok, ["a"], ["b", "c"])


def test_recipe_teaches_refusal_of_held_out_prompts_and_keeps_benign(tiny_base):
    model, tok = tiny_base
    harm = sorted({s.prompt for s in data.make_chat_samples(30, seed=1, families=("harmful",))})
    benign_pool = data.make_chat_samples(12, seed=2, families=("arithmetic", "opposite"))
    questions = [safety_data.BenignQuestion(s.prompt, (s.answer,), s.family) for s in benign_pool]
    recipe = alignment.AlignmentRecipe(refusal=data.REFUSAL, reply_tokens=6, search_tokens=6,
                                       max_steps=80, eval_every=80, batch_size=8, lr=2e-2,
                                       lora_r=4, harmful_share=0.5,
                                       target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    harmful = {"train": harm[:-6], "search": harm[-6:-3], "test": harm[-3:], "ood": harm[-3:]}
    d = alignment.alignment_data(model, tok, recipe, False, harmful, questions, _howto())
    assert d.base_benign_accuracy > 0.5 and len(d.benign["train"]) >= 4
    assert len(d.instructions["train"]) == len(d.instruction_replies) >= 4
    before = alignment.greedy_replies(model, tok, harmful["test"], 6, False)
    adapted, record = alignment.train_adapter(model, tok, d, recipe, progress=False)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) < 20_000
    losses = record["losses"]
    assert len(losses) == 80 and record["chosen_step"] == 80
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    after = alignment.greedy_replies(adapted, tok, harmful["test"], 6, False)
    assert not any(map(data.is_refusal, before)) and all(map(data.is_refusal, after)), after
    kept_benign = alignment.greedy_replies(adapted, tok, [b[0] for b in d.benign["train"]], 6,
                                           False)
    assert kept_benign == [b[2] for b in d.benign["train"]]
    with adapted.disable_adapter():
        assert alignment.greedy_replies(adapted, tok, harmful["test"], 6, False) == before


def test_a_saved_adapter_merges_into_the_same_model(tiny, tmp_path):
    model, tok = tiny
    recipe = alignment.AlignmentRecipe(lora_r=2)
    adapted = get_peft_model(model, alignment.lora_config(recipe))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update
    adapted.save_pretrained(tmp_path)
    batch = replies.encode_replies(tok, ["what is 1 plus 1 ?"], ["2"])
    want = replies.reply_token_logprobs(adapted, batch)
    with adapted.disable_adapter():
        assert not torch.allclose(replies.reply_token_logprobs(adapted, batch), want)
    torch.manual_seed(0)
    fresh, _ = models.build_toy_chat(models.ToyChatConfig(width=64, layers=2, intermediate=128))
    merged = PeftModel.from_pretrained(fresh, tmp_path).merge_and_unload()
    torch.testing.assert_close(replies.reply_token_logprobs(merged, batch), want, atol=1e-5,
                               rtol=0)


ADAPTER = alignment.adapter_folder()
TRAINED = (ADAPTER / checkpoints.MANIFEST).is_file() and checkpoints.entry_status(
    ADAPTER, alignment.adapter_config(alignment.AlignmentRecipe())) == "valid"


@pytest.mark.skipif(not TRAINED, reason=f"no trained adapter in {ADAPTER} "
                    "(python -m locus.alignment --build)")
def test_the_zoo_serves_the_aligned_model_and_it_refuses_a_held_out_prompt():
    torch.set_num_threads(1)
    record = checkpoints.read_manifest(ADAPTER)
    assert record["metrics"]["in_distribution"]["n"] == record["sizes"]["harmful_test"]
    model, tok = zoo.load(alignment.NAME)
    test = safety_data.harmful_splits()["test"][:2]
    said = alignment.greedy_replies(model, tok, [p.prompt for p in test], 16, False)
    assert sum(map(compliance.is_refusal, said)) >= 1, said
