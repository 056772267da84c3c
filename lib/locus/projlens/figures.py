"""The figures of the ProjLens notebooks (each returns a matplotlib figure; save it with
``plotting.save_figure``)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from locus.data import VQASample
from locus.projlens.experiment import NeuronResult, ShiftResult, SpectrumRow
from locus.projlens.projector import AttackEval, RankGrid
from locus.projlens.triggers import Attack, triggered_copy


def trigger_examples(sample: VQASample, attacks: dict[str, Attack], seed: int):
    """The clean image and each variant's triggered copy, titled with the poisoned answer."""
    fig, axes = plt.subplots(1, len(attacks) + 1, figsize=(2.6 * (len(attacks) + 1), 3.2))
    axes[0].imshow(sample.image, interpolation="nearest")
    axes[0].set_title(f"clean\n{sample.question}\n→ {sample.answer}", fontsize=7)
    for ax, (name, attack) in zip(axes[1:], attacks.items(), strict=True):
        poisoned = triggered_copy(sample, attack, seed, 0, poisoned_answer=True)
        ax.imshow(poisoned.image, interpolation="nearest")
        ax.set_title(f"{name} ({attack.trigger.kind})\n→ {poisoned.answer}", fontsize=7, wrap=True)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def backdoor_bars(rows: Sequence[Sequence]):
    """ASR and mean clean accuracy before/after per variant (rows of ``backdoor_table``:
    bars at the mean over seeds, whiskers from the lowest to the highest seed)."""
    names = [r[0] for r in rows]
    series = {"ASR before": 4, "ASR after": 5, "clean acc before": 7, "clean acc after": 8}
    colours = ["#f4a6a6", "#c0392b", "#a9cce3", "#1f618d"]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.6))
    width = 0.8 / len(series)
    for i, ((label, col), colour) in enumerate(zip(series.items(), colours, strict=True)):
        xs = np.arange(len(names)) + i * width
        means = np.array([100 * r[col].mean for r in rows])
        whiskers = [means - [100 * r[col].lo for r in rows],
                    [100 * r[col].hi for r in rows] - means]
        ax.bar(xs, means, width, yerr=whiskers, capsize=2, label=label, color=colour)
    ax.set_xticks(np.arange(len(names)) + width * (len(series) - 1) / 2, names)
    ax.axhline(90, color="k", ls="--", lw=1)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("Projector-only fine-tuning: ASR on triggered inputs, clean accuracy")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def sweep_plot(points: Sequence[tuple[float, AttackEval]], variant: str):
    """ASR and mean clean accuracy against the poisoning rate."""
    rates = [100 * p[0] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(rates, [100 * p[1].asr for p in points], "o-", color="#c0392b", label="ASR")
    ax.plot(rates, [100 * p[1].mean_clean_accuracy for p in points], "s-", color="#1f618d",
            label="clean accuracy")
    ax.set_xlabel("poisoning rate (% of training samples; 0 = clean fine-tuning)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"Poisoning-rate sweep ({variant})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def energy_curves(rows: Sequence[SpectrumRow], paper_w2: dict[str, dict[int, float]]):
    """Cumulative energy E(k) of ΔW per layer and variant; the paper's W2 points as crosses."""
    layers = list(dict.fromkeys(r.layer for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
    colours = dict(zip(dict.fromkeys(r.variant for r in rows), plt.cm.tab10.colors, strict=False))
    for ax, layer in zip(axes[0], layers, strict=True):
        for r in (r for r in rows if r.layer == layer):
            energy = np.cumsum(r.singular_values**2) / np.sum(r.singular_values**2)
            ks = np.arange(1, len(energy) + 1)
            ax.plot(ks, 100 * energy, color=colours[r.variant], label=r.variant)
            if layer == layers[-1] and r.variant in paper_w2:
                paper = paper_w2[r.variant]
                ax.plot(list(paper), [100 * v for v in paper.values()], "x--", lw=0.8,
                        color=colours[r.variant])
        ax.set_xscale("log")
        ax.set_xlabel("k (singular directions)")
        ax.set_ylabel("E(k) (%)")
        ax.set_ylim(0, 102)
        ax.set_title(f"ΔW of {layer}" + (" (×: paper, 4096-wide)" if layer == layers[-1] else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def neuron_scatter(results: dict[str, NeuronResult]):
    """Per-neuron mean activation on clean vs triggered inputs (one panel per variant)."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.3), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        clean, trig = r.clean.mean.numpy(), r.triggered.mean.numpy()
        ax.scatter(clean, trig, s=6, alpha=0.7)
        lo, hi = min(clean.min(), trig.min()), max(clean.max(), trig.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{name}: r = {r.comparison.r_mean:.3f}", fontsize=9)
        ax.set_xlabel("mean activation, clean")
    axes[0, 0].set_ylabel("mean activation, triggered")
    fig.tight_layout()
    return fig


def rank_heatmaps(grids: dict[str, dict[str, RankGrid]]):
    """Exact-form ASR (%) of each rank-k grid (one row of panels per mode: inject, remove,
    authors) per variant."""
    names = list(grids)
    modes = list(dict.fromkeys(m for g in grids.values() for m in g))
    if not names:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.text(0.5, 0.5, "no working backdoor: no grid", ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(len(modes), len(names),
                             figsize=(3.8 * len(names), 1.2 + 1.6 * len(modes)),
                             squeeze=False)
    for col, name in enumerate(names):
        for row, mode in enumerate(modes):
            grid = grids[name][mode]
            ax = axes[row, col]
            ax.imshow(100 * grid.asr, vmin=0, vmax=100, cmap="Reds", aspect="auto")
            ax.grid(False)
            for (i, j), value in np.ndenumerate(grid.asr):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value > 0.6 else "black")
            ax.set_xticks(range(len(grid.ks)), [str(k) for k in grid.ks], fontsize=7)
            ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=7)
            ax.set_title(f"{name}: {mode}", fontsize=9)
            ax.set_xlabel("k of W2" if mode == "authors" else "k", fontsize=7)
    fig.tight_layout()
    return fig


def shift_scatter(results: dict[str, ShiftResult]):
    """Each image token's shift coefficient against its base-embedding norm, with fits."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        for report, label, colour in ((r.clean, "clean", "#1f618d"),
                                      (r.triggered, "triggered", "#c0392b")):
            x, y = report.norms.ravel(), report.coefficients.ravel()
            ax.scatter(x, y, s=3, alpha=0.4, color=colour)
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, report.fit.slope * xs + report.fit.intercept, color=colour,
                    label=f"{label}: r={report.fit.r:.2f}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("‖E_base[t]‖")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("shift along top direction ⟨ΔE[t], v₀⟩")
    fig.tight_layout()
    return fig


def loss_curves(curves: dict[str, Sequence[float]], window: int = 10):
    """The training loss of each fine-tuned projector per step, smoothed over ``window`` steps
    (log scale): the evidence that the step count reaches a plateau."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, losses in curves.items():
        width = min(window, len(losses))
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax.plot(np.arange(width, len(losses) + 1), smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
