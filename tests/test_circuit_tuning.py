"""The sparse circuit that Safety Circuit Tuning tunes: chosen from a large circuit by
attribution within a parameter budget."""

import pytest
import torch

from locus import data, models
from locus.safeseek import circuit_tuning
from locus.safeseek import experiment as safeseek
from locus.safeseek.masks import Circuit, UnitShape


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _ = models.build_toy_chat(models.ToyChatConfig(width=32, layers=2, intermediate=24))
    return model


def _scores(shape: UnitShape) -> tuple[torch.Tensor, torch.Tensor]:
    heads = torch.arange(shape.num_layers * shape.num_heads, dtype=torch.float32)
    neurons = torch.arange(shape.num_layers * shape.intermediate_size, dtype=torch.float32)
    return (heads.view(shape.num_layers, -1) / 100,
            neurons.view(shape.num_layers, -1) / 1000)


def test_budget_keeps_the_top_scoring_units_that_fit(tiny):
    shape = UnitShape.of(tiny)
    big = Circuit(shape, ((0, 0), (1, 3)), tuple((layer, n) for layer in range(2)
                                                 for n in range(0, 24, 2)))
    neuron = circuit_tuning.parameter_fraction(tiny, Circuit(shape, (), ((0, 0),)))
    head = circuit_tuning.parameter_fraction(tiny, Circuit(shape, ((1, 3),), ()))
    # Room for head (1, 3) (the best score) and three neurons; head (0, 0) would not fit.
    small = circuit_tuning.budget_circuit(tiny, big, _scores(shape), head + 3.5 * neuron)
    assert small.heads == ((1, 3),)
    assert small.neurons == ((1, 18), (1, 20), (1, 22))  # the highest-scoring neurons
    assert circuit_tuning.parameter_fraction(tiny, small) <= head + 3.5 * neuron
    # Too small for a head: the neurons fill it, in score order.
    only_neurons = circuit_tuning.budget_circuit(tiny, big, _scores(shape), 2.5 * neuron)
    assert only_neurons.heads == () and only_neurons.neurons == ((1, 20), (1, 22))
    everything = circuit_tuning.budget_circuit(tiny, big, _scores(shape), 1.0)
    assert everything == big


def test_budget_must_be_a_fraction(tiny):
    shape = UnitShape.of(tiny)
    with pytest.raises(ValueError, match="fraction"):
        circuit_tuning.budget_circuit(tiny, Circuit.empty(shape), _scores(shape), 0)


def _restore_rows(restored: dict[str, int], runs: int = 10, lr: float = 1e-3) -> list[dict]:
    return [{"restore_lr": lr, "variant": variant, "retention_pct": 100.0 if i < k else 40.0}
            for variant, k in restored.items() for i in range(runs)]


def test_restore_verdicts_follow_the_counts():
    def verdicts(restored: dict[str, int], **kwargs) -> dict[str, str]:
        table = safeseek.retention_table(_restore_rows(restored, **kwargs), 96.5,
                                         strength="restore_lr", reference="circuit tuned")
        return {k: v for k, (v, _) in safeseek.restore_verdicts(table).items()}

    full = {"full fine-tune": 10}
    assert verdicts({"circuit tuned": 10, "random subset tuned": 2, **full}) == {
        "restores": "holds", "specific": "holds"}
    # Restored everywhere, but the random subsets do as well: not specific to the circuit.
    assert verdicts({"circuit tuned": 10, "random subset tuned": 10, **full}) == {
        "restores": "holds", "specific": "does not hold"}
    # More runs than random but not significantly (7/10 vs 4/10, Fisher p 0.37).
    assert verdicts({"circuit tuned": 7, "random subset tuned": 4, **full}) == {
        "restores": "partly", "specific": "partly"}
    assert verdicts({"circuit tuned": 3, "random subset tuned": 3, **full})["restores"] \
        == "does not hold"
    table = safeseek.retention_table(
        _restore_rows({"circuit tuned": 10, "random subset tuned": 2, **full})
        + _restore_rows({"circuit tuned": 2, "random subset tuned": 2, **full}, lr=3e-3),
        96.5, strength="restore_lr", reference="circuit tuned")
    restores, text = safeseek.restore_verdicts(table)["restores"]
    assert restores == "partly" and "lr 0.001" in text and "lr 0.003" in text


def test_tuning_runs_tune_copies_and_record_each_run():
    torch.manual_seed(0)
    model, tok = models.build_toy_chat(models.ToyChatConfig(width=32, layers=2, intermediate=24))
    shape = UnitShape.of(model)
    before = [p.detach().clone() for p in model.parameters()]
    circuit = Circuit(shape, ((0, 1),), ((1, 5),))
    variants = {"circuit tuned": (lambda seed: circuit, "circuit"),
                "full": (lambda seed: None, "all")}
    seen = []

    def evaluate(lm):
        seen.append(lm)
        return {"moved": max(float((p.detach() - q).abs().max())
                             for p, q in zip(lm.parameters(), before, strict=True))}

    rows = circuit_tuning.tuning_runs(model, tok, data.make_chat_samples(2, seed=1), variants,
                                      [1e-2], [0, 1], steps=2, batch=4, evaluate=evaluate,
                                      strength="restore_lr", progress=False)
    assert [(r["restore_lr"], r["run"], r["variant"]) for r in rows] == [
        (1e-2, 0, "circuit tuned"), (1e-2, 0, "full"), (1e-2, 1, "circuit tuned"),
        (1e-2, 1, "full")]
    fraction = 100 * circuit_tuning.parameter_fraction(model, circuit)
    assert [r["trained_pct"] for r in rows] == [fraction, 100.0, fraction, 100.0]
    assert all(r["moved"] > 0 for r in rows) and all(lm is not model for lm in seen)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_safety_scores_retention_is_relative_to_before(tiny):
    tok = models.build_word_tokenizer(data.vocabulary("chat"))
    samples = data.make_chat_samples(3, seed=4)
    harmful = [s for s in samples if s.family == "harmful"]
    benign = [s for s in samples if s.family != "harmful"]
    scores = circuit_tuning.safety_scores(tiny, tok, harmful, benign, 0.5, max_new_tokens=3)
    assert scores["refusal"] == 1 - scores["asr"]
    assert scores["retention_pct"] == pytest.approx(200 * scores["refusal"])


def test_tuning_runs_memo_makes_each_run_once():
    torch.manual_seed(0)
    model, tok = models.build_toy_chat(models.ToyChatConfig(width=32, layers=2, intermediate=24))
    circuit = Circuit(UnitShape.of(model), ((0, 1),), ())
    variants = {"circuit tuned": (lambda seed: circuit, "circuit"),
                "full": (lambda seed: None, "all")}
    store, evaluated = {}, []

    def memo(key, compute):
        name = repr(sorted(key.items()))
        if name not in store:
            store[name] = compute()
        return store[name]

    def run():
        return circuit_tuning.tuning_runs(
            model, tok, data.make_chat_samples(2, seed=1), variants, [1e-2], [0, 1], steps=2,
            batch=4, evaluate=lambda lm: evaluated.append(1) or {"n": len(evaluated)},
            progress=False, memo=memo)

    first = run()
    assert len(store) == 4 and len(evaluated) == 4  # every (run, variant) has its own key
    assert run() == first and len(evaluated) == 4  # the second pass made no run
