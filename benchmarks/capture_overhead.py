"""Residual capture and a head ablation: locus against a plain forward, output_hidden_states,
nnsight and TransformerLens's TransformerBridge, on the same model, batch and capture set.

    python benchmarks/capture_overhead.py [--models toy-chat smollm2-config] [--batch 8]
        [--seq 32] [--repeats 10] [--threads 1]

Models: an embedded or local checkpoint that ``locus.zoo.load`` knows (a causal LM, e.g.
toy-chat, or smollm2-135m-instruct where the zoo has it), or ``smollm2-config``: a Llama with
SmolLM2-135M's exact configuration (30 layers, width 576, 9 heads, 3 key/value heads, MLP 1536,
vocabulary 49152, tied embeddings), randomly initialised: the real model's compute without its
weights. Inputs are random token ids (seeded), no padding.

Every method is first run once and checked against locus (same captured tensors, same edited
logits, within float32 round-off; see ``methods.py``); then the methods are timed in interleaved
rounds after a warm-up. The ratios are of the median CPU time of the process (torch fixed to
``--threads`` threads), which a shared, busy machine disturbs far less than wall-clock time
(also reported). The table is printed and written to
benchmarks/results/capture_overhead.{json,md}. Peers not installed or unable to run offline are
listed as skipped with the reason. Install the peers with
``pip install -e '.[bench]'`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import Batch, Method, available_methods, check_all, task_name  # noqa: E402

from locus import zoo  # noqa: E402
from locus.arch import adapt  # noqa: E402
from locus.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2)
PACKAGES = ("torch", "transformers", "nnsight", "transformer-lens")


def random_llama(config: dict, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM of the given configuration, in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def load_model(name: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """The model to benchmark and its tokenizer (None where it has none)."""
    if name == "smollm2-config":
        return random_llama(SMOLLM2_135M), None
    model, processor = zoo.load(name, progress=False)
    if not hasattr(model, "lm_head"):
        raise ValueError(f"model {name!r} is not a causal LM (no lm_head); use a chat model")
    tokenizer = processor if isinstance(processor, PreTrainedTokenizerBase) else None
    return model.eval(), tokenizer


def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> Batch:
    """Random token ids of shape (batch, seq) with a full attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _seconds(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall-clock seconds) that one call takes."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


@torch.no_grad()
def time_task(calls: dict, repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall-clock) seconds of each call, over interleaved rounds after a warm-up.
    CPU time is the measure: on a shared machine wall-clock time also counts the waits for
    other processes, which CPU time of a run fixed to a few threads does not."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    rounds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            rounds[name].append(_seconds(fn))
    return {name: tuple(statistics.median(t[k] for t in times) for k in (0, 1))
            for name, times in rounds.items()}


def timed_calls(methods: list[Method], batch: Batch, layer: int, head: int) -> dict:
    """Every (task, method) to time as a zero-argument call; the plain forward, the baseline
    of every task, is timed once per round under the task "baseline"."""
    calls = {}
    for method in methods:
        if method.name == "plain forward":
            calls["baseline", method.name] = functools.partial(method.capture, batch, ())
            continue
        for sites in method.capture_sites:
            calls[task_name(sites), method.name] = functools.partial(method.capture, batch, sites)
        if method.ablate is not None:
            calls["ablation", method.name] = functools.partial(method.ablate, batch, layer, head)
    return calls


def _row_order(item) -> tuple[int, int]:
    """Rows by task (baseline, captures, ablation), then locus before its peers."""
    (task, method), _ = item
    task_rank = 0 if task == "baseline" else 2 if task == "ablation" else 1
    return task_rank, method != "locus"


def benchmark_model(name: str, args) -> tuple[list[dict], dict]:
    """Rows of the table for one model, and what describes the run on it."""
    model, tokenizer = load_model(name)
    arch = adapt(model)
    layer, head = arch.num_layers // 2, 0
    batch = random_batch(model.config.vocab_size, args.batch, args.seq)
    methods, unavailable = available_methods(model, tokenizer)
    diffs = check_all(model, methods, batch, layer, head)
    medians = time_task(timed_calls(methods, batch, layer, head), args.repeats, args.warmup)
    plain = medians["baseline", "plain forward"][0]
    rows = []
    for (task, method), (cpu, wall) in sorted(medians.items(), key=_row_order):
        ours = medians.get((task, "locus"), (plain,))[0]
        rows.append({"model": name, "task": task, "method": method, "cpu_ms": cpu * 1e3,
                     "wall_ms": wall * 1e3, "vs_plain": cpu / plain,
                     "locus_over_method": ours / cpu, "max_rel_diff": diffs.get((task, method))})
    for method, reason in unavailable.items():
        rows.append({"model": name, "task": "all", "method": method, "skipped": reason})
    about = {"layers": arch.num_layers, "hidden": arch.hidden_size, "heads": arch.num_heads,
             "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
             "ablated": {"layer": layer, "head": head}}
    return rows, about


def versions() -> dict[str, str | None]:
    """Installed versions of the packages compared (None: not installed)."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def markdown(rows: list[dict], meta: dict) -> str:
    """The table as Markdown, with the run's settings above it."""
    lines = [f"batch {meta['batch']} x {meta['seq']} tokens, {meta['threads']} thread(s), "
             f"median of {meta['repeats']} interleaved rounds, ratios of CPU time; "
             f"load average {meta['load_before'][0]:.1f} -> "
             f"{meta['load_after'][0]:.1f}; versions: "
             + ", ".join(f"{k} {v or 'not installed'}" for k, v in meta["versions"].items()),
             "",
             "| model | task | method | CPU ms | wall ms | / plain | locus / method | "
             "max rel. diff |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['task']} | {row['method']} | skipped: "
                         f"{row['skipped']} | | | | |")
            continue
        diff = "—" if row["max_rel_diff"] is None else f"{row['max_rel_diff']:.1e}"
        lines.append(f"| {row['model']} | {row['task']} | {row['method']} | "
                     f"{row['cpu_ms']:.2f} | {row['wall_ms']:.2f} | {row['vs_plain']:.3f} | "
                     f"{row['locus_over_method']:.3f} | {diff} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["toy-chat", "smollm2-config"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "capture_overhead",
                        help="results are written to OUT.json and OUT.md")
    args = parser.parse_args()
    if min(args.batch, args.seq, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --seq and --repeats must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
            "warmup": args.warmup, "threads": args.threads, "cpus": os.cpu_count(),
            "platform": platform.platform(), "versions": versions(),
            "load_before": os.getloadavg(), "models": {}}
    rows = []
    for name in args.models:
        model_rows, meta["models"][name] = benchmark_model(name, args)
        rows += model_rows
    meta["load_after"] = os.getloadavg()
    table = markdown(rows, meta)
    print(table)
    atomic_write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(f"written: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
