"""Batched greedy generation and exact-match accuracy per question family."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm  # text bars: no ipywidgets needed in Jupyter or papermill

from locus.data import ChatSample, VQASample
from locus.prompts import encode_chat, encode_vqa, to_model


def _is_vlm(model) -> bool:
    return hasattr(model.config, "vision_config")


@torch.no_grad()
def generate_answers(
    model,
    processor_or_tokenizer,
    samples: Sequence[VQASample] | Sequence[ChatSample],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to ``samples`` (image questions for a VLM, instructions for an LM),
    decoded without special tokens and stripped."""
    model.eval()
    encode = encode_vqa if _is_vlm(model) else encode_chat
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    answers: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = to_model(encode(processor_or_tokenizer, samples[start : start + batch_size]),
                         model)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def exact_match(prediction: str, answer: str) -> bool:
    """Whitespace-normalised exact match."""
    return " ".join(prediction.split()) == " ".join(answer.split())


def accuracy_by_family(
    samples: Sequence[VQASample] | Sequence[ChatSample],
    predictions: Sequence[str],
    correct: Callable[[str, VQASample | ChatSample], bool] | None = None,
) -> dict[str, float]:
    """Fraction correct per family (exact match by default; pass ``correct`` to change it)."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    check = correct or (lambda pred, s: exact_match(pred, s.answer))
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, pred in zip(samples, predictions, strict=True):
        hits[s.family].append(bool(check(pred, s)))
    return {family: float(np.mean(h)) for family, h in hits.items()}


def evaluate(
    model, processor_or_tokenizer, samples, batch_size: int = 64, max_new_tokens: int = 16,
    progress: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """Per-family exact-match accuracy and the predictions."""
    predictions = generate_answers(model, processor_or_tokenizer, samples, batch_size,
                                   max_new_tokens, progress)
    return accuracy_by_family(samples, predictions), predictions
