"""Figures shared by the notebooks, and saving them as PNG (reading) and PDF (papers)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from locus.data import VQASample
from locus.io import atomic_save_figure
from locus.paths import figures_dir

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, name: str, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Save ``fig`` as ``<name>.png`` and ``<name>.pdf`` (atomically) in the figures folder and
    return the file names (relative to that folder) for the claims report."""
    folder = figures_dir(out_dir)
    names = []
    for suffix in (".png", ".pdf"):
        path = atomic_save_figure(fig, Path(folder) / f"{name}{suffix}")
        names.append(path.name)
    return names


def show_vqa_examples(samples: Sequence[VQASample], columns: int = 4):
    """A grid of example images with their question and answer underneath."""
    rows = -(-len(samples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples, strict=False):
        ax.imshow(s.image, interpolation="nearest")
        ax.set_title(f"[{s.family}]\n{s.question}\n→ {s.answer}", fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_bars(accuracy: dict[str, dict[str, float]], target: float | None = None,
                  title: str = ""):
    """Grouped bars: ``accuracy[model][family]`` in percent, with an optional target line."""
    fig, ax = plt.subplots(figsize=(1.3 * max(len(a) for a in accuracy.values()) + 2, 3.5))
    families = list(dict.fromkeys(f for acc in accuracy.values() for f in acc))
    width = 0.8 / len(accuracy)
    for i, (model, acc) in enumerate(accuracy.items()):
        xs = [j + i * width for j in range(len(families))]
        ax.bar(xs, [100 * acc.get(f, float("nan")) for f in families], width, label=model)
    ax.set_xticks([j + width * (len(accuracy) - 1) / 2 for j in range(len(families))], families)
    if target is not None:
        ax.axhline(100 * target, color="k", ls="--", lw=1, label=f"target {100 * target:.0f}%")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
