"""Tests for locus.lost_in_attention.attention: the visual-attention replacement acts inside the
attention computation on exactly the last query row, visual keys, chosen heads and layers; it is
a no-op at λ = 0, keeps causal and padding masks, follows generate() step by step and always
restores the model."""

import math

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from locus.arch import adapt
from locus.lost_in_attention import attention as A

IMAGE_TOKEN = 60
PAD = 0
NUM_LAYERS = 3
NUM_HEADS = 4
TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=63,
    bos_token_id=1,
)
V = IMAGE_TOKEN
# Left-padded: row 1 has two pad positions. A 16x16 image in 8x8 patches gives 4 image tokens.
IDS = torch.tensor([
    [1, 5, V, V, V, V, 7, 8, 9, 10],
    [PAD, PAD, 1, V, V, V, V, 11, 12, 13],
])
MASK = (IDS != PAD).long()
VISUAL = IDS == V


def tiny_llava(attn_implementation="eager"):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, image_size=16, patch_size=8)
    config = LlavaConfig(text_config=LlamaConfig(**TEXT), vision_config=vision,
                         image_token_index=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def inputs():
    torch.manual_seed(2)
    return {"input_ids": IDS, "attention_mask": MASK, "pixel_values": torch.randn(2, 3, 16, 16)}


def attention_weights(model, config=None):
    """Post-softmax attention weights of every decoder layer, (batch, heads, q, k)."""
    arch = adapt(model)
    weights = {}
    handles = [
        arch.attention(i).register_forward_hook(
            lambda m, a, out, i=i: weights.__setitem__(i, out[1].detach()))
        for i in range(NUM_LAYERS)
    ]
    try:
        with torch.no_grad():
            if config is None:
                logits = model(**inputs()).logits
            else:
                with A.replaced_visual_attention(model, config):
                    logits = model(**inputs()).logits
    finally:
        for h in handles:
            h.remove()
    return logits, weights


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", A.VECTOR_MODES)
def test_lambda_zero_gives_exactly_the_vanilla_logits(mode):
    model = tiny_llava()
    with torch.no_grad():
        vanilla = model(**inputs()).logits
    config = A.ReplacementConfig(mode=mode, lam=0.0, heads="all", layers="all")
    with torch.no_grad(), A.replaced_visual_attention(model, config):
        replaced = model(**inputs()).logits
    assert torch.equal(replaced, vanilla)


def test_full_replacement_changes_the_logits_only_from_the_last_position():
    model = tiny_llava()
    vanilla, _ = attention_weights(model)
    replaced, _ = attention_weights(model, A.ReplacementConfig(heads="all", layers="all"))
    # Only the last query row is edited, so every earlier real position is untouched (padding
    # queries, whose keys are all masked, average over every position and may change).
    earlier = MASK.bool().clone()
    earlier[:, -1] = False
    assert torch.equal(replaced[earlier], vanilla[earlier])
    assert (replaced[:, -1] - vanilla[:, -1]).abs().max() > 1e-4


def test_uniform_mode_gives_equal_weights_over_visual_keys_in_replaced_heads():
    model = tiny_llava()
    config = A.ReplacementConfig(mode="uniform", heads=(1, 3), layers=(1, 2))
    _, vanilla = attention_weights(model)
    _, weights = attention_weights(model, config)
    for layer in (1, 2):
        last = weights[layer][:, :, -1, :]
        for row in range(2):
            for head in (1, 3):
                visual = last[row, head, VISUAL[row]]
                assert visual.sum() > 1e-3
                torch.testing.assert_close(visual, visual.mean().expand(4), rtol=1e-6, atol=0)
            # In the first chosen layer, heads not chosen keep their learned weights exactly (in
            # layer 2 the last row's query already changed through layer 1).
            for head in (0, 2):
                if layer == 1:
                    assert torch.equal(last[row, head], vanilla[layer][row, head, -1])
    # The layer before the first chosen one is untouched.
    assert torch.equal(weights[0], vanilla[0])


def test_layers_not_chosen_are_untouched_and_later_layers_change():
    model = tiny_llava()
    _, vanilla = attention_weights(model)
    _, weights = attention_weights(model, A.ReplacementConfig(heads="all", layers=(1,)))
    assert torch.equal(weights[0], vanilla[0])
    assert not torch.equal(weights[1][:, :, -1], vanilla[1][:, :, -1])
    # Layer 2 is not replaced but its input changed at the last position only.
    assert torch.equal(weights[2][:, :, :-1], vanilla[2][:, :, :-1])


def test_padding_and_causal_masks_keep_working():
    model = tiny_llava()
    _, weights = attention_weights(model, A.ReplacementConfig(heads="all", layers="all"))
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)
    for layer_weights in weights.values():
        # Padding keys of row 1 get no weight from any real query (padding queries, whose keys
        # are all masked, are left out).
        assert torch.all(layer_weights[1, :, 2:, :2] == 0)
        # Causal: no real query attends to a later key.
        assert torch.all(layer_weights[0][:, future] == 0)
        assert torch.all(layer_weights[1, :, 2:][:, future[2:]] == 0)
        torch.testing.assert_close(layer_weights[:, :, 2:].sum(-1),
                                   torch.ones(2, NUM_HEADS, 8), rtol=0, atol=1e-5)


def test_batched_rows_equal_single_row_runs():
    model = tiny_llava()
    config = A.ReplacementConfig(mode="uniform", heads=A.HeadBand(0.3, 0.9), layers="all_but_0")
    batch = inputs()
    with torch.no_grad(), A.replaced_visual_attention(model, config):
        both = model(**batch).logits
        alone = model(input_ids=IDS[1:, 2:], pixel_values=batch["pixel_values"][1:]).logits
    torch.testing.assert_close(both[1, 2:], alone[0], rtol=0, atol=1e-5)


def test_drop_masks_the_visual_keys_of_the_last_query():
    model = tiny_llava()
    _, vanilla = attention_weights(model)
    _, weights = attention_weights(model, A.ReplacementConfig(mode="drop", heads=(0,),
                                                              layers=(2,)))
    last = weights[2][:, :, -1, :]
    assert torch.all(last[:, 0][VISUAL] == 0)
    assert torch.all(last[:, 1:][VISUAL[:, None].expand(-1, 3, -1)] > 0)
    assert torch.equal(weights[2][:, :, :-1], vanilla[2][:, :, :-1])


def test_prune_hides_visual_keys_from_text_queries_from_layer_k_on():
    model = tiny_llava()
    _, vanilla = attention_weights(model)
    _, weights = attention_weights(model, A.pruning_config(NUM_LAYERS, after_layer=1))
    assert torch.equal(weights[0], vanilla[0])
    for layer in (1, 2):
        w = weights[layer]
        for row in range(2):
            text_queries = ~VISUAL[row] & MASK[row].bool()
            assert torch.all(w[row][:, text_queries][:, :, VISUAL[row]] == 0)
            # Visual queries still see the visual keys before them.
            visual_rows = w[row][:, VISUAL[row]][:, :, VISUAL[row]]
            assert visual_rows.sum() > 0


def test_head_band_picks_heads_by_quantile_of_minus_mean_text_score():
    model = tiny_llava()
    config = A.ReplacementConfig(heads=A.HeadBand(0.3, 0.6))
    state = A.ReplacementState(adapt(model), config, A._eager_call, None, 8)
    visual = torch.tensor([[False, True, True, False]])
    # Text keys 0 and 3; head h has mean text score -(h + 1) -> head score h + 1.
    last = torch.tensor([[[-1.0, 9, 9, -1], [-2, 9, 9, -2], [-3, 9, 9, -3], [-4, 9, 9, -4]]])
    chosen = state._chosen_heads(last[:, :, None], visual, torch.ones(1, 1, 4, dtype=torch.bool))
    # quantiles of (1, 2, 3, 4): q(0.3) = 1.9, q(0.6) = 2.8 -> only the score-2 head (index 1)
    assert chosen[:, :, 0].tolist() == [[False, True, False, False]]
    # Two query rows: the second row's scores reverse the order, so head 2 is chosen there.
    rows = torch.stack([last, last.flip(1)], dim=2)
    rows[..., 1:3] = 9
    chosen = state._chosen_heads(rows, visual, torch.ones(1, 2, 4, dtype=torch.bool))
    assert chosen.permute(0, 2, 1).tolist() == [[[False, True, False, False],
                                                 [False, False, True, False]]]


@pytest.mark.parametrize("mode", ["dirichlet", "uniform", "gaussian"])
def test_moment_matching_sets_the_mean_over_visual_keys(mode):
    model = tiny_llava()
    state = A.ReplacementState(adapt(model), A.ReplacementConfig(mode=mode), A._eager_call,
                               None, 8)
    state.key_visual = torch.tensor([[False, True, True, True, False]])
    visual = torch.cat([state.key_visual, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    last = torch.randn(1, NUM_HEADS, 1, 6)
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    vector = state._vector(last, visual, valid)
    target = last[:, :, 0, :5].double().mean().abs() / 2
    torch.testing.assert_close(vector[0, 0, 1:4].mean(), target)
    assert torch.all(vector[0, 0, ~visual[0]] == 0)


def test_dirichlet_vectors_are_on_the_simplex_and_seeded():
    a = A.dirichlet_vector(16, torch.Generator().manual_seed(0))
    b = A.dirichlet_vector(16, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.all(a > 0) and math.isclose(float(a.sum()), 1.0, rel_tol=1e-12)


def test_patch_complexity_ranks_a_textured_patch_first():
    pixels = torch.zeros(1, 3, 16, 16)
    pixels[0, :, 8:, :8] = torch.arange(8.0).repeat(8, 1) / 8  # a ramp in the bottom-left patch
    score = A.patch_complexity(pixels, 8)
    assert score.shape == (1, 4)
    assert score[0].argmax() == 2 and score[0, 2] == 1 and score[0, 0] == 0


def test_vision_prior_equals_the_towers_own_last_layer_attention():
    model = tiny_llava()
    tower = adapt(model).vision_tower
    tower.set_attn_implementation("eager")
    pixels = inputs()["pixel_values"]
    captured = {}
    attn = A._last_vision_attention(tower)
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("h", kw.get("hidden_states", a[0] if a else None)),
        with_kwargs=True)
    with torch.no_grad():
        out = tower(pixels, output_attentions=True)
    handle.remove()
    expected = out.attentions[-1].mean(dim=1).double()
    torch.testing.assert_close(A.received_attention(attn, captured["h"]), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["vision_prior", "complexity"])
def test_image_prior_modes_run_and_differ_from_vanilla(mode):
    model = tiny_llava()
    vanilla, _ = attention_weights(model)
    replaced, _ = attention_weights(model, A.ReplacementConfig(mode=mode, heads="all"))
    assert replaced.shape == vanilla.shape
    assert not torch.equal(replaced[:, -1], vanilla[:, -1])


def decoding_weights(model, config, steps=4):
    """Attention weights of every layer at every decoding step (query length 1) of generate()."""
    arch = adapt(model)
    seen = []

    def keep(module, args, out):
        if out[1].shape[2] == 1:
            seen.append(out[1].detach())

    handles = [arch.attention(i).register_forward_hook(keep) for i in range(NUM_LAYERS)]
    try:
        with torch.no_grad(), A.replaced_visual_attention(model, config) as state:
            model.generate(**inputs(), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return seen, state


def test_generate_drops_visual_attention_at_every_decoding_step():
    model = tiny_llava()
    seen, state = decoding_weights(model, A.ReplacementConfig(mode="drop", heads="all",
                                                               layers="all"))
    assert state.prefill_calls == 1
    assert len(seen) == 3 * NUM_LAYERS  # 4 new tokens: a prefill, then 3 decoding steps
    for weights in seen:
        keys = weights.shape[-1]
        visual = torch.cat([VISUAL, torch.zeros(2, keys - 10, dtype=torch.bool)], dim=1)
        assert torch.all(weights[:, :, 0][visual[:, None].expand(-1, NUM_HEADS, -1)] == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_generate_makes_visual_attention_uniform_at_every_decoding_step():
    model = tiny_llava()
    seen, _ = decoding_weights(model, A.ReplacementConfig(mode="uniform", heads="all",
                                                           layers=(1, 2)))
    vanilla_seen, _ = decoding_weights(model, A.ReplacementConfig(lam=0.0, layers=(1, 2)))
    assert len(seen) == len(vanilla_seen) == 3 * NUM_LAYERS
    for call, (weights, vanilla) in enumerate(zip(seen, vanilla_seen, strict=True)):
        if call % NUM_LAYERS == 0:  # layer 0 is not replaced
            continue
        for row in range(2):
            visual = weights[row, :, 0, :10][:, VISUAL[row]]
            torch.testing.assert_close(visual, visual.mean(-1, keepdim=True).expand(-1, 4),
                                       rtol=1e-6, atol=0)
            spread = vanilla[row, :, 0, :10][:, VISUAL[row]]
            assert (spread.amax(-1) - spread.amin(-1)).max() > 1e-4


def test_sdpa_model_is_restored_and_unchosen_layers_use_sdpa():
    model = tiny_llava("sdpa")
    with torch.no_grad():
        vanilla = model(**inputs()).logits
        config = A.ReplacementConfig(lam=0.0, layers=(2,))
        with A.replaced_visual_attention(model, config):
            assert model.config.text_config._attn_implementation == A.IMPLEMENTATION
            assert model.config.vision_config._attn_implementation == "sdpa"
            replaced = model(**inputs()).logits
    real = MASK.bool()  # sdpa and eager treat all-masked padding queries differently
    torch.testing.assert_close(replaced[real], vanilla[real], rtol=0, atol=1e-5)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_everything_is_restored_when_the_body_raises():
    model = tiny_llava()
    with torch.no_grad():
        vanilla = model(**inputs()).logits
    hooks = hook_counts(model)
    config = A.ReplacementConfig(mode="vision_prior", heads="all")
    with pytest.raises(RuntimeError, match="boom"), A.replaced_visual_attention(model, config):
        assert hook_counts(model) > hooks
        raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "eager"
    assert hook_counts(model) == hooks
    assert len(A._ACTIVE) == 0
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, vanilla)


def test_everything_is_restored_when_the_intervention_raises():
    model = tiny_llava()
    right_padded = {"input_ids": IDS.flip(1), "attention_mask": MASK.flip(1),
                    "pixel_values": inputs()["pixel_values"]}
    with pytest.raises(ValueError, match="left-pad"), A.replaced_visual_attention(model):
        model(**right_padded)
    assert model.config.text_config._attn_implementation == "eager"
    assert len(A._ACTIVE) == 0


def test_explicit_visual_mask_replaces_the_input_id_lookup():
    model = tiny_llava()
    config = A.ReplacementConfig(mode="drop", heads="all", layers="all")
    _, weights = attention_weights(model, config)
    arch = adapt(model)
    got = {}
    handle = arch.attention(1).register_forward_hook(
        lambda m, a, out: got.__setitem__("w", out[1]))
    with torch.no_grad(), A.replaced_visual_attention(model, config, visual_mask=VISUAL):
        model(**inputs())
    handle.remove()
    assert torch.equal(got["w"], weights[1])
    with pytest.raises(ValueError, match="visual_mask has shape"):
        with A.replaced_visual_attention(model, config, visual_mask=VISUAL[:, :5]):
            model(**inputs())


def test_config_validation_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        A.ReplacementConfig(mode="noise")
    with pytest.raises(ValueError, match="lam must be"):
        A.ReplacementConfig(lam=1.5)
    with pytest.raises(ValueError, match="heads must be"):
        A.ReplacementConfig(heads=(0.3, 0.6))
    with pytest.raises(ValueError, match="layers must be"):
        A.ReplacementConfig(layers="last")
    with pytest.raises(ValueError, match="HeadBand"):
        A.HeadBand(0.7, 0.2)
    model = tiny_llava()
    with pytest.raises(ValueError, match="out of range"):
        with A.replaced_visual_attention(model, A.ReplacementConfig(layers=(7,))):
            pass
    with pytest.raises(TypeError, match="ReplacementConfig"):
        with A.replaced_visual_attention(model, {"mode": "drop"}):
            pass
    assert model.config.text_config._attn_implementation == "eager"


@pytest.mark.parametrize("mode", ["dirichlet", "gaussian", "drop"])
def test_trailing_query_rows_are_edited_as_generate_edits_each_decoding_step(mode):
    """One forward pass with ``query_rows = k`` gives, at the last k positions, the logits of a
    prefill of the first n - k + 1 tokens followed by k - 1 cached decoding steps."""
    model = tiny_llava()
    config = A.ReplacementConfig(mode=mode, heads=A.HeadBand(0.3, 0.9), layers=(1, 2))
    ids, pixels = IDS[:1], inputs()["pixel_values"][:1]
    k = 3
    with torch.no_grad():
        with A.replaced_visual_attention(model, config) as state:
            state.query_rows = torch.tensor([k])
            forced = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0, -k:]
        with A.replaced_visual_attention(model, config):
            prefix = ids[:, : ids.shape[1] - k + 1]
            out = model(input_ids=prefix, pixel_values=pixels, use_cache=True)
            steps, cache = [out.logits[0, -1]], out.past_key_values
            for position in range(ids.shape[1] - k + 1, ids.shape[1]):
                out = model(input_ids=ids[:, position:position + 1], past_key_values=cache,
                            use_cache=True)
                steps.append(out.logits[0, -1])
                cache = out.past_key_values
        vanilla = model(input_ids=ids, pixel_values=pixels).logits[0, -k:]
    torch.testing.assert_close(forced, torch.stack(steps), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forced, vanilla, atol=1e-4)


def test_query_rows_must_fit_the_batch():
    model = tiny_llava()
    with torch.no_grad(), A.replaced_visual_attention(model, A.ReplacementConfig()) as state:
        state.query_rows = torch.tensor([1])
        with pytest.raises(ValueError, match="query_rows"):
            model(**inputs())


def test_layer_bands_and_pruning_configs():
    assert A.layer_bands(4, 2) == [(0, 1), (1, 2), (2, 3)]
    assert A.layer_bands(6, 2, stride=2) == [(0, 1), (2, 3), (4, 5)]
    assert A.pruning_config(4, 2).layers == (2, 3)
    with pytest.raises(ValueError, match="width"):
        A.layer_bands(4, 5)
