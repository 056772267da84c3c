"""One rank-k grid cell of ProjLens notebook 02, scored two ways on the trained toy VLM:
greedy generation + exact match (what the grids did) against teacher forcing
(``locus.projlens.scoring``: one forward over prompt + answer, inputs encoded once).

    python benchmarks/projlens_grid_scoring.py [--variant refusal] [--n 64] [--repeats 5]
        [--threads 2]

The cell's inputs are notebook 02's: ``n`` triggered inputs (the target), their untriggered
originals (the target: false triggers) and ``n`` clean inputs (the clean answer). The projector
is the cached backdoored one of ``--variant`` when notebook 01 made it, else a rank-1 edit of
the base projector. Both scorings are first checked to agree input by input; then they are
timed in interleaved rounds; the medians of process CPU time (steadier than wall time on a busy
machine; both printed) and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from locus.evaluation import exact_match
from locus.projlens import experiment as L
from locus.projlens import projector as P
from locus.projlens import scoring


def by_generation(vlm, processor, target, inputs: P.GridSet, state, max_new_tokens: int):
    """Exact-form hits per input by generating the answers (the grids' earlier way)."""
    rows = [*inputs.triggered, *inputs.untriggered, *inputs.clean]
    wanted = ([target.poisoned_answer(s) for s in (*inputs.triggered, *inputs.untriggered)]
              + [s.answer for s in inputs.clean])
    answers = P.predict(vlm, processor, rows, state, max_new_tokens)
    return np.array([exact_match(a, w) for a, w in zip(answers, wanted, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="refusal")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run = L.prepare(
        model="toy-vlm", data=None, seeds=[0], device="cpu", dtype=None, figures_dir=None,
        threads=args.threads, variants=[args.variant], poison_rate="pair",
        n_train_per_family=150, n_test_per_family=30, steps=1500, batch_size=16, lr=3e-3,
        max_new_tokens=20, noise_std=50.0, logo_fraction=0.25, injection_suffix="blue circle .",
        hijack_text="green triangle , yellow circle .")
    vlm, processor, attack = run.vlm, run.processor, run.attacks[args.variant]
    test = run.splits[0][1]
    state = run.backdoored_states(0, progress=False)[args.variant]
    inputs = L.grid_samples(test, attack, args.n, seed=0)
    scorer = P.GridScorer(vlm, processor, attack.target, inputs, max_new_tokens=20)

    def cheap():
        with P.projector_loaded(vlm, state):
            return scoring.produced(vlm, scorer.encoded)

    def slow():
        return by_generation(vlm, processor, attack.target, inputs, state, 20)

    agree = np.array_equal(cheap(), slow())
    times: dict[str, list[tuple[float, float]]] = {"teacher forcing": [], "generation": []}
    for _ in range(args.repeats):
        for name, fn in (("teacher forcing", cheap), ("generation", slow)):
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    rows = len(scorer.encoded)
    print(f"one grid cell, {rows} inputs ({args.variant}, torch threads {torch.get_num_threads()})"
          f"; the two scorings agree input by input: {agree}")
    medians = {name: [statistics.median(t[i] for t in ts) for i in (0, 1)]
               for name, ts in times.items()}
    for name, (cpu, wall) in medians.items():
        print(f"  {name:16s} CPU {cpu:6.2f} s   wall {wall:6.2f} s")
    ratio = [medians["generation"][i] / medians["teacher forcing"][i] for i in (0, 1)]
    print(f"  generation / teacher forcing: CPU ×{ratio[0]:.1f}, wall ×{ratio[1]:.1f}")


if __name__ == "__main__":
    main()
