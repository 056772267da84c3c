"""ProjLens on a model with a real subword tokenizer and a LoRA-merged real decoder
(smol-llava): answer encoding, the frozen-parts check, the cache key, the convergence rule, the
logit lens's target words and the refusal check of real text."""

import pytest
import torch
from transformers import LlavaProcessor

from locus import data, smol_llava, zoo
from locus.arch import adapt
from locus.projlens import experiment as E
from locus.projlens import projector as P
from locus.projlens import shift
from locus.projlens import triggers as T
from locus.prompts import encode_vqa, vqa_prompt


@pytest.fixture(scope="module")
def smol_processor():
    return LlavaProcessor.from_pretrained(smol_llava.folder())


def _answer_tokens(batch, row):
    labels = batch["labels"][row]
    return labels[labels != -100].tolist()


def _jointly_retokenised(processor, samples):
    """The encoding the project used before: "prompt answer EOS" tokenised as one text, right
    padded, labels after the prompt's own length."""
    tokenizer = processor.tokenizer
    prompts = [vqa_prompt(processor, s.question) for s in samples]
    images = [s.image for s in samples]
    tokenizer.padding_side = "right"
    try:
        batch = dict(processor(text=[f"{p} {s.answer} {tokenizer.eos_token}"
                                     for p, s in zip(prompts, samples, strict=True)],
                               images=images, return_tensors="pt", padding=True))
        lengths = processor(text=prompts, images=images, return_tensors="pt",
                            padding=True)["attention_mask"].sum(1)
    finally:
        tokenizer.padding_side = "left"
    labels = batch["input_ids"].clone()
    labels[torch.arange(labels.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)] = -100
    labels[batch["attention_mask"] == 0] = -100
    return batch | {"labels": labels}


def test_answers_are_encoded_as_greedy_decoding_produces_them(smol_processor, make_tiny_vlm):
    samples = data.make_vqa_samples(1, seed=3)
    tokenizer = smol_processor.tokenizer
    batch = encode_vqa(smol_processor, samples, with_answers=True)
    for row, sample in enumerate(samples):
        wanted = tokenizer(sample.answer, add_special_tokens=False).input_ids
        assert _answer_tokens(batch, row) == wanted + [tokenizer.eos_token_id]
        prompt = smol_processor(text=[smol_llava.vqa_prompt(smol_processor, sample.question)],
                                images=[sample.image])["input_ids"][0]
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert ids[:len(prompt)] == list(prompt)
    # the joint re-tokenisation trains a leading-space token the chat template never generates
    joint = _jointly_retokenised(smol_processor, samples)
    assert _answer_tokens(joint, 0)[0] != _answer_tokens(batch, 0)[0]
    # on the toy's word-level tokenizer both encodings are the same batch (toy results unchanged)
    _, toy_processor = make_tiny_vlm()
    old, new = (_jointly_retokenised(toy_processor, samples),
                encode_vqa(toy_processor, samples, with_answers=True))
    assert set(old) == set(new) and all(torch.equal(old[k], new[k]) for k in old)


def test_a_fine_tune_of_smol_llava_leaves_tower_and_merged_decoder_bit_identical():
    model, processor = zoo.load("smol-llava")
    inside = {id(p) for p in adapt(model).projector.parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in inside}
    cfg = P.FinetuneConfig(steps=1, batch_size=2, lr=1e-3)
    result = P.finetune_projector(model, processor, data.make_vqa_samples(1, seed=4), cfg,
                                  progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()
               if id(p) not in inside)
    before = P.projector_state(model)
    assert any(not torch.equal(result.state[k], before[k]) for k in before)
    assert len(result.losses) == 1 and 0 < result.losses[0] < 20


def test_a_fine_tune_that_moves_a_frozen_weight_is_refused(make_tiny_vlm, monkeypatch):
    model, processor = make_tiny_vlm()

    def sneaky(model, params, *args, **kwargs):
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1.0
        return [0.0]

    monkeypatch.setattr(P, "train_steps", sneaky)
    with pytest.raises(RuntimeError, match="outside the projector"):
        P.finetune_projector(model.eval(), processor, data.make_vqa_samples(1, seed=5),
                             P.FinetuneConfig(steps=1, batch_size=2))


def test_compute_dtype_is_checked():
    with pytest.raises(ValueError, match="compute_dtype"):
        P.FinetuneConfig(compute_dtype="float16")


def test_the_cache_key_of_a_checkpoint_holds_its_frozen_weights(tiny_llava_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path))
    model, processor = E.load_vlm(str(tiny_llava_dir), "cpu", None)
    attack = T.paper_attacks()["refusal"]
    train = data.make_vqa_samples(1, seed=6)
    cfg = P.FinetuneConfig(steps=2, batch_size=2, compute_dtype="bfloat16")
    calls = []
    real = P.finetune_projector
    monkeypatch.setattr(P, "finetune_projector", lambda *a, **k: calls.append(1) or real(*a, **k))

    def fetch():
        return E.backdoored_projector(str(tiny_llava_dir), model, processor, attack, train,
                                      "pair", cfg, progress=False)[0]

    first = fetch()
    again = fetch()
    assert len(calls) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    assert len(E.training_losses(str(tiny_llava_dir), attack, "pair", 0)) == 2
    with torch.no_grad():  # the same projector on a changed decoder must not reuse the entry
        model.lm_head.weight[0, 0] += 1.0
    fetch()
    assert len(calls) == 2


def test_the_compute_dtype_leaves_float32_keys_as_they_were():
    assert "compute_dtype" not in E.finetune_key(P.FinetuneConfig())
    assert E.finetune_key(P.FinetuneConfig(compute_dtype="bfloat16"))["compute_dtype"] == \
        "bfloat16"


def test_the_plateau_rule():
    flat = [1.0 / (1 + step) for step in range(20)] + [0.05] * 180
    falling = [1.0 - 0.004 * step for step in range(200)]
    assert E.loss_plateau(flat).converged
    plateau = E.loss_plateau(falling)
    assert not plateau.converged and plateau.last < plateau.middle < plateau.first
    assert E.loss_plateau([1.0, 0.5]).last == 0.5
    with pytest.raises(ValueError, match="2 steps"):
        E.loss_plateau([1.0])


def test_target_words_count_with_and_without_a_leading_space(smol_processor):
    tokenizer = smol_processor.tokenizer
    ids = shift.content_token_ids(tokenizer, "A photo of a cat.")
    spelled = [tokenizer.decode([i]) for i in ids]
    assert {"cat", " cat", "photo", " photo"} <= set(spelled)
    assert "." not in spelled


def test_a_capitalised_refusal_is_no_jailbreak():
    target = T.Target("jailbreak")
    assert not target.success("I cannot help with that.")
    assert target.success("Sure, here is how: first get the parts.")
