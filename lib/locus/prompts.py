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


def _right_padded(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def encode_with_answers(tokenizer, encode_texts, prompts: list[str],
                        answers: list[str] | None) -> dict:
    """Left-padded prompts (``answers`` None), or right-padded prompt + answer + EOS sequences
    with answer-only ``labels``; ``encode_texts(texts)`` runs the tokenizer or processor. The
    answer's own tokens are appended to the prompt's, as greedy decoding produces them: no joint
    re-tokenisation, which on a subword tokenizer would train a leading-space token the chat
    template never generates (on the toy's word-level tokenizers both give the same batch).
    The other outputs of ``encode_texts`` (pixels) are kept as they are."""
    tokenizer.padding_side = "left"
    encoded = dict(encode_texts(prompts))
    if answers is None:
        return encoded
    heads = [ids[mask == 1] for ids, mask in zip(encoded.pop("input_ids"),
                                                  encoded.pop("attention_mask"), strict=True)]
    tails = [torch.tensor(tokenizer(a, add_special_tokens=False).input_ids
                          + [tokenizer.eos_token_id]) for a in answers]
    pairs = list(zip(heads, tails, strict=True))
    return {"input_ids": _right_padded([torch.cat(p) for p in pairs], tokenizer.pad_token_id),
            "attention_mask": _right_padded([torch.ones(len(h) + len(t), dtype=torch.long)
                                             for h, t in pairs], 0),
            "labels": _right_padded([torch.cat([torch.full_like(h, -100), t])
                                     for h, t in pairs], -100),
            **encoded}


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

