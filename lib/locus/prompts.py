"""Turning toy-world samples into model inputs through the tokenizer's / processor's chat
template — the same path a real checkpoint (LLaVA, Qwen-VL, Llama chat) takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locus.data import ChatSample, VQASample


def vqa_prompt(processor, question: str) -> str:
    """The chat-formatted prompt of one image question, ending where the answer starts."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The chat-formatted prompt of one instruction, ending where the reply starts."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _answer_suffix(tokenizer, answer: str) -> str:
    return f" {answer} {tokenizer.eos_token}"


def _labels_after_prompt(input_ids, attention_mask, prompt_lengths) -> torch.Tensor:
    """Labels that train only on answer tokens (right-padded batch)."""
    labels = input_ids.clone()
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    labels[positions < torch.as_tensor(prompt_lengths).unsqueeze(1)] = -100
    labels[attention_mask == 0] = -100
    return labels


def encode_vqa(
    processor, samples: Sequence[VQASample], with_answers: bool = False
) -> dict[str, torch.Tensor]:
    """A batch for a LLaVA-style model: left-padded prompts for generation, or right-padded
    prompt+answer sequences with answer-only ``labels`` for training."""
    tokenizer = processor.tokenizer
    prompts = [vqa_prompt(processor, s.question) for s in samples]
    images = [s.image for s in samples]
    if not with_answers:
        tokenizer.padding_side = "left"
        return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))
    tokenizer.padding_side = "right"
    try:
        full = [p + _answer_suffix(tokenizer, s.answer) for p, s in zip(prompts, samples, strict=True)]
        batch = dict(processor(text=full, images=images, return_tensors="pt", padding=True))
        prompt_only = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        lengths = prompt_only["attention_mask"].sum(1)
    finally:
        tokenizer.padding_side = "left"
    batch["labels"] = _labels_after_prompt(batch["input_ids"], batch["attention_mask"], lengths)
    return batch


def encode_chat(
    tokenizer, samples: Sequence[ChatSample], with_answers: bool = False
) -> dict[str, torch.Tensor]:
    """A batch for a causal LM, as ``encode_vqa`` does for a VLM."""
    prompts = [chat_prompt(tokenizer, s.prompt) for s in samples]
    if not with_answers:
        tokenizer.padding_side = "left"
        return dict(tokenizer(prompts, return_tensors="pt", padding=True,
                              add_special_tokens=False))
    tokenizer.padding_side = "right"
    try:
        full = [p + _answer_suffix(tokenizer, s.answer) for p, s in zip(prompts, samples, strict=True)]
        batch = dict(tokenizer(full, return_tensors="pt", padding=True, add_special_tokens=False))
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    finally:
        tokenizer.padding_side = "left"
    batch["labels"] = _labels_after_prompt(batch["input_ids"], batch["attention_mask"], lengths)
    return batch
