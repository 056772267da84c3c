"""Why the spatial family fails on toy-vlm and smol-llava: the data's statistics, linear probes
of an object's row / column and of a relation's answer at every stage of each model, and the
proxy retrainings that test a fix (``locus.spatial``).

    python benchmarks/spatial_diagnosis.py [--models toy-vlm smol-llava] [--n 600]
        [--proxy base coordinate] [--proxy-steps 1500] [--threads 1]

Held-out samples: the toy world's held-out seed (10000), spatial family only, ``--n`` of them
(and, for the proxies, 200 coordinate questions of seed 10001). Every probe is trained and scored
on images split apart (70 / 30). The committed checkpoints are only read. A proxy (``--proxy``)
keeps toy-vlm's committed tower, initialises a fresh projector and decoder (seed 0) and trains
them for ``--proxy-steps`` steps (batch 64, lr 1.5e-3, cosine) on a spatial-only pool: "base" =
4000 spatial questions of the toy world (seed 2), "coordinate" = those and 2000 coordinate
questions (seed 3), "coordinate-only-relations" = 2000 coordinate and the 4000 spatial without
their "where" form. Same step budget for every proxy, so a proxy with coordinate questions
sees fewer relation questions. Results go, atomically, to
benchmarks/results/spatial_diagnosis.{json,md} (a run with ``--proxy`` only adds its proxies
to the existing file's).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from locus import data, spatial, training, zoo  # noqa: E402
from locus.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 10_000
PROXY_TEST_SEED = 10_001


def pct(record: dict) -> str:
    return f"{100 * record['accuracy']['rate']:.0f}"


def model_diagnosis(name: str, samples: list) -> dict:
    """Accuracy by form, patch probes at every stage, answer probes at every layer."""
    start = time.perf_counter()
    model, processor = zoo.load(name, progress=False)
    hits = spatial.spatial_hits(model, processor, samples, progress=False)
    features = spatial.stage_features(model, processor, samples, batch_size=16)
    layers = spatial.decoder_layers(features)
    stages = ["pixels", "tower", "projector", *(f"visual.{i}" for i in range(layers))]
    return {"accuracy": spatial.accuracy_by_form(samples, hits),
            "by_shortcut": spatial.accuracy_by_shortcut(samples, hits),
            "patch": spatial.patch_probes(features, samples, stages),
            "answer": spatial.answer_probes(features, samples),
            "seconds": round(time.perf_counter() - start, 1)}


def proxy_pool(variant: str, n: int) -> list:
    """A proxy's training pool: ``n`` spatial questions (seed 2), with ``n // 2`` coordinate
    questions (seed 3) for "coordinate"."""
    pool = data.make_vqa_samples(n, 2, ("spatial",))
    if variant == "base":
        return pool
    if variant == "coordinate":
        return pool + spatial.coordinate_samples(n // 2, 3)
    raise ValueError(f"unknown proxy {variant!r}; accepted: base, coordinate")


def proxy(model_name: str, variant: str, steps: int, samples: list) -> dict:
    """Retrain on a spatial-only pool, same budget for every variant, and score by form:
    toy-vlm: a fresh projector and decoder on the committed tower (4000 spatial questions);
    smol-llava: the committed model continued with a fresh LoRA adapter and its projector
    (1500 spatial questions)."""
    start = time.perf_counter()
    source, processor = zoo.load(model_name, progress=False)
    if model_name == "toy-vlm":
        training.seed_everything(0)
        model, processor = spatial.toy_vlm_with_tower(source)
        losses = spatial.tune(model, processor, proxy_pool(variant, 4000), steps)
    else:
        model, losses = spatial.tune_smol_llava(source, processor, proxy_pool(variant, 1500),
                                                steps)
    test = samples + spatial.coordinate_samples(200, PROXY_TEST_SEED)
    return {"model": model_name, "variant": variant, "steps": steps,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "accuracy": spatial.accuracy_by_form(
                test, spatial.spatial_hits(model, processor, test, progress=False)),
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(result: dict) -> str:
    lines = ["# Spatial diagnosis", "",
             f"Written by `benchmarks/spatial_diagnosis.py` ({result['written']}; "
             f"{result['threads']} torch thread(s)). Held-out spatial questions: "
             f"{result['n']} (seed {HELD_OUT_SEED}); every probe is split by image (70 / 30) "
             "and scored on held-out images (percent; chance = the test split's majority "
             "class).", "", "## The data", ""]
    d = result["data"]
    lines += ["| form | n | answers |", "|---|---|---|"]
    lines += [f"| {form} | {f['n']} | {f['answers']} |" for form, f in d["forms"].items()]
    q = d["question_only"]
    lines += ["", f"Relation pairs in one column: {100 * d['same_column_rate']:.1f}% (both "
              f"horizontal relations false), in one row: {100 * d['same_row_rate']:.1f}%. "
              "The token-order shortcut (a before b in the row-major visual tokens read as "
              f"left of / above) answers {100 * d['order_shortcut']['horizontal']:.0f}% of "
              f"horizontal and {100 * d['order_shortcut']['vertical']:.0f}% of vertical "
              "questions. Question-only baseline (the training half's majority answer per "
              f"question string): relations {pct(q['relation'])}%, where {pct(q['where'])}%.",
              ""]
    for name, m in result.get("models", {}).items():
        lines += [f"## {name}", "", "Greedy exact match by form: " + ", ".join(
            f"{form} {100 * r['rate']:.0f}% (n {r['n']})" for form, r in m["accuracy"].items()),
            "", "Object patch: its row and column from the patch's features", "",
            "| stage | row | col |", "|---|---|---|"]
        lines += [f"| {stage} | {pct(p['row'])} | {pct(p['col'])} |"
                  for stage, p in m["patch"].items()]
        lines += ["", "Answer position of relation questions (occupancy: the scene's occupied "
                  "cells alone, no name)", "",
                  "| layer | answer (horizontal) | answer (vertical) | col a | col b | row a "
                  "| row b | chance h / v / col a |", "|---|---|---|---|---|---|---|---|"]
        for layer, a in m["answer"].items():
            chance = " / ".join(f"{100 * a[k]['chance']:.0f}"
                                for k in ("answer_horizontal", "answer_vertical", "col_a"))
            lines.append(f"| {layer} | " + " | ".join(pct(a[k]) for k in (
                "answer_horizontal", "answer_vertical", "col_a", "col_b", "row_a", "row_b"))
                + f" | {chance} |")
        lines.append("")
    if result.get("proxies"):
        lines += ["## Proxies: spatial-only retraining, same budget per model", "",
                  "| model | pool | steps | s | " + " | ".join(spatial.PROXY_FORMS) + " |",
                  "|---|---|---|---|" + "---|" * len(spatial.PROXY_FORMS)]
        for p in result["proxies"].values():
            acc = p["accuracy"]
            lines.append(f"| {p['model']} | {p['variant']} | {p['steps']} | {p['seconds']:.0f} | "
                         + " | ".join(
                f"{100 * acc[f]['rate']:.0f}" if f in acc else "-" for f in spatial.PROXY_FORMS)
                + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["toy-vlm", "smol-llava"])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--proxy", nargs="*", default=[],
                        help="MODEL:VARIANT:STEPS, e.g. toy-vlm:coordinate:1500")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = data.make_vqa_samples(args.n, HELD_OUT_SEED, ("spatial",))
    path = RESULTS / "spatial_diagnosis.json"
    result = (__import__("json").loads(path.read_text()) if path.is_file() and not args.models
              else {})
    result |= {"written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "threads": args.threads, "n": args.n, "data": spatial.data_report(samples)}
    if args.models:
        result["models"] = {name: model_diagnosis(name, samples) for name in args.models}
    result.setdefault("proxies", {})
    for spec in args.proxy:
        model_name, variant, steps = spec.split(":")
        result["proxies"][spec] = proxy(model_name, variant, int(steps), samples)
    atomic_write_json(path, result)
    atomic_write_text(RESULTS / "spatial_diagnosis.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
