"""toy-vlm's training data is a function of its seed alone. The committed checkpoint was trained
(18542ca) while existence questions drew a present object from a set, whose order follows
Python's per-process string hash seed; a retrain under another hash seed saw other questions and
came out a different, weaker model. These tests pin what a retrain consumes, cheaply: the pools
under two hash seeds, and the hash of the first instruction-tuning batch."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import torch

from locus import data, models, training

POOL_DIGEST = """
import hashlib
from locus import data
digest = hashlib.sha256()
for s in data.make_vqa_samples(150, 2, ("existence", "attribute", "spatial")):
    digest.update(f"{s.question}|{s.answer}".encode())
print(digest.hexdigest())
"""


def _digest_under_hash_seed(seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", POOL_DIGEST], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_training_pool_does_not_depend_on_the_hash_seed():
    digests = {seed: _digest_under_hash_seed(seed) for seed in ("1", "2", "3")}
    assert len(set(digests.values())) == 1, digests


def _tensor_digest(batch: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key].numpy()).tobytes())
    return digest.hexdigest()[:16]


def test_instruction_pool_and_first_batch_are_pinned():
    """toy-vlm's stage-2 pool (its seed, cut to 20 per family), encoded as training encodes it,
    and the first batch drawn from it: a change of the world, the questions, the encoding or
    the sampler changes these digests, and so every retrain of toy-vlm; update them only with
    a deliberate retrain."""
    cfg = training.VLMTraining()
    _, processor = models.build_toy_vlm()
    pool = data.make_vqa_samples(20, cfg.seed + 2)

    def encode(samples):
        return training.encode_vqa(processor, samples, with_answers=True)

    batches = training.weighted_batches(pool, 16, cfg.seed, encode, dict(cfg.family_weights))
    assert _tensor_digest(encode(pool)) == "a1fe39b78c0c3688"
    assert _tensor_digest(batches(0)) == "9c61909855b4cf5a"
