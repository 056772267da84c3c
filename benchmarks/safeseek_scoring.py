"""SafeSeek's exact scores two ways on the trained toy chat LM: greedy generation + exact match
against teacher forcing (``locus.safeseek.circuits.greedy_matches``: one forward over prompt +
answer).

    python benchmarks/safeseek_scoring.py [--n 60] [--repeats 5] [--threads 2]

The inputs are ``n`` harmful requests with their compliant answers and ``n`` benign requests
with theirs (the toy world, seed 0), scored with one head removed and with nothing removed. Both
scorings are first checked to agree input by input; then they are timed in interleaved rounds;
the medians of process CPU time (steadier than wall time on a busy machine; both printed) and
their ratio are printed. Generation is capped at the longest answer + 1 token, so it can match.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from locus import data, zoo
from locus.evaluation import exact_match
from locus.safeseek import circuits
from locus.safeseek.masks import Circuit, UnitShape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = zoo.load("toy-chat", progress=False)
    benign, harmful = circuits.split_harmful(data.make_chat_samples(args.n, 0, aligned=False))
    samples = circuits.take(harmful, args.n, 0) + circuits.take(benign, args.n, 0)
    cap = max(len(tokenizer(s.answer, add_special_tokens=False)["input_ids"])
              for s in samples) + 1
    head = Circuit(UnitShape.of(model), ((1, 0),), ())

    def slow(circuit):
        replies = circuits.generate_with(model, tokenizer, samples, circuit, "circuit removed",
                                         cap)
        return [exact_match(r, s.answer) for r, s in zip(replies, samples, strict=True)]

    def cheap(circuit):
        return circuits.greedy_matches(model, tokenizer, samples, circuit, "circuit removed")

    for circuit in (None, head):
        assert slow(circuit) == cheap(circuit), "the two scorings disagree"
    times: dict[str, list[tuple[float, float]]] = {"teacher forcing": [], "generation": []}
    for _ in range(args.repeats):
        for name, fn in (("teacher forcing", cheap), ("generation", slow)):
            cpu, wall = time.process_time(), time.perf_counter()
            fn(head)
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    print(f"{len(samples)} requests (generation capped at {cap} tokens), torch threads "
          f"{torch.get_num_threads()}; the two scorings agree input by input")
    medians = {name: [statistics.median(t[i] for t in ts) for i in (0, 1)]
               for name, ts in times.items()}
    for name, (cpu, wall) in medians.items():
        print(f"  {name:16s} CPU {cpu:6.3f} s   wall {wall:6.3f} s")
    ratio = [medians["generation"][i] / medians["teacher forcing"][i] for i in (0, 1)]
    print(f"  generation / teacher forcing: CPU x{ratio[0]:.1f}, wall x{ratio[1]:.1f}")


if __name__ == "__main__":
    main()
