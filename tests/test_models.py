"""Tokenizers, the loader (embedded names and local folders), prompts and batched generation."""

import pytest
import torch
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from locus import data, models, zoo
from locus.evaluation import accuracy_by_family, generate_answers
from locus.prompts import encode_chat, encode_vqa


def test_word_tokenizer_round_trip_and_template():
    tok = models.build_word_tokenizer()
    text = "how do i make a cake ?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "user : hi assistant :"


def test_unknown_model_name_lists_embedded_names():
    with pytest.raises(FileNotFoundError) as err:
        zoo.load("llava-13b")
    assert "toy-vlm" in str(err.value) and "local checkpoint folder" in str(err.value)
    with pytest.raises(TypeError, match="name or a path"):
        zoo.load(3)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.load(tmp_path)


def test_load_local_checkpoints(tiny_llava_dir, tiny_llama_dir):
    vlm, processor = zoo.load(tiny_llava_dir)
    lm, tokenizer = zoo.load(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert isinstance(vlm, LlavaForConditionalGeneration) and hasattr(processor, "tokenizer")
    assert isinstance(lm, LlamaForCausalLM) and lm.dtype == torch.bfloat16
    assert tokenizer.padding_side == "left"


def test_training_labels_cover_only_the_answer(tiny_llava_dir):
    _, processor = zoo.load(tiny_llava_dir)
    samples = data.make_vqa_samples(1, seed=0, families=("caption", "existence"))
    batch = encode_vqa(processor, samples, with_answers=True)
    tok = processor.tokenizer
    for row, s in zip(batch["labels"], samples, strict=True):
        labelled = tok.decode(row[row != -100])
        assert labelled.split() == s.answer.split() + [tok.eos_token]


def test_batched_generation_equals_one_by_one(tiny_llava_dir, tiny_llama_dir):
    """Left padding must not change a greedy answer."""
    vlm, processor = zoo.load(tiny_llava_dir)
    vqa = data.make_vqa_samples(2, seed=1, families=("caption", "existence", "text"))
    batched = generate_answers(vlm, processor, vqa, batch_size=6, max_new_tokens=4,
                               progress=False)
    single = [generate_answers(vlm, processor, [s], max_new_tokens=4, progress=False)[0]
              for s in vqa]
    assert batched == single
    lm, tokenizer = zoo.load(tiny_llama_dir)
    chat = data.make_chat_samples(2, seed=1)
    batched = generate_answers(lm, tokenizer, chat, batch_size=8, max_new_tokens=4,
                               progress=False)
    assert batched == [generate_answers(lm, tokenizer, [s], max_new_tokens=4,
                                        progress=False)[0] for s in chat]
    assert encode_chat(tokenizer, chat)["input_ids"].shape[0] == len(chat)


def test_accuracy_by_family():
    samples = data.make_chat_samples(2, seed=0, families=("arithmetic", "opposite"))
    predictions = [samples[0].answer, "wrong", samples[2].answer, samples[3].answer]
    assert accuracy_by_family(samples, predictions) == {"arithmetic": 0.5, "opposite": 1.0}
    with pytest.raises(ValueError, match="predictions"):
        accuracy_by_family(samples, predictions[:1])
