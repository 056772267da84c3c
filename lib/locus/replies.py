"""Prompt + reply sequences of a chat model, teacher-forced: the scoring of a known reply
(its log-likelihood under a model) and supervised fine-tuning on replies share this encoding.

Each sequence is the chat-formatted prompt's tokens followed by the reply's tokens (tokenised
apart, so the boundary is exact), left-padded, with position ids that skip the padding. Every
reply then ends at the last column, so the logits are computed only for the last ``keep``
positions (``logits_to_keep``): the longest reply of the batch plus one, never the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from locus.prompts import chat_prompt


def encode_replies(tokenizer, prompts: Sequence[str], replies: Sequence[str],
                   add_eos: Sequence[bool] | bool = False) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompt + reply sequences with ``labels`` at the reply tokens only
    (-100 elsewhere) and ``keep``: how many final positions carry reply predictions. ``add_eos``
    (one flag, or one per reply) ends a reply with the end-of-sequence token, to train stopping."""
    if len(prompts) != len(replies) or not prompts:
        raise ValueError(f"need as many replies as prompts (>= 1), got {len(prompts)} prompts "
                         f"and {len(replies)} replies")
    eos = [add_eos] * len(replies) if isinstance(add_eos, bool) else list(add_eos)
    rows, reply_lengths = [], []
    for prompt, reply, stop in zip(prompts, replies, eos, strict=True):
        head = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        tail = tokenizer(reply, add_special_tokens=False).input_ids if reply else []
        tail = tail + [tokenizer.eos_token_id] * stop
        rows.append(head + tail)
        reply_lengths.append(len(tail))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, reply_lengths, strict=True)):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
        if n:
            labels[i, width - n:] = ids[i, width - n:]
    keep = max(reply_lengths) + 1
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0), "labels": labels[:, -keep:],
            "keep": torch.tensor(keep)}


def cut(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sub-batch ``rows`` of an encoded pool, trimmed to its own longest sequence and reply
    (so a pool encodes once and each training batch stays short)."""
    ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
    labels = batch["labels"][rows]
    width = int(mask.sum(1).max())
    answered = (labels != -100).any(0).nonzero()
    keep = labels.shape[1] - int(answered.min()) + 1 if len(answered) else 1
    return {"input_ids": ids[:, -width:], "attention_mask": mask[:, -width:],
            "position_ids": batch["position_ids"][rows][:, -width:],
            "labels": labels[:, -keep:], "keep": torch.tensor(keep)}


def reply_token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probability of every reply token (0 where ``labels`` is -100), shape (batch, keep-1):
    one forward pass, logits only at the reply positions."""
    keep = int(batch["keep"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -100)


def reply_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over each reply's tokens, then over replies (a short reply
    weighs as much as a long one): the ``loss_fn`` of ``training.train_steps``."""
    counts = (batch["labels"][:, 1:] != -100).sum(1).clamp(min=1)
    return -(reply_token_logprobs(model, batch).sum(1) / counts).mean()


@torch.no_grad()
def mean_reply_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str],
                        replies: Sequence[str], batch_size: int = 16,
                        progress: bool = True) -> list[float]:
    """Each reply's mean per-token log-likelihood under ``model`` given its prompt (teacher
    forced, batched); NaN for an empty reply."""
    model.eval()
    out: list[float] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="score replies", disable=not progress, leave=False):
        chunk = slice(start, start + batch_size)
        batch = encode_replies(tokenizer, prompts[chunk], replies[chunk])
        device = next(model.parameters()).device
        logp = reply_token_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        counts = (batch["labels"][:, 1:] != -100).sum(1)
        means = logp.sum(1).cpu() / counts.clamp(min=1)
        out += [float(m) if c else float("nan") for m, c in zip(means, counts, strict=True)]
    return out

