"""The shared training helpers."""

import numpy as np
import torch

from locus import training


def test_sampled_batches_are_seeded_uniform_draws():
    samples = list(range(10))
    draws = [training.sampled_batches(samples, 4, seed=3, encode=list) for _ in range(2)]
    first = [draws[0](step) for step in range(50)]
    assert first == [draws[1](step) for step in range(50)]
    assert first[0] == list(np.random.default_rng(3).integers(10, size=4))
    counts = np.bincount(np.concatenate(first), minlength=10)
    assert counts.min() > 0 and counts.sum() == 200


def test_cosine_schedule_warms_up_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = training.cosine_schedule(optimizer, steps=100, warmup=0.1)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.1 and rates[9] == 1.0
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] < 1e-3
