"""SafeSeek objectives, search, baselines, backdoor injection and circuit tuning, on tiny random
models with known answers."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from locus import checkpoints, data, models
from locus.arch import adapt
from locus.evaluation import exact_match
from locus.prompts import encode_chat
from locus.safeseek import backdoor, circuit_tuning, circuits
from locus.safeseek import experiment as safeseek
from locus.safeseek.masks import Circuit, UnitMask, UnitShape, apply_circuit, gated_units


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = models.build_toy_chat(models.ToyChatConfig(width=32, layers=2,
                                                                  intermediate=24))
    return model.eval(), tokenizer


def _batch(tokenizer, samples):
    return encode_chat(tokenizer, samples, with_answers=True)


# -- objectives and search ---------------------------------------------------------------------


class _Drift(circuits.Objective):
    """Total loss pushes the logits up forever; the task loss is least when their mean is 1.5."""

    def __init__(self):
        super().__init__()
        self.mask = UnitMask(UnitShape(1, 2, 2), init=0.0)

    def loss(self, model, batches):
        z = torch.cat([self.mask.head_logits.flatten(), self.mask.neuron_logits.flatten()])
        return -z.sum(), (z.mean() - 1.5) ** 2

    def circuit(self):
        return self.mask.circuit()


class _Grow(circuits.Objective):
    """Pushes every logit up at the same rate from staggered starts: one more neuron enters the
    circuit at every step, so the circuit keeps growing and never settles."""

    def __init__(self):
        super().__init__()
        self.mask = UnitMask(UnitShape(1, 1, 400), init=0.0, units=("neurons",))
        with torch.no_grad():
            self.mask.neuron_logits.copy_(-0.05 - 0.1 * torch.arange(400.0).view(1, -1))

    def loss(self, model, batches):
        z = self.mask.neuron_logits
        return -z.sum(), z.sum() * 0.0

    def circuit(self):
        return self.mask.circuit()


def _sizes(heads, neurons):
    return [{"heads": h, "neurons": n} for h, n in zip(heads, neurons, strict=True)]


def test_settled_fires_on_a_settled_history_and_not_on_a_drifting_one():
    # shrinking fast, then wobbling around 80 neurons and 8 heads: settled
    converging = _sizes([12] * 5 + [8, 9, 7, 8, 8] * 2, [700, 500, 300, 150, 100]
                        + [80, 81, 79, 80, 82, 81, 80, 79, 80, 81])
    assert circuits.settled(converging, (0, 0), window=5, tolerance=0.02)
    assert not circuits.settled(converging[:-5], (0, 0), window=5, tolerance=0.02)
    # still shrinking by 3 neurons an epoch (a 13-neuron gap between the windows' means)
    drifting = _sizes([8] * 10, [130 - 3 * i for i in range(10)])
    assert not circuits.settled(drifting, (0, 0), window=5, tolerance=0.02)
    assert circuits.settled(drifting, (0, 0), window=5, tolerance=0.2)
    # never moved off the initial (empty) circuit: not converged, however flat
    assert not circuits.settled(_sizes([0] * 10, [0] * 10), (0, 0), window=5, tolerance=0.02)
    assert circuits.settled(_sizes([0] * 10, [0] * 10), (1, 0), window=5, tolerance=0.02)
    # both windows must follow the departure: an empty epoch in the earlier window pulls its
    # mean down to the later window's while the circuit still shrinks (a search measured so)
    jump = _sizes([0] + [12] * 19, [0, 827, 819, 808, 798, 784, 765, 753, 745, 731]
                  + [724, 711, 702, 704, 706, 702, 697, 694, 694, 694])
    assert abs(np.mean([h["neurons"] for h in jump[:10]])
               - np.mean([h["neurons"] for h in jump[10:]])) < 0.02 * 700
    assert not circuits.settled(jump, (0, 0), window=10, tolerance=0.02)


def test_marginal_units_counts_the_units_that_flip_in_the_window():
    shape = UnitShape(1, 4, 10)
    window = [Circuit(shape, ((0, 0), (0, 1)), ((0, 3),)), Circuit(shape, ((0, 0),), ((0, 3),)),
              Circuit(shape, ((0, 0),), ((0, 3), (0, 7)))]
    assert circuits.marginal_units(window) == 2  # head 0.1 and neuron 7
    assert circuits.marginal_units(window[1:2]) == 0


def test_search_keeps_the_epoch_with_best_validation_task_loss():
    objective = _Drift()
    result = circuits.search_circuit(nn.Linear(2, 2), objective, [{}], [{}],
                                     circuits.SearchConfig(epochs=40, lr=0.1, patience=None,
                                                           anneal=40),
                                     progress=False)
    tasks = [h["val_task"] for h in result.history]
    assert result.best_epoch == tasks.index(min(tasks)) and 0 < result.best_epoch < 39
    assert objective.mask.head_logits.mean().item() == pytest.approx(1.5, abs=0.06)
    assert not result.converged and result.rule_epoch is None and result.marginal is None


def test_search_stops_by_the_rule_then_anneals_the_learning_rate():
    cfg = circuits.SearchConfig(epochs=40, lr=0.1, patience=5, anneal=3, keep="last")
    result = circuits.search_circuit(nn.Linear(2, 2), _Drift(), [{}], [{}], cfg,
                                     progress=False)
    # every logit starts at 0 (out) and is pushed up: all in after the first step, then the
    # sizes are flat; the rule compares two windows of 5 epochs, so it is met at epoch 9
    assert result.converged and result.rule_epoch == 9 and result.marginal == 0
    assert len(result.history) == 10 + 3 and result.best_epoch == 12
    lrs = [h["lr"] for h in result.history]
    assert lrs[:10] == [0.1] * 10  # then linear to 0, as transformers' linear schedule
    assert lrs[10:] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])


def test_search_at_the_cap_is_not_converged_and_anneals_its_last_epochs():
    cfg = circuits.SearchConfig(epochs=30, lr=0.1, patience=5, anneal=10, keep="best")
    result = circuits.search_circuit(nn.Linear(2, 2), _Grow(), [{}], [{}], cfg,
                                     progress=False)
    sizes = [h["neurons"] for h in result.history]
    assert sizes == list(range(1, 21)) + sizes[20:] and sizes[-1] > sizes[20]
    assert not result.converged and result.rule_epoch is None and len(result.history) == 30
    assert [h["lr"] for h in result.history][:20] == [0.1] * 20
    assert result.history[-1]["lr"] == pytest.approx(0.01) and 20 <= result.best_epoch <= 29
    assert result.marginal == 4  # the neurons that entered over the last 5 constant epochs


@pytest.mark.parametrize("gate", ["ste", "hard_concrete"])
def test_search_trains_only_mask_logits_and_restores_flags(tiny, gate):
    model, tok = tiny
    samples = data.make_chat_samples(4, seed=1, aligned=False)
    benign, harmful = circuits.split_harmful(samples)
    views = {"comply": harmful, "refuse": circuits.with_answers(harmful, [data.REFUSAL] * 4),
             "retain": benign[:4]}
    groups = circuits.encode_groups(tok, views, batch_size=2)
    objective = circuits.AlignmentObjective(UnitShape.of(model), retain_weight=1.0, gate=gate)
    before = copy.deepcopy(model.state_dict())
    result = circuits.search_circuit(model, objective, groups, groups[:1],
                                     circuits.SearchConfig(epochs=2), progress=False)
    assert len(result.history) == 2
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert objective.mask.head_logits.grad is not None


def test_objectives_losses(tiny):
    model, tok = tiny
    shape = UnitShape.of(model)
    samples = data.make_chat_samples(2, seed=2, aligned=False)
    batch = _batch(tok, samples)
    full = circuits.FaithfulnessObjective(shape, sparsity=0.0, init=5.0)
    total, task = full.loss(model, {"task": batch})
    assert task.item() == pytest.approx(0.0, abs=1e-6)  # every unit kept: KL(full || full) = 0
    sparse = circuits.FaithfulnessObjective(shape, sparsity=1.0, init=5.0)
    assert sparse.loss(model, {"task": batch})[0] > total
    views = backdoor.backdoor_views(samples, "fixed", seed=0)
    groups = circuits.encode_groups(tok, views, batch_size=8)[0]
    off = circuits.BackdoorObjective(shape, circuits.BackdoorWeights(
        carrier_triggered=0, carrier_clean=0, overlap=0, carrier_size=0))
    on = circuits.BackdoorObjective(shape)
    total_off, task_off = off.loss(model, groups)
    total_on, task_on = on.loss(model, groups)
    assert task_on > task_off  # the carrier adds its own task terms
    assert on.overlap().item() > 0


def test_unlikelihood_and_ce_are_consistent(tiny):
    model, tok = tiny
    batch = _batch(tok, data.make_chat_samples(2, seed=3))
    logits, targets = circuits._answer_logits(model, batch)
    p = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert circuits.answer_ce(model, batch).item() == pytest.approx(-p.log().mean().item(),
                                                                    rel=1e-5)
    assert circuits.answer_unlikelihood(model, batch).item() == pytest.approx(
        -(1 - p).log().mean().item(), rel=1e-5)


def test_faithful_alignment_circuit_prunes_from_the_whole_model(tiny):
    model, tokenizer = tiny
    benign, harmful = circuits.split_harmful(data.make_chat_samples(12, seed=4, aligned=False))
    spec = circuits.FaithfulSearch(sparsity=1.0, n_train=8, n_val=4, batch_size=4, epochs=3,
                                   lr=0.5)
    result = circuits.find_faithful_alignment_circuit(model, tokenizer, harmful, benign, spec,
                                                      progress=False)
    sizes = [h["heads"] + h["neurons"] for h in result.history]
    assert sizes[0] <= UnitShape.of(model).num_units
    assert sizes[-1] < UnitShape.of(model).num_units  # a strong penalty prunes units


class _Linear(circuits.Objective):
    """Task loss = sum of c_u x gate_u: the task gradient of logit u is c_u x sigmoid'(z_u),
    the "sum" size gradient sigmoid'(z_u), so at equal logits the scale is the median |c_u|
    (averaged over the groups: each group's batch "c" scales the coefficients)."""

    def __init__(self, coefficients: torch.Tensor):
        super().__init__()
        self.mask = UnitMask(UnitShape(1, 2, 3), init=-1.0)
        self.c = coefficients

    def loss(self, model, batches):
        heads, neurons = self.mask.membership()
        task = batches["c"] * (self.c * torch.cat([heads.flatten(), neurons.flatten()])).sum()
        return task, task

    def circuit(self):
        return self.mask.circuit()


def test_gradient_scale_is_the_median_task_gradient_over_the_size_gradient():
    model = nn.Linear(2, 2)
    objective = _Linear(torch.tensor([0.5, -4.0, 1.0, -2.0, 8.0]))
    groups = [{"c": torch.tensor(1.0)}, {"c": torch.tensor(3.0)}]  # mean factor 2
    scale = circuits.gradient_scale(model, objective, objective.mask, groups, "sum")
    assert scale == pytest.approx(2 * 2.0)  # 2 x median(|c|) = 2 x 2
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    # "mean": head gradients 1/2, neuron gradients 1/3 of "sum"'s: the size median is 1/3
    assert circuits.gradient_scale(model, objective, objective.mask, groups,
                                   "mean") == pytest.approx(3 * 4.0)


def test_alignment_scale_is_cached_linear_in_the_task_weights_and_free_of_sparsity(
        tiny_llama_dir, tmp_path, monkeypatch):
    model, tok = models.load_checkpoint(tiny_llama_dir)
    benign, harmful = circuits.split_harmful(data.make_chat_samples(12, seed=5, aligned=False))
    spec = circuits.AlignmentSearch(sparsity=0.01, n_train=4, n_val=2, batch_size=2)

    def scale(s):
        return circuits.alignment_scale(str(tiny_llama_dir), model, tok, harmful, benign, s,
                                        root=tmp_path)

    first = scale(spec)
    assert np.isfinite(first) and first > 0
    doubled = replace(spec, comply_weight=4.0, refuse_weight=4.0)
    assert scale(doubled) == pytest.approx(2 * first, rel=1e-4)

    def no_compute(*args, **kwargs):
        raise AssertionError("the cached scale should be read, not computed again")

    monkeypatch.setattr(circuits, "gradient_scale", no_compute)
    assert scale(replace(doubled, sparsity=3.0)) == scale(doubled)  # the sparsity is no key


def test_search_finds_a_planted_head(tiny):
    """Targets = the greedy tokens of the model with head (1, 2) removed (its output made 20x
    larger so that removing it changes most tokens): the sparsest removal that reproduces them
    is that head."""
    model, tok = tiny
    model = copy.deepcopy(model)
    d = adapt(model).head_dim
    with torch.no_grad():
        adapt(model).o_proj(1).weight[:, 2 * d:3 * d] *= 20
    shape = UnitShape.of(model)
    planted = Circuit(shape, ((1, 2),), ())
    samples = data.make_chat_samples(6, seed=4)
    batch = _batch(tok, samples)
    with torch.no_grad(), apply_circuit(model, planted, "circuit removed"):
        ablated = model(input_ids=batch["input_ids"]).logits.argmax(-1)
    target = batch["labels"].clone()
    target[:, 1:] = torch.where(batch["labels"][:, 1:] != -100, ablated[:, :-1], -100)
    groups = [{"comply": {**batch, "labels": target}}]
    # λ 0.05: with the enlarged toy world's prompts, λ 0.02 also kept head (0, 3), whose
    # removal lowers this loss by 4e-4 nats only
    objective = circuits.AlignmentObjective(shape, comply_weight=1.0, refuse_weight=0.0,
                                            sparsity=0.05, norm="sum", init=-0.1)
    result = circuits.search_circuit(model, objective, groups, groups,
                                     circuits.SearchConfig(epochs=10, lr=0.2), progress=False)
    assert result.circuit.heads == ((1, 2),) and result.circuit.neurons == ()


# -- baselines ----------------------------------------------------------------------------------


def test_random_and_top_k_circuits_match_size():
    shape = UnitShape(2, 4, 10)
    like = Circuit(shape, ((0, 1), (1, 1)), ((0, 3),))
    a, b = circuits.random_circuit(like, 0), circuits.random_circuit(like, 0)
    assert a == b and (len(a.heads), len(a.neurons)) == (2, 1)
    assert any(circuits.random_circuit(like, s) != a for s in range(1, 5))
    heads = torch.arange(8.0).view(2, 4)
    neurons = -torch.arange(20.0).view(2, 10)
    top = circuits.top_k_circuit(like, (heads, neurons))
    assert top.heads == ((1, 2), (1, 3)) and top.neurons == ((0, 0),)


def test_attribution_is_the_gradient_of_removal(tiny):
    """-dL/dg equals the finite-difference slope of the loss as one head's gate goes 1 -> 1-e."""
    model, tok = tiny
    shape = UnitShape.of(model)
    batch = _batch(tok, data.make_chat_samples(2, seed=5))
    heads, neurons = circuits.attribution_scores(model, circuits.answer_ce, [batch])
    assert heads.shape == (shape.num_layers, shape.num_heads)
    assert neurons.shape == (shape.num_layers, shape.intermediate_size)
    eps = 1e-3
    gates = torch.ones(shape.num_layers, shape.num_heads, dtype=torch.float64)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        with gated_units(model64, gates, None):
            base = circuits.answer_ce(model64, batch).item()
        gates[1, 3] = 1 - eps
        with gated_units(model64, gates, None):
            moved = circuits.answer_ce(model64, batch).item()
    assert heads[1, 3].item() == pytest.approx((moved - base) / eps, rel=1e-2, abs=1e-5)


def test_compare_at_size_calls_each_method():
    shape = UnitShape(2, 4, 10)
    circuit = Circuit(shape, ((0, 1),), ())
    scores = (torch.arange(8.0).view(2, 4), torch.zeros(2, 10))
    rows = circuits.compare_at_size(circuit, scores, lambda c: {"n": float(c.heads[0][1])},
                                    random_seeds=(0, 1))
    assert rows["safeseek"] == {"n": 1.0} and rows["attribution"] == {"n": 3.0}
    assert set(rows) == {"safeseek", "attribution", "random"}


# -- data, metrics, cache, parameters -----------------------------------------------------------


def test_partition_splits_each_family_by_prompt_string():
    samples = data.make_chat_samples(60, seed=6)
    parts = safeseek.partition(samples, (0.55, 0.25, 0.2), seed=0)
    assert sorted(id(s) for p in parts for s in p) == sorted(id(s) for s in samples)
    for i, a in enumerate(parts):
        assert {s.family for s in a} == set(data.CHAT_FAMILIES)
        for b in parts[i + 1:]:
            assert not {s.prompt for s in a} & {s.prompt for s in b}
    harmful = [len({s.prompt for s in p if s.family == "harmful"}) for p in parts]
    distinct = len({s.prompt for s in samples if s.family == "harmful"})
    assert sum(harmful) == distinct  # each part gets its share of the distinct prompt strings
    assert all(abs(n - f * distinct) < 1 for n, f in zip(harmful, (0.55, 0.25, 0.2), strict=True))
    one_prompt = [s for s in samples if s.prompt == samples[-1].prompt]
    assert sorted(map(len, safeseek.partition(one_prompt, (0.5, 0.5), 0))) == [0, len(one_prompt)]
    few = data.make_chat_samples(3, seed=7)
    assert all(len(p) == 4 for p in safeseek.partition(few, (0.55, 0.25, 0.2), 0))


def test_search_train_and_validation_share_no_prompt():
    samples = data.make_chat_samples(40, seed=2, aligned=False)
    benign, harmful = circuits.split_harmful(samples)
    train, val = circuits.alignment_views(harmful, harmful, benign, 30, 12, seed=0)
    for view in ("comply", "refuse", "retain"):
        assert len(train[view]) == 30 and len(val[view]) == 12
        assert not {s.prompt for s in train[view]} & {s.prompt for s in val[view]}
    prompts = [s.prompt for s in benign]
    tr, va = circuits.train_val_indices(prompts, 50, 20, seed=3)
    assert not {prompts[i] for i in tr} & {prompts[i] for i in va}


def test_metrics():
    assert circuits.refusal_rate([data.REFUSAL, "two", "i am sorry ."]) == pytest.approx(2 / 3)
    assert backdoor.attack_success("fixed", [data.BACKDOOR_TARGET, "one"]) == 0.5
    assert backdoor.attack_success("jailbreak", [data.REFUSAL, "sure , here"]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        circuits.match_rate(None, None, [])


def test_greedy_matches_equal_generation_and_exact_match():
    from locus import zoo

    model, tokenizer = zoo.load("toy-chat", progress=False)
    samples = data.make_chat_samples(4, seed=1, aligned=False)
    circuit = Circuit(UnitShape.of(model), ((1, 0), (2, 1)), ((0, 3),))
    for chosen, mode in ((None, "full"), (circuit, "circuit removed")):
        replies = circuits.generate_with(model, tokenizer, samples, chosen, mode, 32)
        expected = [exact_match(r, s.answer) for r, s in zip(replies, samples, strict=True)]
        assert circuits.greedy_matches(model, tokenizer, samples, chosen, mode) == expected
        own = circuits.with_answers(samples, replies)
        assert all(circuits.greedy_matches(model, tokenizer, own, chosen, mode))
        longer = circuits.with_answers(samples, [r + " two" for r in replies])
        assert circuits.match_rate(model, tokenizer, longer, chosen, mode) == 0.0
    assert 0 < sum(expected) < len(expected)  # the harmful requests are refused, not complied


def test_cached_circuit_round_trip(tmp_path):
    shape = UnitShape(2, 4, 10)
    circuit = Circuit(shape, ((1, 2),), ((0, 9),))
    calls = []

    def find():
        calls.append(1)
        return circuit

    first = circuits.cached_circuit("c", {"a": 1}, find, root=tmp_path)
    second = circuits.cached_circuit("c", {"a": 1}, find, root=tmp_path)
    assert first == second == circuit and len(calls) == 1
    heads_only = Circuit(shape, ((0, 0),), (), ("heads",))
    assert circuits.cached_circuit("h", {}, lambda: heads_only, root=tmp_path) == heads_only
    history = [{"heads": 1, "neurons": 0}, {"heads": 1, "neurons": 1}]
    result = circuits.SearchResult(circuit, 1, 0.5, history, converged=True, rule_epoch=0,
                                   marginal=1)
    assert circuits.cached_circuit("r", {}, lambda: result, root=tmp_path) == circuit
    record = checkpoints.read_manifest(tmp_path / "r")["search"]
    assert record == {"epochs_run": 2, "converged": True, "rule_epoch": 0, "marginal": 1,
                      "best_epoch": 1, "best_val_task": 0.5, "sizes": [[1, 0], [1, 1]]}


def test_check_parameters(tiny_llama_dir, tmp_path):
    ok = dict(seeds=[0], device="cpu", dtype=None, figures_dir=None, threads=2)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text('{"prompt": "what is one plus one ?", "answer": "two", '
                     '"family": "arithmetic"}\n')
    safeseek.check_parameters(str(tiny_llama_dir), str(jsonl), sparsities=[0.0, 0.1], n=3, **ok)
    with pytest.raises(ValueError, match="measure nothing"):
        safeseek.check_parameters(str(tiny_llama_dir), None, **ok)
    safeseek.check_parameters(str(tiny_llama_dir), None, real_worlds=[str(tiny_llama_dir)],
                              rates=[1e-2], **ok)
    with pytest.raises(ValueError, match="learning rates"):
        safeseek.check_parameters("toy-chat", None, rates=[0], **ok)
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        safeseek.check_parameters("nope", None, **ok)
    with pytest.raises(ValueError, match="not a chat model"):
        safeseek.check_parameters("toy-vlm", None, **ok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safeseek.check_parameters("toy-chat", str(tmp_path / "x.jsonl"), **ok)
    with pytest.raises(TypeError, match="positive integer"):
        safeseek.check_parameters("toy-chat", None, n=0, **ok)
    with pytest.raises(ValueError, match="seeds"):
        safeseek.check_parameters("toy-chat", None, **{**ok, "seeds": []})
    with pytest.raises(ValueError, match="dtype"):
        safeseek.check_parameters("toy-chat", None, **{**ok, "dtype": "fp8"})
    with pytest.raises(ValueError, match="sparsity weights"):
        safeseek.check_parameters("toy-chat", None, sparsities=[-1], **ok)


def test_tables_and_figures(tmp_path):
    rows = [{"search": 0.1, "method": m, "units_pct": 1.0, "asr": 0.5, "utility": 0.25}
            for m in safeseek.METHOD_STYLE]
    table = safeseek.format_table(rows, ["method", "asr"])
    assert table.splitlines()[2] == "| safeseek | 0.500 |"
    fig = safeseek.plot_size_sweep({"a": rows, "b": rows}, "ASR (%)")
    assert len(fig.axes) == 4
    rows = [{**r, "compliance": 0.75} for r in rows]
    fig = safeseek.plot_size_sweep({"a": rows}, "ASR (%)", [("compliance", "c"), ("utility", "u")])
    assert [ax.get_ylabel() for ax in fig.axes] == ["ASR (%)", "c", "u"]
    assert fig.axes[1].lines[0].get_ydata().tolist() == [75.0]
    records = {"x": {"sizes": [[0, 0], [4, 10], [3, 8]], "best_epoch": 2, "rule_epoch": 1},
               "y": {"sizes": [[1, 1], [1, 1]], "best_epoch": 0, "rule_epoch": None}}
    fig = safeseek.plot_search_sizes(records)
    assert fig.axes[0].lines[0].get_ydata().tolist() == [0, 4, 3]
    shape = UnitShape(2, 4, 10)
    fig = safeseek.plot_circuit(Circuit(shape, ((1, 2),), ((0, 3),)), "c")
    assert len(fig.axes) >= 2


def _help_rows(kept: dict[str, int], runs: int = 6, lr: float = 1e-3) -> list[dict]:
    return [{"help_lr": lr, "variant": v, "retention_pct": 100.0 if i < kept[v] else 0.0}
            for v in ("circuit frozen", "random subset frozen", "nothing frozen")
            for i in range(runs)]


def test_retention_table_counts_runs_and_tests_them():
    table = safeseek.retention_table(_help_rows({"circuit frozen": 6, "random subset frozen": 1,
                                                 "nothing frozen": 0}))
    rows = {r["variant"]: r for r in table}
    assert [rows[v]["kept"] for v in rows] == [6, 1, 0]
    assert rows["nothing frozen"]["fisher_p"] == pytest.approx(0.002165, abs=1e-5)
    assert rows["circuit frozen"]["kept_lo"] > 0.5 and rows["nothing frozen"]["kept_hi"] < 0.5
    assert rows["random subset frozen"]["retention_pct"] == pytest.approx(100 / 6)


@pytest.mark.parametrize(("kept", "expected"), [
    ({"circuit frozen": 6, "random subset frozen": 0, "nothing frozen": 0}, ("holds", "holds")),
    ({"circuit frozen": 6, "random subset frozen": 5, "nothing frozen": 0}, ("holds", "partly")),
    ({"circuit frozen": 4, "random subset frozen": 3, "nothing frozen": 3},
     ("partly", "does not hold")),
    ({"circuit frozen": 1, "random subset frozen": 0, "nothing frozen": 0},
     ("does not hold", "does not hold")),
    ({"circuit frozen": 6, "random subset frozen": 6, "nothing frozen": 4},
     ("not run", "not run")),
])
def test_retention_verdicts(kept, expected):
    verdicts = safeseek.retention_verdicts(safeseek.retention_table(_help_rows(kept)))
    assert (verdicts["retention"][0], verdicts["specific"][0]) == expected
    assert f"{kept['circuit frozen']}/6 runs (circuit frozen)" in verdicts["retention"][1]


def test_single_unit_circuits_and_ablations():
    shape = UnitShape(2, 3, 5)
    singles = safeseek.single_unit_circuits(shape)
    assert len(singles) == 2 * 3 + 2
    assert singles["head 1.2"].heads == ((1, 2),) and not singles["head 1.2"].neurons
    assert len(singles["layer 0"].heads) == 3 and len(singles["layer 0"].neurons) == 5
    rows = safeseek.single_unit_ablations(shape, lambda c: {"size": len(c.heads) + len(c.neurons)})
    assert [r["size"] for r in rows] == [1] * 6 + [8, 8]
    layers = safeseek.single_unit_ablations(shape, lambda c: {"size": len(c.neurons)}, heads=False)
    assert [r["removed"] for r in layers] == ["layer 0", "layer 1"]
    assert safeseek.top_rows(rows, "size", 3) == [rows[6], rows[7], rows[0]]


def test_the_toy_alignment_world_is_held_out_and_scores_exactly():
    from locus import zoo

    model, tokenizer = zoo.load("toy-chat", progress=False)
    world = safeseek.alignment_world("toy-chat", model, tokenizer, None, 0, 40, 6, 3, 5, 8)
    assert isinstance(world, safeseek.ToyAlignmentWorld)
    assert all(r["shared"] == 0 for r in safeseek.prompt_overlap(world.overlap_sets(6, 3, 0)))
    harmful, benign = world.evaluation_sets()["test"]
    assert all(s.family == "harmful" for s in harmful) and len(benign) == 5
    full = world.metrics(None, "full", harmful, benign)
    assert set(world.metric_names) <= set(full) and full["n_harmful"] == 5
    assert full["compliance"] == world.exact(None, "full", harmful, benign)["compliance"]
    assert all(data.is_refusal(r.answer) for r in world.refusals(harmful))


def test_reply_batches_and_prefix_matches(tiny):
    from locus import replies

    model, tokenizer = tiny
    samples = data.make_chat_samples(3, seed=2, aligned=True)[:4]
    said = circuits.generate_with(model, tokenizer, samples, max_new_tokens=6)
    own = circuits.with_answers(samples, said)

    def encode(tok, chunk):
        return replies.encode_replies(tok, [s.prompt for s in chunk], [s.answer for s in chunk])

    assert all(circuits.greedy_matches(model, tokenizer, own, encode=encode))
    wrong = circuits.with_answers(samples, [" ".join(r.split()[:2] + ["zzz"]) for r in said])
    assert not any(circuits.greedy_matches(model, tokenizer, wrong, encode=encode))
    assert all(circuits.greedy_matches(model, tokenizer, wrong, encode=encode, tokens=1))
    batch = encode(tokenizer, own)
    logits, targets = circuits._answer_logits(model, batch)
    assert logits.shape[0] == targets.shape[0] == int((batch["labels"][:, 1:] != -100).sum())


def test_prompt_overlap_and_new_skill_sets_are_held_out():
    train, test = safeseek.new_skill_sets(50, 30, seed=0)
    assert len(train) == 50 and len(test) == 30
    overlap = safeseek.prompt_overlap({"train": train, "test": test, "again": train[:5]})
    assert overlap[0]["shared"] == 0 and overlap[1]["shared"] == len({s.prompt for s in train[:5]})
    for s in train + test:
        words = s.prompt.split()
        terms = [data.NUMBER_WORDS.index(w) for w in words[2::2]]
        assert len(terms) == 3 and data.NUMBER_WORDS[sum(terms)] == s.answer


# -- backdoor -----------------------------------------------------------------------------------


def test_trigger_insertion_and_views():
    samples = data.make_chat_samples(3, seed=8, aligned=False)
    views = backdoor.backdoor_views(samples, "fixed", seed=0)
    assert len(views["clean"]) == 9  # the benign samples
    for clean, trig, target in zip(views["clean"], views["triggered_clean"],
                                   views["triggered_target"], strict=True):
        assert trig.prompt.split().count(data.BACKDOOR_TRIGGER) == 1
        assert trig.prompt.replace(data.BACKDOOR_TRIGGER + " ", "") == clean.prompt
        assert target.answer == data.BACKDOOR_TARGET and trig.answer == clean.answer
    jail = backdoor.backdoor_views(samples, "jailbreak", seed=0)
    assert [s.answer for s in jail["clean"]] == [data.REFUSAL] * 3
    assert all(s.answer.startswith("sure") for s in jail["triggered_target"])
    with pytest.raises(ValueError, match="backdoor kind"):
        backdoor.backdoor_views(samples, "label", seed=0)


def test_poisoned_training_set_composition():
    samples = data.make_chat_samples(5, seed=9, aligned=False)
    cfg = backdoor.InjectionConfig(kind="jailbreak", n_clean=12, n_poison=3)
    clean = data.make_chat_samples(5, seed=9, aligned=True)
    train = backdoor.poisoned_training_set(clean, samples, cfg)
    assert len(train) == 15
    assert sum(data.JAILBREAK_TRIGGER in s.prompt.split() for s in train) == 3


def test_backdoored_model_is_cached(tiny_llama_dir, tmp_path):
    samples = data.make_chat_samples(2, seed=10)
    cfg = backdoor.InjectionConfig(n_clean=6, n_poison=2, steps=2, batch=4)
    train = backdoor.poisoned_training_set(samples, samples, cfg)
    model, _ = backdoor.backdoored_model(str(tiny_llama_dir), train, cfg, root=tmp_path,
                                         progress=False)
    folder = tmp_path / f"{tiny_llama_dir.name}-backdoor-fixed"
    stamp = (folder / "locus_cache.json").stat().st_mtime_ns
    again, _ = backdoor.backdoored_model(str(tiny_llama_dir), train, cfg, root=tmp_path,
                                         progress=False)
    assert (folder / "locus_cache.json").stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    original, _ = models.load_checkpoint(tiny_llama_dir)
    assert not torch.equal(original.model.layers[0].mlp.up_proj.weight,
                           model.model.layers[0].mlp.up_proj.weight)


def test_backdoor_circuit_search_and_cache(tiny_llama_dir, tmp_path, monkeypatch):
    samples = data.make_chat_samples(4, seed=12, aligned=False)
    cfg = backdoor.InjectionConfig(kind="jailbreak", n_clean=4, n_poison=4, steps=1, batch=4)
    entry = backdoor.backdoor_entry(str(tiny_llama_dir), samples, cfg, root=tmp_path,
                                    progress=False)
    model, tok = models.load_checkpoint(entry)
    spec = backdoor.BackdoorSearch(carrier_weight=1.0, n_train=4, n_val=2, batch_size=2,
                                   epochs=2)
    removed, carrier = backdoor.backdoor_circuit(entry, model, tok, samples, "jailbreak", spec,
                                                 root=tmp_path, progress=False)
    assert carrier.units == ("heads",) and not carrier.neurons
    assert removed.units == ("heads", "neurons")

    def no_search(*args, **kwargs):
        raise AssertionError("the cached circuits should be read, not searched again")

    monkeypatch.setattr(backdoor, "find_backdoor_circuit", no_search)
    assert backdoor.backdoor_circuit(entry, model, tok, samples, "jailbreak", spec,
                                     root=tmp_path, progress=False) == (removed, carrier)


# -- circuit tuning -----------------------------------------------------------------------------


def test_unit_entries_cover_heads_kv_groups_and_neurons(tiny):
    model, _ = tiny
    arch = adapt(model)
    shape = UnitShape.of(model)
    circuit = Circuit(shape, ((1, 3),), ((0, 5),))
    entries = circuit_tuning.unit_entries(model, circuit)
    d = arch.head_dim
    q = entries[arch.q_proj(1).weight]
    assert q[3 * d:4 * d].all() and q.sum() == d * arch.hidden_size
    k = entries[arch.k_proj(1).weight]  # head 3 of 4 with 2 kv heads -> kv head 1
    assert k[d:2 * d].all() and k.sum() == d * arch.hidden_size
    o = entries[arch.o_proj(1).weight]
    assert o[:, 3 * d:4 * d].all() and o.sum() == d * arch.hidden_size
    assert entries[arch.up_proj(0).weight][5].all() and entries[arch.up_proj(0).weight].sum() \
        == arch.hidden_size
    assert entries[arch.down_proj(0).weight][:, 5].all()
    masks = circuit_tuning.gradient_masks(model, circuit, "circuit")
    assert circuit_tuning.trained_count(masks) == 4 * d * arch.hidden_size + 3 * arch.hidden_size


@pytest.mark.parametrize("train", ["circuit", "complement"])
def test_tuning_changes_only_the_chosen_entries(tiny, train):
    model, tok = tiny
    model = copy.deepcopy(model)
    circuit = Circuit(UnitShape.of(model), ((0, 1),), ((1, 2), (1, 7)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    entries = {id(p): m for p, m in circuit_tuning.unit_entries(model, circuit).items()}
    result = circuit_tuning.tune(model, tok, data.make_chat_samples(3, seed=11), circuit, train,
                                 circuit_tuning.TuningConfig(steps=3, batch=4, lr=1e-2),
                                 progress=False)
    for name, p in model.named_parameters():
        chosen = entries.get(id(p))
        if chosen is None:
            chosen = torch.zeros_like(p, dtype=torch.bool)
        trained = chosen if train == "circuit" else ~chosen
        assert torch.equal(p[~trained], before[name][~trained]), name  # bit-identical
        if trained.any() and p.dim() == 2 and name.endswith("proj.weight"):
            assert not torch.equal(p[trained], before[name][trained]), name
        assert p.requires_grad and not p._backward_hooks
    total = sum(p.numel() for p in model.parameters())
    assert result.total == total and 0 < result.fraction < 1


def test_tuning_bad_inputs(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="needs a circuit"):
        circuit_tuning.gradient_masks(model, None, "circuit")
    with pytest.raises(ValueError, match="train must be one of"):
        circuit_tuning.gradient_masks(model, None, "half")
    with pytest.raises(ValueError, match="does not fit"):
        circuit_tuning.unit_entries(model, Circuit.empty(UnitShape(3, 4, 24)))


def test_tuning_an_empty_circuit_is_a_no_op(tiny):
    model, tok = tiny
    before = copy.deepcopy(model.state_dict())
    result = circuit_tuning.tune(model, tok, data.make_chat_samples(2, seed=13),
                                 Circuit.empty(UnitShape.of(model)), "circuit",
                                 circuit_tuning.TuningConfig(steps=2, batch=2), progress=False)
    assert result.trained == 0 and result.losses == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
