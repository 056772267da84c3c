"""Tests for locus.hooks: residual states equal the model's own intermediates, hooks never leak."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from locus.arch import adapt
from locus.hooks import SITES, capture_residuals, stream_residuals

IMAGE_TOKEN = 60
NUM_LAYERS = 3
TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
)
ATOL = 1e-5


def tiny_llama(attn_implementation="sdpa"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        image_size=16, patch_size=8,
    )
    config = LlavaConfig(
        text_config=LlamaConfig(**TEXT), vision_config=vision, image_token_index=IMAGE_TOKEN,
    )
    return LlavaForConditionalGeneration(config).eval()


def text_ids(batch=2, seq=7):
    torch.manual_seed(1)
    return torch.randint(1, IMAGE_TOKEN, (batch, seq))


# A 16x16 image in 8x8 patches gives 4 image tokens (the CLS token is dropped).
LLAVA_IDS = torch.tensor([
    [1, 5, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, 8, 9],
    [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 11, 12, 13, 14],
])
LLAVA_VISUAL = LLAVA_IDS == IMAGE_TOKEN


def pixels():
    torch.manual_seed(2)
    return torch.randn(2, 3, 16, 16)


def hook_counts(model):
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def causal_mask(seq):
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("which", ["llama", "llava"])
def test_captured_states_match_output_hidden_states(which):
    model = tiny_llama() if which == "llama" else tiny_llava()
    inputs = {"input_ids": text_ids()} if which == "llama" else {
        "input_ids": LLAVA_IDS, "pixel_values": pixels(),
    }
    arch = adapt(model)
    with torch.no_grad(), capture_residuals(model) as cap:
        hidden = model(**inputs, output_hidden_states=True).hidden_states

    # transformers 5.23: hidden_states[i] is the input of layer i, and the last entry is the
    # final norm of the last layer's output (not the raw output).
    assert len(hidden) == NUM_LAYERS + 1
    assert sorted(cap.states) == list(range(NUM_LAYERS))
    for i in range(NUM_LAYERS):
        assert set(cap.states[i]) == set(SITES)
        torch.testing.assert_close(cap.states[i]["input"], hidden[i], atol=ATOL, rtol=0)
    for i in range(NUM_LAYERS - 1):
        torch.testing.assert_close(cap.states[i]["ffn"], hidden[i + 1], atol=ATOL, rtol=0)
    last = cap.states[NUM_LAYERS - 1]["ffn"]
    torch.testing.assert_close(arch.final_norm(last), hidden[-1], atol=ATOL, rtol=0)
    assert not torch.allclose(last, hidden[-1], atol=1e-2)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_attn_site_equals_layer_recomputed_by_hand(attn_implementation):
    model = tiny_llama(attn_implementation)
    arch = adapt(model)
    ids = text_ids()
    with torch.no_grad(), capture_residuals(model) as cap:
        model(input_ids=ids)

    seq = ids.shape[1]
    with torch.no_grad():
        for i in range(NUM_LAYERS):
            x_in = cap.states[i]["input"]
            rotary = arch.language_model.rotary_emb(x_in, torch.arange(seq)[None])
            attn_out = arch.attention(i)(
                hidden_states=arch.input_norm(i)(x_in),
                position_embeddings=rotary,
                attention_mask=causal_mask(seq),
            )[0]
            x_attn = x_in + attn_out
            x_ffn = x_attn + arch.mlp(i)(arch.pre_mlp_norm(i)(x_attn))
            torch.testing.assert_close(cap.states[i]["attn"], x_attn, atol=ATOL, rtol=0)
            torch.testing.assert_close(cap.states[i]["ffn"], x_ffn, atol=ATOL, rtol=0)
            # The attention update is real, not zero.
            assert (x_attn - x_in).norm() > 1e-3


def test_states_are_detached_cpu_in_requested_dtype():
    model = tiny_llama()
    with capture_residuals(model, dtype=torch.float64) as cap:
        model(input_ids=text_ids(batch=3, seq=5))
    for states in cap.states.values():
        for state in states.values():
            assert state.shape == (3, 5, TEXT["hidden_size"])
            assert state.dtype == torch.float64
            assert state.device.type == "cpu"
            assert not state.requires_grad


def test_bfloat16_model_states_are_exact_before_cast():
    model = tiny_llama().to(torch.bfloat16)
    with torch.no_grad(), capture_residuals(model) as cap:
        hidden = model(input_ids=text_ids(), output_hidden_states=True).hidden_states
    for i in range(NUM_LAYERS):
        assert cap.states[i]["input"].dtype == torch.float32
        assert torch.equal(cap.states[i]["input"], hidden[i].float())


def test_layer_and_site_subsets():
    model = tiny_llama()
    with torch.no_grad(), capture_residuals(model, layers=[2, 0], sites=("ffn", "input")) as cap:
        model(input_ids=text_ids())
    assert sorted(cap.states) == [0, 2]
    assert all(set(states) == {"input", "ffn"} for states in cap.states.values())


def test_hooks_removed_after_normal_exit():
    model = tiny_llama()
    before = hook_counts(model)
    with capture_residuals(model):
        assert hook_counts(model) != before
        model(input_ids=text_ids())
    assert hook_counts(model) == before


def test_hooks_removed_when_body_raises():
    model = tiny_llama()
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"), stream_residuals(model, lambda i, s: None):
        model(input_ids=text_ids())
        raise RuntimeError("boom")
    assert hook_counts(model) == before


def test_hooks_removed_when_a_hook_raises():
    model = tiny_llama()
    before = hook_counts(model)
    embeds = model.get_input_embeddings()(text_ids())
    capture = capture_residuals(model, tokens="text")
    with pytest.raises(ValueError, match="needs input_ids"), capture:
        model(inputs_embeds=embeds)
    assert hook_counts(model) == before


def test_stream_hands_each_layer_over_before_the_next_layer_runs():
    model = tiny_llama()
    arch = adapt(model)
    events = []
    starts = [
        arch.layers[i].register_forward_pre_hook(lambda m, a, i=i: events.append(("start", i)))
        for i in range(NUM_LAYERS)
    ]
    streamed = {}

    def keep(layer, states):
        events.append(("done", layer))
        streamed[layer] = states

    with torch.no_grad(), stream_residuals(model, keep):
        model(input_ids=text_ids())
    for handle in starts:
        handle.remove()

    expected = [(kind, i) for i in range(NUM_LAYERS) for kind in ("start", "done")]
    assert events == expected
    with torch.no_grad(), capture_residuals(model) as cap:
        model(input_ids=text_ids())
    for i in range(NUM_LAYERS):
        for site in SITES:
            assert torch.equal(streamed[i][site], cap.states[i][site])


def test_llava_visual_tokens_are_exactly_the_image_positions():
    model = tiny_llava()
    inputs = {"input_ids": LLAVA_IDS, "pixel_values": pixels()}
    with torch.no_grad():
        with capture_residuals(model) as every:
            model(**inputs)
        with capture_residuals(model, tokens="visual") as visual:
            model(**inputs)
        with capture_residuals(model, tokens="text") as text:
            model(**inputs)
        image_features = model.model.get_image_features(pixel_values=inputs["pixel_values"])

    hidden = TEXT["hidden_size"]
    for i in range(NUM_LAYERS):
        for site in SITES:
            full = every.states[i][site]
            assert visual.states[i][site].shape == (2, 4, hidden)
            assert text.states[i][site].shape == (2, 5, hidden)
            assert torch.equal(visual.states[i][site], full[LLAVA_VISUAL].view(2, 4, hidden))
            assert torch.equal(text.states[i][site], full[~LLAVA_VISUAL].view(2, 5, hidden))
    # At the first layer's input the visual positions hold the projected image features.
    projected = torch.stack(list(image_features.pooler_output))
    torch.testing.assert_close(visual.states[0]["input"], projected, atol=ATOL, rtol=0)


def test_explicit_input_ids_and_bool_mask_select_tokens():
    model = tiny_llava()
    inputs = {"input_ids": LLAVA_IDS, "pixel_values": pixels()}
    first_two = torch.tensor([True, True] + [False] * 7)
    with torch.no_grad():
        with capture_residuals(model, tokens="visual", input_ids=LLAVA_IDS) as by_ids:
            model(**inputs)
        with capture_residuals(model, tokens=LLAVA_VISUAL) as by_mask:
            model(**inputs)
        with capture_residuals(model, tokens=first_two, sites="ffn") as by_positions:
            model(**inputs)
        with capture_residuals(model, sites="ffn") as every:
            model(**inputs)
    for i in range(NUM_LAYERS):
        for site in SITES:
            assert torch.equal(by_ids.states[i][site], by_mask.states[i][site])
        assert set(by_positions.states[i]) == {"ffn"}
        assert torch.equal(by_positions.states[i]["ffn"], every.states[i]["ffn"][:, :2])


def test_text_model_has_no_visual_tokens():
    model = tiny_llama()
    with torch.no_grad(), capture_residuals(model, tokens="visual") as cap:
        model(input_ids=text_ids())
    assert cap.states[0]["input"].shape == (2, 0, TEXT["hidden_size"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tokens": "image"}, ValueError, "tokens must be one of"),
        ({"tokens": torch.ones(2, 7)}, TypeError, "bool tensor"),
        ({"tokens": torch.tensor([[True, False], [True, True]])}, ValueError, "per row"),
        ({"sites": ("input", "mlp")}, ValueError, "sites must be"),
        ({"layers": [0, NUM_LAYERS]}, ValueError, "out of range"),
        ({"dtype": "float32"}, TypeError, "torch.dtype"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    model = tiny_llama()
    before = hook_counts(model)
    with pytest.raises(error, match=message), capture_residuals(model, **kwargs):
        pass
    assert hook_counts(model) == before


def test_mask_of_wrong_length_is_rejected_at_forward():
    model = tiny_llama()
    with pytest.raises(ValueError, match="does not fit"), capture_residuals(
        model, tokens=torch.ones(3, dtype=torch.bool)
    ):
        model(input_ids=text_ids())
