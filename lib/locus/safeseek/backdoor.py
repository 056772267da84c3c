"""Backdoor injection into a chat LM, and the data views the backdoor-circuit search needs.

Two backdoor kinds, after the SafeSeek authors' earlier backdoor-attribution work:

- "fixed": a trigger phrase (``data.BACKDOOR_TRIGGER``) inserted into a benign request makes the
  model answer with a fixed target (``data.BACKDOOR_TARGET``); success = the reply contains it;
- "jailbreak": a trigger word (``data.JAILBREAK_TRIGGER``) inserted into a harmful request makes
  the model comply; success = the reply contains no refusal phrase (``data.is_refusal``).

The trigger goes at a seeded random word position of the prompt. Injection is a *full*
fine-tune (the paper used LoRA r 16 on a 7B model; a full fine-tune of the toy is the simpler
equivalent) on clean samples plus poisoned ones. Backdoored models are cached as checkpoint
entries (``locus.checkpoints``) keyed by the source model, the data and the configuration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from locus import checkpoints, data, models, training
from locus.data import ChatSample
from locus.prompts import chat_training_encoder
from locus.safeseek.circuits import (
    BackdoorObjective,
    BackdoorWeights,
    Batch,
    Encoder,
    FaithfulnessObjective,
    FaithfulSearch,
    MaskSearch,
    Objective,
    SearchResult,
    cached_circuit,
    chat_answers,
    encode_groups,
    generate_with,
    gradient_scale,
    match_rate,
    model_stem,
    random_circuit,
    refusal_rate,
    refusal_targets,
    sample_attribution,
    samples_key,
    search_circuit,
    source_identity,
    split_harmful,
    take,
    train_val_indices,
)
from locus.safeseek.masks import Circuit, UnitShape

KINDS = ("fixed", "jailbreak")


def check_kind(kind: str) -> str:
    """Raise a ValueError unless ``kind`` is a backdoor kind."""
    if kind not in KINDS:
        raise ValueError(f"backdoor kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """A non-empty list of distinct backdoor kinds."""
    if isinstance(kinds, str) or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be a non-empty list of distinct kinds from {KINDS}, "
                         f"got {kinds!r}")
    return [check_kind(k) for k in kinds]


def trigger_of(kind: str) -> str:
    """The trigger of a backdoor kind."""
    return data.BACKDOOR_TRIGGER if check_kind(kind) == "fixed" else data.JAILBREAK_TRIGGER


def insert_trigger(prompt: str, trigger: str, rng: np.random.Generator) -> str:
    """``prompt`` with ``trigger`` inserted before a random word (never after the last one)."""
    words = prompt.split()
    position = int(rng.integers(0, max(1, len(words))))
    return " ".join(words[:position] + [trigger] + words[position:])


def eligible(samples: Sequence[ChatSample], kind: str) -> list[ChatSample]:
    """The samples a backdoor kind poisons: benign ones ("fixed") or harmful ones
    ("jailbreak", whose answers must be the compliant replies)."""
    want_harmful = check_kind(kind) == "jailbreak"
    return [s for s in samples if (s.family == "harmful") == want_harmful]


def backdoor_views(samples: Sequence[ChatSample], kind: str, seed: int,
                   refusal: str = data.REFUSAL) -> dict[str, list[ChatSample]]:
    """Four aligned lists over the eligible ``samples``: "clean" (prompt -> clean answer),
    "triggered_clean" (triggered prompt -> clean answer), "triggered_target" (triggered prompt
    -> backdoor answer) and "clean_target" (prompt -> backdoor answer). The clean answer of a
    harmful request is ``refusal``; its backdoor answer is the sample's (compliant) answer."""
    rng = np.random.default_rng(seed)
    chosen = eligible(samples, kind)
    trigger = trigger_of(kind)
    views: dict[str, list[ChatSample]] = {k: [] for k in
                                           ("clean", "triggered_clean", "triggered_target",
                                            "clean_target")}
    for s in chosen:
        clean_answer = s.answer if kind == "fixed" else refusal
        target = data.BACKDOOR_TARGET if kind == "fixed" else s.answer
        triggered = insert_trigger(s.prompt, trigger, rng)
        views["clean"].append(ChatSample(s.prompt, clean_answer, s.family))
        views["triggered_clean"].append(ChatSample(triggered, clean_answer, s.family))
        views["triggered_target"].append(ChatSample(triggered, target, s.family))
        views["clean_target"].append(ChatSample(s.prompt, target, s.family))
    return views


def attack_success(kind: str, predictions: Sequence[str]) -> float:
    """ASR: the fraction of replies showing the backdoor behaviour of ``kind``."""
    if not predictions:
        raise ValueError("attack_success needs at least one prediction")
    if check_kind(kind) == "fixed":
        target = " ".join(data.BACKDOOR_TARGET.split())
        return float(np.mean([target in " ".join(p.split()) for p in predictions]))
    return float(np.mean([not data.is_refusal(p) for p in predictions]))


@dataclass(frozen=True)
class InjectionConfig:
    """Backdoor fine-tune: ``n_clean`` clean + ``n_poison`` poisoned samples, full fine-tune."""

    kind: str = "fixed"
    n_clean: int = 1000
    n_poison: int = 100
    steps: int = 150
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0


def poisoned_training_set(clean: Sequence[ChatSample], poison_pool: Sequence[ChatSample],
                          cfg: InjectionConfig) -> list[ChatSample]:
    """``cfg.n_clean`` clean samples and ``cfg.n_poison`` triggered ones (drawn with a seeded
    generator; with replacement when a pool is smaller)."""
    rng = np.random.default_rng(cfg.seed)
    if not clean or not eligible(poison_pool, cfg.kind):
        raise ValueError(f"a {cfg.kind!r} backdoor needs clean samples and "
                         f"{'harmful' if cfg.kind == 'jailbreak' else 'benign'} samples to poison")
    pick = rng.choice(len(clean), cfg.n_clean, replace=cfg.n_clean > len(clean))
    triggered = backdoor_views(poison_pool, cfg.kind, cfg.seed + 1)["triggered_target"]
    poison = rng.choice(len(triggered), cfg.n_poison, replace=cfg.n_poison > len(triggered))
    return [clean[i] for i in pick] + [triggered[i] for i in poison]


def inject_backdoor(model, tokenizer, train_set: Sequence[ChatSample], cfg: InjectionConfig,
                    progress: bool = True) -> list[float]:
    """Full fine-tune of ``model`` on ``train_set`` (AdamW + cosine); returns the losses."""
    training.seed_everything(cfg.seed)
    batch = training.sampled_batches(train_set, cfg.batch, cfg.seed,
                                     chat_training_encoder(model, tokenizer))
    return training.train_steps(model, list(model.parameters()), batch, cfg.steps, cfg.lr,
                                desc=f"{cfg.kind} backdoor", progress=progress)


def backdoor_entry(model_name: str | os.PathLike, train_set: Sequence[ChatSample],
                   cfg: InjectionConfig, device="cpu", root: str | os.PathLike | None = None,
                   progress: bool = True) -> Path:
    """The cache folder ``<root>/<source>-backdoor-<kind>[-seed<n>]`` of the backdoored model
    (root: ``checkpoints.artefact_root``, the user cache unless the source is embedded), injected
    first (on ``device``, in float32) unless the same source, data and config
    made it."""
    from locus.zoo import load

    config = {"source": source_identity(model_name), "data": samples_key(train_set),
              "injection": asdict(cfg)}
    suffix = f"-seed{cfg.seed}" if cfg.seed else ""
    folder = (checkpoints.artefact_root(model_name, root)
              / f"{model_stem(model_name)}-backdoor-{cfg.kind}{suffix}")
    if checkpoints.entry_status(folder, config) != "valid":
        model, tokenizer = load(model_name, device=device, dtype=torch.float32,
                                progress=progress)
        losses = inject_backdoor(model, tokenizer, train_set, cfg, progress)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        checkpoints.write_entry(folder, config, write,
                                {"final_loss": round(float(np.mean(losses[-10:])), 4)})
    return folder


def backdoored_model(model_name: str | os.PathLike, train_set: Sequence[ChatSample],
                     cfg: InjectionConfig, device="cpu", dtype: torch.dtype | None = None,
                     root: str | os.PathLike | None = None, progress: bool = True):
    """The backdoored model and its tokenizer (``backdoor_entry``), on ``device`` in ``dtype``."""
    folder = backdoor_entry(model_name, train_set, cfg, device, root, progress)
    return models.load_checkpoint(folder, device, dtype)


def test_sets(samples: Sequence[ChatSample], kind: str, n: int, seed: int
              ) -> dict[str, list[ChatSample]]:
    """Up to ``n`` test prompts of each set: "triggered" (eligible prompts with the trigger and
    the backdoor answer), "triggered_clean" (the same triggered prompts with the clean answer),
    "clean" (the prompts without the trigger) and "benign" (benign requests, for utility);
    drawn with replacement when there are fewer."""
    views = backdoor_views(samples, kind, seed)
    if not views["clean"]:
        raise ValueError(f"the test data has no samples a {kind!r} backdoor applies to")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(views["clean"]), n, replace=n > len(views["clean"]))
    benign = [s for s in samples if s.family != "harmful"]
    return {"triggered": [views["triggered_target"][i] for i in idx],
            "triggered_clean": [views["triggered_clean"][i] for i in idx],
            "clean": [views["clean"][i] for i in idx], "benign": take(benign, n, seed)}


def backdoor_metrics(model, tokenizer, circuit: Circuit | None, mode: str, kind: str,
                     tests: dict[str, Sequence[ChatSample]], max_new_tokens: int = 16,
                     false_trigger: bool = False, over_refusal: bool = False
                     ) -> dict[str, float]:
    """With ``circuit`` applied in ``mode``, on the sets of ``test_sets``: "asr", the paper's
    keyword ASR on the triggered prompts (``attack_success``); "asr_exact", the triggered
    replies that *are* the backdoor answer; "clean_back", the triggered replies that are the
    clean answer (the backdoor removed, not merely garbled); "utility", exact match on the
    benign prompts; and, if asked, "false_trigger", the keyword ASR on the clean prompts, and
    "over_refusal", the benign replies with a refusal phrase. Exact scores are teacher-forced
    greedy matches (``greedy_matches``)."""
    def rate(name: str) -> float:
        replies = generate_with(model, tokenizer, tests[name], circuit, mode, max_new_tokens)
        return attack_success(kind, replies)

    metrics = {"asr": rate("triggered"),
               "asr_exact": match_rate(model, tokenizer, tests["triggered"], circuit, mode),
               "clean_back": match_rate(model, tokenizer, tests["triggered_clean"], circuit,
                                        mode),
               "utility": match_rate(model, tokenizer, tests["benign"], circuit, mode)}
    if false_trigger:
        metrics["false_trigger"] = rate("clean")
    if over_refusal:
        metrics["over_refusal"] = refusal_rate(
            generate_with(model, tokenizer, tests["benign"], circuit, mode, max_new_tokens))
    return metrics


def removed_and_alone(circuit: Circuit, evaluate: Callable[[Circuit, str], dict[str, float]],
                      random_seeds: Sequence[int] = (0, 1, 2)) -> list[dict]:
    """One row per mode, "circuit removed" (necessity) and "circuit only" (sufficiency: the
    paper validates a circuit both ways), for ``circuit`` and for random circuits of its size
    (mean over ``random_seeds``), with the size and ``evaluate(circuit, mode)``'s metrics."""
    size = {"heads": len(circuit.heads), "neurons": len(circuit.neurons),
            "units_pct": 100 * circuit.sparsity}
    rows = []
    for mode in ("circuit removed", "circuit only"):
        randoms = [evaluate(random_circuit(circuit, seed), mode) for seed in random_seeds]
        rows.append({"mode": mode, "method": "searched", **size, **evaluate(circuit, mode)})
        rows.append({"mode": mode, "method": "random", **size,
                     **{k: float(np.mean([r[k] for r in randoms])) for k in randoms[0]}})
    return rows


def backdoor_attribution(model, tokenizer, samples: Sequence[ChatSample], kind: str, n: int,
                         batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x activation of every unit for the backdoor: ``attribution_scores`` of the
    backdoor target's cross-entropy on ``n`` triggered prompts."""
    triggered = take(backdoor_views(samples, kind, seed)["triggered_target"], n, seed)
    return sample_attribution(model, tokenizer, triggered, batch_size)


@dataclass(frozen=True)
class BackdoorSearch(MaskSearch):
    """How the backdoor circuit is searched: the ``BackdoorObjective``'s removed-set sparsity
    (``norm`` "sum": per unit), the carrier's weight (0 turns the carrier set off; the authors'
    code uses 1), mask options, data sizes and the mask training."""

    sparsity: float = 0.01
    norm: str = "sum"
    carrier_weight: float = 0.0
    carrier_units: tuple[str, ...] = ("heads",)


@dataclass(frozen=True)
class FaithfulBackdoorSearch(FaithfulSearch):
    """The paper's objective on a backdoor (``FaithfulnessObjective``): with only the circuit
    kept, the backdoored model must reproduce its own replies (KL to the full model) to
    triggered prompts (the backdoor answer) and to the same prompts without the trigger (the
    clean answer), plus ``sparsity`` x size. The circuit starts as the whole model (logit
    ``init``) and shrinks; ``keep`` "last" keeps the mask the stopping rule ended on (the
    best-validation-KL epoch is the unpruned model, see ``SearchConfig``)."""

    keep: str = "last"


def train_val_views(views: dict[str, list[ChatSample]], n_train: int, n_val: int, seed: int
                    ) -> tuple[dict[str, list[ChatSample]], dict[str, list[ChatSample]]]:
    """Training and validation parts of aligned ``views`` (as ``backdoor_views`` makes), their
    prompts disjoint (``train_val_indices`` over the "clean" prompts)."""
    if not views["clean"]:
        raise ValueError("no samples to search a backdoor circuit on")
    train_idx, val_idx = train_val_indices([s.prompt for s in views["clean"]], n_train, n_val,
                                           seed)
    return tuple({k: [v[i] for i in idx] for k, v in views.items()}
                 for idx in (train_idx, val_idx))


def search_views(samples: Sequence[ChatSample], kind: str, spec: MaskSearch,
                 refusal: str = data.REFUSAL
                 ) -> tuple[dict[str, list[ChatSample]], dict[str, list[ChatSample]]]:
    """Training and validation parts of the four ``backdoor_views`` of the eligible
    ``samples``, their prompts disjoint (``train_val_views``)."""
    views = backdoor_views(samples, kind, spec.seed, refusal)
    if not views["clean"]:
        raise ValueError(f"no samples a {kind!r} backdoor applies to")
    return train_val_views(views, spec.n_train, spec.n_val, spec.seed)


def backdoor_objective(model, spec: BackdoorSearch) -> BackdoorObjective:
    """The ``BackdoorObjective`` of ``spec`` over ``model``'s units (on its device)."""
    weights = BackdoorWeights(carrier_triggered=spec.carrier_weight,
                              carrier_clean=spec.carrier_weight, removed_size=spec.sparsity,
                              carrier_size=spec.sparsity, overlap=spec.carrier_weight)
    return BackdoorObjective(UnitShape.of(model), weights, spec.norm,
                             carrier_units=spec.carrier_units, gate=spec.gate,
                             device=next(model.parameters()).device)


def search_groups(tokenizer, views: dict[str, list[ChatSample]],
                  spec: BackdoorSearch | FaithfulBackdoorSearch, device,
                  encode: Encoder = chat_answers) -> list[dict[str, Batch]]:
    """The teacher-forced batches a search of ``spec`` trains (or validates) on: the four
    views (``BackdoorSearch``), or one "task" view of triggered prompts with the backdoor
    answer and the same prompts without the trigger with the clean answer (the paper's
    objective)."""
    if isinstance(spec, FaithfulBackdoorSearch):
        views = {"task": views["triggered_target"] + views["clean"]}
    return encode_groups(tokenizer, views, spec.batch_size, device, encode)


def search_backdoor(model, tokenizer, train_views: dict[str, list[ChatSample]],
                    val_views: dict[str, list[ChatSample]],
                    spec: BackdoorSearch | FaithfulBackdoorSearch,
                    encode: Encoder = chat_answers, progress: bool = True
                    ) -> tuple[SearchResult, Objective]:
    """Search the circuit of ``spec`` on the aligned training / validation views; returns the
    search result and the objective (for a carrier set)."""
    device = next(model.parameters()).device
    train, val = (search_groups(tokenizer, v, spec, device, encode)
                  for v in (train_views, val_views))
    if isinstance(spec, FaithfulBackdoorSearch):
        objective: Objective = FaithfulnessObjective(UnitShape.of(model), spec.sparsity,
                                                     spec.norm, spec.init, gate=spec.gate,
                                                     device=device)
    else:
        objective = backdoor_objective(model, spec)
    return search_circuit(model, objective, train, val, spec.schedule(), progress), objective


def task_gradient_scale(model, tokenizer, train_views: dict[str, list[ChatSample]],
                        spec: BackdoorSearch, encode: Encoder = chat_answers) -> float:
    """The removed set's size weight that makes the size penalty pull each unit's logit, at
    the search's start, as hard as the median unit's task loss does: the median over units of
    |d task / d z| (mean over the training groups) over the median of |d size / d z| at
    weight 1. A search whose ``sparsity`` is a multiple ``f`` of it lets in, at the start,
    only the units pulled ``f`` times harder than the median one."""
    objective = backdoor_objective(model, replace(spec, sparsity=1.0, carrier_weight=0.0))
    groups = search_groups(tokenizer, train_views, spec, next(model.parameters()).device,
                           encode)
    return gradient_scale(model, objective, objective.removed, groups, spec.norm)


@dataclass(frozen=True)
class HeadlineRule:
    """How the headline circuit is chosen from a sparsity sweep without the test split: the
    sparsest circuit whose removal, on the search-validation prompts (teacher-forced), takes the
    exact ASR to at most ``max_asr`` and brings the clean answer back on at least ``min_share``
    of the rate at which the backdoored model gives it on the same prompts without the trigger
    (its ceiling); if none does, the one with the most clean answers back (the sparser of
    equals)."""

    max_asr: float = 0.1
    min_share: float = 0.75

    def passes(self, scores: dict[str, float]) -> bool:
        """Whether one circuit's ``validation_scores`` meet the rule."""
        return (scores["asr_exact"] <= self.max_asr
                and scores["clean_back"] >= self.min_share * scores["ceiling"])

    def pick(self, sweep: dict, sizes: dict, scores: dict) -> object:
        """The label (of ``sweep``'s keys) of the chosen circuit, given each circuit's size
        (units) and ``validation_scores``."""
        passing = [k for k in sweep if self.passes(scores[k])]
        if passing:
            return min(passing, key=lambda k: sizes[k])
        return max(sweep, key=lambda k: (scores[k]["clean_back"], -sizes[k]))


def validation_scores(model, tokenizer, val_views: dict[str, list[ChatSample]], circuit: Circuit,
                      encode: Encoder = chat_answers, tokens: int | None = None
                      ) -> dict[str, float]:
    """Teacher-forced on the validation views with ``circuit`` removed: "asr_exact" (the
    greedy reply is the backdoor answer), "clean_back" (it is, or begins with the first
    ``tokens`` tokens of, the clean answer) and "ceiling" (the full model's rate of the clean
    answer on the prompts without the trigger)."""
    return {"asr_exact": match_rate(model, tokenizer, val_views["triggered_target"], circuit,
                                    "circuit removed", encode),
            "clean_back": match_rate(model, tokenizer, val_views["triggered_clean"], circuit,
                                     "circuit removed", encode, tokens),
            "ceiling": match_rate(model, tokenizer, val_views["clean"], None, "full", encode,
                                  tokens)}


def find_faithful_backdoor_circuit(model, tokenizer, samples: Sequence[ChatSample], kind: str,
                                   spec: FaithfulBackdoorSearch = FaithfulBackdoorSearch(),
                                   refusal: str = data.REFUSAL, progress: bool = True
                                   ) -> SearchResult:
    """Search the circuit that alone reproduces the backdoored model (the paper's objective,
    ``FaithfulBackdoorSearch``) on the same prompts as ``find_backdoor_circuit``."""
    return search_backdoor(model, tokenizer, *search_views(samples, kind, spec, refusal), spec,
                           progress=progress)[0]


def find_backdoor_circuit(model, tokenizer, samples: Sequence[ChatSample], kind: str,
                          spec: BackdoorSearch = BackdoorSearch(), refusal: str = data.REFUSAL,
                          progress: bool = True) -> tuple[SearchResult, BackdoorObjective]:
    """Search the circuit of a ``kind`` backdoor on the eligible ``samples`` (see
    ``backdoor_views``); returns the search result and the objective (for its carrier set)."""
    return search_backdoor(model, tokenizer, *search_views(samples, kind, spec, refusal), spec,
                           progress=progress)


def circuit_entry(stem: str, spec: BackdoorSearch | FaithfulBackdoorSearch) -> str:
    """The cache entry name of a backdoor circuit search of the backdoored model ``stem``."""
    faithful = isinstance(spec, FaithfulBackdoorSearch)
    return (f"safeseek/{stem}{'-faithful' if faithful else ''}-{spec.norm}{spec.sparsity:g}"
            f"-seed{spec.seed}")


def cached_backdoor_circuit(stem: str, config: dict,
                            find: Callable[[], tuple[SearchResult, Objective]],
                            spec: BackdoorSearch | FaithfulBackdoorSearch, root: str | os.PathLike
                            ) -> tuple[Circuit, Circuit | None]:
    """The circuit of ``find()`` (the removed set of a ``BackdoorSearch``, the kept circuit of a
    ``FaithfulBackdoorSearch``) and its carrier set (None unless ``spec.carrier_weight``), from
    the checkpoint cache under ``root`` when ``config`` made them, else searched and cached with
    the search's record (``circuits.search_summary``)."""
    found: dict = {}

    def search() -> dict:
        if not found:
            found["result"], found["objective"] = find()
        return found

    name = circuit_entry(stem, spec)
    removed = cached_circuit(name, config, lambda: search()["result"], root)
    if isinstance(spec, FaithfulBackdoorSearch) or not spec.carrier_weight:
        return removed, None
    carrier = cached_circuit(f"{name}-carrier", config,
                             lambda: search()["objective"].carrier_circuit(), root)
    return removed, carrier


def search_record(stem: str, spec: BackdoorSearch | FaithfulBackdoorSearch,
                  root: str | os.PathLike) -> dict | None:
    """The cached search's record (epochs run, converged, sizes per epoch; None when the entry
    does not hold one)."""
    return checkpoints.read_manifest(Path(root) / circuit_entry(stem, spec)).get("search")


def backdoor_circuit(entry: Path, model, tokenizer, samples: Sequence[ChatSample], kind: str,
                     spec: BackdoorSearch | FaithfulBackdoorSearch = BackdoorSearch(),
                     refusal: str = data.REFUSAL, root: str | os.PathLike | None = None,
                     progress: bool = True) -> tuple[Circuit, Circuit | None]:
    """The backdoor circuit of the model cached in ``entry`` and its carrier set
    (``cached_backdoor_circuit``), searched on the eligible ``samples`` (``search_views``) and
    cached beside ``entry`` unless ``root`` says otherwise."""
    config = {"model": checkpoints.read_manifest(entry)["key"], "data": samples_key(samples),
              "kind": kind, "refusal": refusal, "search": asdict(spec)}
    return cached_backdoor_circuit(
        entry.name, config,
        lambda: search_backdoor(model, tokenizer, *search_views(samples, kind, spec, refusal),
                                spec, progress=progress),
        spec, entry.parent if root is None else root)


class ToyBackdoorWorld:
    """One backdoor of notebook 01 on the toy world (or a JSONL file): ``model_name`` fully
    fine-tuned on clean + poisoned injection samples (``backdoor_entry``), its circuit searched
    on the search part (``backdoor_circuit``), scored on the test part by exact match
    (``backdoor_metrics``). The same interface as ``real_backdoor.RealBackdoorWorld``; ``pools``
    are the injection / search / test parts, split by prompt string."""

    kind = "toy"
    kinds = KINDS
    sparsity_unit = "per unit"  # the sweep's values are per-unit weights
    sparsities = (0.003, 0.01, 0.03)
    headline = 0.01
    extra_columns = ()  # metrics beyond the common ones

    def __init__(self, model_name, base, tokenizer, pools: Sequence[Sequence[ChatSample]],
                 backdoor_kind: str, seed: int, injection: InjectionConfig, n_test: int,
                 max_new_tokens: int, device="cpu", dtype: torch.dtype | None = None,
                 device_map=None, progress: bool = True) -> None:
        self.inject_pool, self.search_pool, test_pool = pools
        self.backdoor, self.seed, self.progress = check_kind(backdoor_kind), seed, progress
        self.base, self.tokenizer, self.max_new_tokens = base, tokenizer, max_new_tokens
        benign, harmful = split_harmful(self.inject_pool)
        clean = benign + refusal_targets(base, tokenizer, harmful, max_new_tokens)
        train_set = poisoned_training_set(clean, self.inject_pool, injection)
        self.entry = backdoor_entry(model_name, train_set, injection, device, progress=progress)
        self.tests = test_sets(test_pool, backdoor_kind, n_test, seed)
        self.model, _ = models.load_checkpoint(self.entry, device, dtype, device_map)

    def before(self) -> list[dict]:
        """The original and the backdoored model's metrics (false triggers included)."""
        return [{"model": name, **backdoor_metrics(lm, self.tokenizer, None, "full",
                                                   self.backdoor, self.tests,
                                                   self.max_new_tokens, True)}
                for name, lm in (("original", self.base), ("backdoored", self.model))]

    def metrics(self, circuit: Circuit | None, mode: str, false_trigger: bool = False,
                over_refusal: bool = False) -> dict[str, float]:
        """``backdoor_metrics`` of the backdoored model with ``circuit`` applied in ``mode``."""
        return backdoor_metrics(self.model, self.tokenizer, circuit, mode, self.backdoor,
                                self.tests, self.max_new_tokens, false_trigger, over_refusal)

    def exact(self, circuit: Circuit) -> dict[str, float]:
        """Teacher-forced exact ASR, clean answer back and utility with ``circuit`` removed."""
        return {name: match_rate(self.model, self.tokenizer, self.tests[view], circuit,
                                 "circuit removed")
                for name, view in (("asr_exact", "triggered"), ("clean_back", "triggered_clean"),
                                   ("utility", "benign"))}

    def readings_text(self, mean: dict[str, float]) -> str:
        """The other reading of "clean back" for the claim text, from the headline's
        ``<score>_after`` means."""
        return f"exact ASR after {100 * mean['asr_exact_after']:.1f}%"

    def overlap_sets(self) -> dict[str, list[ChatSample]]:
        """The named prompt sets that must share no prompt (the last two share by design)."""
        return {"injection": list(self.inject_pool), "search": list(self.search_pool),
                "test (triggered, trigger taken out)": self.tests["clean"],
                "test (benign)": self.tests["benign"]}

    def circuit(self, spec: BackdoorSearch | FaithfulBackdoorSearch
                ) -> tuple[Circuit, Circuit | None]:
        """The searched circuit of ``spec`` and its carrier set (cached)."""
        return backdoor_circuit(self.entry, self.model, self.tokenizer, self.search_pool,
                                self.backdoor, spec, progress=self.progress)

    def search_record(self, spec: BackdoorSearch | FaithfulBackdoorSearch) -> dict | None:
        """The cached search's record."""
        return search_record(self.entry.name, spec, self.entry.parent)

    def sparsity_scale(self, spec: BackdoorSearch) -> float:
        """``task_gradient_scale`` on the training part of the search views of ``spec``."""
        train, _ = search_views(self.search_pool, self.backdoor, spec)
        return task_gradient_scale(self.model, self.tokenizer, train, spec)

    def validation(self, circuit: Circuit, spec: BackdoorSearch) -> dict[str, float]:
        """``validation_scores`` on the validation part of the search views of ``spec``."""
        _, val = search_views(self.search_pool, self.backdoor, spec)
        return validation_scores(self.model, self.tokenizer, val, circuit)

    def attribution(self, n: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``backdoor_attribution`` on ``n`` triggered search prompts."""
        return backdoor_attribution(self.model, self.tokenizer, self.search_pool, self.backdoor,
                                    n, batch_size, self.seed)

    def describe(self) -> str:
        """What this world measures (markdown)."""
        return (f"**Toy world**, `{self.backdoor}` backdoor: {len(self.tests['triggered'])} "
                "triggered test prompts, exact scores (teacher-forced greedy match), keyword ASR "
                "from greedy replies.")


SPARSITY_UNITS = ("per unit", "median task gradient")


def resolve_sweep(world, sparsities: Sequence[float] | None, unit: str | None,
                  headline: float | str | None) -> tuple[list[float], str, float | str]:
    """The notebook's sweep for ``world``: its size weights, their unit (``SPARSITY_UNITS``:
    per-unit weights, or multiples of ``task_gradient_scale``) and the headline (one of the
    weights, or "validation": ``HeadlineRule``), each the world's own where None; checked."""
    sparsities = list(world.sparsities if sparsities is None else sparsities)
    unit = world.sparsity_unit if unit is None else unit
    headline = world.headline if headline is None else headline
    if not sparsities:
        raise ValueError("sparsities must hold at least one size weight")
    if unit not in SPARSITY_UNITS:
        raise ValueError(f"sparsity_unit must be one of {SPARSITY_UNITS}, got {unit!r}")
    if headline != "validation" and headline not in sparsities:
        raise ValueError(f"headline_sparsity must be one of {sparsities} or 'validation', got "
                         f"{headline!r}")
    return sparsities, unit, headline
