"""Unit masks: exact per-head / per-neuron gating on every supported architecture, gates,
modes, hook clean-up and the circuit's JSON export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from locus import data, models
from locus.arch import adapt
from locus.prompts import encode_vqa
from locus.safeseek.masks import (
    Circuit,
    UnitMask,
    UnitShape,
    apply_circuit,
    gated_units,
    mode_gates,
)

SIZES = dict(vocab_size=50, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _text_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()
    return MistralForCausalLM(MistralConfig(**SIZES)).eval()


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    sizes = models.ToyVLMConfig(vision_width=32, text_width=32, text_layers=2, text_heads=4,
                                text_kv_heads=2, text_intermediate=24)
    model, processor = models.build_toy_vlm(sizes)
    batch = encode_vqa(processor, data.make_vqa_samples(1, seed=3, families=("counting",)))
    return model.eval(), batch


def _inputs(model, llava_batch=None):
    if llava_batch is not None:
        return llava_batch
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}


def _cases(llava):
    return [(_text_model(k), None) for k in ("llama", "qwen2", "mistral")] + [llava]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_all_ones_gives_vanilla_logits_exactly(llava):
    for model, batch in _cases(llava):
        inputs = _inputs(model, batch)
        shape = UnitShape.of(model)
        vanilla = _logits(model, inputs)
        ones = (torch.ones(shape.num_layers, shape.num_heads),
                torch.ones(shape.num_layers, shape.intermediate_size))
        with gated_units(model, *ones):
            assert torch.equal(_logits(model, inputs), vanilla)
        # ones that carry a gradient take the hooked path (no layer is skipped)
        trainable = tuple(g.clone().requires_grad_(True) for g in ones)
        arch = adapt(model)
        with gated_units(model, *trainable):
            assert all(arch.o_proj(i)._forward_pre_hooks and arch.down_proj(i)._forward_pre_hooks
                       for i in range(arch.num_layers))
            hooked = _logits(model, inputs)
        assert torch.equal(hooked, vanilla), model.config.model_type
        for mode, circuit in (("full", Circuit.empty(shape)),
                              ("circuit removed", Circuit.empty(shape)),
                              ("circuit only", _everything(shape))):
            with apply_circuit(model, circuit, mode):
                assert torch.equal(_logits(model, inputs), vanilla), (model.config.model_type,
                                                                      mode)


def _everything(shape: UnitShape) -> Circuit:
    return Circuit.from_membership(
        shape, torch.ones(shape.num_layers, shape.num_heads, dtype=torch.bool),
        torch.ones(shape.num_layers, shape.intermediate_size, dtype=torch.bool))


def _zero_slice_by_hand(module, start, stop):
    def hook(mod, args):
        x = args[0].clone()
        x[..., start:stop] = 0
        return (x,)
    return module.register_forward_pre_hook(hook)


def test_one_head_equals_zeroing_its_o_proj_slice(llava):
    for model, batch in _cases(llava):
        inputs = _inputs(model, batch)
        arch = adapt(model)
        shape = UnitShape.of(model)
        layer, head = 1, 2
        circuit = Circuit(shape, ((layer, head),), ())
        with apply_circuit(model, circuit, "circuit removed"):
            masked = _logits(model, inputs)
        d = arch.head_dim
        handle = _zero_slice_by_hand(arch.o_proj(layer), head * d, (head + 1) * d)
        try:
            by_hand = _logits(model, inputs)
        finally:
            handle.remove()
        assert torch.equal(masked, by_hand)
        assert not torch.allclose(masked, _logits(model, inputs))


def test_one_neuron_equals_zeroing_its_down_proj_input(llava):
    for model, batch in _cases(llava):
        inputs = _inputs(model, batch)
        arch = adapt(model)
        shape = UnitShape.of(model)
        circuit = Circuit(shape, (), ((0, 5),))
        with apply_circuit(model, circuit, "circuit removed"):
            masked = _logits(model, inputs)
        handle = _zero_slice_by_hand(arch.down_proj(0), 5, 6)
        try:
            by_hand = _logits(model, inputs)
        finally:
            handle.remove()
        assert torch.equal(masked, by_hand)


def test_grouped_query_o_proj_input_is_num_heads_wide():
    model = _text_model("llama")
    arch = adapt(model)
    assert arch.num_kv_heads == 2
    assert arch.o_proj(0).in_features == arch.num_heads * arch.head_dim


def test_circuit_only_keeps_just_the_circuit():
    model = _text_model("llama")
    shape = UnitShape.of(model)
    inputs = _inputs(model)
    circuit = Circuit(shape, ((0, 1),), ((1, 3),))
    heads = torch.zeros(shape.num_layers, shape.num_heads)
    heads[0, 1] = 1
    neurons = torch.zeros(shape.num_layers, shape.intermediate_size)
    neurons[1, 3] = 1
    with gated_units(model, heads, neurons):
        expected = _logits(model, inputs)
    with apply_circuit(model, circuit, "circuit only"):
        assert torch.equal(_logits(model, inputs), expected)


def test_hooks_removed_on_exception():
    model = _text_model("llama")
    arch = adapt(model)
    mask = UnitMask.for_model(model)
    with pytest.raises(RuntimeError, match="boom"), apply_circuit(model, mask, "circuit only"):
        assert len(arch.o_proj(0)._forward_pre_hooks) == 1
        raise RuntimeError("boom")
    for i in range(arch.num_layers):
        assert not arch.o_proj(i)._forward_pre_hooks
        assert not arch.down_proj(i)._forward_pre_hooks


def test_ste_gate_is_hard_forward_with_sigmoid_gradient():
    shape = UnitShape(1, 2, 3)
    mask = UnitMask(shape, gate="ste", temperature=2.0, init=0.0)
    with torch.no_grad():
        mask.head_logits.copy_(torch.tensor([[1.0, -1.0]]))
    heads, neurons = mask.membership()
    assert heads.tolist() == [[1.0, 0.0]]
    assert neurons.tolist() == [[0.0, 0.0, 0.0]]  # sigmoid(0) = 0.5 is not > 0.5
    heads.sum().backward()
    s = torch.sigmoid(torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(mask.head_logits.grad[0], s * (1 - s) / 2.0)


def test_hard_concrete_gate():
    torch.manual_seed(0)
    mask = UnitMask(UnitShape(2, 4, 8), gate="hard_concrete", init=0.0)
    mask.train()
    a, _ = mask.membership()
    b, _ = mask.membership()
    assert not torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    mask.eval()
    heads, _ = mask.membership()
    torch.testing.assert_close(heads, torch.full((2, 4), 0.5))
    # P(gate > 0) at logit 0 = sigmoid(-beta * log(-gamma / zeta)), beta 2/3, gamma -0.1, zeta 1.1
    expected = torch.sigmoid(torch.tensor(-2 / 3 * math.log(0.1 / 1.1))).item()
    assert mask.size("sum").item() == pytest.approx(expected * (8 + 16), rel=1e-5)
    assert mask.size("mean").item() == pytest.approx(2 * expected, rel=1e-5)
    assert mask.size("module").item() == pytest.approx(2 * 2 * expected, rel=1e-5)


def test_module_norm_sums_one_mean_per_layer_and_kind():
    mask = UnitMask(UnitShape(2, 4, 8), init=0.0)
    with torch.no_grad():
        mask.head_logits[0] = 20.0   # layer 0: every head in (mean 1), layer 1: mean 1/2
        mask.neuron_logits[1, :2] = 20.0  # layer 1: 2 of 8 neurons in, the rest at 1/2
    heads = 1.0 + 0.5
    neurons = 0.5 + (2 + 6 * 0.5) / 8
    assert mask.size("module").item() == pytest.approx(heads + neurons, rel=1e-6)
    assert mask.size("mean").item() == pytest.approx(heads / 2 + neurons / 2, rel=1e-6)
    assert mask.size("sum").item() == pytest.approx(4 + 2 + 2 + 7, rel=1e-6)
    with pytest.raises(ValueError, match="norm"):
        mask.size("max")


def test_unit_kinds_left_out_are_never_gated():
    model = _text_model("llama")
    heads_only = UnitMask.for_model(model, units=("heads",), init=-2.0)
    assert heads_only.membership()[1] is None and not heads_only.neuron_logits.requires_grad
    circuit = heads_only.circuit()
    assert circuit.units == ("heads",) and circuit.sparsity == 0.0
    inputs = _inputs(model)
    with apply_circuit(model, circuit, "circuit only"):  # no head kept, every neuron kept
        only = _logits(model, inputs)
    shape = UnitShape.of(model)
    with gated_units(model, torch.zeros(shape.num_layers, shape.num_heads), None):
        assert torch.equal(only, _logits(model, inputs))


def test_only_mask_logits_get_gradients():
    model = _text_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    mask = UnitMask.for_model(model, init=0.5)
    with apply_circuit(model, mask, "circuit only"):
        model(**_inputs(model)).logits.square().mean().backward()
    assert mask.head_logits.grad.abs().sum() > 0 and mask.neuron_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_mask_circuit_and_json_round_trip(tmp_path):
    shape = UnitShape(2, 4, 10)
    mask = UnitMask(shape, init=-2.0)
    with torch.no_grad():
        mask.head_logits[1, 3] = 2.0
        mask.neuron_logits[0, 7] = 2.0
        mask.neuron_logits[1, 0] = 2.0
    circuit = mask.circuit()
    assert circuit.heads == ((1, 3),) and circuit.neurons == ((0, 7), (1, 0))
    assert circuit.head_fraction == 1 / 8 and circuit.neuron_fraction == 2 / 20
    assert circuit.sparsity == pytest.approx(3 / 28)
    assert circuit.heads_per_layer() == [0, 1] and circuit.neurons_per_layer() == [1, 1]
    path = circuit.save(tmp_path / "c.json")
    record = json.loads(path.read_text())
    assert record["heads"] == [[1, 3]] and record["sparsity"]["units"] == pytest.approx(3 / 28)
    assert Circuit.load(path) == circuit
    union = circuit | Circuit(shape, ((0, 0),), ())
    assert union.heads == ((0, 0), (1, 3))


def test_bad_inputs_raise_clear_errors():
    shape = UnitShape(2, 4, 10)
    with pytest.raises(ValueError, match="gate must be one of"):
        UnitMask(shape, gate="gumbel")
    with pytest.raises(ValueError, match="temperature"):
        UnitMask(shape, temperature=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        mode_gates((None, None), "half")
    with pytest.raises(ValueError, match="out of range"):
        Circuit(shape, ((2, 0),), ())
    with pytest.raises(ValueError, match="lacks keys"):
        Circuit.from_dict({"heads": []})
    model = _text_model("llama")
    with pytest.raises(ValueError, match="the model needs"):
        with gated_units(model, torch.ones(3, 4), None):
            pass
