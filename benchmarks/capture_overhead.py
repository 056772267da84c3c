"""Cost of capturing every residual state, against a plain forward pass and against
``output_hidden_states=True``, on the toy VLM (or any model given with --model).

    .venv/bin/python benchmarks/capture_overhead.py [--model toy-vlm] [--batch 64] [--repeats 30]

Prints the median time of each and the ratios. Goal: capture <= 1.2x a plain forward.
Timings are wall-clock medians of interleaved repeats, so a busy machine affects all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from locus import data, zoo
from locus.hooks import capture_residuals
from locus.prompts import encode_vqa


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-vlm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = zoo.load(args.model)
    samples = data.make_vqa_samples(args.batch // len(data.VQA_FAMILIES) + 1, seed=0)
    batch = encode_vqa(processor, samples[: args.batch])

    @torch.no_grad()
    def plain():
        model(**batch)

    @torch.no_grad()
    def hidden_states():
        model(**batch, output_hidden_states=True)

    @torch.no_grad()
    def capture():
        with capture_residuals(model) as cap:
            model(**batch)
        return cap

    for fn in (plain, hidden_states, capture):  # warm-up
        fn()
    rounds = {"plain": [], "hidden_states": [], "capture": []}
    for _ in range(args.repeats):  # interleaved, so load drift hits all three alike
        for name, fn in (("plain", plain), ("hidden_states", hidden_states),
                         ("capture", capture)):
            rounds[name].append(_seconds(fn))
    med = {name: statistics.median(ts) for name, ts in rounds.items()}
    print(f"model {args.model}, batch {args.batch} x {batch['input_ids'].shape[1]} tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    for name, seconds in med.items():
        print(f"  {name:14s} {seconds * 1e3:8.2f} ms")
    print(f"capture / plain          = {med['capture'] / med['plain']:.3f}")
    print(f"capture / hidden_states  = {med['capture'] / med['hidden_states']:.3f}")
    print(f"hidden_states / plain    = {med['hidden_states'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
