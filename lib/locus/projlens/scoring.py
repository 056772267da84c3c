"""Teacher-forced scoring of known answers: whether greedy decoding would produce exactly a
given answer, read from one forward pass over prompt + answer instead of a token-by-token
generation.

Greedy decoding produces the answer tokens a₁..a_L and then stops iff, with the prompt and
a₁..a_{t−1} as input, the argmax is a_t for every t and the end-of-sequence token after a_L.
One forward over prompt + answer + EOS gives all of these argmaxes at once. Capped at
``max_new_tokens`` as generation is: an answer longer than the cap can never be produced; an
answer of exactly the cap needs no EOS. It equals generating and exact-matching the decoded
text whenever the generation holds no special token but EOS (a trained model's case;
decoding drops special tokens, so a random model's text can match where its tokens do not).

The inputs are encoded once (``encode_answers``) and scored under as many projector states as
needed (``produced``): a rank-k grid re-encodes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from locus.data import VQASample
from locus.prompts import encode_vqa, to_model


@dataclass(frozen=True)
class EncodedAnswers:
    """Prompt + answer batches (answer-only labels) and the cap on generated tokens."""

    batches: list[dict[str, torch.Tensor]]
    max_new_tokens: int

    def __len__(self) -> int:
        return sum(len(b["input_ids"]) for b in self.batches)


def encode_answers(model: nn.Module, processor, samples: Sequence[VQASample],
                   answers: Sequence[str], max_new_tokens: int = 20,
                   batch_size: int = 64) -> EncodedAnswers:
    """``samples`` with ``answers[i]`` as the answer to score, encoded for ``model``."""
    if len(samples) != len(answers):
        raise ValueError(f"{len(samples)} samples but {len(answers)} answers")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}")
    rows = [replace(s, answer=a) for s, a in zip(samples, answers, strict=True)]
    batches = [to_model(encode_vqa(processor, rows[i:i + batch_size], with_answers=True), model)
               for i in range(0, len(rows), batch_size)]
    return EncodedAnswers(batches, max_new_tokens)


@torch.no_grad()
def produced(model: nn.Module, encoded: EncodedAnswers) -> np.ndarray:
    """Per row, whether greedy decoding would answer exactly the encoded answer (bool array)."""
    model.eval()
    out: list[bool] = []
    for batch in encoded.batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        predicted = model(**inputs).logits[:, :-1].argmax(-1).cpu()  # predicts token p + 1
        wanted = batch["labels"][:, 1:].cpu()
        for row in range(len(wanted)):
            positions = (wanted[row] != -100).nonzero().flatten()
            if len(positions) - 1 > encoded.max_new_tokens:  # the last labelled token is EOS
                out.append(False)
                continue
            checked = positions[:encoded.max_new_tokens]
            out.append(bool((predicted[row, checked] == wanted[row, checked]).all()))
    return np.array(out, dtype=bool)


def greedy_produces(model: nn.Module, processor, samples: Sequence[VQASample],
                    answers: Sequence[str], max_new_tokens: int = 20,
                    batch_size: int = 64) -> np.ndarray:
    """Per sample, whether greedy decoding would answer exactly ``answers[i]``."""
    return produced(model, encode_answers(model, processor, samples, answers, max_new_tokens,
                                          batch_size))
