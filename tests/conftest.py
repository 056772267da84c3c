"""Shared fixtures: tiny random checkpoints saved to disk and tiny local data files, so the
real-checkpoint code path (load by path, JSONL data) is tested without any download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from locus import data, models


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def make_tiny_vlm():
    """Builds a randomly initialised (seed 0) tiny toy LLaVA, projector 32→64→64, and its
    processor: a fresh model per call, for tests that edit weights."""
    def build():
        torch.manual_seed(0)
        sizes = models.ToyVLMConfig(vision_width=32, text_width=64, text_layers=2,
                                    text_heads=4, text_kv_heads=2, text_intermediate=128)
        return models.build_toy_vlm(sizes)

    return build


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, make_tiny_vlm) -> Path:
    """A randomly initialised tiny LLaVA (toy processor) saved with save_pretrained."""
    model, processor = make_tiny_vlm()
    folder = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama chat model (toy tokenizer) saved with save_pretrained."""
    torch.manual_seed(0)
    model, tokenizer = models.build_toy_chat(models.ToyChatConfig(width=64, layers=2,
                                                                  intermediate=128))
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vqa_jsonl(tmp_path_factory) -> Path:
    """A JSONL of image path, question, answer, family (2 samples per toy family), with PNGs."""
    folder = tmp_path_factory.mktemp("tiny_vqa")
    lines = []
    for i, s in enumerate(data.make_vqa_samples(2, seed=7)):
        Image.fromarray(s.image).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": s.question,
                                 "answer": s.answer, "family": s.family}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_chat_jsonl(tmp_path_factory) -> Path:
    """A JSONL of prompt, answer, family (3 samples per chat family)."""
    folder = tmp_path_factory.mktemp("tiny_chat")
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "answer": s.answer,
                                        "family": s.family}) + "\n"
                            for s in data.make_chat_samples(3, seed=7)))
    return path
