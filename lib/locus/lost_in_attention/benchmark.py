"""Accuracy under the visual-attention replacement ("Lost in Attention", claim 2): scoring,
paired comparisons with vanilla, the verdict rules and the readings of the authors' settings.

Scoring is exact match of the greedy answer. ``"teacher_forced"`` gets it from one forward pass
of prompt + known answer: the answer is the greedy one exactly when, at every answer-producing
position, the argmax is the next answer token (and after the answer, the end-of-sequence token,
when the answer is shorter than ``max_new_tokens``). The replacement edits those positions as
``generate()`` edits each at its own decoding step (:attr:`ReplacementState.query_rows`), so the
two agree; :func:`scoring_agreement` checks it on the data at hand. ``"generate"`` decodes.

Every condition is scored on the same samples as vanilla, so a comparison is the paired
difference of per-sample correctness (all seeds pooled, :func:`locus.stats.paired_difference`)
called better / comparable / worse / inconclusive against a margin (:func:`locus.stats.compare`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from locus.data import VQASample
from locus.evaluation import exact_match, generate_answers
from locus.lost_in_attention.attention import (
    VECTOR_MODES,
    HeadBand,
    ReplacementConfig,
    chosen_layers,
    replaced_visual_attention,
)
from locus.prompts import to_model, vqa_prompt
from locus.stats import Interval, compare, paired_difference, wilson_interval

SCORINGS = ("teacher_forced", "generate")
# Per seed, the 0/1 correctness of each sample of that seed's set (in set order).
Scores = dict[int, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Scoring


def encode_teacher_forced(processor, samples: Sequence[VQASample]):
    """Left-padded prompt + answer sequences, and per sample its answer token ids: the
    tokenizer's ids of the answer alone appended to the prompt's ids (as this project trains its
    models to answer, :func:`locus.smol_llava.encode_answers`, and as greedy decoding emits them
    after a chat prompt; re-tokenizing the joined text would instead give a real tokenizer's
    space-prefixed word, e.g. SmolLM2's " yes" for "yes"). Per-position processor outputs other
    than the ids and the mask (token type ids) are 0 at the answer's text positions."""
    tokenizer = processor.tokenizer
    images = [s.image for s in samples]
    prompts = [vqa_prompt(processor, s.question) for s in samples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        alone = dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side
    answers = [tokenizer(s.answer, add_special_tokens=False).input_ids for s in samples]
    empty = [s.answer for s, a in zip(samples, answers, strict=True) if not a]
    if empty:
        raise ValueError(f"answers {empty!r} have no tokens; teacher forcing needs an answer")
    lengths = alone["attention_mask"].sum(1).tolist()
    width = max(n + len(a) for n, a in zip(lengths, answers, strict=True))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shape = alone["input_ids"].shape
    full = {}
    for key, value in alone.items():
        if not (torch.is_tensor(value) and value.shape == shape):
            full[key] = value
            continue
        rows = torch.full((len(samples), width), pad if key == "input_ids" else 0,
                          dtype=value.dtype)
        for row, (n, answer) in enumerate(zip(lengths, answers, strict=True)):
            tail = {"input_ids": answer, "attention_mask": [1] * len(answer)}.get(
                key, [0] * len(answer))
            rows[row, width - n - len(answer):] = torch.cat(
                [value[row, shape[1] - n:], torch.tensor(tail, dtype=value.dtype)])
        full[key] = rows
    return full, answers


@torch.no_grad()
def correct_teacher_forced(
    model: nn.Module, processor, samples: Sequence[VQASample],
    config: ReplacementConfig | None, batch_size: int = 64, max_new_tokens: int = 4,
) -> np.ndarray:
    """Per sample, whether greedy decoding (at most ``max_new_tokens``) gives exactly the
    answer, from one teacher-forced forward pass per batch (vanilla when ``config`` is None)."""
    eos = processor.tokenizer.eos_token_id
    model.eval()
    correct: list[bool] = []
    context = nullcontext(None) if config is None else replaced_visual_attention(model, config)
    with context as state:
        for start in range(0, len(samples), batch_size):
            batch, answers = encode_teacher_forced(processor, samples[start:start + batch_size])
            batch = to_model(batch, model)
            mask = batch["attention_mask"]
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
            rows = torch.tensor([len(a) + 1 for a in answers])
            if state is not None:
                state.query_rows = rows
            keep = int(rows.max())
            predicted = model(**batch, use_cache=False, logits_to_keep=keep).logits.argmax(-1)
            predicted = predicted.cpu()
            for row, answer in enumerate(answers):
                if len(answer) > max_new_tokens:
                    correct.append(False)
                    continue
                expected = answer + ([eos] if len(answer) < max_new_tokens else [])
                first = keep - 1 - len(answer)
                got = predicted[row, first:first + len(expected)]
                correct.append(got.tolist() == expected)
            if state is not None:
                state.query_rows = None
    return np.array(correct, dtype=bool)


def correct_generated(
    model: nn.Module, processor, samples: Sequence[VQASample],
    config: ReplacementConfig | None, batch_size: int = 64, max_new_tokens: int = 4,
) -> np.ndarray:
    """Per sample, whether the greedy answer (``generate``) matches exactly."""
    context = nullcontext() if config is None else replaced_visual_attention(model, config)
    with context:
        answers = generate_answers(model, processor, samples, batch_size, max_new_tokens,
                                   progress=False)
    return np.array([exact_match(a, s.answer) for a, s in zip(answers, samples, strict=True)])


def score(
    model: nn.Module, processor, sample_sets: Mapping[int, Sequence[VQASample]],
    config: ReplacementConfig | None, batch_size: int = 64, max_new_tokens: int = 4,
    scoring: str = "teacher_forced",
) -> Scores:
    """Per seed, the correctness of its samples under ``config`` with its random vectors drawn
    from that seed (vanilla when ``config`` is None)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    run = correct_teacher_forced if scoring == "teacher_forced" else correct_generated
    return {seed: run(model, processor, samples,
                      None if config is None else replace(config, seed=seed), batch_size,
                      max_new_tokens)
            for seed, samples in sample_sets.items()}


class Scorer:
    """:func:`score` of named configs on fixed sample sets, each distinct config scored once:
    conditions that coincide (the same drop control of two readings, a pruning layer that is
    also a comparison row) are not run twice."""

    def __init__(
        self, model: nn.Module, processor, sample_sets: Mapping[int, Sequence[VQASample]],
        batch_size: int = 64, max_new_tokens: int = 4, scoring: str = "teacher_forced",
    ) -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.model, self.processor, self.sample_sets = model, processor, sample_sets
        self.batch_size, self.max_new_tokens, self.scoring = batch_size, max_new_tokens, scoring
        self._done: dict[ReplacementConfig | None, Scores] = {}

    def __call__(
        self, configs: Mapping[str, ReplacementConfig | None], desc: str = "conditions"
    ) -> dict[str, Scores]:
        """The scores of each named config, with a progress bar."""
        out = {}
        for name, config in tqdm(configs.items(), desc=desc):
            if config not in self._done:
                self._done[config] = score(self.model, self.processor, self.sample_sets, config,
                                           self.batch_size, self.max_new_tokens, self.scoring)
            out[name] = self._done[config]
        return out

    @property
    def runs(self) -> int:
        """How many distinct configs were scored."""
        return len(self._done)


def first_per_family(samples: Sequence[VQASample], n: int) -> list[VQASample]:
    """The first ``n`` samples of each family, in their order."""
    seen: dict[str, int] = {}
    kept = []
    for s in samples:
        seen[s.family] = seen.get(s.family, 0) + 1
        if seen[s.family] <= n:
            kept.append(s)
    return kept


def scoring_agreement(
    model: nn.Module, processor, samples: Sequence[VQASample],
    configs: Mapping[str, ReplacementConfig | None], batch_size: int = 64,
    max_new_tokens: int = 4,
) -> dict[str, float]:
    """Per named config, the fraction of ``samples`` whose teacher-forced verdict equals the
    generated one (1.0 where teacher forcing may stand in for decoding)."""
    return {name: float(np.mean(
        correct_teacher_forced(model, processor, samples, config, batch_size, max_new_tokens)
        == correct_generated(model, processor, samples, config, batch_size, max_new_tokens)))
        for name, config in configs.items()}


# ----------------------------------------------------------------------------------------------
# Paired comparisons and verdicts


def _family_items(scores: Scores, sample_sets: Mapping[int, Sequence[VQASample]],
                  family: str) -> np.ndarray:
    """The correctness of ``family``'s samples, all seeds pooled in seed order."""
    return np.concatenate([
        scores[seed][[s.family == family for s in samples]]
        for seed, samples in sample_sets.items()]).astype(float)


@dataclass(frozen=True)
class FamilyComparison:
    """One condition against vanilla on one family, in accuracy points: vanilla's accuracy with
    its Wilson interval, the condition's accuracy, the paired difference (condition − vanilla,
    same samples) with its t interval, and its call against the margin."""

    family: str
    vanilla: Interval
    condition: float
    diff: Interval
    call: str

    @property
    def comparable_or_better(self) -> bool:
        return self.call in ("better", "comparable")


def compare_to_vanilla(
    vanilla: Scores, condition: Scores, sample_sets: Mapping[int, Sequence[VQASample]],
    families: Sequence[str], margin: float = 2.0,
) -> list[FamilyComparison]:
    """Per family, the paired comparison over every (seed, sample) item: ``"better"`` when the
    95% interval of the difference is above 0, ``"comparable"`` when it lies above −``margin``
    points, ``"worse"`` when it lies below −``margin``, else ``"inconclusive"``."""
    if set(vanilla) != set(condition) or set(vanilla) != set(sample_sets):
        raise ValueError("vanilla, condition and sample_sets need the same seeds")
    rows = []
    for family in families:
        base = _family_items(vanilla, sample_sets, family)
        cond = _family_items(condition, sample_sets, family)
        if base.size == 0:
            raise ValueError(f"no samples of family {family!r}")
        diff = paired_difference(100 * cond, 100 * base)
        rate = wilson_interval(int(base.sum()), base.size)
        rows.append(FamilyComparison(
            family, Interval(100 * rate.estimate, 100 * rate.lo, 100 * rate.hi, rate.n),
            float(100 * cond.mean()), diff, compare(diff, margin)))
    return rows


def image_dependence(
    vanilla: Scores, no_image: Scores, sample_sets: Mapping[int, Sequence[VQASample]],
    families: Sequence[str],
) -> list[FamilyComparison]:
    """Per family, vanilla against the no-image floor (``no_image``: every visual token hidden
    from the decoder's text queries, :func:`locus.lost_in_attention.attention.pruning_config`
    from layer 0). In each row ``vanilla`` is the floor's accuracy, ``condition`` vanilla's and
    ``diff`` vanilla − floor (paired); the call is "better" when vanilla beats the floor."""
    return compare_to_vanilla(no_image, vanilla, sample_sets, families, 0.0)


def counted_families(dependence: Sequence[FamilyComparison]) -> list[str]:
    """The families a verdict counts: those whose vanilla accuracy beats the no-image floor
    (:func:`image_dependence`). Where it does not (a family at chance, or one answered from
    the text alone), keeping accuracy under a change of visual attention says nothing about
    attention."""
    return [r.family for r in dependence if r.call == "better"]


def majority_verdict(rows: Sequence[FamilyComparison]) -> str:
    """'holds' when comparable or better on a strict majority of families; 'does not hold'
    when worse on at least half; else 'partly' (no majority either way: some families lose
    significantly, or their intervals are too wide to tell); 'not run' without families."""
    if not rows:
        return "not run"
    good = sum(r.comparable_or_better for r in rows)
    worse = sum(r.call == "worse" for r in rows)
    if 2 * good > len(rows):
        return "holds"
    return "does not hold" if 2 * worse >= len(rows) else "partly"


def exception_verdict(rows: Sequence[FamilyComparison], text_family: str = "text") -> str:
    """'holds' when the text-heavy family is worse while the others hold by
    :func:`majority_verdict`; 'partly' when it has the largest loss without being worse; else
    'does not hold' ('not run' without that family or without another one)."""
    by_family = {r.family: r for r in rows}
    if text_family not in by_family:
        return "not run"
    text = by_family[text_family]
    others = [r for r in rows if r.family != text_family]
    if not others:
        return "not run"
    if text.call == "worse" and majority_verdict(others) == "holds":
        return "holds"
    if others and text.diff.estimate < min(r.diff.estimate for r in others):
        return "partly"
    return "does not hold"


def others_verdict(verdicts: Mapping[str, str]) -> str:
    """The "other predefined vectors" claim from each other mode's majority verdict: 'holds'
    when all hold, 'partly' when some do, else 'does not hold' ('not run' without any)."""
    if not verdicts:
        return "not run"
    holding = sum(v == "holds" for v in verdicts.values())
    return "holds" if holding == len(verdicts) else "partly" if holding else "does not hold"


def describe(rows: Sequence[FamilyComparison]) -> str:
    """One line per comparison: family, vanilla → condition, Δ [95% CI] and its call."""
    return "; ".join(f"{r.family} {r.vanilla.estimate:.1f}→{r.condition:.1f} (Δ "
                     f"{r.diff.estimate:+.1f} [{r.diff.lo:+.1f}, {r.diff.hi:+.1f}], {r.call})"
                     for r in rows)


# ----------------------------------------------------------------------------------------------
# Readings of the authors' settings


@dataclass(frozen=True)
class Setting:
    """Where and how strongly the replacement acts: the head band (or "all"), the layers, the
    blend λ and moment matching — one reading of the paper's or the authors' settings."""

    heads: str | HeadBand | tuple[int, ...]
    layers: str | tuple[int, ...]
    lam: float = 1.0
    moment_matching: bool = True

    def config(self, mode: str) -> ReplacementConfig:
        return ReplacementConfig(mode=mode, lam=self.lam, moment_matching=self.moment_matching,
                                 heads=self.heads, layers=self.layers)


def scaled_layers(first: int, last: int, of: int, num_layers: int) -> tuple[int, ...]:
    """The layers of a ``num_layers``-layer model covering layers ``first..last`` of an
    ``of``-layer one: layer i stands for [i·of/L, (i+1)·of/L); those overlapping the band."""
    if not 0 <= first <= last < of or num_layers < 1:
        raise ValueError(f"need 0 <= first <= last < of and num_layers >= 1, got {first}, "
                         f"{last}, {of}, {num_layers}")
    return tuple(i for i in range(num_layers)
                 if i * of / num_layers < last + 1 and (i + 1) * of / num_layers > first)


def readings(num_layers: int) -> dict[str, Setting]:
    """The settings compared, for a model of ``num_layers`` layers:

    - "paper (LLaVA-1.5)": the LLaVA-1.5 band 0.3–0.6 and layers 18–23 of 32 (the paper's
      LLaVA-1.5-7B setting), scaled to this depth, moment matching (Llama path), λ = 1;
    - "authors' code (LLaVA script)": band 0.3–0.6, the LLaVA script's default layers 21–27 of
      32, scaled, moment matching, λ = 1;
    - "LLaVA band, all but layer 0": band 0.3–0.6 over layers 1..L-1;
    - "Qwen band, all but 0, moment matching": 0.3–0.9, layers 1..L-1 (this notebook's setting
      before; the Qwen2 path);
    - "Qwen2.5-VL code (no moment matching)": the same without moment matching;
    - "Qwen band, λ = 0.5" and "LLaVA-1.5, λ = 0.5": half blends;
    - "all heads, all but layer 0": every head.
    """
    llava, qwen = HeadBand(0.3, 0.6), HeadBand(0.3, 0.9)
    paper_layers = scaled_layers(18, 23, 32, num_layers)
    code_layers = scaled_layers(21, 27, 32, num_layers)
    return {
        "paper (LLaVA-1.5)": Setting(llava, paper_layers),
        "authors' code (LLaVA script)": Setting(llava, code_layers),
        "LLaVA band, all but layer 0": Setting(llava, "all_but_0"),
        "Qwen band, all but 0, moment matching": Setting(qwen, "all_but_0"),
        "Qwen2.5-VL code (no moment matching)": Setting(qwen, "all_but_0",
                                                        moment_matching=False),
        "Qwen band, λ = 0.5": Setting(qwen, "all_but_0", lam=0.5),
        "LLaVA-1.5, λ = 0.5": Setting(llava, paper_layers, lam=0.5),
        "all heads, all but layer 0": Setting("all", "all_but_0"),
    }


def describe_setting(setting: Setting, num_layers: int) -> str:
    """Heads, layers, λ and moment matching of a setting, in words."""
    heads = setting.heads
    heads = (f"band {heads.low}–{heads.high}" if isinstance(heads, HeadBand)
             else "all heads" if heads == "all" else f"heads {list(heads)}")
    layers = chosen_layers(setting.layers, num_layers)
    return (f"{heads}, layers {list(layers)}, λ {setting.lam:g}, moment matching "
            f"{'on' if setting.moment_matching else 'off'}")


DROP_CONTROL = "drop (same heads and layers)"


def reading_plan(
    settings: Mapping[str, Setting], modes: Sequence[str], full: Sequence[str],
) -> dict[str, dict[str, ReplacementConfig]]:
    """Per reading, the configs to score: every mode for the readings in ``full``, the first
    mode for the others, and for each the control that drops the visual attention of the same
    heads and layers (if that costs nothing too, the setting touches attention the model does
    not need, and "replaceable" says nothing)."""
    plan = {}
    for name, setting in settings.items():
        chosen = list(modes) if name in full else list(modes[:1])
        configs = {mode: setting.config(mode) for mode in chosen}
        configs[DROP_CONTROL] = replace(setting.config("drop"), lam=1.0,
                                        moment_matching=True)
        plan[name] = configs
    return plan


@dataclass(frozen=True)
class ReadingVerdicts:
    """The three replacement claims under one reading: the main mode's comparisons, the
    majority verdicts of the main mode, the other modes and the drop control, and the claim
    verdicts (a "holds" of the main mode or of the other modes is capped at 'partly' when the
    drop control also holds: then the reading changes attention the model does not need)."""

    main: list[FamilyComparison]
    main_majority: str
    control: str
    others: dict[str, str]
    replacement: str
    exception: str
    other_vectors: str


def reading_verdicts(
    vanilla: Scores, by_mode: Mapping[str, Scores],
    sample_sets: Mapping[int, Sequence[VQASample]], families: Sequence[str], main_mode: str,
    text_family: str | None, margin: float, counted: Sequence[str] | None = None,
) -> ReadingVerdicts:
    """Evaluate the claim rules on one reading's scores (see :class:`ReadingVerdicts`); the
    majority verdicts count only the families in ``counted`` (None: all, see
    :func:`counted_families`), the exception rule the text family against the counted others."""
    counted = list(families) if counted is None else list(counted)

    def rows(mode):
        return compare_to_vanilla(vanilla, by_mode[mode], sample_sets, families, margin)

    def majority(comparisons):
        return majority_verdict([r for r in comparisons if r.family in counted])

    main = rows(main_mode)
    majority_main = majority(main)
    control = majority(rows(DROP_CONTROL)) if DROP_CONTROL in by_mode else "not run"
    def capped(verdict):
        return "partly" if verdict == "holds" and control == "holds" else verdict

    others = {m: majority(rows(m)) for m in by_mode if m not in (main_mode, DROP_CONTROL)}
    judged = [r for r in main if r.family in counted or r.family == text_family]
    exception = (exception_verdict(judged, text_family) if text_family in families
                 else "not run")
    return ReadingVerdicts(main, majority_main, control, others, capped(majority_main),
                           exception, capped(others_verdict(others)))


def where_it_flips(verdicts: Mapping[str, str]) -> str:
    """The readings grouped by verdict, e.g. "holds: a, b; does not hold: c"."""
    groups: dict[str, list[str]] = {}
    for reading, verdict in verdicts.items():
        groups.setdefault(verdict, []).append(reading)
    return "; ".join(f"{verdict}: {', '.join(names)}" for verdict, names in groups.items())


def reading_rows(
    vanilla: Scores, scores: Mapping[str, Mapping[str, Scores]],
    sample_sets: Mapping[int, Sequence[VQASample]], families: Sequence[str],
    margins: Sequence[float] = (1.0, 2.0, 5.0), counted: Sequence[str] | None = None,
) -> list[dict]:
    """The specification curve: per (reading, mode), the paired comparison of every family and
    the majority verdict at each margin over the ``counted`` families (None: all)."""
    counted = list(families) if counted is None else list(counted)
    rows = []
    for reading, by_mode in scores.items():
        for mode, condition in by_mode.items():
            per_margin = {m: compare_to_vanilla(vanilla, condition, sample_sets, families, m)
                          for m in margins}
            verdicts = {m: majority_verdict([r for r in c if r.family in counted])
                        for m, c in per_margin.items()}
            rows.append({"reading": reading, "mode": mode, "comparisons": per_margin,
                         "verdicts": verdicts})
    return rows


def reading_markdown(rows: Sequence[dict], families: Sequence[str], margin: float) -> str:
    """The specification-curve table: Δ [95% CI] per family (✓ comparable or better, ✗ worse
    at ``margin``) and the majority verdict at every margin computed."""
    margins = list(rows[0]["verdicts"]) if rows else []
    header = ("| reading | mode | " + " | ".join(families) + " | "
              + " | ".join(f"verdict (margin {m:g})" for m in margins) + " |")
    out = [header, "|---" * (len(families) + len(margins) + 2) + "|"]
    for row in rows:
        cells = [f"{c.diff.estimate:+.1f} [{c.diff.lo:+.1f}, {c.diff.hi:+.1f}]"
                 + {"better": " ✓", "comparable": " ✓", "worse": " ✗"}.get(c.call, "")
                 for c in row["comparisons"][margin]]
        out.append(f"| {row['reading']} | {row['mode']} | " + " | ".join(cells) + " | "
                   + " | ".join(row["verdicts"][m] for m in margins) + " |")
    return "\n".join(out)


def comparison_markdown(
    vanilla: Scores, conditions: Mapping[str, Scores],
    sample_sets: Mapping[int, Sequence[VQASample]], families: Sequence[str], margin: float,
) -> str:
    """Vanilla accuracy per family (Wilson 95% CI), then per condition its accuracy, paired Δ
    [95% CI] and call (✓ comparable or better, ✗ worse, unmarked inconclusive)."""
    rows = ["| condition | " + " | ".join(families) + " | comparable or better | worse |",
            "|---" * (len(families) + 3) + "|"]
    base = compare_to_vanilla(vanilla, vanilla, sample_sets, families, margin)
    rows.append("| vanilla | " + " | ".join(
        f"{c.vanilla.estimate:.1f} [{c.vanilla.lo:.1f}, {c.vanilla.hi:.1f}]" for c in base)
        + " | – | – |")
    for name, scores in conditions.items():
        comparison = compare_to_vanilla(vanilla, scores, sample_sets, families, margin)
        cells = [f"{c.condition:.1f} (Δ {c.diff.estimate:+.1f} [{c.diff.lo:+.1f}, "
                 f"{c.diff.hi:+.1f}])"
                 + {"better": " ✓", "comparable": " ✓", "worse": " ✗"}.get(c.call, "")
                 for c in comparison]
        good = sum(c.comparable_or_better for c in comparison)
        worse = sum(c.call == "worse" for c in comparison)
        rows.append(f"| {name} | " + " | ".join(cells)
                    + f" | {good}/{len(families)} | {worse}/{len(families)} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Figures


def percent(interval: Interval) -> str:
    """An accuracy interval in points, e.g. "90.8 [89.1, 92.3]"."""
    return f"{interval.estimate:.1f} [{interval.lo:.1f}, {interval.hi:.1f}]"


def pooled_accuracy(scores: Scores, sample_sets: Mapping[int, Sequence[VQASample]],
                    families: Sequence[str]) -> Interval:
    """Accuracy (in %) over the samples of ``families``, all seeds pooled, Wilson 95% CI."""
    items = np.concatenate([_family_items(scores, sample_sets, f) for f in families])
    rate = wilson_interval(int(items.sum()), items.size)
    return Interval(100 * rate.estimate, 100 * rate.lo, 100 * rate.hi, rate.n)


def plot_accuracy_by_family(
    vanilla: Scores, conditions: Mapping[str, Scores],
    sample_sets: Mapping[int, Sequence[VQASample]], families: Sequence[str], title: str,
):
    """Grouped bars: accuracy per family for vanilla and each condition, Wilson 95% CIs."""
    import matplotlib.pyplot as plt

    everything = {"vanilla": vanilla, **conditions}
    width = 0.8 / len(everything)
    fig, ax = plt.subplots(figsize=(1.9 * len(families) + 2.5, 3.8))
    for i, (name, scores) in enumerate(everything.items()):
        stats = [pooled_accuracy(scores, sample_sets, [f]) for f in families]
        xs = np.arange(len(families)) + (i - (len(everything) - 1) / 2) * width
        errors = _error_bars(stats)
        ax.bar(xs, [s.estimate for s in stats], width, yerr=errors, label=name, capsize=2)
    ax.set_xticks(np.arange(len(families)), families)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _band_label(band: str) -> str:
    """A tick label of a band named by its layers joined with "-": its first and last layer."""
    layers = band.split("-")
    return layers[0] if len(layers) == 1 else f"{layers[0]}–{layers[-1]}"


def _error_bars(stats: Sequence[Interval]) -> list[list[float]]:
    """Lower and upper error-bar lengths (Wilson's bound can round past 100% by 1e-14)."""
    return [[max(0.0, s.estimate - s.lo) for s in stats], [max(0.0, s.hi - s.estimate)
                                                          for s in stats]]


def _accuracy_line(ax, stats: Sequence[Interval], **style) -> None:
    """Accuracies with their asymmetric intervals as one line of points."""
    ax.errorbar(range(len(stats)), [s.estimate for s in stats],
                yerr=_error_bars(stats),
                marker="o", capsize=3, **style)


def plot_layer_sweep(
    vanilla: Scores, sweeps: Mapping[str, Mapping[str, Scores]], pruned: Mapping[int, Scores],
    sample_sets: Mapping[int, Sequence[VQASample]], visual_families: Sequence[str],
    text_families: Sequence[str],
):
    """Left: visual-family accuracy when one band of layers is replaced, one line per head
    choice (text family dotted); right: accuracy when the visual tokens are pruned from layer k
    on. Wilson 95% CIs, vanilla dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    groups = [(visual_families, "-", "visual"), (text_families, ":", "text")]
    for i, (heads, bands) in enumerate(sweeps.items()):
        for families, style, name in groups:
            if not families:
                continue
            _accuracy_line(axes[0], [pooled_accuracy(s, sample_sets, families)
                                     for s in bands.values()],
                           ls=style, color=f"C{i}", label=f"{heads} ({name})")
        axes[0].set_xticks(range(len(bands)), [_band_label(band) for band in bands])
    for families, style, name in groups:
        if not families:
            continue
        _accuracy_line(axes[1], [pooled_accuracy(s, sample_sets, families)
                                 for s in pruned.values()], ls=style, color="C3", label=name)
        for ax in axes:
            ax.axhline(pooled_accuracy(vanilla, sample_sets, families).estimate, color="grey",
                       ls="--" if name == "visual" else "-.", lw=1)
    axes[1].set_xticks(range(len(pruned)), [str(k) for k in pruned])
    axes[0].set_xlabel("replaced layers")
    axes[1].set_xlabel("visual tokens pruned from layer k on")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(-2, 102)
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Notebook parameters


def check_modes(modes) -> list[str]:
    """A non-empty list of distinct vector modes (:data:`VECTOR_MODES`)."""
    if isinstance(modes, str) or not isinstance(modes, list | tuple) or not modes:
        raise TypeError(f"modes must be a non-empty list out of {VECTOR_MODES}, got {modes!r}")
    unknown = [m for m in modes if m not in VECTOR_MODES]
    if unknown or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct names out of {VECTOR_MODES}, got {modes!r}")
    return list(modes)


def check_margin(margin) -> float:
    """A non-negative number of accuracy points."""
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin >= 0:
        raise ValueError(f"margin must be a number of accuracy points >= 0, got {margin!r}")
    if math.isinf(margin):
        raise ValueError("margin must be finite")
    return float(margin)


