"""Turning toy-world samples into model inputs through the tokenizer's / processor's chat
template — the same path a real checkpoint (LLaVA, Qwen-VL, Llama chat) takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def encode_with_answers(tokenizer, encode_texts, prompts: list[str],
                        answers: list[str] | None) -> dict:
    """Left-padded prompts (``answers`` None), or right-padded prompt+answer sequences with
    answer-only ``labels``; ``encode_texts(texts)`` runs the tokenizer or processor."""
    if answers is None:
        tokenizer.padding_side = "left"
        return dict(encode_texts(prompts))
    tokenizer.padding_side = "right"
    try:
        full = [p + _answer_suffix(tokenizer, a) for p, a in zip(prompts, answers, strict=True)]
        batch = dict(encode_texts(full))
        lengths = encode_texts(prompts)["attention_mask"].sum(1)
    finally:
        tokenizer.padding_side = "left"
    batch["labels"] = _labels_after_prompt(batch["input_ids"], batch["attention_mask"], lengths)
    return batch


def encode_vqa(
    processor, samples: Sequence[VQASample], with_answers: bool = False
) -> dict[str, torch.Tensor]:
    """A batch for a LLaVA-style model: left-padded prompts for generation, or right-padded
    prompt+answer sequences with answer-only ``labels`` for training."""
    images = [s.image for s in samples]

    def encode_texts(texts: list[str]):
        return processor(text=texts, images=images, return_tensors="pt", padding=True)

    prompts = [vqa_prompt(processor, s.question) for s in samples]
    answers = [s.answer for s in samples] if with_answers else None
    return encode_with_answers(processor.tokenizer, encode_texts, prompts, answers)


def encode_chat(
    tokenizer, samples: Sequence[ChatSample], with_answers: bool = False
) -> dict[str, torch.Tensor]:
    """A batch for a causal LM, as ``encode_vqa`` does for a VLM."""

    def encode_texts(texts: list[str]):
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    prompts = [chat_prompt(tokenizer, s.prompt) for s in samples]
    answers = [s.answer for s in samples] if with_answers else None
    return encode_with_answers(tokenizer, encode_texts, prompts, answers)


def to_model(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``batch`` on ``model``'s device, its pixel values (if any) in the model's dtype."""
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
    return batch


def chat_training_encoder(model: torch.nn.Module, tokenizer) -> Callable[[list], dict]:
    """``encode_chat`` with answers, on ``model``'s device: the ``encode`` argument of
    ``training.sampled_batches`` for a chat model."""
    return lambda samples: to_model(encode_chat(tokenizer, samples, with_answers=True), model)


def encode_vqa_answers(processor, samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer + EOS batches with answer-only ``labels``, the answer's
    tokens appended to the prompt's exactly as greedy decoding would produce them (no joint
    re-tokenisation: a subword tokenizer would otherwise train a leading-space token the chat
    template never generates). The other processor outputs (pixels) are kept as they are."""
    tokenizer = processor.tokenizer
    prompts = [vqa_prompt(processor, s.question) for s in samples]
    encoded = dict(processor(text=prompts, images=[s.image for s in samples],
                             return_tensors="pt", padding=True))
    heads = [ids[mask == 1] for ids, mask in zip(encoded.pop("input_ids"),
                                                  encoded.pop("attention_mask"), strict=True)]
    tails = [torch.tensor(tokenizer(s.answer, add_special_tokens=False).input_ids
                          + [tokenizer.eos_token_id]) for s in samples]

    def padded(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)

    return {"input_ids": padded([torch.cat(p) for p in zip(heads, tails, strict=True)],
                                tokenizer.pad_token_id),
            "attention_mask": padded([torch.ones(len(h) + len(t), dtype=torch.long)
                                      for h, t in zip(heads, tails, strict=True)], 0),
            "labels": padded([torch.cat([torch.full_like(h, -100), t])
                              for h, t in zip(heads, tails, strict=True)], -100),
            **encoded}
