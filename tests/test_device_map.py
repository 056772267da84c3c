"""Models spread over devices by accelerate: ``zoo.load(device_map=...)``, and every hook of the
library (capture, streaming, masks, circuit tuning, attention replacement, RID streaming) on a
model whose decoder layers are dispatched to different devices. Without a GPU the layers go to
"cpu" entries, with accelerate's hooks forced on (the code path of a spread model, every device
the CPU); with one, the layers alternate between "cuda:0" and "cpu" (activations really cross
devices, and results must match the undispatched model to float tolerance)."""

import copy

import pytest
import torch
from accelerate import dispatch_model

from locus import data, params, zoo
from locus.arch import adapt
from locus.hooks import SITES, capture_residuals, stream_residuals
from locus.lost_in_attention import attention as A
from locus.lost_in_attention import geometry as G
from locus.lost_in_attention.metrics import LayerMetricTable
from locus.projlens import experiment as projlens
from locus.safeseek import circuit_tuning
from locus.safeseek.masks import Circuit, UnitShape, gated_units

DEVICES = ("cuda:0", "cpu") if torch.cuda.is_available() else ("cpu", "cpu")
# Exact on one device; across devices the kernels differ in the last bits.
ATOL = 1e-4 if torch.cuda.is_available() else 0.0


def layer_device_map(model, devices=DEVICES) -> dict[str, str]:
    """{module name: device}: decoder layer i on devices[i % 2], everything else on devices[1]
    (the CPU, where inputs start)."""
    layers = adapt(model).layers
    layers_name = next(name for name, module in model.named_modules() if module is layers)
    device_map, parent = {}, ""
    for part in layers_name.split("."):
        for name, _ in model.get_submodule(parent).named_children():
            if name != part:
                device_map[f"{parent}.{name}".lstrip(".")] = devices[1]
        parent = f"{parent}.{part}".lstrip(".")
    for i in range(len(layers)):
        device_map[f"{layers_name}.{i}"] = devices[i % 2]
    return device_map


def spread(model):
    """model dispatched over DEVICES by accelerate (hooks forced on, no offloading)."""
    return dispatch_model(model, layer_device_map(model), main_device="cpu", force_hooks=True)


def close(a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    plain, tokenizer = zoo.load(tiny_llama_dir, progress=False)
    spread_model, _ = zoo.load(tiny_llama_dir, progress=False)
    return plain, spread(spread_model), tokenizer


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    plain, processor = zoo.load(tiny_llava_dir, progress=False)
    spread_model, _ = zoo.load(tiny_llava_dir, progress=False)
    return plain.eval(), spread(spread_model).eval(), processor


def chat_ids():
    return torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(1))


def vqa_batch(processor):
    return G.vqa_batches(processor, data.make_vqa_samples(1, seed=3)[:2], 2, "cpu",
                         torch.float32)[0]


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_zoo_load_passes_device_map_and_max_memory_to_accelerate(tiny_llama_dir):
    plain, _ = zoo.load(tiny_llama_dir, progress=False)
    device_map = layer_device_map(plain, ("cpu", "cpu"))
    mapped, _ = zoo.load(tiny_llama_dir, progress=False, device_map=device_map)
    for name, device in device_map.items():
        assert {p.device.type for p in mapped.get_submodule(name).parameters()} <= {device}
    auto, _ = zoo.load(tiny_llama_dir, progress=False, device_map="auto",
                       max_memory={"cpu": "1GiB"})
    ids = chat_ids()
    assert torch.equal(logits(mapped, input_ids=ids), logits(plain, input_ids=ids))
    close(logits(auto, input_ids=ids), logits(plain, input_ids=ids))
    with pytest.raises(ValueError, match="pass device_map too"):
        zoo.load(tiny_llama_dir, progress=False, max_memory={"cpu": "1GiB"})


def test_device_map_parameter_check():
    assert params.check_device_map(None) is None
    assert params.check_device_map("auto") == "auto"
    assert params.check_device_map({"model": "cpu"}) == {"model": "cpu"}
    for bad, message in (("everywhere", "device_map must be"), ({}, "device_map must be"),
                         ({"model": "disk"}, "offloading to disk"),
                         ({"model": "tpu"}, "not a torch device")):
        with pytest.raises(ValueError, match=message):
            params.check_device_map(bad)


def test_capture_and_stream_on_a_spread_model(llama):
    plain, spread_model, _ = llama
    arch = adapt(spread_model)
    assert all(hasattr(layer, "_hf_hook") for layer in arch.layers)
    assert [str(next(layer.parameters()).device) for layer in arch.layers] == [
        DEVICES[i % 2] for i in range(arch.num_layers)]
    ids = chat_ids()
    with torch.no_grad(), capture_residuals(plain) as expected:
        plain(input_ids=ids)
    with torch.no_grad(), capture_residuals(spread_model) as captured:
        spread_model(input_ids=ids)
    streamed = {}
    with torch.no_grad(), stream_residuals(spread_model, streamed.__setitem__):
        spread_model(input_ids=ids)
    for i in range(arch.num_layers):
        layer_device = str(next(arch.layers[i].parameters()).device)
        for site in SITES:
            assert captured.states[i][site].device.type == "cpu"
            close(captured.states[i][site], expected.states[i][site])
            assert str(streamed[i][site].device) == layer_device
            close(streamed[i][site], expected.states[i][site])


def test_masks_on_a_spread_model(llama):
    plain, spread_model, _ = llama
    shape = UnitShape.of(spread_model)
    ids = chat_ids()
    vanilla = logits(spread_model, input_ids=ids)
    close(vanilla, logits(plain, input_ids=ids))
    ones = torch.ones(shape.num_layers, shape.num_heads), torch.ones(shape.num_layers,
                                                                     shape.intermediate_size)
    with gated_units(spread_model, *ones):
        assert torch.equal(logits(spread_model, input_ids=ids), vanilla)
    heads, neurons = ones[0].clone(), ones[1].clone()
    heads[1, 2], neurons[0, 5] = 0.0, 0.0
    with gated_units(plain, heads, neurons):
        expected = logits(plain, input_ids=ids)
    with gated_units(spread_model, heads, neurons):
        gated = logits(spread_model, input_ids=ids)
    close(gated, expected)
    assert not torch.allclose(gated.cpu(), vanilla.cpu(), atol=1e-5)


def test_circuit_tuning_on_a_spread_model(llama):
    _, spread_model, tokenizer = llama
    model = spread(copy.deepcopy(spread_model))
    circuit = Circuit(UnitShape.of(model), ((1, 3),), ((0, 4),))
    entries = {id(p): flags for p, flags in circuit_tuning.unit_entries(model, circuit).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    circuit_tuning.tune(model, tokenizer, data.make_chat_samples(2, seed=11), circuit, "circuit",
                        circuit_tuning.TuningConfig(steps=2, batch=4, lr=1e-2), progress=False)
    changed = 0
    for name, p in model.named_parameters():
        chosen = entries.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~chosen], before[name][~chosen]), name
        changed += int((p[chosen] != before[name][chosen]).sum())
    assert changed > 0


def test_attention_replacement_and_geometry_on_a_spread_vlm(llava):
    plain, spread_model, processor = llava
    batch = vqa_batch(processor)
    plain.set_attn_implementation("eager")
    spread_model.set_attn_implementation("eager")
    vanilla = logits(spread_model, **batch)
    close(vanilla, logits(plain, **batch))
    with A.replaced_visual_attention(spread_model, A.ReplacementConfig(lam=0.0, heads="all",
                                                                       layers="all")):
        assert torch.equal(logits(spread_model, **batch), vanilla)
    config = A.ReplacementConfig(mode="uniform", heads="all", layers="all")
    with A.replaced_visual_attention(plain, config):
        expected = logits(plain, **batch)
    with A.replaced_visual_attention(spread_model, config):
        replaced = logits(spread_model, **batch)
    close(replaced, expected)
    assert not torch.allclose(replaced[:, -1].cpu(), vanilla[:, -1].cpu(), atol=1e-5)

    tables = []
    for model in (plain, spread_model):
        table = LayerMetricTable()
        G.record_updates(model, batch, table, G.GeometryConfig(),
                         torch.Generator().manual_seed(0))
        tables.append(table)
    assert set(tables[0].keys()) == set(tables[1].keys())
    for key in tables[0].keys():
        for layer, values in tables[0]._values[key].items():
            assert tables[1]._values[key][layer] == pytest.approx(values, rel=1e-3, abs=1e-4)


def test_notebook_loaders_take_a_device_map(tiny_llava_dir):
    for load in (G.load_vlm, G.load_decoder, projlens.load_vlm):
        model, _ = load(str(tiny_llava_dir), "cpu", None, device_map="auto")
        assert adapt(model).vision_tower is not None
        with pytest.raises(ValueError, match="device_map must be"):
            load(str(tiny_llava_dir), "cpu", None, device_map="everywhere")
