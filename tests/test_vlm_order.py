"""The toy VLM's prompt order option: the default (question before image) is unchanged, and
LLaVA-1.5's order (image before question) puts every image token before the question."""

import json
from pathlib import Path

import pytest
import torch

from locus import checkpoints, data, models, zoo
from locus.prompts import encode_vqa, vqa_prompt

ROOT = Path(__file__).resolve().parents[1]
SIZES = models.ToyVLMConfig(vision_width=32, text_width=64, text_layers=2, text_heads=4,
                            text_kv_heads=2, text_intermediate=128)


def _positions(processor, sample) -> tuple[list[int], list[int]]:
    """Positions of the image tokens and of the question's words in the encoded prompt."""
    ids = encode_vqa(processor, [sample])["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    image = [i for i, t in enumerate(tokens) if t == models.SPECIAL_TOKENS["image"]]
    words = sample.question.split()
    start = next(i for i in range(len(tokens)) if tokens[i:i + len(words)] == words)
    return image, list(range(start, start + len(words)))


def test_default_order_is_the_committed_template_and_key():
    committed = ROOT / "checkpoints/toy-vlm"
    _, processor = models.build_toy_vlm(SIZES)
    assert processor.chat_template == models.CHAT_TEMPLATE
    assert processor.tokenizer.chat_template == models.CHAT_TEMPLATE
    assert (committed / "chat_template.jinja").read_text() == models.CHAT_TEMPLATE
    manifest = json.loads((committed / checkpoints.MANIFEST).read_text())
    assert checkpoints.config_key(zoo.EMBEDDED["toy-vlm"].config()) == manifest["key"]
    assert vqa_prompt(processor, "is there a red square ?") == (
        "user : is there a red square ? <image> assistant :")


def test_image_first_puts_every_image_token_before_the_question():
    sample = data.make_vqa_samples(1, 0, ("spatial",))[0]
    _, default = models.build_toy_vlm(SIZES)
    _, llava = models.build_toy_vlm(SIZES, prompt_order="image_first")
    image, question = _positions(llava, sample)
    assert len(image) == data.GRID * data.GRID and max(image) < min(question)
    image, question = _positions(default, sample)
    assert min(image) > max(question)
    assert vqa_prompt(llava, "is there a red square ?") == (
        "user : <image> is there a red square ? assistant :")
    text_only = [{"role": "user", "content": "hi"}]
    assert (llava.tokenizer.apply_chat_template(text_only, add_generation_prompt=True,
                                                tokenize=False) == "user : hi assistant :")


def test_image_first_model_runs_and_keeps_its_order_when_saved(tmp_path):
    torch.manual_seed(0)
    model, processor = models.build_toy_vlm(SIZES, prompt_order="image_first")
    samples = data.make_vqa_samples(2, 0, ("spatial", "caption"))
    batch = encode_vqa(processor, samples, with_answers=True)
    assert torch.isfinite(model(**batch).loss)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, loaded = models.load_checkpoint(tmp_path)
    assert loaded.chat_template == models.IMAGE_FIRST_TEMPLATE
    assert vqa_prompt(loaded, "q ?") == vqa_prompt(processor, "q ?")


def test_unknown_prompt_order_is_refused():
    with pytest.raises(ValueError, match="image_first"):
        models.build_toy_vlm(SIZES, prompt_order="answer_first")
