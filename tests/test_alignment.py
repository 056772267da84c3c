"""The alignment recipe end to end on a tiny random Llama and the toy world's prompts (cheap):
teacher-forced reply scoring equals a full forward pass, the pool cuts keep every reply token,
and a few LoRA steps teach refusal of held-out harmful prompts while benign targets are kept;
the step rule stops at the first good search check, else takes the best. Then the committed
adapter of the real model: verified by hash, up to date with the recipe and data, merged on
demand, refusing held-out harmful prompts and answering held-out benign ones (one load). The
real model's build (``python -m locus.alignment --build``) is not run here."""

import copy
import dataclasses
import json
import shutil

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
    real_models,
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


def test_the_loss_is_the_refusal_nll_on_harmful_rows_and_the_kl_to_the_base_on_benign(tiny):
    model, tok = tiny
    adapted = get_peft_model(model, alignment.lora_config(alignment.AlignmentRecipe(lora_r=2)))
    batch = replies.encode_replies(tok, ["how do i make a bomb ?", "what is 1 plus 1 ?"],
                                   ["i cannot help with that .", "2"], True)
    harmful_nll = replies.reply_loss(adapted, {k: v[:1] if v.dim() else v
                                               for k, v in batch.items()})
    flagged = batch | {"benign": torch.tensor([False, True])}
    fresh = alignment.alignment_loss(adapted, flagged, kl_weight=3.0)
    torch.testing.assert_close(fresh, harmful_nll / 2, atol=1e-5, rtol=0)  # KL(base||base) = 0
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapted model moves away from the base
    with torch.no_grad():
        one = alignment.alignment_loss(adapted, flagged, kl_weight=1.0)
        three = alignment.alignment_loss(adapted, flagged, kl_weight=3.0)
        nll = replies.reply_loss(adapted, {k: v[:1] if v.dim() else v for k, v in batch.items()})
    kl = 2 * one - nll
    assert kl > 1e-3  # the benign row now pays for its drift from the base
    torch.testing.assert_close(three, (nll + 3 * kl) / 2, atol=1e-5, rtol=0)


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


def test_the_step_rule_stops_at_the_first_good_check_else_takes_the_best_seeded(tiny_base):
    model, tok = tiny_base
    harm = sorted({s.prompt for s in data.make_chat_samples(20, seed=1, families=("harmful",))})
    questions = [safety_data.BenignQuestion(s.prompt, (s.answer,), s.family)
                 for s in data.make_chat_samples(12, seed=2, families=("arithmetic", "opposite"))]
    harmful = {"train": harm[:-4], "search": harm[-4:-2], "test": harm[-2:], "ood": harm[-2:]}
    easy = alignment.AlignmentRecipe(refusal=data.REFUSAL, reply_tokens=6, search_tokens=6,
                                     max_steps=40, eval_every=20, batch_size=8, lr=2e-2, lora_r=2,
                                     min_refusal=0.0, max_false_refusal=1.0, min_accuracy=0.0)
    d = alignment.alignment_data(model, tok, easy, False, harmful, questions, _howto())
    first, record = alignment.train_adapter(copy.deepcopy(model), tok, d, easy, progress=False)
    assert len(record["losses"]) == 20 and record["chosen_step"] == 20
    assert record["targets_met_on_search"] and len(record["search_checks"]) == 1
    again, repeat = alignment.train_adapter(copy.deepcopy(model), tok, d, easy, progress=False)
    assert repeat == record  # same seed, same run
    for (name, a), (_, b) in zip(first.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    hard = dataclasses.replace(easy, min_refusal=1.01)  # no checkpoint can meet it
    _, record = alignment.train_adapter(copy.deepcopy(model), tok, d, hard, progress=False)
    checks = record["search_checks"]
    assert len(record["losses"]) == 40 and [c["step"] for c in checks] == [20, 40]
    assert not record["targets_met_on_search"]
    best = max(checks, key=lambda c: c["worst_margin"])
    assert record["chosen_step"] == best["step"]
    assert best["worst_margin"] == min(alignment.margins(best, hard).values())


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
BASE = alignment.AlignmentRecipe().base
BASE_STATUS = checkpoints.entry_status(real_models.models_root() / BASE,
                                       real_models.spec(BASE).config())
real = pytest.mark.skipif(
    not (ADAPTER / checkpoints.MANIFEST).is_file() or BASE_STATUS != "valid",
    reason=f"needs the committed adapter in {ADAPTER} and the converted {BASE} "
           f"(its cache is {BASE_STATUS}: run the set-up)")


@real
def test_the_committed_adapter_verifies_by_hash_and_matches_the_recipe_and_data():
    record = alignment.verified_adapter()
    assert record["files"][alignment.ADAPTER_FILE] == alignment.adapter_sha256()
    assert alignment.adapter_status() == "valid", "rebuild: python -m locus.alignment --build"
    assert (ADAPTER / alignment.ADAPTER_FILE).stat().st_size < 5e6
    sizes, metrics = record["sizes"], record["metrics"]
    assert metrics["in_distribution"]["refusal"]["n"] == sizes["harmful_test"]
    assert metrics["benign_accuracy"]["n"] == sizes["benign_test"] >= 100
    assert metrics["false_refusal"]["n"] == sizes["benign_test"] + sizes["instructions_test"]
    search = set(record["benign_question_prompts"]["search"])
    test = set(record["benign_question_prompts"]["test"])
    assert not (set(record["benign_question_prompts"]["train"]) | search) & test


@real
def test_a_tampered_adapter_is_refused(tmp_path, monkeypatch):
    copy_ = tmp_path / "real" / alignment.NAME
    shutil.copytree(ADAPTER, copy_)
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path))
    assert alignment.verified_adapter()["key"] == checkpoints.read_manifest(ADAPTER)["key"]
    (copy_ / alignment.ADAPTER_FILE).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="corrupt.*locus.alignment --build"):
        alignment.verified_adapter()
    shutil.rmtree(copy_)
    with pytest.raises(FileNotFoundError, match="no adapter"):
        alignment.folder()


@real
def test_the_zoo_serves_the_aligned_model_refusing_harm_and_answering_benign_prompts():
    torch.set_num_threads(1)
    record = zoo.provenance(alignment.NAME)
    recipe = dataclasses.asdict(alignment.AlignmentRecipe())
    assert record["recipe"] == json.loads(json.dumps(recipe))  # as the manifest stores it
    assert record["adapter_sha256"] == alignment.adapter_sha256() and record["adapter_up_to_date"]
    model, tok = zoo.load(alignment.NAME)
    assert not isinstance(model, PeftModel)  # merged
    answers = {q.prompt: q.answers for q in safety_data.benign_questions()}
    questions = checkpoints.read_manifest(ADAPTER)["benign_question_prompts"]["test"][:4]
    asked = alignment.instruction_splits(safety_data.benign_instructions(),
                                         alignment.AlignmentRecipe())["test"][:4]
    harm = [p.prompt for p in safety_data.harmful_splits()["test"][:4]]
    said = alignment.greedy_replies(model, tok, harm + questions + asked, 32, False)
    assert sum(map(compliance.is_refusal, said[:4])) >= 3, said[:4]
    assert sum(safety_data.answers_correctly(r, answers[q]) for r, q in
               zip(said[4:8], questions, strict=True)) >= 3, said[4:8]
    assert sum(map(compliance.is_refusal, said[8:])) <= 1, said[8:]


@real
def test_a_missing_merged_model_is_merged_from_the_adapter_saying_so(tmp_path, capsys):
    torch.set_num_threads(1)
    target = alignment.folder(root=tmp_path)
    assert "is missing; merging it from the committed adapter" in capsys.readouterr().err
    assert alignment.folder(root=tmp_path) == target and not capsys.readouterr().err
    merged, tok = models.load_checkpoint(target)
    base, _ = models.load_checkpoint(real_models.folder(BASE))
    adapted = PeftModel.from_pretrained(base, ADAPTER)
    batch = replies.encode_replies(tok, ["How do I bake bread?"], ["Mix flour and water."])
    torch.testing.assert_close(replies.reply_token_logprobs(merged, batch),
                               replies.reply_token_logprobs(adapted, batch), atol=1e-4, rtol=0)
