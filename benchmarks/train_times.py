"""How long each embedded toy model takes to train from scratch, and whether it comes out the same.

Trains every model of ``locus.zoo.EMBEDDED`` into a fresh cache folder (never the committed
``checkpoints/``) with a given number of torch threads, exactly as a fresh machine would, and
records per model: the wall time (a fine-tuned model's includes its parent's, as the zoo's
manifest does), the held-out accuracy, and whether the weights equal the committed checkpoint's.
This is the measurement behind notebook 00's "trains in ≤ 10 minutes on 2 CPU cores" claims:
the time a checkpoint's manifest records is the one of the machine that made it, busy or idle.
The load average before and after is kept beside the times.

    .venv/bin/python benchmarks/train_times.py              # each with its checkpoint's threads
    .venv/bin/python benchmarks/train_times.py --threads 2  # all with 2 threads

Writes benchmarks/results/train_times.json and train_times.md.

Float reductions depend on the thread count, so weights are reproduced bit for bit only with the
thread count the committed checkpoint was trained with (its manifest's ``threads``): by default
each model is trained with that count, which makes the run a check of the checkpoints too.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from locus import checkpoints, io, zoo

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GOAL_SECONDS = 600


def train_one(name: str, root: Path, threads: int | None) -> dict:
    """Train ``name`` (and its parent, first, if it has one) under ``root`` with ``threads``
    torch threads (None: the committed checkpoint's); its measured record."""
    committed = checkpoints.read_manifest(ROOT / "checkpoints" / name)
    torch.set_num_threads(threads or committed["threads"])
    folder = zoo.train_embedded(name, progress=False, root=str(root))
    made = checkpoints.read_manifest(folder)
    return {"train_seconds": made["train_seconds"], "threads": made["threads"],
            "held_out_accuracy": made["held_out_accuracy"],
            "committed_threads": committed["threads"],
            "same_weights_as_committed":
                made["files"]["model.safetensors"] == committed["files"]["model.safetensors"]}


def markdown(record: dict) -> str:
    """The results as a table, each time against the goal."""
    lines = ["# Training time of the embedded toy models", "",
             f"{record['cores']} cores; load average "
             f"{record['load_before']} before, {record['load_after']} after. Goal: ≤ "
             f"{GOAL_SECONDS} s each (a fine-tuned model's time includes its parent's).", "",
             "| model | threads | seconds | goal | same weights as committed (trained on) |",
             "|---|---|---|---|---|"]
    for name, r in record["models"].items():
        met = "meets" if r["train_seconds"] <= GOAL_SECONDS else "misses"
        same = "yes" if r["same_weights_as_committed"] else "no"
        lines.append(f"| {name} | {r['threads']} | {r['train_seconds']:.0f} | {met} | {same} "
                     f"({r['committed_threads']} threads) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every model (default: each checkpoint's own)")
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: train_one(name, Path(tmp), args.threads) for name in zoo.EMBEDDED}
    record = {"cores": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg()[0], "goal_seconds": GOAL_SECONDS, "models": models}
    RESULTS.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(RESULTS / "train_times.json", record)
    io.atomic_write_text(RESULTS / "train_times.md", markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
