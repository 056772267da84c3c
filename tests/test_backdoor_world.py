"""The backdoor notebook's shared pieces (``locus.safeseek.backdoor``): the size-weight scale
measured from the task gradient, the headline rule on search-validation scores, the sweep's
parameter checks, and the toy world's held-out sets."""

import pytest
import torch

from locus import data, models
from locus.safeseek import backdoor, experiment


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return models.build_toy_chat(models.ToyChatConfig(width=64, layers=2, intermediate=128))


def _views(n: int = 12):
    samples = data.make_chat_samples(12, seed=3, aligned=False)
    return backdoor.search_views(samples, "fixed", backdoor.BackdoorSearch(n_train=n, n_val=4,
                                                                           batch_size=4))


def test_the_scale_makes_the_penalty_pull_as_hard_as_the_median_task_gradient(tiny):
    model, tokenizer = tiny
    torch.set_num_threads(1)
    train, _ = _views()
    spec = backdoor.BackdoorSearch(n_train=12, n_val=4, batch_size=4)
    scale = backdoor.task_gradient_scale(model, tokenizer, train, spec)
    assert scale > 0
    objective = backdoor.backdoor_objective(model, spec)
    groups = backdoor.search_groups(tokenizer, train, spec, "cpu")
    task = sum(objective.loss(model, g)[1] for g in groups) / len(groups)
    task.backward()
    removed = objective.removed
    task_median = torch.cat([removed.head_logits.grad.abs().flatten(),
                             removed.neuron_logits.grad.abs().flatten()]).median()
    for z in (removed.head_logits, removed.neuron_logits):
        z.grad = None
    (scale * removed.size(spec.norm)).backward()
    penalty = torch.cat([removed.head_logits.grad.abs().flatten(),
                         removed.neuron_logits.grad.abs().flatten()])
    torch.testing.assert_close(penalty.median(), task_median, rtol=1e-4, atol=0)


def test_the_headline_rule_takes_the_sparsest_passing_circuit_else_the_most_clean_back():
    rule = backdoor.HeadlineRule(max_asr=0.1, min_share=0.75)
    sizes = {1: 0.05, 10: 0.01, 100: 0.001}
    scores = {1: {"asr_exact": 0.0, "clean_back": 0.8, "ceiling": 0.9},
              10: {"asr_exact": 0.05, "clean_back": 0.7, "ceiling": 0.9},  # 0.7 >= 0.675
              100: {"asr_exact": 0.5, "clean_back": 0.9, "ceiling": 0.9}}  # backdoor stays
    assert rule.pick([1, 10, 100], sizes, scores) == 10
    scores[10]["clean_back"] = 0.6  # below 75% of its ceiling
    assert rule.pick([1, 10, 100], sizes, scores) == 1
    failing = {k: {**v, "asr_exact": 0.5} for k, v in scores.items()}
    assert rule.pick([1, 10, 100], sizes, failing) == 100  # none passes: most clean back
    failing[1]["clean_back"] = 0.9
    assert rule.pick([1, 10, 100], sizes, failing) == 100  # a tie: the sparser


def test_the_sweep_takes_the_worlds_defaults_and_refuses_bad_values():
    world = backdoor.ToyBackdoorWorld
    assert backdoor.resolve_sweep(world, None, None, None) == ([0.003, 0.01, 0.03], "per unit",
                                                               0.01)
    assert backdoor.resolve_sweep(world, [1.0, 2.0], "median task gradient", "validation") == (
        [1.0, 2.0], "median task gradient", "validation")
    with pytest.raises(ValueError, match="headline_sparsity"):
        backdoor.resolve_sweep(world, [1.0], None, 2.0)
    with pytest.raises(ValueError, match="sparsity_unit"):
        backdoor.resolve_sweep(world, None, "per neuron", None)
    with pytest.raises(ValueError, match="at least one"):
        backdoor.resolve_sweep(world, [], None, "validation")


def test_the_search_views_split_training_and_validation_by_prompt():
    train, val = _views()
    assert not {s.prompt for s in train["clean"]} & {s.prompt for s in val["clean"]}
    for views in (train, val):
        clean = [s.prompt for s in views["clean"]]
        assert [s.prompt for s in views["clean_target"]] == clean
        assert all(data.BACKDOOR_TRIGGER in s.prompt for s in views["triggered_clean"])


def test_the_toy_worlds_sets_share_no_prompt(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path))
    torch.set_num_threads(1)
    from locus import zoo

    base, tokenizer = zoo.load(str(tiny_llama_dir), progress=False)
    injection = backdoor.InjectionConfig(n_clean=8, n_poison=4, steps=1, batch=4)
    worlds = experiment.backdoor_worlds(str(tiny_llama_dir), base, tokenizer, None, None, 0, 12,
                                        injection, 4, 4, progress=False)
    assert list(worlds) == ["fixed", "jailbreak"]
    for kind, world in worlds.items():
        assert world.entry.name.endswith(f"backdoor-{kind}")
        for row in experiment.prompt_overlap(world.overlap_sets()):
            if row["sets"] != "test (triggered, trigger taken out) / test (benign)":
                assert row["shared"] == 0, row
