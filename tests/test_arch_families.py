"""The families added to locus.arch (Qwen3, Gemma-2, Gemma-3 text and vision-language, Phi-3,
Qwen3-VL, InternVL, SmolVLM, Idefics3), each built tiny, saved with save_pretrained, loaded
back by path through ``locus.zoo.load`` and run through every library operation: residual
capture (against ``output_hidden_states`` and a layer recomputed by hand), RID/MixIG streaming,
Noise QKV, unit masks, circuit tuning, visual-attention replacement and the projector
tools."""

import copy
import json

import pytest
import torch
import transformers as T

from locus import data, models, params, zoo
from locus.arch import MLP_PROJECTOR_FAMILIES, adapt
from locus.hooks import capture_residuals
from locus.lost_in_attention import attention as A
from locus.lost_in_attention import geometry as G
from locus.lost_in_attention.metrics import LayerMetricTable, rid
from locus.projlens import projector as P
from locus.safeseek import circuit_tuning
from locus.safeseek.masks import Circuit, UnitShape, apply_circuit, gated_units

V = 150  # image token id (the toy tokenizer has 147 words; the models' vocabulary is 160)
LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 3, 6, 2, 8, 48, 80
TEXT = dict(vocab_size=160, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMOL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, image_size=16, patch_size=4)
QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=HIDDEN, patch_size=4, spatial_merge_size=2,
                    temporal_patch_size=1, deepstack_visual_indexes=[0],
                    num_position_embeddings=16)
# Windows longer than the prompts: the sliding layers see what the full layers see.
GEMMA = dict(sliding_window=32, query_pre_attn_scalar=HEAD_DIM)


def _qwen3_vl():
    text = dict(**TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]})
    return T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(
        text_config=text, vision_config=QWEN3_VISION, image_token_id=V, video_token_id=V + 1,
        vision_start_token_id=V + 2, vision_end_token_id=V + 3))


def _gemma3():
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=dict(**TEXT, **GEMMA), vision_config=SMOL_VISION, mm_tokens_per_image=4,
        image_token_index=V, boi_token_index=V + 1, eoi_token_index=V + 2))
    with torch.no_grad():  # initialised to zeros, which would make every image token 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    return model


BUILDERS = {
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**TEXT)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**TEXT, **GEMMA)),
    "gemma3_text": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**TEXT, **GEMMA)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(
        **{k: v for k, v in TEXT.items() if k != "head_dim"})),
    "qwen3_vl": _qwen3_vl,
    "smolvlm": lambda: T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
        text_config=T.LlamaConfig(**TEXT), vision_config=SMOL_VISION, scale_factor=2,
        image_token_id=V)),
    "idefics3": lambda: T.Idefics3ForConditionalGeneration(T.Idefics3Config(
        text_config=T.LlamaConfig(**TEXT), vision_config=SMOL_VISION, scale_factor=2,
        image_token_id=V)),
    "gemma3": _gemma3,
    "internvl": lambda: T.InternVLForConditionalGeneration(T.InternVLConfig(
        text_config=T.Qwen2Config(**TEXT), vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=[16, 16], patch_size=[4, 4]), image_token_id=V, downsample_ratio=0.5)),
}
TEXT_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3")
VLM_FAMILIES = ("qwen3_vl", "internvl", "smolvlm", "idefics3", "gemma3")
SANDWICH = ("gemma2", "gemma3_text", "gemma3")


def family_inputs(family: str) -> dict[str, torch.Tensor]:
    """A batch of two prompts; each VLM prompt holds one 16x16 image of 4 visual tokens."""
    gen = torch.Generator().manual_seed(2)
    if family in TEXT_FAMILIES:
        return {"input_ids": torch.randint(5, 140, (2, 9), generator=gen)}
    if family == "qwen3_vl":  # 4x4 patches of 4 pixels, merged 2x2 into 4 tokens
        ids = torch.tensor([[1, 5, V + 2, V, V, V, V, V + 3, 7, 8],
                            [1, V + 2, V, V, V, V, V + 3, 9, 10, 11]])
        return {"input_ids": ids, "pixel_values": torch.randn(32, 48, generator=gen),
                "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
                "mm_token_type_ids": (ids == V).long()}
    ids = torch.tensor([[1, 5, V, V, V, V, 7, 8], [1, V, V, V, V, 9, 10, 11]])
    if family in ("gemma3", "internvl"):  # 16 patches pooled / shuffled into 4 tokens
        pixels = {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
        if family == "gemma3":  # its image tokens see each other
            pixels["token_type_ids"] = (ids == V).long()
        return {"input_ids": ids, **pixels}
    return {"input_ids": ids, "pixel_values": torch.randn(2, 1, 3, 16, 16, generator=gen)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> its tiny checkpoint folder (random weights, seed 0, with the toy tokenizer)."""
    folders = {}
    for family, build in BUILDERS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        build().save_pretrained(folder)
        models.build_word_tokenizer().save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def loaded(saved):
    """family -> (model, tokenizer) loaded back by path through locus.zoo.load. The processors
    of Qwen3-VL and SmolVLM include a video processor that needs torchvision, which the test
    environment lacks; the tests build their inputs by hand, so the folder's tokenizer stands in
    for the processor."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "AutoProcessor", T.AutoTokenizer)
        return {family: zoo.load(folder, progress=False) for family, folder in saved.items()}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("family", list(BUILDERS))
def test_adapter_finds_the_parts_and_the_projection_rows(family, loaded):
    model, _ = loaded[family]
    arch = adapt(model)
    assert arch.family == family == model.config.model_type
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    assert (arch.hidden_size, arch.intermediate_size) == (HIDDEN, INTERMEDIATE)
    assert arch.lm_head is model.lm_head and arch.final_norm is arch.language_model.norm
    q, k, v, gate, up = (arch.rows(1, name) for name in ("q", "k", "v", "gate", "up"))
    assert (q.size, k.size, v.size, gate.size, up.size) == (48, 16, 16, 80, 80)
    layer = arch.layers[1]
    if family == "phi3":
        assert q.linear is k.linear is v.linear is layer.self_attn.qkv_proj
        assert (q.start, k.start, v.start) == (0, 48, 64)
        assert gate.linear is up.linear is layer.mlp.gate_up_proj
        assert (gate.start, up.start) == (0, 80)
    else:
        assert (q.linear, k.linear, v.linear) == (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                  layer.self_attn.v_proj)
        assert (gate.linear, up.linear) == (layer.mlp.gate_proj, layer.mlp.up_proj)
        assert q.start == k.start == gate.start == 0
    assert torch.equal(k.weight, k.linear.weight[k.start:k.stop])
    expected_norm = "pre_feedforward_layernorm" if family in SANDWICH else (
        "post_attention_layernorm")
    assert arch.pre_mlp_norm(1) is getattr(layer, expected_norm)
    if family in VLM_FAMILIES:
        assert arch.image_token_id == V
        llava_like = ("vision_tower", "multi_modal_projector", "language_model")
        parts = {"qwen3_vl": ("visual", "visual.merger", "language_model"),
                 "gemma3": llava_like, "internvl": llava_like}.get(
            family, ("vision_model", "connector", "text_model"))
        assert arch.vision_tower is model.model.get_submodule(parts[0])
        assert arch.projector is model.model.get_submodule(parts[1])
        assert arch.language_model is model.model.get_submodule(parts[2])
    else:
        assert arch.vision_tower is None and arch.projector is None


@pytest.mark.parametrize("family", list(BUILDERS))
def test_captured_states_match_output_hidden_states(family, loaded):
    model, _ = loaded[family]
    arch = adapt(model)
    inputs = family_inputs(family)
    with torch.no_grad(), capture_residuals(model) as cap:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    states = cap.states
    # hidden_states[0] is layer 0's input, hidden_states[i + 1] layer i's output, the last
    # entry the final norm of the last output.
    assert torch.equal(states[0]["input"], hidden[0])
    for i in range(LAYERS - 1):
        assert torch.equal(states[i]["ffn"], hidden[i + 1])
    torch.testing.assert_close(arch.final_norm(states[LAYERS - 1]["ffn"]), hidden[-1],
                               atol=1e-5, rtol=0)
    for i in range(LAYERS - 1):
        between = states[i + 1]["input"] - states[i]["ffn"]
        if family == "qwen3_vl" and i == 0:
            # DeepStack adds visual features after layer 0, on the visual positions only.
            visual = arch.visual_token_mask(inputs["input_ids"])
            assert torch.equal(between[~visual], torch.zeros_like(between[~visual]))
            assert between[visual].abs().amin(dim=-1).gt(0).all()
        else:
            assert torch.equal(between, torch.zeros_like(between))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_attn_and_ffn_sites_equal_each_layer_recomputed_by_hand(family, loaded):
    model, _ = loaded[family]
    arch = adapt(model)
    received = {}
    handles = [arch.layers[i].register_forward_pre_hook(
        lambda m, a, kw, i=i: received.__setitem__(i, kw), with_kwargs=True)
        for i in range(LAYERS)]
    try:
        with torch.no_grad(), capture_residuals(model) as cap:
            model(**family_inputs(family), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for i in range(LAYERS):
            x_in = cap.states[i]["input"]
            attn_out = arch.attention(i)(
                hidden_states=arch.input_norm(i)(x_in),
                position_embeddings=received[i]["position_embeddings"],
                attention_mask=received[i]["attention_mask"],
            )[0]
            layer = arch.layers[i]
            if family in SANDWICH:  # Gemma: each update is normed again before it is added
                attn_update = layer.post_attention_layernorm(attn_out)
                x_attn = x_in + attn_update
                mlp_out = layer.mlp(layer.pre_feedforward_layernorm(x_attn))
                x_ffn = x_attn + layer.post_feedforward_layernorm(mlp_out)
            else:
                attn_update = attn_out
                x_attn = x_in + attn_out
                x_ffn = x_attn + layer.mlp(layer.post_attention_layernorm(x_attn))
            assert torch.equal(arch.attention_update(i, attn_out), attn_update)
            torch.testing.assert_close(cap.states[i]["attn"], x_attn, atol=1e-5, rtol=0)
            torch.testing.assert_close(cap.states[i]["ffn"], x_ffn, atol=1e-5, rtol=0)
            assert (x_attn - x_in).norm() > 1e-3
            if family in SANDWICH:  # Llama's layer equation would be wrong here
                assert not torch.allclose(cap.states[i]["attn"], x_in + attn_out, atol=1e-3)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_rid_and_mixig_stream_from_the_captured_states(family, loaded):
    model, _ = loaded[family]
    batch = family_inputs(family)
    table = LayerMetricTable()
    G.record_updates(model, batch, table, G.GeometryConfig(), torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_residuals(model, dtype=torch.float64) as cap:
        model(**batch, use_cache=False)
    for layer in range(LAYERS):
        x_in, x_attn, x_ffn = (cap.states[layer][s][1] for s in ("input", "attn", "ffn"))
        rtol = G.rank_rtol(torch.float32, x_in.shape)
        recorded = table._values[("attn", "all", "rid")][layer][1]
        assert recorded == pytest.approx(rid(x_in, x_attn, rtol=rtol).rid, rel=1e-9, abs=1e-12)
        recorded = table._values[("ffn", "all", "rid")][layer][1]
        assert recorded == pytest.approx(rid(x_attn, x_ffn, rtol=rtol).rid, rel=1e-9, abs=1e-12)
    groups = {g for _, g, _ in table.keys()}
    assert groups == ({"all", "visual", "text"} if family in VLM_FAMILIES else {"all", "text"})
    assert {k for k, _, _ in table.keys()} >= {"attn", "ffn", "noise_delta", "rope"}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_noise_qkv_noises_each_projection_block_with_its_own_moments(family, loaded):
    model, _ = loaded[family]
    model = copy.deepcopy(model)
    arch = adapt(model)
    with torch.no_grad():  # keys 10x larger: a block noised with another block's std shows
        for i in range(LAYERS):
            arch.rows(i, "k").weight.mul_(10)
    noised = G.noised_qkv_copy(model, torch.Generator().manual_seed(3))
    noised_arch = adapt(noised)
    qkv = {id(arch.rows(i, n).linear.weight) for i in range(LAYERS) for n in ("q", "k", "v")}
    for (name, p), (_, p_new) in zip(model.named_parameters(), noised.named_parameters(),
                                     strict=True):
        if id(p) not in qkv:
            assert torch.equal(p, p_new), name
    for i in range(LAYERS):
        for name in ("q", "k", "v"):
            old, new = arch.rows(i, name).weight, noised_arch.rows(i, name).weight
            assert not torch.equal(old, new)
            assert new.std().item() == pytest.approx(old.std().item(), rel=0.25)
        assert noised_arch.rows(i, "k").weight.std() > 5 * noised_arch.rows(i, "q").weight.std()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_all_ones_masks_give_the_vanilla_logits_exactly(family, loaded):
    model, _ = loaded[family]
    inputs = family_inputs(family)
    shape = UnitShape.of(model)
    assert shape == UnitShape(LAYERS, HEADS, INTERMEDIATE)
    vanilla = logits(model, inputs)
    with gated_units(model, torch.ones(LAYERS, HEADS), torch.ones(LAYERS, INTERMEDIATE)):
        assert torch.equal(logits(model, inputs), vanilla)
    everything = Circuit.from_membership(shape, torch.ones(LAYERS, HEADS, dtype=torch.bool),
                                         torch.ones(LAYERS, INTERMEDIATE, dtype=torch.bool))
    for mode, circuit in (("circuit removed", Circuit.empty(shape)),
                          ("circuit only", everything)):
        with apply_circuit(model, circuit, mode):
            assert torch.equal(logits(model, inputs), vanilla), mode
    with apply_circuit(model, everything, "circuit removed"):
        assert not torch.allclose(logits(model, inputs), vanilla)


def _zeroed_rows(model, layer, name, start, stop):
    """A copy of model with rows [start, stop) of projection ``name`` of ``layer`` zeroed."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        block = adapt(edited).rows(layer, name)
        block.linear.weight[block.index(start, stop)] = 0
        if block.linear.bias is not None:
            block.linear.bias[block.index(start, stop)] = 0
    return edited


# The decoders of SmolVLM, Idefics3 (Llama) and InternVL (Qwen2) are covered by test_masks.
@pytest.mark.parametrize("family", TEXT_FAMILIES + ("qwen3_vl", "gemma3"))
def test_projection_rows_are_the_queries_keys_values_and_neurons(family, loaded):
    """Zeroing a head's query rows or its key rows both give zero scores (the same output);
    zeroing a key/value head's value rows equals gating its query heads off; zeroing a neuron's
    up row equals gating the neuron off. Wrong blocks in a fused weight break these."""
    model, _ = loaded[family]
    inputs = family_inputs(family)
    vanilla = logits(model, inputs)
    layer, d = 1, HEAD_DIM
    no_q = logits(_zeroed_rows(model, layer, "q", 0, 3 * d), inputs)  # heads 0-2 (kv head 0)
    no_k = logits(_zeroed_rows(model, layer, "k", 0, d), inputs)      # kv head 0
    torch.testing.assert_close(no_q, no_k, atol=1e-5, rtol=0)
    assert not torch.allclose(no_q, vanilla, atol=1e-4)
    heads = torch.ones(LAYERS, HEADS)
    heads[layer, :3] = 0
    with gated_units(model, heads, None):
        gated = logits(model, inputs)
    torch.testing.assert_close(logits(_zeroed_rows(model, layer, "v", 0, d), inputs), gated,
                               atol=1e-5, rtol=0)
    neurons = torch.ones(LAYERS, INTERMEDIATE)
    neurons[layer, 7] = 0
    with gated_units(model, None, neurons):
        gated = logits(model, inputs)
    torch.testing.assert_close(logits(_zeroed_rows(model, layer, "up", 7, 8), inputs), gated,
                               atol=1e-5, rtol=0)
    assert not torch.allclose(gated, vanilla, atol=1e-6)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_circuit_tuning_leaves_every_other_entry_bit_identical(family, loaded):
    model, tokenizer = loaded[family]
    model = copy.deepcopy(model)
    arch = adapt(model)
    circuit = Circuit(UnitShape.of(model), ((1, 4),), ((0, 5), (2, 70)))
    entries = circuit_tuning.unit_entries(model, circuit)
    marked = {}  # linear -> rows holding the circuit's entries
    for layer, name, start, stop in ((1, "q", 32, 40), (1, "k", 8, 16), (1, "v", 8, 16),
                                     (0, "gate", 5, 6), (0, "up", 5, 6)):  # head 4 -> kv head 1
        block = arch.rows(layer, name)
        rows = marked.setdefault(block.linear, set())
        rows.update(range(block.index(start, stop).start, block.index(start, stop).stop))
    for linear, rows in marked.items():
        assert set(entries[linear.weight].any(dim=1).nonzero().flatten().tolist()) == rows
        assert entries[linear.weight][sorted(rows)].all()
    if family == "phi3":  # the blocks of the fused weights: [q | k | v] and [gate | up]
        assert marked[arch.layers[1].self_attn.qkv_proj] == {*range(32, 40), *range(56, 64),
                                                            *range(72, 80)}
        assert marked[arch.layers[0].mlp.gate_up_proj] == {5, 85}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_id = {id(p): flags for p, flags in entries.items()}
    circuit_tuning.tune(model, tokenizer, data.make_chat_samples(2, seed=11), circuit, "circuit",
                        circuit_tuning.TuningConfig(steps=2, batch=4, lr=1e-2), progress=False)
    changed = 0
    for name, p in model.named_parameters():
        chosen = by_id.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~chosen], before[name][~chosen]), name
        changed += int((p[chosen] != before[name][chosen]).sum())
    assert changed > 0


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_visual_attention_replacement(family, loaded):
    model, _ = loaded[family]
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    arch = adapt(model)
    inputs = family_inputs(family)
    visual = arch.visual_token_mask(inputs["input_ids"])
    vanilla = logits(model, inputs)
    config = A.ReplacementConfig(mode="dirichlet", lam=0.0, heads="all", layers="all")
    with A.replaced_visual_attention(model, config):
        assert torch.equal(logits(model, inputs), vanilla)

    weights = {}
    handles = [arch.attention(i).register_forward_hook(
        lambda m, a, out, i=i: weights.__setitem__(i, out[1].detach())) for i in range(LAYERS)]
    try:
        for mode in ("uniform", "drop"):
            config = A.ReplacementConfig(mode=mode, heads=(1, 3), layers=(1, 2))
            with A.replaced_visual_attention(model, config):
                replaced = logits(model, inputs)
            assert not torch.allclose(replaced[:, -1], vanilla[:, -1], atol=1e-5)
            assert torch.equal(replaced[:, :-1], vanilla[:, :-1])
            for layer in (1, 2):
                last = weights[layer][:, :, -1, :]
                for row in range(2):
                    on_image = last[row, [1, 3]][:, visual[row]]
                    if mode == "drop":
                        assert on_image.max() < 1e-6
                    else:
                        torch.testing.assert_close(on_image, on_image[:, :1].expand(-1, 4),
                                                   rtol=1e-6, atol=0)
                        assert on_image.sum() > 1e-3
    finally:
        for handle in handles:
            handle.remove()
    assert model.config.get_text_config()._attn_implementation == "eager"


# The MLP projectors: their two linears, an input (vision features, after Qwen3-VL's 2x2 merge
# input and InternVL's pixel shuffle) and the hidden activation (the input of the second linear).
MLP_LINEARS = {"qwen3_vl": ("linear_fc1", "linear_fc2"), "internvl": ("linear_1", "linear_2")}
MLP_FEATURES = {"qwen3_vl": (8, 32), "internvl": (2, 4, 128)}
MLP_HIDDEN = {
    "qwen3_vl": lambda m, x: m.act_fn(m.linear_fc1(m.norm(x).view(-1, 128))),
    "internvl": lambda m, x: m.act(m.linear_1(m.layer_norm(x))),
}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_projector_tools_on_mlp_projectors_and_a_clear_error_elsewhere(family, loaded):
    model, _ = loaded[family]
    base = P.projector_state(model)
    finetuned = {name: t + 0.01 * torch.randn_like(t) for name, t in base.items()}
    if family not in MLP_PROJECTOR_FAMILIES:
        for tool in (P.layer_labels, P.linear_weight_names, P.max_rank):
            with pytest.raises(ValueError, match="not a Linear -> activation -> Linear") as info:
                tool(model)
            assert "Qwen3VLForConditionalGeneration (qwen3_vl)" in str(info.value)
        with P.projector_loaded(model, finetuned):  # states and fine-tuning still work
            assert all(torch.equal(p, finetuned[name])
                       for name, p in adapt(model).projector.named_parameters())
        return
    first, second = MLP_LINEARS[family]
    assert P.layer_labels(model) == ["W1", "W2"]
    assert P.linear_weight_names(model) == [f"{first}.weight", f"{second}.weight"]
    deltas = P.weight_updates(model, base, finetuned)
    for label, name in zip(["W1", "W2"], P.linear_weight_names(model), strict=True):
        assert torch.equal(deltas[label], finetuned[name] - base[name])
    features = torch.randn(*MLP_FEATURES[family])
    projector = adapt(model).projector
    hidden, output = P.projector_forward(model, features, finetuned)
    with torch.no_grad(), P.projector_loaded(model, finetuned):
        torch.testing.assert_close(hidden, MLP_HIDDEN[family](projector, features))
        torch.testing.assert_close(output, projector(features))
    assert torch.equal(P.projector_state(model)[f"{first}.weight"], base[f"{first}.weight"])


def test_parameter_checks_name_the_supported_families(saved, tmp_path):
    assert params.check_model(str(saved["phi3"]), "chat") == str(saved["phi3"])
    assert params.check_model(str(saved["smolvlm"]), "vlm") == str(saved["smolvlm"])
    with pytest.raises(ValueError, match="not a supported text-only causal-LM") as info:
        params.check_model(str(saved["qwen3_vl"]), "chat")
    assert "Gemma2ForCausalLM (gemma2)" in str(info.value)
    assert "Qwen3VLForConditionalGeneration" not in str(info.value)
    with pytest.raises(ValueError, match="not a supported vision-language") as info:
        params.check_model(str(saved["gemma2"]), "vlm")
    assert "SmolVLMForConditionalGeneration (smolvlm)" in str(info.value)
    T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' is not a supported architecture") as info:
        params.check_model(str(tmp_path))
    assert "Phi3ForCausalLM (phi3)" in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ValueError, match="not a JSON object"):
        params.check_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        params.check_model(str(tmp_path))


def test_replacement_keeps_gemma2_logit_soft_capping(loaded):
    """Gemma-2 caps its attention logits; the replacement's eager attention must too (a text
    model has no visual keys, so a full replacement in every layer changes nothing)."""
    model, _ = loaded["gemma2"]
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    assert model.config.attn_logit_softcapping is not None
    inputs = family_inputs("gemma2")
    vanilla = logits(model, inputs)
    with A.replaced_visual_attention(model, A.ReplacementConfig(mode="uniform", heads="all",
                                                                layers="all")):
        assert torch.equal(logits(model, inputs), vanilla)
