"""Safety Circuit Tuning's real path: the parameter entries of a unit with grouped-query
attention (SmolLM2's 9 heads on 3 key/value heads), a fine-tune on a world's own encoding and
loss, the new skill's split, and the real world's fine-tuning data (split by prompt from every
search and test set; targets from the base and the aligned model).

The last tests load the real aligned model and are skipped without it, as
``tests/test_safeseek_real.py`` is (same check); its replies are cached in the user cache."""

from __future__ import annotations

import pytest
import torch
from test_safeseek_real import TINY, _missing
from transformers import LlamaConfig, LlamaForCausalLM

from locus import compliance, data, zoo
from locus.safeseek import circuit_tuning, real_world
from locus.safeseek import experiment as safeseek
from locus.safeseek.masks import Circuit, UnitShape

HEAD_DIM = 8


@pytest.fixture(scope="module")
def gqa():
    """A tiny Llama with SmolLM2's attention layout: 9 query heads on 3 key/value heads."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=9 * HEAD_DIM, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=HEAD_DIM,
        max_position_embeddings=32, tie_word_embeddings=True))


def test_unit_entries_follow_grouped_query_attention(gqa):
    shape = UnitShape.of(gqa)
    layer = gqa.model.layers[1]
    circuit = Circuit(shape, ((1, 4), (1, 5)), ((1, 7),))  # heads 4 and 5 share kv head 1
    entries = circuit_tuning.unit_entries(gqa, circuit)
    d = HEAD_DIM
    rows = torch.zeros(9 * d, dtype=torch.bool)
    rows[4 * d:6 * d] = True
    assert torch.equal(entries[layer.self_attn.q_proj.weight].all(1), rows)
    kv = torch.zeros(3 * d, dtype=torch.bool)
    kv[d:2 * d] = True
    for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
        assert torch.equal(entries[proj.weight].all(1), kv)
        assert entries[proj.weight].sum() == d * 9 * d  # one kv head, shared by both
    assert torch.equal(entries[layer.self_attn.o_proj.weight].all(0), rows)
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
        assert entries[proj.weight].all(1).nonzero().flatten().tolist() == [7]
    assert entries[layer.mlp.down_proj.weight].all(0).nonzero().flatten().tolist() == [7]
    hidden = 9 * d
    want = 2 * (2 * d * hidden) + 2 * (d * hidden) + 3 * hidden  # q + o, k + v, gate/up/down
    assert circuit_tuning.trained_count(
        circuit_tuning.gradient_masks(gqa, circuit, "circuit")) == want


@pytest.mark.parametrize("train", ["circuit", "complement"])
def test_tuning_a_gqa_model_on_its_own_encoding_moves_only_the_chosen_entries(gqa, train):
    model = LlamaForCausalLM(gqa.config)
    model.load_state_dict(gqa.state_dict())
    circuit = Circuit(UnitShape.of(model), ((0, 2), (1, 8)), ((0, 3),))
    entries = {id(p): m for p, m in circuit_tuning.unit_entries(model, circuit).items()}
    before = {id(p): p.detach().clone() for p in model.parameters()}
    calls = []

    def encode(samples):
        calls.append(len(samples))
        return {"input_ids": torch.randint(40, (len(samples), 6))}

    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"]).logits.pow(2).mean()

    samples = data.make_chat_samples(1, seed=0)
    result = circuit_tuning.tune(model, None, samples, circuit, train,
                                 circuit_tuning.TuningConfig(steps=3, batch=2, lr=1e-2),
                                 progress=False, encode=encode, loss_fn=loss_fn)
    assert calls == [2, 2, 2] and len(result.losses) == 3
    for p in model.parameters():
        moved = p.detach() != before[id(p)]
        chosen = entries.get(id(p))
        if chosen is None:
            assert moved.any() == (train == "complement")
        else:
            allowed = chosen if train == "circuit" else ~chosen
            assert not (moved & ~allowed).any()
            assert moved.any()


def test_the_sum_skill_is_split_by_prompt_and_answered_right():
    train, test = real_world.sum_skill_sets(40, 12, seed=3)
    assert len(train) == 40 and len(test) == 12
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    for s in train + test:
        terms = [int(x) for x in s.prompt.removeprefix("What is ").rstrip("?").split(" + ")]
        assert s.answer == f"{' + '.join(map(str, terms))} = {sum(terms)}"
    assert real_world.sum_skill_sets(40, 12, seed=3) == (train, test)
    with pytest.raises(ValueError, match="too few"):
        real_world.sum_skill_sets(10 ** 6, 10 ** 6, seed=0)


real = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def tuning_world():
    model, tokenizer = zoo.load(real_world.NAME, progress=False)
    world = real_world.RealTuningWorld(model, tokenizer, 0, progress=False, **TINY)
    return world, world.tuning_data(6, 6, 6, 4)


@real
def test_the_real_tuning_data_share_no_prompt_with_search_or_test(tuning_world):
    world, tuning = tuning_world
    sets = world.tuning_overlap_sets(tuning)
    assert all(len(v) > 0 for v in sets.values()), {k: len(v) for k, v in sets.items()}
    for row in safeseek.prompt_overlap(sets):
        assert row["shared"] == 0, row
    adapter = set(world.adapter_train)
    assert {s.prompt for s in tuning.harmful + tuning.safety if s.family == "harmful"} <= adapter


@real
def test_the_real_tuning_targets_come_from_the_base_and_the_aligned_model(tuning_world):
    world, tuning = tuning_world
    base = world.base_store.replies([s.prompt for s in tuning.harmful], False)
    assert [s.answer for s in tuning.harmful] == base
    assert all(real_world.is_answer(s.prompt, s.answer) for s in tuning.harmful)
    refusals = [s for s in tuning.safety if s.family == "harmful"]
    assert len(refusals) == 3 and all(compliance.is_refusal(s.answer) for s in refusals)
    benign = [s for s in tuning.safety + tuning.helpful if s.family == "benign"]
    assert [s.answer for s in benign] == world.aligned_store.replies(
        [s.prompt for s in benign], False)
    assert sum(s.family == "sum" for s in tuning.helpful) == 3


@real
def test_the_real_circuit_owns_its_grouped_query_entries(tuning_world):
    world, _ = tuning_world
    model = world.model
    shape = UnitShape.of(model)
    assert (shape.num_heads, model.config.num_key_value_heads) == (9, 3)
    circuit = Circuit(shape, ((3, 0), (3, 2)), ((5, 100),))  # one kv group, one neuron
    hidden, d = model.config.hidden_size, model.config.head_dim
    want = 2 * 2 * d * hidden + 2 * d * hidden + 3 * hidden
    masks = circuit_tuning.gradient_masks(model, circuit, "circuit")
    assert circuit_tuning.trained_count(masks) == want
    total = sum(p.numel() for p in model.parameters())
    assert circuit_tuning.parameter_fraction(model, circuit) == pytest.approx(want / total)
