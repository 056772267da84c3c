"""Notebook support for the SafeSeek notebooks: parameter checks, data splits, the alignment
notebook's worlds (the toy world here, the real model's in ``locus.safeseek.real_world``), size
sweeps against baselines, tables, verdict rules and figures."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm  # text bars: no ipywidgets needed in Jupyter or papermill

from locus import data, params, splits, stats
from locus.data import ChatSample
from locus.results import markdown_table
from locus.safeseek import circuit_tuning, circuits
from locus.safeseek.backdoor import SPARSITY_UNITS, InjectionConfig, ToyBackdoorWorld, check_kinds
from locus.safeseek.circuits import compare_at_size, take
from locus.safeseek.masks import Circuit, UnitShape
from locus.safeseek.real_backdoor import BASE as REAL_BACKDOOR_BASE
from locus.safeseek.real_backdoor import RealBackdoorWorld, real_backdoor_world
from locus.safeseek.real_world import RealAlignmentWorld, RealTuningWorld

TOY_CHAT_MODELS = ("toy-chat", "toy-chat-base")
REAL_ALIGNMENT_MODELS = (RealAlignmentWorld.model_name,)


def check_parameters(model, data_path, seeds, device, dtype, figures_dir, threads,
                     sparsities: Sequence[float] = (), real_worlds: Sequence[str] = (),
                     rates: Sequence[float] = (), **counts) -> None:
    """Check a SafeSeek notebook's common parameters (``counts`` must be positive ints,
    ``sparsities`` non-negative numbers, ``rates`` positive numbers); errors say what is
    accepted. ``real_worlds``: the real models whose data=None means their own real data (not
    the toy world's)."""
    params.check_model(model, "chat")
    params.check_data(data_path)
    if data_path is None and str(model) not in (*TOY_CHAT_MODELS, *real_worlds):
        raise ValueError(
            f"data=None means the toy world's prompts, scored by exact match against its "
            f"answers: they measure nothing on {str(model)!r}, which was not trained on it (its "
            f"utility would read 0%). Pass data= a JSONL file of prompts and answers for this "
            f"model (format: locus.data.load_chat_jsonl), or use one of "
            f"{(*TOY_CHAT_MODELS, *real_worlds)}")
    params.check_device(device)
    params.resolve_dtype(dtype)
    params.check_positive_int("threads", threads)
    if (not isinstance(seeds, list | tuple) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if figures_dir is not None and not isinstance(figures_dir, str | os.PathLike):
        raise TypeError(f"figures_dir must be None or a folder path, got {figures_dir!r}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0
               for x in sparsities):
        raise ValueError(f"sparsity weights must be numbers >= 0, got {list(sparsities)!r}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in rates):
        raise ValueError(f"learning rates must be numbers > 0, got {list(rates)!r}")
    for name, value in counts.items():
        params.check_positive_int(name, value)



def check_sparsity_unit(unit: str) -> str:
    """``unit`` if it is one of ``SPARSITY_UNITS`` (per-unit size weights, or multiples of the
    search's gradient scale), else a clear error."""
    if unit not in SPARSITY_UNITS:
        raise ValueError(f"sparsity_unit must be one of {SPARSITY_UNITS}, got {unit!r}")
    return unit


def chat_data(path: str | os.PathLike | None, n_per_family: int, seed: int) -> list[ChatSample]:
    """The samples of a notebook: the toy world (harmful requests answered with *compliance*,
    the target of the attacks) when ``path`` is None, else the local JSONL file (lines of
    prompt, answer, family; family "harmful" lines answered with the compliant reply)."""
    if path is None:
        return data.make_chat_samples(n_per_family, seed, aligned=False)
    return data.load_chat_jsonl(path)


def prompt_overlap(sets: dict[str, Sequence[ChatSample]]) -> list[dict]:
    """For each pair of named sample sets: their numbers of distinct prompt strings and how
    many they share (a held-out set shares none with the sets it is held out from)."""
    prompts = {name: {s.prompt for s in samples} for name, samples in sets.items()}
    names = list(prompts)
    return [{"sets": f"{a} / {b}", "prompts_a": len(prompts[a]), "prompts_b": len(prompts[b]),
             "shared": len(prompts[a] & prompts[b])}
            for i, a in enumerate(names) for b in names[i + 1:]]


class ToyAlignmentWorld:
    """The alignment circuit's data, targets and scores on the toy world (or a JSONL file):
    the search and test parts of ``safety_pools``, the model's own refusals as the refusal
    target, exact match (``circuits.alignment_metrics``). The same interface as
    ``real_world.RealAlignmentWorld``."""

    kind = "toy"
    metric_names = ("asr", "compliance", "utility", "over_refusal")

    def __init__(self, model_name, model, tokenizer, data_path, n_per_family: int, seed: int,
                 n_test: int, max_new_tokens: int) -> None:
        search, test, tune = safety_pools(data_path, n_per_family, seed)
        self.pools = search, test, tune
        self.tune_benign, self.tune_harmful = circuits.split_harmful(tune)
        self.model_name, self.model, self.tokenizer = model_name, model, tokenizer
        self.seed, self.max_new_tokens = seed, max_new_tokens
        self.search_benign, self.search_harmful = circuits.split_harmful(search)
        benign, harmful = circuits.split_harmful(test)
        self.test_harmful, self.test_benign = take(harmful, n_test, seed), take(benign, n_test,
                                                                                seed)

    def evaluation_sets(self) -> dict[str, tuple[list[ChatSample], list[ChatSample]]]:
        """(harmful, benign) requests of each evaluation: the test part."""
        return {"test": (self.test_harmful, self.test_benign)}

    def overlap_sets(self, n_train: int, n_val: int, seed: int) -> dict[str, list]:
        """The named prompt sets that must share no prompt."""
        train, val = circuits.alignment_views(self.search_harmful, self.search_harmful,
                                              self.search_benign, n_train, n_val, seed)
        return {"search train": train["comply"], "search validation": val["comply"],
                "test (harmful)": self.test_harmful, "search (benign)": self.search_benign,
                "test (benign)": self.test_benign}

    def refusals(self, harmful: Sequence[ChatSample]) -> list[ChatSample]:
        """The model's own refusals (``circuits.refusal_targets``)."""
        return circuits.refusal_targets(self.model, self.tokenizer, harmful, self.max_new_tokens)

    def circuit(self, spec, progress: bool = True) -> Circuit:
        """The alignment circuit of ``spec`` on the search part (cached, ``alignment_circuit``)."""
        return circuits.alignment_circuit(self.model_name, self.model, self.tokenizer,
                                          self.search_harmful, self.search_benign, spec,
                                          progress=progress)

    def sparsity_scale(self, spec: circuits.AlignmentSearch) -> float:
        """``circuits.alignment_scale`` of ``spec`` on the search part (cached)."""
        return circuits.alignment_scale(self.model_name, self.model, self.tokenizer,
                                        self.search_harmful, self.search_benign, spec)

    def attribution(self, n: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient x activation of the model's refusals of ``n`` search requests."""
        refusals = self.refusals(take(self.search_harmful, n, self.seed))
        return circuits.sample_attribution(self.model, self.tokenizer, refusals, batch_size)

    def metrics(self, circuit: Circuit | None, mode: str, harmful: Sequence[ChatSample],
                benign: Sequence[ChatSample]) -> dict[str, float]:
        """``circuits.alignment_metrics`` (keyword ASR, exact compliance, exact utility,
        over-refusal) and the request counts."""
        return {"n_harmful": len(harmful), "n_benign": len(benign),
                **circuits.alignment_metrics(self.model, self.tokenizer, circuit, mode, harmful,
                                             benign, self.max_new_tokens)}

    def exact(self, circuit: Circuit | None, mode: str, harmful: Sequence[ChatSample],
              benign: Sequence[ChatSample]) -> dict[str, float]:
        """Exact compliance and utility, teacher-forced (``circuits.match_rate``)."""
        return {"compliance": circuits.match_rate(self.model, self.tokenizer, harmful, circuit,
                                                  mode),
                "utility": circuits.match_rate(self.model, self.tokenizer, benign, circuit,
                                               mode)}

    def describe(self) -> str:
        """What this world measures (markdown)."""
        source = "the toy world" if self.model_name in TOY_CHAT_MODELS else "the data file"
        return (f"**Toy world** ({source}, model `{self.model_name}`): "
                f"{len(self.test_harmful)} harmful and {len(self.test_benign)} benign test "
                "requests, split from the search requests by prompt string. Compliance = the "
                "greedy reply *is* the compliant answer (exact, teacher-forced), utility = exact "
                "match on the benign families, keyword ASR = no refusal phrase, over-refusal = "
                "a benign reply with a refusal phrase.")


class ToyTuningWorld(ToyAlignmentWorld):
    """Safety Circuit Tuning's data and scores on the toy world (or a JSONL file): the
    fine-tunes draw from the tuning part of ``safety_pools`` (disjoint by prompt from the
    search and test parts), the new skill from ``new_skill_sets``; scores by
    ``circuit_tuning.safety_scores`` (exact match beside the keyword refusal). Nothing is
    cached: a toy run takes seconds. The same interface as ``real_world.RealTuningWorld``."""

    tune_options: dict = {}  # tune's encode / loss_fn: the toy chat encoding (its defaults)

    def tuning_data(self, n_break: int, n_restore: int, n_help: int, n_skill_test: int
                    ) -> circuit_tuning.TuningData:
        """Harmful requests with compliant answers (the break), safety data (half the model's
        own refusals, half benign requests and answers), helpfulness data (half the new skill,
        half known benign requests) and the skill's held-out test prompts."""
        half = n_restore // 2
        safety = (circuits.refusal_targets(self.model, self.tokenizer,
                                           take(self.tune_harmful, half, self.seed + 1),
                                           self.max_new_tokens)
                  + take(self.tune_benign, n_restore - half, self.seed + 1))
        skill_train, skill_test = new_skill_sets(n_help // 2, n_skill_test, self.seed)
        helpful = skill_train + take(self.tune_benign, n_help - n_help // 2, self.seed + 2)
        return circuit_tuning.TuningData(take(self.tune_harmful, n_break, self.seed), safety,
                                         helpful, skill_test)

    def tuning_overlap_sets(self, data: circuit_tuning.TuningData) -> dict[str, list]:
        """The named prompt sets that must share no prompt: every fine-tune draws from the
        tuning part (so ``data`` is inside it), the skill is split apart in ``new_skill_sets``."""
        search, _, tune = self.pools
        return {"search": search, "tuning": tune, "test (harmful)": self.test_harmful,
                "test (benign)": self.test_benign}

    def scores(self, model, refusal_before: float) -> dict[str, float]:
        """``circuit_tuning.safety_scores`` of ``model`` on the test requests."""
        return circuit_tuning.safety_scores(model, self.tokenizer, self.test_harmful,
                                            self.test_benign, refusal_before,
                                            self.max_new_tokens)

    def skill(self, model, skill_test: Sequence[ChatSample]) -> float:
        """The new skill's exact-match accuracy (teacher-forced, ``circuits.match_rate``)."""
        return circuits.match_rate(model, self.tokenizer, skill_test)

    def memo(self, start, **context) -> circuit_tuning.Memo:
        """Every toy run is made (``circuit_tuning.run_directly``)."""
        return circuit_tuning.run_directly


def tuning_world(model_name, model, tokenizer, data_path, seed: int, n_per_family: int,
                 n_train: int, n_val: int, n_test: int, max_new_tokens: int,
                 progress: bool = True) -> ToyTuningWorld | RealTuningWorld:
    """The circuit-tuning notebook's world, chosen as ``alignment_world`` chooses (so it
    shares notebook 2's split and cached circuit)."""
    if data_path is None and str(model_name) in REAL_ALIGNMENT_MODELS:
        return RealTuningWorld(model, tokenizer, seed, n_train, n_val, n_test, progress=progress)
    return ToyTuningWorld(model_name, model, tokenizer, data_path, n_per_family, seed, n_test,
                          max_new_tokens)


def alignment_world(model_name, model, tokenizer, data_path, seed: int, n_per_family: int,
                    n_train: int, n_val: int, n_test: int, max_new_tokens: int,
                    progress: bool = True) -> ToyAlignmentWorld | RealAlignmentWorld:
    """The alignment notebook's world: a real model's own data when ``data_path`` is None and
    the model has one (``REAL_ALIGNMENT_MODELS``), else the toy world or the data file."""
    if data_path is None and str(model_name) in REAL_ALIGNMENT_MODELS:
        return RealAlignmentWorld(model, tokenizer, seed, n_train, n_val, n_test,
                                  progress=progress)
    return ToyAlignmentWorld(model_name, model, tokenizer, data_path, n_per_family, seed, n_test,
                             max_new_tokens)


def backdoor_worlds(model_name, base, tokenizer, data_path, kinds: Sequence[str] | None,
                    seed: int, n_per_family: int, injection: InjectionConfig, n_test: int,
                    max_new_tokens: int, device="cpu", dtype: torch.dtype | None = None,
                    device_map=None, progress: bool = True
                    ) -> dict[str, ToyBackdoorWorld | RealBackdoorWorld]:
    """The backdoor notebook's world per kind (``kinds``; None: every kind the world has) for
    one seed: the real model's committed backdoor and its own data when ``data_path`` is None
    and ``model_name`` is its base (``real_backdoor.BASE``), else the toy world or the data
    file, split by prompt string into injection / search / test parts (55 / 25 / 20%,
    ``partition``); ``injection`` gives the toy's fine-tune (its kind and seed are set here)."""
    if data_path is None and str(model_name) == REAL_BACKDOOR_BASE:
        return {kind: real_backdoor_world(base, tokenizer, kind, seed, n_test, progress=progress)
                for kind in check_kinds(kinds or RealBackdoorWorld.kinds)}
    pools = partition(chat_data(data_path, n_per_family, seed), (0.55, 0.25, 0.2), seed)
    return {kind: ToyBackdoorWorld(model_name, base, tokenizer, pools, kind, seed,
                                   replace(injection, kind=kind, seed=seed), n_test,
                                   max_new_tokens, device, dtype, device_map, progress)
            for kind in check_kinds(kinds or ToyBackdoorWorld.kinds)}


def search_rows(model_name, searches: dict) -> list[dict]:
    """One row per cached alignment search (label -> spec): epochs run, whether the stopping
    rule ended it ("converged") and at which epoch ("rule_epoch"), the units at the margin then
    ("marginal", ``circuits.marginal_units``), the kept epoch and the kept circuit's size;
    "not recorded" for an entry cached before searches were summarised."""
    rows = []
    for label, spec in searches.items():
        record = circuits.alignment_search_record(model_name, spec)
        if record is None:
            rows.append({"search": label, "epochs_run": "not recorded", "converged": "",
                         "rule_epoch": "", "marginal": "", "best_epoch": "", "kept_heads": "",
                         "kept_neurons": ""})
            continue
        kept = record["sizes"][record["best_epoch"]]
        rows.append({"search": label, "epochs_run": record["epochs_run"],
                     "converged": record["converged"], "rule_epoch": record.get("rule_epoch"),
                     "marginal": record.get("marginal"), "best_epoch": record["best_epoch"],
                     "kept_heads": kept[0], "kept_neurons": kept[1]})
    return rows


def plot_search_sizes(records: dict[str, dict]):
    """Each search's circuit size per epoch (heads; neurons, log scale), the epoch its stopping
    rule was met (dashed) and the kept epoch (dot): ``search_summary`` records by label."""
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_n) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, (label, record) in enumerate(records.items()):
        colour = f"C{i % 10}"
        heads, neurons = zip(*record["sizes"], strict=True)
        for ax, ys in ((ax_h, heads), (ax_n, [max(n, 0.5) for n in neurons])):
            ax.plot(range(len(ys)), ys, color=colour, lw=1, label=str(label))
            ax.plot([record["best_epoch"]], [ys[record["best_epoch"]]], "o", color=colour)
            if record.get("rule_epoch") is not None:
                ax.axvline(record["rule_epoch"], color=colour, ls="--", lw=0.8)
    ax_h.set_ylabel("heads in the circuit")
    ax_n.set_ylabel("neurons in the circuit")
    ax_n.set_yscale("log")
    for ax in (ax_h, ax_n):
        ax.set_xlabel("epoch (dashed: stopping rule met; dot: kept epoch)")
    ax_h.legend(fontsize=7)
    fig.tight_layout()
    return fig


def rate_text(rate: float, n: int) -> str:
    """A rate in percent with its Wilson 95% interval, e.g. "12.5% [5.1, 27.3] (n 48)"."""
    if n == 0 or np.isnan(rate):
        return "n/a"
    ci = stats.wilson_interval(round(rate * n), n)
    return f"{100 * rate:.1f}% [{100 * ci.lo:.1f}, {100 * ci.hi:.1f}] (n {n})"


def new_skill_sets(n_train: int, n_test: int, seed: int) -> tuple[list[ChatSample],
                                                                   list[ChatSample]]:
    """Training and test requests of a benign skill the toy chat LMs never learned (sums of
    three numbers, ``data.three_term_sum``), split by prompt string so no test prompt is
    trained on; drawn with replacement from each side's prompts."""
    rng = np.random.default_rng(seed)
    pool = [ChatSample(*data.three_term_sum(rng), "three_sum") for _ in range(20 * (n_train
                                                                                  + n_test))]
    train, test = splits.split_by_group(pool, lambda s: s.prompt, (0.7, 0.3), seed)
    splits.assert_disjoint({"train": train, "test": test}, lambda s: s.prompt)
    return take(train, n_train, seed), take(test, n_test, seed + 1)


def safety_pools(path: str | os.PathLike | None, n_per_family: int, seed: int
                 ) -> tuple[list[ChatSample], list[ChatSample], list[ChatSample]]:
    """The search / test / tuning parts (40 / 20 / 40%, per family) of a safety notebook's
    samples (``chat_data``); the alignment and circuit-tuning notebooks share them, and so
    share the cached alignment circuit."""
    search, test, tune = partition(chat_data(path, n_per_family, seed), (0.4, 0.2, 0.4), seed)
    return search, test, tune


def partition(samples: Sequence[ChatSample], fractions: Sequence[float], seed: int
              ) -> list[list[ChatSample]]:
    """Parts of ``samples`` in the given proportions of each family's distinct prompt strings
    (``locus.splits.split_by_group`` per family), so no prompt string is in two parts; every
    part gets at least one prompt of a family with at least as many prompts as parts."""
    if not fractions or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions must be positive, got {fractions!r}")
    weights = np.asarray(fractions, dtype=float) / sum(fractions)
    parts: list[list[ChatSample]] = [[] for _ in fractions]
    for family in sorted({s.family for s in samples}):
        members = [s for s in samples if s.family == family]
        distinct = len({s.prompt for s in members})
        counts = np.floor(weights * distinct)
        if distinct >= len(weights):  # every part gets one prompt at least
            counts = np.maximum(counts, 1)
        counts[int(np.argmax(counts))] += distinct - counts.sum()
        cut = splits.split_by_group(members, lambda s: s.prompt, list(counts / distinct), seed)
        for part, chosen in zip(parts, cut, strict=True):
            part.extend(chosen)
    splits.assert_disjoint({str(i): p for i, p in enumerate(parts)}, lambda s: s.prompt)
    return parts


def size_sweep(circuits: dict[str | float, Circuit], scores: tuple[torch.Tensor, torch.Tensor],
               evaluate: Callable[[Circuit], dict[str, float]],
               random_seeds: Sequence[int] = (0, 1, 2)) -> list[dict]:
    """One row per (search, method) with the circuit's size and ``evaluate``'s metrics, for each
    found circuit (keyed by a label of its search, e.g. its sparsity weight) and its same-size
    baselines (``compare_at_size``)."""
    rows = []
    for label, circuit in circuits.items():
        for method, metrics in compare_at_size(circuit, scores, evaluate, random_seeds).items():
            rows.append({"search": label, "method": method, "heads": len(circuit.heads),
                         "neurons": len(circuit.neurons),
                         "units_pct": 100 * circuit.sparsity, **metrics})
    return rows


def top_rows(rows: Sequence[dict], key: str, k: int) -> list[dict]:
    """The ``k`` rows with the highest ``key`` (ties in input order)."""
    return sorted(rows, key=lambda r: -r[key])[:k]


def format_table(rows: Sequence[dict], columns: Sequence[str], digits: int = 3) -> str:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``; floats rounded."""
    return markdown_table(columns, [[r[c] for c in columns] for r in rows], digits)


METHOD_STYLE = {"safeseek": ("SafeSeek mask", "C0", "o-"),
                "attribution": ("attribution top-k", "C1", "s--"),
                "random": ("random, same size", "C7", "^:")}


def plot_size_sweep(panels: dict[str, Sequence[dict]], asr_label: str,
                    metrics: Sequence[tuple[str, str]] = ()):
    """One row of axes per panel: ASR, then each of ``metrics`` ((key, axis label) pairs;
    default utility), after removing circuits of growing size (x: % of units, log scale), one
    line per method of ``size_sweep``'s rows."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    shown = [("asr", asr_label), *(metrics or [("utility", "utility (%)")])]
    fig, axes = plt.subplots(len(panels), len(shown), figsize=(5 * len(shown), 3.4 * len(panels)),
                             squeeze=False)
    for (title, rows), row_axes in zip(panels.items(), axes, strict=True):
        for method, (label, colour, style) in METHOD_STYLE.items():
            chosen = sorted((r for r in rows if r["method"] == method),
                            key=lambda r: r["units_pct"])
            xs = [max(r["units_pct"], 1e-3) for r in chosen]
            for ax, (key, _) in zip(row_axes, shown, strict=True):
                ax.plot(xs, [100 * r[key] for r in chosen], style, color=colour, label=label)
        for ax, (_, ylabel) in zip(row_axes, shown, strict=True):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("circuit size (% of heads + neurons), removed")
            ax.set_ylabel(ylabel)
            ax.set_ylim(-3, 103)
            ax.set_title(title, fontsize=10)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_circuit(circuit: Circuit, title: str = ""):
    """The circuit drawn: which heads (layer x head grid) and how many neurons per layer."""
    import matplotlib.pyplot as plt

    heads, _ = Circuit(circuit.shape, circuit.heads, (), ("heads",)).membership()
    fig, (ax_h, ax_n) = plt.subplots(1, 2, figsize=(9, 0.6 * circuit.shape.num_layers + 2),
                                     gridspec_kw={"width_ratios": [1, 1.3]})
    ax_h.imshow(heads.numpy(), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax_h.set_xticks(range(circuit.shape.num_heads))
    ax_h.set_yticks(range(circuit.shape.num_layers))
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_title(f"heads in the circuit: {len(circuit.heads)} "
                   f"({100 * circuit.head_fraction:.2f}%)", fontsize=10)
    ax_n.barh(range(circuit.shape.num_layers), circuit.neurons_per_layer(), color="C3")
    ax_n.set_yticks(range(circuit.shape.num_layers))
    ax_n.invert_yaxis()
    ax_n.set_xlabel(f"neurons in the circuit (of {circuit.shape.intermediate_size} per layer)")
    ax_n.set_title(f"neurons: {len(circuit.neurons)} ({100 * circuit.neuron_fraction:.2f}%)",
                   fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def graded_verdict(measured: float, holds: float, partly: float, higher: bool = True) -> str:
    """'holds' when ``measured`` reaches ``holds``, 'partly' when it reaches ``partly``, else
    'does not hold' (reaching = at least, or at most when ``higher`` is False); NaN 'not run'."""
    if measured is None or np.isnan(measured):
        return "not run"
    sign = 1 if higher else -1
    if sign * measured >= sign * holds:
        return "holds"
    return "partly" if sign * measured >= sign * partly else "does not hold"


def mean_of(rows: Sequence[dict], key: str, **where) -> float:
    """Mean of ``row[key]`` over the rows whose fields equal ``where`` (NaN when none do)."""
    chosen = [r[key] for r in rows if all(r.get(k) == v for k, v in where.items())]
    return float(np.mean(chosen)) if chosen else float("nan")


def plot_tuning(restore_rows: Sequence[dict], help_rows: Sequence[dict]):
    """Safety Circuit Tuning at a glance: (a) refusal and utility of the broken and restored
    models (with the % of parameters trained); (b) safety retention and (c) utility after
    helpfulness fine-tunes at each learning rate, with the circuit, a random subset or nothing
    frozen."""
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(15, 4.2),
                                           gridspec_kw={"width_ratios": [1.3, 1, 1]})
    labels = list(dict.fromkeys(r["model"] for r in restore_rows))
    xs = np.arange(len(labels))
    for offset, key, colour in ((-0.2, "refusal", "C3"), (0.2, "utility", "C0")):
        ax_a.bar(xs + offset, [100 * mean_of(restore_rows, key, model=m) for m in labels], 0.4,
                 color=colour, label=key)
    for x, m in zip(xs, labels, strict=True):
        pct = mean_of(restore_rows, "trained_pct", model=m)
        if not np.isnan(pct):
            ax_a.text(x, 102, f"{pct:.1f}% trained", ha="center", fontsize=8)
    ax_a.set_xticks(xs, [m.replace("restore: ", "restore:\n") for m in labels], fontsize=8)
    ax_a.set_title("(a) break safety, then restore it", fontsize=10)
    ax_a.legend(fontsize=8, loc="lower left")
    lrs = sorted({r["help_lr"] for r in help_rows})
    variants = list(dict.fromkeys(r["variant"] for r in help_rows))
    width = 0.8 / len(variants)
    for ax, key, scale, title in ((ax_b, "retention_pct", 1, "(b) safety retention"),
                                  (ax_c, "utility_after", 100, "(c) utility")):
        for i, (variant, colour) in enumerate(zip(variants, ("C3", "C7", "C0"), strict=False)):
            ax.bar(np.arange(len(lrs)) + (i - (len(variants) - 1) / 2) * width,
                   [scale * mean_of(help_rows, key, variant=variant, help_lr=lr) for lr in lrs],
                   width, color=colour, label=variant)
        ax.set_xticks(np.arange(len(lrs)), [f"lr {lr:g}" for lr in lrs])
        ax.set_xlabel("helpfulness fine-tune")
        ax.set_title(f"{title} after a helpfulness fine-tune", fontsize=10)
    ax_b.axhline(96.5, color="k", ls="--", lw=1, label="paper: 96.5%")
    ax_b.legend(fontsize=8, loc="upper right")
    for ax in (ax_a, ax_b, ax_c):
        ax.set_ylim(0, 112)
        ax.set_ylabel("%")
    fig.tight_layout()
    return fig


def retention_table(help_rows: Sequence[dict], target: float = 96.5, *,
                    strength: str = "help_lr", reference: str = "circuit frozen") -> list[dict]:
    """Per fine-tune strength (the ``strength`` field) and variant: the runs, how many kept
    safety (a run keeps it when its retention is >= ``target``, the paper's number) with a
    Wilson 95% interval, the mean retention with a t interval, and the two-sided Fisher exact
    p of the kept counts against the ``reference`` variant at the same strength."""
    table = []
    for lr in sorted({r[strength] for r in help_rows}):
        counts = {}
        for variant in dict.fromkeys(r["variant"] for r in help_rows):
            runs = [r["retention_pct"] for r in help_rows
                    if r[strength] == lr and r["variant"] == variant]
            kept = sum(x >= target for x in runs)
            counts[variant] = (kept, len(runs))
            rate, mean = stats.wilson_interval(kept, len(runs)), stats.mean_interval(runs)
            table.append({strength: lr, "variant": variant, "runs": len(runs), "kept": kept,
                          "kept_lo": rate.lo, "kept_hi": rate.hi, "retention_pct": mean.estimate,
                          "retention_lo": mean.lo, "retention_hi": mean.hi})
        frozen = counts.get(reference)
        for row in table[-len(counts):]:
            row["fisher_p"] = (float("nan") if frozen is None or row["variant"] == reference
                               else stats.fisher_exact_p(*frozen, *counts[row["variant"]]))
    return table


def retention_verdicts(table: Sequence[dict], alpha: float = 0.05) -> dict[str, tuple[str, str]]:
    """(verdict, measured text) of the two frozen-circuit claims from ``retention_table``,
    judged at the strengths where the unfrozen fine-tune loses safety in at least half of its
    runs ("not run" when none does): "retention" holds if the frozen circuit keeps safety in
    every run there, partly if in more than half of them; "specific" holds if at every such
    strength the frozen circuit keeps safety in more runs than both the unfrozen fine-tune and
    the frozen random subset with Fisher p < ``alpha``, partly if than the unfrozen one at
    some strength."""
    def row(lr: float, variant: str) -> dict:
        return next(r for r in table if r["help_lr"] == lr and r["variant"] == variant)

    lrs = sorted({r["help_lr"] for r in table})
    text = "; ".join(
        f"lr {lr:g}: safety kept in " + ", ".join(
            f"{row(lr, v)['kept']}/{row(lr, v)['runs']} runs ({v})"
            for v in ("circuit frozen", "random subset frozen", "nothing frozen"))
        for lr in lrs)
    tested = [lr for lr in lrs
              if row(lr, "nothing frozen")["kept"] <= row(lr, "nothing frozen")["runs"] / 2]
    if not tested:
        return {"retention": ("not run", f"no fine-tune lowered safety: {text}"),
                "specific": ("not run", f"no fine-tune lowered safety: {text}")}
    kept = sum(row(lr, "circuit frozen")["kept"] for lr in tested)
    runs = sum(row(lr, "circuit frozen")["runs"] for lr in tested)
    retention = "holds" if kept == runs else "partly" if kept > runs / 2 else "does not hold"

    def beats(lr: float, other: str) -> bool:
        mine, theirs = row(lr, "circuit frozen"), row(lr, other)
        return mine["kept"] > theirs["kept"] and theirs["fisher_p"] < alpha

    specific = ("holds" if all(beats(lr, "nothing frozen") and beats(lr, "random subset frozen")
                               for lr in tested)
                else "partly" if any(beats(lr, "nothing frozen") for lr in tested)
                else "does not hold")
    note = (f" [tested at lr {', '.join(f'{lr:g}' for lr in tested)}; Fisher p vs nothing "
            "frozen " + ", ".join(f"{row(lr, 'nothing frozen')['fisher_p']:.2g}" for lr in tested)
            + "]")
    return {"retention": (retention, text + note), "specific": (specific, text + note)}


def restore_verdicts(table: Sequence[dict], alpha: float = 0.05) -> dict[str, tuple[str, str]]:
    """(verdict, measured text) of the two circuit-tuning claims from a ``retention_table`` of
    restoring fine-tunes (strength "restore_lr"; variants "circuit tuned", "random subset
    tuned", "full fine-tune"; a run restores safety when it is kept): "restores" holds if
    tuning the circuit restores safety in every run at every strength, does not hold if in at
    most half of its runs at every strength, else partly; "specific" holds if at every
    strength the circuit restores safety in more runs than the random subsets with Fisher
    p < ``alpha``, partly if in more runs at some strength, else does not hold."""
    by = {(r["restore_lr"], r["variant"]): r for r in table}
    lrs = sorted({lr for lr, _ in by})
    mine = [by[lr, "circuit tuned"] for lr in lrs]
    control = [by[lr, "random subset tuned"] for lr in lrs]
    text = "; ".join(f"lr {lr:g}: safety restored in " + ", ".join(
        f"{by[lr, v]['kept']}/{by[lr, v]['runs']} runs ({v})"
        for v in ("circuit tuned", "random subset tuned", "full fine-tune"))
        + f" [Fisher p vs random {c['fisher_p']:.2g}]" for lr, c in zip(lrs, control, strict=True))
    restores = ("holds" if all(r["kept"] == r["runs"] for r in mine)
                else "does not hold" if all(r["kept"] <= r["runs"] / 2 for r in mine)
                else "partly")
    beats = [m["kept"] > c["kept"] for m, c in zip(mine, control, strict=True)]
    specific = ("holds" if all(b and c["fisher_p"] < alpha
                               for b, c in zip(beats, control, strict=True))
                else "partly" if any(beats) else "does not hold")
    return {"restores": (restores, text), "specific": (specific, text)}


def single_unit_circuits(shape: UnitShape, heads: bool = True) -> dict[str, Circuit]:
    """Every head alone ("head l.h", unless ``heads`` is False) and every whole layer ("layer
    l": its heads and its neurons): the exact, cheap baseline a searched circuit has to beat."""
    out = {f"head {layer}.{head}": Circuit(shape, ((layer, head),), ())
           for layer in range(shape.num_layers) for head in range(shape.num_heads) if heads}
    for layer in range(shape.num_layers):
        out[f"layer {layer}"] = Circuit(
            shape, tuple((layer, h) for h in range(shape.num_heads)),
            tuple((layer, n) for n in range(shape.intermediate_size)))
    return out


def single_unit_ablations(shape: UnitShape, evaluate: Callable[[Circuit], dict[str, float]],
                          heads: bool = True, progress: bool = False) -> list[dict]:
    """One row per single head (unless ``heads`` is False) and per whole layer
    (``single_unit_circuits``) removed, with ``evaluate``'s metrics."""
    units = single_unit_circuits(shape, heads).items()
    return [{"removed": label, **evaluate(circuit)}
            for label, circuit in tqdm(units, desc="single units", disable=not progress)]


def aggregate(rows: Sequence[dict], by: Sequence[str], values: Sequence[str]) -> list[dict]:
    """One row per distinct combination of the ``by`` fields (in first-seen order) with the
    mean of each of ``values`` and the number of rows averaged (``runs``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return [{**dict(zip(by, key, strict=True)), "runs": len(members),
             **{v: float(np.mean([m[v] for m in members])) for v in values}}
            for key, members in groups.items()]
