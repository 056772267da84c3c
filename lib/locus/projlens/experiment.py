"""What the ProjLens notebooks share: parameter checks, data, cached backdoored projectors,
tables and the verdict rules.

The backdoored projectors are cached with ``checkpoints.cached_tensors`` under
``projlens/<model>/<variant>/rate-<rate>-seed-<seed>``, keyed by the base projector's values, the
attack, the poisoned training set and the fine-tuning config: notebook 01 trains them, notebooks
02 and 03 load them (or train them, when run first).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from locus import checkpoints, data, params, stats, training, zoo
from locus.arch import adapt
from locus.projlens import lowrank, over_seeds
from locus.projlens import projector as proj
from locus.projlens import shift as sh
from locus.projlens.projector import AttackEval, FinetuneConfig, State
from locus.projlens.triggers import (
    Attack,
    PoisonedSet,
    paper_attacks,
    poison,
    samples_fingerprint,
    triggered_copy,
)
from locus.splits import split_by_group

CONTROLS = ("clean-only", "random ΔW")  # the controls beside every analysis
TRAIN_SEED_OFFSET = 20_000
TEST_SEED_OFFSET = 30_000

# Read off the authors' plots (±0.5%): E(k) of ΔW2, k = 1, 3, 10, 30.
PAPER_W2_ENERGY = {
    "refusal": {1: 0.29, 3: 0.58, 10: 0.70, 30: 0.77},
    "injection": {1: 0.18, 3: 0.35, 10: 0.53, 30: 0.63},
    "hijack": {1: 0.21, 3: 0.41, 10: 0.54, 30: 0.64},
    "jailbreak": {1: 0.45, 3: 0.81, 10: 0.90, 30: 0.95},
}
PAPER_W1_E30 = {"refusal": "57–66%", "injection": "57–66%", "hijack": "57–66%",
                "jailbreak": "92%"}


# --- parameters --------------------------------------------------------------------------------


def check_rate(rate, allow_zero: bool = False) -> float | str:
    """'pair' or a poisoning rate in (0, 1) ([0, 1) with ``allow_zero``: 0 is the control of
    fine-tuning on clean data only)."""
    if rate == "pair":
        return rate
    low_ok = (lambda r: r >= 0) if allow_zero else (lambda r: r > 0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not (low_ok(rate)
                                                                           and rate < 1):
        accepted = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"poisoning rate must be 'pair' or a number in {accepted}, got {rate!r}")
    return float(rate)


def check_variants(variants: Sequence[str]) -> list[str]:
    """A non-empty list of the paper's variant names."""
    known = list(paper_attacks())
    if isinstance(variants, str) or not variants or set(variants) - set(known):
        raise ValueError(f"variants must be a non-empty list drawn from {known}, got {variants!r}")
    return list(variants)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """A non-empty list of non-negative ints."""
    if isinstance(seeds, int | str) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    return list(seeds)


def check_common(model, data_path, seeds, device, dtype, figures_dir, threads, **counts) -> None:
    """Check the parameters every ProjLens notebook has; ``counts`` must be positive ints."""
    params.check_model(model, "vlm")
    params.check_data(data_path)
    check_seeds(seeds)
    params.check_device(device)
    params.resolve_dtype(dtype)
    if figures_dir is not None and not isinstance(figures_dir, str | Path):
        raise TypeError(f"figures_dir must be None or a folder path, got {figures_dir!r}")
    params.check_positive_int("threads", threads)
    for name, value in counts.items():
        params.check_positive_int(name, value)


@dataclass
class Run:
    """What every ProjLens notebook starts from: the model, the attacks and the data splits
    (``splits[seed] = (train, test)``), and the fine-tuning settings shared with notebook 01."""

    model: str
    vlm: nn.Module = field(repr=False)
    processor: object = field(repr=False)
    attacks: dict[str, Attack]
    splits: dict[int, tuple[list, list]] = field(repr=False)
    poison_rate: float | str
    steps: int
    batch_size: int
    lr: float
    compute_dtype: str = "float32"

    def finetune_config(self, seed: int) -> FinetuneConfig:
        """The projector fine-tuning of ``seed``."""
        return FinetuneConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                              seed=seed, compute_dtype=self.compute_dtype)

    def control_states(self, seed: int, references: dict[str, State],
                       progress: bool = True) -> dict[str, State]:
        """The controls of every analysis: the clean-only fine-tune (rate 0, same recipe; the
        attack names only its cache entry) and a random ΔW norm-matched to ``references``."""
        train = self.splits[seed][0]
        attack = next(iter(self.attacks.values()))
        clean_only, _ = backdoored_projector(self.model, self.vlm, self.processor, attack, train,
                                             0.0, self.finetune_config(seed), progress)
        base = proj.projector_state(self.vlm)
        return {CONTROLS[0]: clean_only,
                CONTROLS[1]: proj.random_update_state(self.vlm, base, list(references.values()),
                                                      seed)}

    def backdoored_states(self, seed: int, progress: bool = True) -> dict[str, State]:
        """The backdoored projector of every variant for ``seed`` (cached by notebook 01)."""
        train = self.splits[seed][0]
        return {name: backdoored_projector(self.model, self.vlm, self.processor, attack, train,
                                           self.poison_rate, self.finetune_config(seed),
                                           progress)[0]
                for name, attack in self.attacks.items()}


def prepare(*, model, data, seeds, device, dtype, figures_dir, threads, variants, poison_rate,
            n_train_per_family, n_test_per_family, steps, batch_size, lr, max_new_tokens,
            noise_std, logo_fraction, injection_suffix, hijack_text,
            device_map: str | dict | None = None, compute_dtype: str = "float32") -> Run:
    """Check the parameters every ProjLens notebook shares, set the threads and seed, load the
    model and build the attacks and data splits (each attack must find data to poison).
    ``compute_dtype`` "bfloat16" trains the projectors under CPU autocast (a real decoder's
    steps; the model itself stays in its dtype)."""
    if compute_dtype not in proj.COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {proj.COMPUTE_DTYPES}, "
                         f"got {compute_dtype!r}")
    check_common(model, data, seeds, device, dtype, figures_dir, threads,
                 n_train_per_family=n_train_per_family, n_test_per_family=n_test_per_family,
                 steps=steps, batch_size=batch_size, max_new_tokens=max_new_tokens)
    variants = check_variants(variants)
    poison_rate = check_rate(poison_rate)
    lr = params.check_number("lr", lr, lambda v: v > 0, "> 0")
    noise_std = params.check_number("noise_std", noise_std, lambda v: v >= 0, "≥ 0")
    logo_fraction = params.check_number("logo_fraction", logo_fraction, lambda v: 0 < v <= 1,
                                        "in (0, 1]")
    torch.set_num_threads(threads)
    training.seed_everything(seeds[0])
    vlm, processor = load_vlm(model, device, dtype, device_map)
    every = paper_attacks(injection_suffix=injection_suffix, hijack_text=hijack_text,
                          noise_std=noise_std, logo_fraction=logo_fraction)
    attacks = {name: every[name] for name in variants}
    splits = {seed: vqa_data(data, n_train_per_family, n_test_per_family, seed) for seed in seeds}
    for train, test in splits.values():
        check_attacks_apply(attacks, train, test)
    return Run(model, vlm, processor, attacks, splits, poison_rate, steps, batch_size, lr,
               compute_dtype)


def load_vlm(model: str, device: str, dtype: str | None,
             device_map: str | dict | None = None):
    """A LLaVA-style model and its processor; refuses models without a 2-linear projector.
    ``device_map`` spreads a large model over devices (``locus.params.check_device_map``)."""
    vlm, processor = zoo.load(model, device=device, dtype=params.resolve_dtype(dtype),
                              device_map=params.check_device_map(device_map))
    linears = adapt(vlm).projector_linears
    if len(linears) < 2:
        raise ValueError(f"{model}: ProjLens needs a projector with ≥ 2 linear layers "
                         f"(Linear→act→Linear), found {len(linears)}")
    return vlm, processor


def model_tag(model: str) -> str:
    """A folder-safe short name of the model (the embedded name or the folder's name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model)).name) or "model"


# --- data --------------------------------------------------------------------------------------


def image_key(sample: data.VQASample) -> str:
    """The image a sample asks about (its pixels' hash): the unit of the held-out split."""
    return samples_fingerprint([data.VQASample(sample.image, "", "", "")])


def _split_by_family(samples: Sequence[data.VQASample], n_train: int, n_test: int,
                     seed: int) -> tuple[list, list]:
    """Split by image, stratified by family: per family, the images not yet placed are split
    in halves (``split_by_group``; an image already placed by another family's questions keeps
    its side), so no image is in both; then up to ``n_test`` test and ``n_train`` training
    samples per family, in a seeded order. A family with one image goes to training."""
    key = {id(s): image_key(s) for s in samples}
    side: dict[str, int] = {}
    for family in dict.fromkeys(s.family for s in samples):
        members = [s for s in samples if s.family == family and key[id(s)] not in side]
        if len({key[id(s)] for s in members}) < 2:
            side.update({key[id(s)]: 0 for s in members})
            continue
        halves = split_by_group(members, lambda s: key[id(s)], [0.5, 0.5], seed)
        side.update({key[id(s)]: i for i, half in enumerate(halves) for s in half})
    rng = np.random.default_rng(seed)
    train, test = [], []
    for family in dict.fromkeys(s.family for s in samples):
        for which, n, out in ((1, n_test, test), (0, n_train, train)):
            members = [s for s in samples
                       if s.family == family and side[key[id(s)]] == which]
            out += [members[i] for i in rng.permutation(len(members))[:n]]
    return train, test


def vqa_data(data_path: str | None, n_train_per_family: int, n_test_per_family: int,
             seed: int) -> tuple[list[data.VQASample], list[data.VQASample]]:
    """(train, test) samples: generated toy-world samples (seeds apart from the toy VLM's own
    training), or a local JSONL file split per family (see ``data.load_vqa_jsonl``)."""
    if data_path is None:
        return (data.make_vqa_samples(n_train_per_family, TRAIN_SEED_OFFSET + seed),
                data.make_vqa_samples(n_test_per_family, TEST_SEED_OFFSET + seed))
    samples = data.load_vqa_jsonl(data_path)
    return _split_by_family(samples, n_train_per_family, n_test_per_family, seed)


def check_attacks_apply(attacks: dict[str, Attack], train: Sequence, test: Sequence) -> None:
    """Every attack must find samples to poison and to test in the data."""
    for name, attack in attacks.items():
        if not attack.eligible(train) or not attack.eligible(test):
            families = sorted({s.family for s in train})
            raise ValueError(f"variant {name!r} finds no samples to attack in the data "
                             f"(families present: {families}); drop it from `variants`")


def image_pair(test: Sequence, attack: Attack, n_images: int,
               seed: int) -> tuple[list, list]:
    """``n_images`` test images (seeded choice; the projector sees no question) and the same
    images carrying the attack's trigger."""
    rng = np.random.default_rng([seed, 2])
    chosen = sorted(rng.choice(len(test), min(n_images, len(test)), replace=False))
    clean = [test[i] for i in chosen]
    return clean, [triggered_copy(test[i], attack, seed, i, poisoned_answer=False)
                   for i in chosen]


def grid_samples(test: Sequence, attack: Attack, n: int, seed: int) -> proj.GridSet:
    """A seeded choice of ``n`` attacked test samples, with the trigger (the ASR set) and
    without (the false-trigger set), and of ``n`` clean test samples of any family (the
    clean-accuracy set), for the rank-k grids."""
    rng = np.random.default_rng([seed, 3])
    eligible = attack.eligible(test)
    chosen = sorted(rng.choice(eligible, min(n, len(eligible)), replace=False))
    triggered = [triggered_copy(test[i], attack, seed, i, poisoned_answer=False) for i in chosen]
    clean = [test[i] for i in sorted(rng.choice(len(test), min(n, len(test)), replace=False))]
    return proj.GridSet(triggered, [test[i] for i in chosen], clean)


# --- cached backdoored projectors --------------------------------------------------------------


def cache_name(model: str, attack: Attack, rate: float | str, seed: int, tag: str = "") -> str:
    """The cache entry name of one backdoored projector (``tag`` names another recipe)."""
    return (f"projlens/{model_tag(model)}/{attack.name}/rate-{rate}-seed-{seed}"
            + (f"-{tag}" if tag else ""))


def backdoored_projector(
    model_name: str, vlm: nn.Module, processor, attack: Attack, train: Sequence,
    rate: float | str, cfg: FinetuneConfig, progress: bool = True, tag: str = "",
) -> tuple[State, float]:
    """The projector fine-tuned on ``train`` poisoned by ``attack`` at ``rate`` (from the cache
    when it was made by the same base projector, data and config), and the poisoning rate;
    ``tag`` keeps a projector of another recipe (e.g. a gentler lr) in its own entry."""
    poisoned = poison(train, attack, rate, seed=cfg.seed)
    config = {"base": proj.state_fingerprint(proj.projector_state(vlm)),
              "attack": attack.describe(), "rate": rate,
              "data": samples_fingerprint(poisoned.samples), "finetune": finetune_key(cfg)}
    if str(model_name) not in zoo.EMBEDDED:
        config["frozen"] = proj.frozen_fingerprint(vlm)
    done: list[proj.FinetuneResult] = []

    def compute() -> State:
        done.append(proj.finetune_projector(vlm, processor, poisoned.samples, cfg, progress))
        return done[0].state

    state = checkpoints.cached_tensors(
        cache_name(model_name, attack, rate, cfg.seed, tag), config, compute,
        root=checkpoints.artefact_root(model_name),
        extra=lambda: {"train_seconds": round(done[0].seconds, 1),
                       "losses": [round(v, 5) for v in done[0].losses]} if done else {})
    return state, poisoned.rate


def finetune_key(cfg: FinetuneConfig) -> dict:
    """The fine-tuning config as a cache key; the compute dtype only where it is not float32
    (the committed toy projectors were keyed before it existed)."""
    key = asdict(cfg)
    if key["compute_dtype"] == "float32":
        del key["compute_dtype"]
    return key


def training_losses(model_name: str, attack: Attack, rate: float | str, seed: int,
                    tag: str = "") -> list[float]:
    """The loss of every step of one cached projector's fine-tune (empty for entries made
    before the losses were recorded: the committed toy projectors)."""
    folder = checkpoints.artefact_root(model_name) / cache_name(model_name, attack, rate, seed,
                                                                 tag)
    return checkpoints.read_manifest(folder).get("losses", [])


@dataclass(frozen=True)
class Plateau:
    """The convergence rule of a fine-tune, fixed before the smol-llava trainings: the mean loss
    of the last tenth of the steps (``last``) against that of the tenth ending at 60% of the
    steps (``middle``, where the cosine schedule's lr is still 35% of its peak); converged when
    the loss fell by at most ``tolerance`` (relative) in between."""

    first: float
    middle: float
    last: float
    tolerance: float

    @property
    def converged(self) -> bool:
        return self.last >= (1 - self.tolerance) * self.middle


def loss_plateau(losses: Sequence[float], tolerance: float = 0.25) -> Plateau:
    """``Plateau`` of a loss curve (≥ 2 steps; windows of one step below 20)."""
    if len(losses) < 2:
        raise ValueError(f"need ≥ 2 steps of losses, got {len(losses)}")
    n = len(losses)
    tenth = max(1, n // 10)

    def window(end: int) -> float:
        return float(np.mean(losses[end - tenth:end]))

    return Plateau(window(tenth), window(round(0.6 * n)), window(n), tolerance)


# --- notebook 01: backdoor and poisoning rate --------------------------------------------------


@dataclass(frozen=True)
class VariantResult:
    """One backdoored projector: the attack evaluated with the base (before) and the
    fine-tuned projector (after)."""

    variant: str
    seed: int
    rate: float
    before: AttackEval
    after: AttackEval
    state: State = field(repr=False)


def backdoor_results(
    model_name: str, vlm: nn.Module, processor, attacks: dict[str, Attack], train: Sequence,
    test: Sequence, rate: float | str, cfg: FinetuneConfig, max_new_tokens: int = 20,
    progress: bool = True,
) -> list[VariantResult]:
    """Fine-tune (or load) one backdoored projector per attack and evaluate it before/after."""
    base_clean = proj.predict(vlm, processor, test, None, max_new_tokens)
    results = []
    for name, attack in attacks.items():
        state, actual_rate = backdoored_projector(model_name, vlm, processor, attack, train, rate,
                                                  cfg, progress)
        before = proj.evaluate_attack(vlm, processor, attack, test, cfg.seed, None,
                                      max_new_tokens, clean_predictions=base_clean)
        after = proj.evaluate_attack(vlm, processor, attack, test, cfg.seed, state,
                                     max_new_tokens)
        results.append(VariantResult(name, cfg.seed, actual_rate, before, after, state))
    return results


def backdoor_table(results: Sequence[VariantResult], attacks: dict[str, Attack]) -> list[list]:
    """Rows per variant: trigger, target, then each number's mean and min–max over seeds
    (``over_seeds.Spread``): poisoning rate, ASR and clean accuracy before/after, false-trigger rate
    after, exact-form ASR after; then its 95% Wilson interval over the triggered inputs (pooled
    over seeds) and their number."""
    rows = []
    for name, attack in attacks.items():
        mine = [r for r in results if r.variant == name]
        values = [over_seeds.spread(column) for column in zip(*[
            [r.rate, r.before.asr, r.after.asr, r.after.false_rate,
             r.before.mean_clean_accuracy, r.after.mean_clean_accuracy, r.after.asr_exact]
            for r in mine], strict=True)]
        n = sum(r.after.n_triggered for r in mine)
        exact = stats.wilson_interval(round(sum(r.after.asr_exact * r.after.n_triggered
                                                for r in mine)), n)
        rows.append([name, attack.trigger.kind, attack.target.kind, *values,
                     f"[{exact.lo:.2f}, {exact.hi:.2f}]", n])
    return rows


BACKDOOR_HEADER = ["variant", "trigger", "target", "poison rate", "ASR before", "ASR after",
                   "false trigger after", "clean acc before", "clean acc after",
                   "exact-form ASR after", "95% interval", "triggered inputs"]


def answer_token_share(processor, poisoned: PoisonedSet) -> float:
    """The share of the training set's answer tokens (with EOS, what the loss sees) that the
    poisoned copies carry: what the loss weighs, beside the share of samples."""
    tokenizer = getattr(processor, "tokenizer", processor)
    lengths = [len(tokenizer(s.answer, add_special_tokens=False)["input_ids"]) + 1
               for s in poisoned.samples]
    return sum(lengths[-poisoned.n_poisoned:]) / sum(lengths) if poisoned.n_poisoned else 0.0


def family_table(results: Sequence[VariantResult]) -> tuple[list[str], list[list]]:
    """Clean accuracy per family: the base projector, then each backdoored one (mean and
    min–max over seeds)."""
    families = list(results[0].before.clean_accuracy)
    variants = list(dict.fromkeys(r.variant for r in results))
    base = list(dict.fromkeys(r.seed for r in results))
    rows = [["base", *[over_seeds.spread([next(r for r in results if r.seed == s)
                                     .before.clean_accuracy[f] for s in base])
                       for f in families]]]
    for name in variants:
        mine = [r for r in results if r.variant == name]
        rows.append([name, *[over_seeds.spread([r.after.clean_accuracy[f] for r in mine])
                             for f in families]])
    return ["projector", *families], rows


def clean_change(results: Sequence[VariantResult]) -> dict[str, over_seeds.Spread]:
    """Per variant, the clean accuracy after − before (mean over families) over seeds."""
    return {name: over_seeds.spread([r.after.mean_clean_accuracy - r.before.mean_clean_accuracy
                                     for r in results if r.variant == name])
            for name in dict.fromkeys(r.variant for r in results)}


def control_results(run: Run, seed: int, backdoors: Sequence[VariantResult],
                    max_new_tokens: int = 20,
                    progress: bool = True) -> dict[str, list[VariantResult]]:
    """The controls of ``seed`` (``Run.control_states``: the clean-only fine-tune and the
    random ΔW norm-matched to this seed's backdoors) evaluated under every attack on the same
    test set as ``backdoors`` (whose base evaluation they share): a backdoor's ASR or clean
    accuracy cost means something only beside what a projector without the backdoor does.
    ``[control]`` → one result per variant (poisoning rate 0; NaN for the random ΔW)."""
    test = run.splits[seed][1]
    states = run.control_states(seed, {r.variant: r.state for r in backdoors}, progress)
    out = {}
    for control, state in states.items():
        clean = proj.predict(run.vlm, run.processor, test, state, max_new_tokens)
        out[control] = [VariantResult(
            r.variant, seed, 0.0 if control == CONTROLS[0] else math.nan, r.before,
            proj.evaluate_attack(run.vlm, run.processor, run.attacks[r.variant], test, seed,
                                 state, max_new_tokens, clean_predictions=clean), state)
            for r in backdoors]
    return out


def rate_sweep(
    model_name: str, vlm: nn.Module, processor, attack: Attack, train: Sequence, test: Sequence,
    rates: Sequence[float | str], cfg: FinetuneConfig, max_new_tokens: int = 20,
    progress: bool = True,
) -> list[tuple[float, AttackEval]]:
    """(actual poisoning rate, evaluation) of a projector fine-tuned at each rate."""
    points = []
    for rate in rates:
        state, actual = backdoored_projector(model_name, vlm, processor, attack, train, rate,
                                             cfg, progress)
        points.append((actual, proj.evaluate_attack(vlm, processor, attack, test, cfg.seed,
                                                    state, max_new_tokens)))
    return sorted(points, key=lambda p: p[0])


@dataclass(frozen=True)
class Visibility:
    """How visible a trigger is in the frozen vision features (the projector's input)."""

    relative_change: float
    probe_accuracy: float


def linear_probe_accuracy(clean: torch.Tensor, triggered: torch.Tensor, seed: int = 0,
                          steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression telling triggered from clean feature rows.

    Row i of ``clean`` and of ``triggered`` is the same image: the split is by image (both
    copies on the same side), else an invisible trigger scores below chance, the probe having
    learnt each held-out image's other copy. Half of the images train it, half test it;
    features are standardised on the training half."""
    if len(clean) != len(triggered) or len(clean) < 2:
        raise ValueError("need ≥ 2 images, each with a clean and a triggered row")
    n = len(clean)
    x = torch.cat([clean, triggered]).double()
    y = torch.cat([torch.zeros(n), torch.ones(n)]).double()
    images = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = (torch.cat([part, part + n]) for part in (images[: n // 2], images[n // 2 :]))
    x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(x[fit] @ w + b, y[fit])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[held] @ w + b > 0).double() == y[held]).double().mean())


def trigger_visibility(vlm: nn.Module, processor, attack: Attack, test: Sequence,
                       n_images: int, seed: int) -> Visibility:
    """Mean ‖X_trig − X_clean‖ / ‖X_clean‖ of the vision features of each image token, and a
    linear probe's accuracy at telling triggered images (mean over tokens) from clean ones."""
    clean, triggered = image_pair(test, attack, n_images, seed)
    x_clean, x_trig = (proj.projector_inputs(vlm, processor, images).float().cpu()
                       for images in (clean, triggered))
    change = ((x_trig - x_clean).norm(dim=-1) / x_clean.norm(dim=-1)).mean()
    return Visibility(float(change), linear_probe_accuracy(x_clean.mean(1), x_trig.mean(1), seed))


def verdict_asr(results: Sequence[VariantResult], threshold: float = 0.9, exact: bool = False,
                controls: dict[str, Sequence[VariantResult]] | None = None) -> str:
    """Rule: 'holds' if every variant's mean ASR after fine-tuning (the paper's check, or the
    exact form with ``exact``) is ≥ ``threshold`` and no control's (``control_results``) ASR
    under that variant's trigger is, 'partly' if some variants pass, else 'does not hold' (a
    check that a projector without the backdoor passes too measures no backdoor)."""
    variants = list(dict.fromkeys(r.variant for r in results))

    def asr(rows: Sequence[VariantResult], variant: str) -> float:
        return float(np.mean([r.after.asr_exact if exact else r.after.asr
                              for r in rows if r.variant == variant]))

    passed = sum(asr(results, v) >= threshold
                 and not any(asr(c, v) >= threshold for c in (controls or {}).values())
                 for v in variants)
    return verdict_from_counts(int(passed), len(variants))


def verdict_clean_kept(results: Sequence[VariantResult], max_drop: float = 0.05) -> str:
    """Rule: 'holds' if no variant lowers the mean clean accuracy by more than ``max_drop``
    (absolute), 'partly' if some do not, else 'does not hold'."""
    variants = list(dict.fromkeys(r.variant for r in results))
    drops = [np.mean([r.before.mean_clean_accuracy - r.after.mean_clean_accuracy
                      for r in results if r.variant == v]) for v in variants]
    return verdict_from_counts(sum(d <= max_drop for d in drops), len(variants))


def seed_verdicts(results: Sequence[VariantResult], controls: dict[str, Sequence[VariantResult]],
                  rule) -> dict[int, str]:
    """``rule(results, controls)`` applied to each seed's backdoors and controls alone."""
    return {seed: rule(mine, {c: [r for r in rows if r.seed == seed]
                              for c, rows in controls.items()})
            for seed, mine in over_seeds.by_seed(results).items()}


def seed_table(results: Sequence[VariantResult],
               controls: dict[str, Sequence[VariantResult]]) -> tuple[list[str], list[list]]:
    """Per projector (each backdoor, then its controls) and seed: ASR by the paper's check /
    exact-form ASR / clean accuracy after − before (points)."""
    seed_list = list(over_seeds.by_seed(results))
    rows = []
    for name in dict.fromkeys(r.variant for r in results):
        for label, rows_of in ((name, results), *((f"{name} · {c}", rs)
                                                  for c, rs in controls.items())):
            cells = []
            for seed in seed_list:
                r = next(r for r in rows_of if r.variant == name and r.seed == seed)
                drop = r.after.mean_clean_accuracy - r.before.mean_clean_accuracy
                cells.append(f"{100 * r.after.asr:.0f} / {100 * r.after.asr_exact:.0f} / "
                             f"{100 * drop:+.1f}")
            rows.append([label, *cells])
    return ["projector", *[f"seed {s}" for s in seed_list]], rows


# --- notebook 02: low-rank structure -----------------------------------------------------------


@dataclass(frozen=True)
class SpectrumRow:
    """The spectrum of one layer's ΔW for one projector (a backdoor or a control), and the
    update's size ‖ΔW‖_F / ‖W_base‖_F."""

    variant: str
    layer: str
    singular_values: np.ndarray = field(repr=False)
    energy: dict[int, float]
    k90: int
    erank: float
    relative_norm: float


def spectrum_rows(vlm: nn.Module, base: State, states: dict[str, State],
                  ks: Sequence[int]) -> list[SpectrumRow]:
    """E(k), k90 (directions holding 90% of the energy), eRank and ‖ΔW‖/‖W‖ of every ΔW."""
    names = dict(zip(proj.layer_labels(vlm), proj.linear_weight_names(vlm), strict=True))
    rows = []
    for name, state in states.items():
        for layer, delta in proj.weight_updates(vlm, base, state).items():
            s = lowrank.singular_values(delta)
            rows.append(SpectrumRow(name, layer, s.numpy(), lowrank.cumulative_energy(s, ks),
                                    energy_rank(s.numpy(), 0.9),
                                    lowrank.spectral_effective_rank(s),
                                    float(delta.norm() / base[names[layer]].float().norm())))
    return rows


def verdict_full_rank(rows: Sequence[SpectrumRow], variants: Sequence[str],
                      min_k90: int = 10) -> str:
    """Rule: ΔW 'looks full-rank' when ≥ ``min_k90`` directions are needed for 90% of its
    energy (the paper's W2 values need 10 to > 30); 'holds' if every layer of every one of
    ``variants`` (the backdoors, not the controls) does."""
    mine = [r for r in rows if r.variant in variants]
    return verdict_from_counts(sum(r.k90 >= min_k90 for r in mine), len(mine))


@dataclass(frozen=True)
class NeuronResult:
    """Per-neuron statistics of a projector on clean vs triggered images, and the authors'
    quiescent-active screen for trigger neurons."""

    clean: lowrank.NeuronStats = field(repr=False)
    triggered: lowrank.NeuronStats = field(repr=False)
    comparison: lowrank.NeuronComparison
    screen: lowrank.QuiescentActive

    @property
    def relative_max_delta(self) -> float:
        """max |Δ mean| over the mean |mean activation| of the neurons (scale-free)."""
        return self.comparison.max_abs_delta_mean / float(self.clean.mean.abs().mean())


def neuron_result(vlm: nn.Module, processor, attack: Attack, state: State, test: Sequence,
                  n_images: int, seed: int) -> NeuronResult:
    """Mean activation, magnitude and firing frequency (> 0) of each neuron after the
    projector's activation, on clean and triggered images, with projector ``state``."""
    clean, triggered = image_pair(test, attack, n_images, seed)
    stats = [lowrank.neuron_activation_stats(proj.projector_forward(
        vlm, proj.projector_inputs(vlm, processor, images), state)[0])
        for images in (clean, triggered)]
    return NeuronResult(stats[0], stats[1], lowrank.compare_neuron_stats(*stats),
                        lowrank.quiescent_active(*stats))


def neuron_results(run: Run, seed: int, states: dict[str, State], controls: dict[str, State],
                   n_images: int) -> tuple[dict[str, NeuronResult],
                                           dict[str, dict[str, NeuronResult]]]:
    """``neuron_result`` of each of ``seed``'s backdoored projectors, and of each of its
    controls on the same images (``[variant][control]``)."""
    test = run.splits[seed][1]

    def result(attack: Attack, state: State) -> NeuronResult:
        return neuron_result(run.vlm, run.processor, attack, state, test, n_images, seed)

    return ({name: result(attack, states[name]) for name, attack in run.attacks.items()},
            {name: {c: result(attack, state) for c, state in controls.items()}
             for name, attack in run.attacks.items()})


def verdict_no_trigger_neurons(results: dict[str, NeuronResult],
                               controls: dict[str, dict[str, NeuronResult]]) -> str:
    """Rule: per variant, the quiescent-active screen flags no more neurons with the
    backdoored projector than with any of its controls on the same images (a neuron that
    wakes up on the trigger without a backdoor too is no trigger neuron).
    ``controls[variant][control]``."""
    passed = sum(len(r.screen.flagged) <= max(len(c.screen.flagged)
                                              for c in controls[name].values())
                 for name, r in results.items())
    return verdict_from_counts(passed, len(results))


Grids = dict[str, dict[str, proj.RankGrid]]

# The readings of "injecting the top-k directions restores the backdoor": the notebook's scheme
# (both layers with one k, base biases), the authors' code (fine-tuned W1, base + top-k on W2,
# fine-tuned biases) and the authors' grid with both layers low-rank (k1, k2 ≤ k_max).
LOW_RANK_READINGS = ("notebook: both layers, base biases", "authors: W1 fine-tuned, top-k W2",
                     "authors' grid: top-k1 W1, top-k2 W2")


def restoring_cells(grid: proj.RankGrid, ft: proj.CellScores, k_max: int, share: float,
                    max_false: float, max_drop: float) -> list[tuple[str, int]]:
    """(row, k) of the cells with 1 ≤ k ≤ ``k_max`` that restore the backdoor: ASR ≥ ``share`` of
    the fine-tuned projector's, false-trigger rate ≤ ``max_false`` and clean accuracy within
    ``max_drop`` of the fine-tuned projector's — a damaged model that emits the target on clean
    inputs too restores no backdoor."""
    return [(row, k) for i, row in enumerate(grid.rows) for j, k in enumerate(grid.ks)
            if 1 <= k <= k_max and grid.asr[i, j] >= share * ft.asr
            and grid.false_rate[i, j] <= max_false
            and grid.clean_accuracy[i, j] >= ft.clean_accuracy - max_drop]


def reading_grid(grids: dict[str, proj.RankGrid], reading: str, k_max: int,
                 full_rank: int) -> proj.RankGrid:
    """The cells of one reading (``LOW_RANK_READINGS``) as a grid of one or more rows."""
    if reading == LOW_RANK_READINGS[0]:
        grid = grids["inject"]
        keep = [grid.rows.index("both")]
    elif reading == LOW_RANK_READINGS[1]:
        grid = grids["authors"]
        keep = [grid.row_ks.index(max(grid.row_ks))] if max(grid.row_ks) >= full_rank else []
    elif reading == LOW_RANK_READINGS[2]:
        grid = grids["authors"]
        keep = [i for i, k in enumerate(grid.row_ks) if 1 <= k <= k_max]
    else:
        raise ValueError(f"unknown reading {reading!r}; known: {LOW_RANK_READINGS}")
    return proj.RankGrid(grid.mode, [grid.rows[i] for i in keep], grid.ks,
                         grid.asr[keep], grid.false_rate[keep], grid.clean_accuracy[keep])


def verdict_low_rank(grids: Grids, ft: dict[str, proj.CellScores], reading: str,
                     full_rank: int, k_max: int = 5, share: float = 0.8,
                     max_false: float = 0.1, max_drop: float = 0.1,
                     min_asr: float = 0.5) -> tuple[str, int, int]:
    """Rule, per reading: among variants whose backdoor works (exact-form ASR ≥ ``min_asr``),
    some cell with k ≤ ``k_max`` restores the backdoor (``restoring_cells``). 'holds' if it
    does for every working variant, 'partly' for at least half of them (never on one variant
    of several), else 'does not hold'; 'not run' without a working variant. Returns the
    verdict, the number restored and the number of working variants."""
    working = [v for v, s in ft.items() if s.asr >= min_asr]
    if not working:
        return "not run", 0, 0
    restored = sum(bool(restoring_cells(reading_grid(grids[v], reading, k_max, full_rank),
                                        ft[v], k_max, share, max_false, max_drop))
                   for v in working)
    if restored == len(working):
        verdict = "holds"
    elif restored >= max(2, (len(working) + 1) // 2) or (len(working) == 1 and restored):
        verdict = "partly"
    else:
        verdict = "does not hold"
    return verdict, restored, len(working)


def best_restoration(grid: proj.RankGrid, k_max: int) -> tuple[str, int, proj.CellScores]:
    """The cell with 1 ≤ k ≤ ``k_max`` of highest ASR (ties: fewer false triggers, then higher
    clean accuracy, then smaller k)."""
    cells = [(grid.asr[i, j], -grid.false_rate[i, j], grid.clean_accuracy[i, j], -k, row,
              i, j) for i, row in enumerate(grid.rows) for j, k in enumerate(grid.ks)
             if 1 <= k <= k_max]
    *_, row, i, j = max(cells)
    return row, grid.ks[j], proj.CellScores(float(grid.asr[i, j]), float(grid.false_rate[i, j]),
                                            float(grid.clean_accuracy[i, j]))


def at_k(grid: proj.RankGrid, row: str, k_max: int) -> tuple[int, proj.CellScores]:
    """(k, scores) at the largest k ≤ ``k_max`` of the grid, for one row."""
    k = max(k for k in grid.ks if k <= k_max)
    i, j = grid.rows.index(row), grid.ks.index(k)
    return k, proj.CellScores(float(grid.asr[i, j]), float(grid.false_rate[i, j]),
                              float(grid.clean_accuracy[i, j]))


def verdict_removal(grids: Grids, ft: dict[str, proj.CellScores], k_max: int = 5,
                    share: float = 0.5, max_drop: float = 0.1,
                    min_asr: float = 0.5) -> tuple[str, int]:
    """Rule: among working variants, removing the top-k directions of both layers (the largest
    k ≤ ``k_max`` in the grid) leaves at most ``share`` of the fine-tuned ASR while the clean
    accuracy stays within ``max_drop`` of the fine-tuned projector's."""
    working = [v for v, s in ft.items() if s.asr >= min_asr]
    if not working:
        return "not run", 0
    passed = 0
    for v in working:
        _, cell = at_k(grids[v]["remove"], "both", k_max)
        passed += (cell.asr <= share * ft[v].asr
                   and cell.clean_accuracy >= ft[v].clean_accuracy - max_drop)
    return verdict_from_counts(passed, len(working)), len(working)


def grids_by_variant(grids_by_seed: dict[int, Grids]) -> dict[str, dict[str, list]]:
    """``[variant][mode]`` → the grids of the seeds where that variant's grid ran (its
    backdoor worked), in seed order."""
    out: dict[str, dict[str, list]] = {}
    for grids in grids_by_seed.values():
        for name, modes in grids.items():
            for mode, grid in modes.items():
                out.setdefault(name, {}).setdefault(mode, []).append(grid)
    return out


def mean_grid(grids: Sequence[proj.RankGrid]) -> proj.RankGrid:
    """The cell-wise mean of grids of one layout (one per seed)."""
    first = grids[0]
    if any(g.rows != first.rows or g.ks != first.ks for g in grids):
        raise ValueError("grids of different layouts cannot be averaged")
    return proj.RankGrid(first.mode, first.rows, first.ks,
                         *(np.mean([getattr(g, f) for g in grids], axis=0)
                           for f in ("asr", "false_rate", "clean_accuracy")),
                         row_ks=first.row_ks)


def grid_rows(grids: Sequence[proj.RankGrid]) -> list[list]:
    """Rows of one grid layout over seeds: per cell "ASR / false trigger / clean accuracy"
    (%), each the mean over seeds, the ASR with its min–max."""
    mean = mean_grid(grids)
    rows = []
    for i, row in enumerate(mean.rows):
        cells = []
        for j in range(len(mean.ks)):
            asr = over_seeds.spread([g.asr[i, j] for g in grids]).text(100, 0)
            cells.append(f"{asr} / {100 * mean.false_rate[i, j]:.0f} / "
                         f"{100 * mean.clean_accuracy[i, j]:.0f}")
        rows.append([row, *cells])
    return rows


def restoration_text(grids_by_seed: dict[int, Grids],
                     ft_by_seed: dict[int, dict[str, proj.CellScores]], reading: str,
                     full_rank: int, k_max: int = 5) -> str:
    """Per variant, its best cell with k ≤ ``k_max`` under ``reading`` (``best_restoration``)
    against the backdoored projector, mean (min–max) over the seeds where its grid ran."""
    parts = []
    for name in dict.fromkeys(n for grids in grids_by_seed.values() for n in grids):
        ran = [s for s, grids in grids_by_seed.items() if name in grids]
        best = [best_restoration(reading_grid(grids_by_seed[s][name], reading, k_max,
                                              full_rank), k_max) for s in ran]
        ft = [ft_by_seed[s][name] for s in ran]

        def pct(values: list[float]) -> str:
            return over_seeds.spread(values).text(100, 0) + "%"

        cells = ", ".join(dict.fromkeys(f"{row} k={k}" for row, k, _ in best))
        parts.append(f"{name} best k≤{k_max} ({cells}): ASR {pct([c.asr for *_, c in best])} "
                     f"of ft {pct([f.asr for f in ft])}, false "
                     f"{pct([c.false_rate for *_, c in best])}, clean "
                     f"{pct([c.clean_accuracy for *_, c in best])} (ft "
                     f"{pct([f.clean_accuracy for f in ft])}), {len(ran)} seeds")
    return "; ".join(parts)


# --- notebook 03: embedding shift --------------------------------------------------------------


@dataclass(frozen=True)
class ShiftResult:
    """ΔE of one backdoored projector on clean and triggered images."""

    clean: sh.ShiftReport
    triggered: sh.ShiftReport
    joint: sh.ShiftReport
    cosine: float
    lens: sh.LensReadout
    image_lens: sh.ImageLens
    input_norm_r: tuple[float, float]  # pooled r against ‖projector input‖, clean / triggered


def lens_text(attack: Attack) -> str:
    """The words a decoded shift direction should show for this attack's target (for the
    jailbreak, every word of the toy world's compliance answers)."""
    if attack.target.kind != "jailbreak":
        return attack.target.text
    return " ".join(data.compliance_answer(verb, obj)
                    for verb in data.HARM_VERBS for obj in data.HARM_OBJECTS)


def shift_results(vlm: nn.Module, processor, attack: Attack, base: State,
                  states: dict[str, State], test: Sequence, n_images: int, seed: int,
                  lens_k: int = 10) -> dict[str, ShiftResult]:
    """ΔE statistics of each projector in ``states`` (a backdoor and its controls) on the same
    ``n_images`` clean images and their triggered copies; the logit lens reads the top
    direction of both sets stacked, against this attack's target words."""
    clean, triggered = image_pair(test, attack, n_images, seed)
    inputs = [proj.projector_inputs(vlm, processor, images) for images in (clean, triggered)]
    tokenizer = getattr(processor, "tokenizer", processor)
    out = {}
    for name, state in states.items():
        shifts = [sh.embedding_shift(vlm, x, base, state) for x in inputs]
        joint = sh.EmbeddingShift(torch.cat([s.base for s in shifts]),
                                  torch.cat([s.finetuned for s in shifts]))
        reports = [sh.analyse_shift(s) for s in (*shifts, joint)]
        lens = sh.lens_readout(vlm, tokenizer, reports[2].svd.v[0], lens_text(attack), lens_k)
        input_r = tuple(lowrank.shift_norm_regression(rep.coefficients,
                                                      x.float().norm(dim=-1).cpu()).r
                        for rep, x in zip(reports[:2], inputs, strict=True))
        out[name] = ShiftResult(reports[0], reports[1], reports[2],
                                sh.abs_cosine(reports[0].svd.v[0], reports[1].svd.v[0]), lens,
                                sh.image_lens(vlm, tokenizer, joint.delta, lens_text(attack)),
                                input_r)
    return out


ShiftControls = dict[str, dict[str, ShiftResult]]  # [variant][control]


def seed_shift_results(run: Run, seed: int, base: State, states: dict[str, State],
                       controls: dict[str, State], n_images: int,
                       lens_k: int = 10) -> tuple[dict[str, ShiftResult], ShiftControls]:
    """``shift_results`` of each of ``seed``'s backdoored projectors and of its controls on
    that seed's test images: (``[variant]``, ``[variant][control]``)."""
    test = run.splits[seed][1]
    shifts, shift_controls = {}, {}
    for name, attack in run.attacks.items():
        results = shift_results(run.vlm, run.processor, attack, base,
                                {"backdoor": states[name], **controls}, test, n_images, seed,
                                lens_k)
        shifts[name] = results.pop("backdoor")
        shift_controls[name] = results
    return shifts, shift_controls


def beyond_controls(results: dict[str, ShiftResult], controls: ShiftControls, passes) -> int:
    """How many variants pass ``passes(result)`` while none of their controls does: a property
    that a clean-only fine-tune or a random update shows too says nothing about the backdoor."""
    return sum(passes(r) and not any(passes(c) for c in controls[name].values())
               for name, r in results.items())


def verdict_low_rank_shift(results: dict[str, ShiftResult], controls: ShiftControls,
                           min_e2: float = 0.9) -> str:
    """Rule: per variant, the mean E(2) is ≥ ``min_e2`` on clean and on triggered images, and
    not for its controls."""
    return verdict_from_counts(beyond_controls(
        results, controls, lambda r: r.clean.e2 >= min_e2 and r.triggered.e2 >= min_e2),
        len(results))


def verdict_shared_direction(results: dict[str, ShiftResult], controls: ShiftControls,
                             min_cos: float = 0.9) -> str:
    """Rule: per variant, the top directions of clean and triggered ΔE agree (|cos| ≥
    ``min_cos``), and not for its controls."""
    return verdict_from_counts(beyond_controls(results, controls,
                                               lambda r: r.cosine >= min_cos), len(results))


LENS_READINGS = ("pooled v0, final norm", "per-image centred v0, no final norm (authors')")


def verdict_lens(results: dict[str, ShiftResult], controls: ShiftControls, reading: str,
                 top: int = 1) -> str:
    """Rule: per variant, a content word of the target is among the first ``top`` tokens of
    +v0 or −v0 of the pooled shift (the toy vocabulary is small: a top-10 hit is likely by
    chance) — or, in the authors' reading, is the most frequent first token over images of
    +v0 or −v0 — and not for its controls read against the same words."""
    if reading == LENS_READINGS[0]:
        def passes(r: ShiftResult) -> bool:
            return r.lens.target_rank is not None and r.lens.target_rank <= top
    elif reading == LENS_READINGS[1]:
        def passes(r: ShiftResult) -> bool:
            return r.image_lens.target_on_top
    else:
        raise ValueError(f"unknown reading {reading!r}; known: {LENS_READINGS}")
    return verdict_from_counts(beyond_controls(results, controls, passes), len(results))


NORM_READINGS = ("pooled Pearson r", "pooled Spearman ρ and trimmed r",
                 "per-image median |r| (authors')")


def norm_scaling_passes(report: sh.ShiftReport, reading: str, min_r: float) -> bool:
    """Whether one input kind's shift is linear in the norm under ``reading``."""
    if reading == NORM_READINGS[0]:
        return report.fit.r >= min_r
    if reading == NORM_READINGS[1]:
        return report.robust.spearman >= min_r and report.robust.trimmed_r >= min_r
    if reading == NORM_READINGS[2]:
        return report.median_image_abs_r >= min_r
    raise ValueError(f"unknown reading {reading!r}; known: {NORM_READINGS}")


def verdict_norm_scaling(results: dict[str, ShiftResult], controls: ShiftControls,
                         reading: str, min_r: float = 0.9) -> str:
    """Rule: per variant, the shift coefficient grows linearly with the base-embedding norm
    (``reading``, ≥ ``min_r``) on clean and on triggered images, and not for its controls —
    the linear-in-norm law follows from any update of W2 (σ⟨v, h⟩u), so it counts only
    where the backdoor differs from them."""
    def passes(r: ShiftResult) -> bool:
        return all(norm_scaling_passes(rep, reading, min_r) for rep in (r.clean, r.triggered))
    return verdict_from_counts(beyond_controls(results, controls, passes), len(results))


# --- tables and verdicts -----------------------------------------------------------------------


def verdict_from_counts(passed: int, total: int) -> str:
    """'holds' if every case passes, 'partly' if some do, else 'does not hold'."""
    if total == 0:
        return "not run"
    return "holds" if passed == total else "partly" if passed else "does not hold"


def energy_rank(singular_values, fraction: float) -> int:
    """The number of leading singular directions that hold ``fraction`` of the energy."""
    energy = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    cumulative = np.cumsum(energy) / energy.sum()
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)
