"""Why the spatial family fails on toy-vlm and smol-llava: the data's statistics, linear probes
of an object's row / column and of a relation's answer at every stage of each model, and the
proxy retrainings that test a fix (``locus.spatial``).

    python benchmarks/spatial_diagnosis.py [--models toy-vlm smol-llava] [--n 600]
        [--proxy MODEL:START:POOL:STEPS ...] [--threads 1]

Held-out samples: the toy world's held-out seed (10000), spatial family only, ``--n`` of them
(and, for the proxies, 200 coordinate questions of seed 10001). Every probe is trained and
scored on images split apart (70 / 30). The committed checkpoints are only read (nothing is
written over them or the user cache's merged copies). A proxy retrains on a spatial-only pool
with a fixed step budget (toy-vlm: batch 64, lr 1.5e-3; smol-llava: its stage 2's batch 16,
lr 2e-3, LoRA r8; cosine schedules) and is scored by form: START "tower" = toy-vlm's committed
tower with a fresh projector and decoder, "committed" = the committed model trained further;
POOL "N" = N spatial questions of the toy world (seed 2), "N+coordinate" = those and N // 2
coordinate questions (seed 3); ORDER "random" trains with each image's visual tokens in a
random order (scored in LLaVA's row-major order), "column-major" trains and scores with them
column by column, "both" with each image twice, row- then column-major (32 visual tokens;
``spatial.reordered_visual_tokens``). Results go, atomically, to
benchmarks/results/spatial_diagnosis.{json,md}, after every model and proxy; a run replaces
the sections it measures (``--models`` none: keeps the file's) and keeps the other proxies.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from locus import data, smol_llava, spatial, training, zoo  # noqa: E402
from locus.evaluation import exact_match  # noqa: E402
from locus.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 10_000
PROXY_TEST_SEED = 10_001


def pct(record: dict) -> str:
    return f"{100 * record['accuracy']['rate']:.0f}"


def training_pool_spatial(name: str, n: int = 400) -> list:
    """The first ``n`` spatial questions of a model's own training pool (toy-vlm: its stage
    2's pool, seed 2; smol-llava: its training split)."""
    if name == "toy-vlm":
        pool = data.make_vqa_samples(training.VLMTraining().pool_per_family, 2)
    else:
        pool = smol_llava.pools(smol_llava.SmolLlavaRecipe())["train"]
    return [s for s in pool if s.family == "spatial"][:n]


def model_diagnosis(name: str, samples: list) -> dict:
    """Accuracy by form (held out, and on the model's own training questions), patch probes at
    every stage, answer probes at every layer."""
    start = time.perf_counter()
    model, processor = zoo.load(name, progress=False)
    seen = training_pool_spatial(name)
    said = spatial.spatial_answers(model, processor, samples, progress=False)
    hits = [exact_match(a, s.answer) for a, s in zip(said, samples, strict=True)]
    features = spatial.stage_features(model, processor, samples, batch_size=16)
    layers = spatial.decoder_layers(features)
    stages = ["pixels", "tower", "projector", *(f"visual.{i}" for i in range(layers))]
    return {"accuracy": spatial.accuracy_by_form(samples, hits),
            "by_shortcut": spatial.accuracy_by_shortcut(samples, hits),
            "where_words": spatial.where_words(samples, said),
            "training_pool_accuracy": spatial.accuracy_by_form(
                seen, spatial.spatial_hits(model, processor, seen, progress=False)),
            "patch": spatial.patch_probes(features, samples, stages),
            "answer": spatial.answer_probes(features, samples),
            "seconds": round(time.perf_counter() - start, 1)}


def proxy_pool(pool: str) -> list:
    """A proxy's training pool from its spec: "N" spatial questions of the toy world (seed 2),
    or "N+coordinate": those and N // 2 coordinate questions (seed 3)."""
    size, _, extra = pool.partition("+")
    if extra not in ("", "coordinate"):
        raise ValueError(f"unknown pool {pool!r}; accepted: N or N+coordinate")
    samples = data.make_vqa_samples(int(size), 2, ("spatial",))
    return samples + (spatial.coordinate_samples(int(size) // 2, 3) if extra else [])


def proxy(spec: str, samples: list) -> dict:
    """A proxy retraining ``MODEL:START:POOL:STEPS[:ORDER]`` scored by form on the held-out
    spatial and coordinate questions. START "tower": toy-vlm's committed tower with a fresh
    projector and decoder (seed 0); "committed": the committed model trained further (toy-vlm:
    its projector and decoder; smol-llava: a fresh LoRA adapter and its projector)."""
    model_name, start_from, pool, steps, *option = spec.split(":")
    order = option[0] if option else None
    if len(option) > 1 or order not in (None, *spatial.VISUAL_ORDERS):
        raise ValueError(f"unknown proxy option {option}; accepted: {spatial.VISUAL_ORDERS}")
    if start_from not in ("tower", "committed") or (start_from == "tower"
                                                     and model_name != "toy-vlm"):
        raise ValueError(f"unknown start {start_from!r} for {model_name}: toy-vlm takes "
                         "tower or committed, smol-llava committed")
    start = time.perf_counter()
    model, processor = zoo.load(model_name, progress=False)
    if model_name == "smol-llava":
        model, losses = spatial.tune_smol_llava(model, processor, proxy_pool(pool), int(steps),
                                                visual_order=order)
    else:
        if start_from == "tower":
            training.seed_everything(0)
            model, processor = spatial.toy_vlm_with_tower(model)
        losses = spatial.tune(model, processor, proxy_pool(pool), int(steps),
                              visual_order=order)
    test = samples + spatial.coordinate_samples(200, PROXY_TEST_SEED)
    hits = spatial.spatial_hits(model, processor, test, progress=False, visual_order=order)
    return {"model": model_name, "start": start_from, "pool": pool, "steps": int(steps),
            "visual_order": order or "row-major",
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "accuracy": spatial.accuracy_by_form(test, hits),
            "by_shortcut": spatial.accuracy_by_shortcut(test, hits),
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(result: dict) -> str:
    lines = ["# Spatial diagnosis", "",
             f"Written by `benchmarks/spatial_diagnosis.py` ({result['written']}; "
             f"{result['threads']} torch thread(s)). Held-out spatial questions: "
             f"{result['n']} (seed {HELD_OUT_SEED}); every probe is split by image (70 / 30) "
             "and scored on held-out images (percent; chance = the test split's majority "
             "class).", "", "## The data (toy-vlm's training pool: its 4000 spatial questions)",
             ""]
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
        lines += [f"## {name}", "", "Greedy exact match by form, held out: " + ", ".join(
            f"{form} {100 * r['rate']:.0f}% (n {r['n']})" for form, r in m["accuracy"].items()),
            "", "Where is ...: " + ", ".join(f"the {k} right {100 * r['rate']:.0f}%"
                                             for k, r in m.get("where_words", {}).items()),
            "", "The same on the model's own training questions: " + ", ".join(
                f"{form} {100 * r['rate']:.0f}% (n {r['n']})"
                for form, r in m["training_pool_accuracy"].items()),
            "", "Relation questions apart by the token-order shortcut: " + "; ".join(
                f"{axis}: " + ", ".join(f"{k} {100 * r['rate']:.0f}% (n {r['n']})"
                                        for k, r in d.items())
                for axis, d in m["by_shortcut"].items()),
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
                  "| model | start | pool | visual order | steps | final loss | s | "
                  + " | ".join(spatial.PROXY_FORMS) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(spatial.PROXY_FORMS)]
        for p in result["proxies"].values():
            acc = p["accuracy"]
            lines.append(f"| {p['model']} | {p['start']} | {p['pool']} | "
                         f"{p['visual_order']} | {p['steps']} | "
                         f"{p['final_loss']:.3f} | {p['seconds']:.0f} | "
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
                        help="MODEL:START:POOL:STEPS[:ORDER], e.g. "
                        "toy-vlm:committed:64000:1000:column-major")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = data.make_vqa_samples(args.n, HELD_OUT_SEED, ("spatial",))
    path = RESULTS / "spatial_diagnosis.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result |= {"written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "threads": args.threads, "n": args.n,
               "data": spatial.data_report(training_pool_spatial("toy-vlm", 4000))}

    def save() -> None:  # after every model and proxy, so a long run keeps what it measured
        atomic_write_json(path, result)
        atomic_write_text(RESULTS / "spatial_diagnosis.md", markdown(result))

    result.setdefault("models", {})
    for name in args.models:
        result["models"][name] = model_diagnosis(name, samples)
        save()
    result.setdefault("proxies", {})
    for spec in args.proxy:
        result["proxies"][spec] = proxy(spec, samples)
        save()
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
