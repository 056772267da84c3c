"""Lost in Attention on the toy VLM: what scoring one replacement condition and measuring one
seed's residual geometry cost, teacher-forced scoring against greedy decoding.

    python benchmarks/lia_scoring.py [--n-per-family 60] [--repeats 3] [--threads 1]

Both scorings are first checked to give the same verdict on every sample (a method that
computes something else stops the run). Times are the median CPU time of the process over
``--repeats`` rounds with torch fixed to ``--threads`` threads (on a busy shared machine this is
close to what the run takes on an idle one; wall-clock time is printed beside it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from locus.lost_in_attention import benchmark, geometry


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median CPU and wall-clock seconds of ``fn()`` over ``repeats`` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-family", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vlm, processor = geometry.load_vlm("toy-vlm", "cpu", None)
    samples = geometry.sample_set(None, args.n_per_family, 0)
    config = benchmark.readings(4)["paper (LLaVA-1.5)"].config("dirichlet")
    forced = benchmark.correct_teacher_forced(vlm, processor, samples, config, 64, 3)
    decoded = benchmark.correct_generated(vlm, processor, samples, config, 64, 3)
    if not np.array_equal(forced, decoded):
        raise SystemExit("teacher-forced and decoded verdicts differ: nothing to compare")
    print(f"{len(samples)} samples, torch threads {args.threads}, load {os.getloadavg()[0]:.1f}")
    rows = {
        "score one condition, teacher-forced": lambda: benchmark.correct_teacher_forced(
            vlm, processor, samples, config, 64, 3),
        "score one condition, generate": lambda: benchmark.correct_generated(
            vlm, processor, samples, config, 64, 3),
        "residual geometry of one seed (100 samples)": lambda: geometry.residual_geometry(
            vlm, processor, geometry.sample_set(None, 20, 0), seed=0),
    }
    for name, fn in rows.items():
        cpu, wall = timed(fn, args.repeats)
        print(f"{name:46s} CPU {cpu:6.2f} s   wall {wall:6.2f} s")


if __name__ == "__main__":
    main()
