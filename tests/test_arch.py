"""Tests for locus.arch: every supported family, built tiny, saved, loaded back and adapted."""

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

from locus.arch import adapt

IMAGE_TOKEN = 90
VOCAB = 96
HIDDEN = 48
INTERMEDIATE = 80
# 6 query heads sharing 2 key/value heads (grouped-query attention), head_dim 8.
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    image_size=16, patch_size=8,
)
# Qwen2-VL names the vision width embed_dim and the output (text) width hidden_size; Qwen2.5-VL
# names them hidden_size and out_hidden_size.
QWEN2_VISION = dict(
    depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=4,
    spatial_merge_size=2, temporal_patch_size=1,
)
QWEN2_5_VISION = dict(
    depth=1, hidden_size=32, out_hidden_size=HIDDEN, num_heads=2, intermediate_size=64,
    patch_size=4, spatial_merge_size=2, temporal_patch_size=1,
)
QWEN_ROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}


def llava():
    config = LlavaConfig(
        text_config=LlamaConfig(**TEXT), vision_config=CLIPVisionConfig(**VISION),
        image_token_index=IMAGE_TOKEN,
    )
    return LlavaForConditionalGeneration(config)


def llava_next():
    config = LlavaNextConfig(
        text_config=LlamaConfig(**TEXT), vision_config=CLIPVisionConfig(**VISION),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[16, 16]],
    )
    return LlavaNextForConditionalGeneration(config)


def llava_onevision():
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**TEXT), vision_config=SiglipVisionConfig(**VISION),
        image_token_index=IMAGE_TOKEN, video_token_index=IMAGE_TOKEN + 1,
        image_grid_pinpoints=[[16, 16]],
    )
    return LlavaOnevisionForConditionalGeneration(config)


def qwen_vl(config_class, model_class, vision):
    config = config_class(
        text_config=dict(**TEXT, rope_parameters=QWEN_ROPE), vision_config=vision,
        image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
        vision_start_token_id=IMAGE_TOKEN + 2, vision_end_token_id=IMAGE_TOKEN + 3,
    )
    return model_class(config)


VLMS = {
    "llava": (llava, LlavaForConditionalGeneration),
    "llava_next": (llava_next, AutoModelForImageTextToText),
    "llava_onevision": (llava_onevision, AutoModelForImageTextToText),
    "qwen2_vl": (
        lambda: qwen_vl(Qwen2VLConfig, Qwen2VLForConditionalGeneration, QWEN2_VISION),
        AutoModelForImageTextToText,
    ),
    "qwen2_5_vl": (
        lambda: qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, QWEN2_5_VISION),
        Qwen2_5_VLForConditionalGeneration,
    ),
}
TEXT_MODELS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**TEXT)), AutoModelForCausalLM),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**TEXT)), Qwen2ForCausalLM),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**TEXT)), AutoModelForCausalLM),
}


def saved_and_loaded(build, loader, tmp_path):
    """Build a tiny model, save it and load it back by path (the real-checkpoint code path)."""
    torch.manual_seed(0)
    build().save_pretrained(tmp_path)
    return loader.from_pretrained(tmp_path)


def assert_decoder_found(arch, model):
    assert arch.num_layers == len(arch.layers) == 2
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (6, 2, 8)
    assert (arch.hidden_size, arch.intermediate_size) == (HIDDEN, INTERMEDIATE)
    for i in range(arch.num_layers):
        assert arch.attention(i) is arch.layers[i].self_attn
        assert arch.q_proj(i).out_features == arch.num_heads * arch.head_dim
        assert arch.k_proj(i).out_features == arch.num_kv_heads * arch.head_dim
        assert arch.v_proj(i).out_features == arch.num_kv_heads * arch.head_dim
        assert arch.o_proj(i).in_features == arch.num_heads * arch.head_dim
        assert arch.o_proj(i).out_features == HIDDEN
        assert arch.up_proj(i).out_features == INTERMEDIATE
        assert arch.gate_proj(i).out_features == INTERMEDIATE
        assert arch.down_proj(i).in_features == INTERMEDIATE
        assert arch.mlp(i).down_proj is arch.down_proj(i)
        assert arch.input_norm(i).weight.shape == (HIDDEN,)
        assert arch.pre_mlp_norm(i).weight.shape == (HIDDEN,)
    assert arch.final_norm is arch.language_model.norm
    assert arch.lm_head is model.lm_head
    assert arch.lm_head.weight.shape == (VOCAB, HIDDEN)
    assert arch.language_model.embed_tokens is model.get_input_embeddings()


@pytest.mark.parametrize("family", list(VLMS))
def test_adapt_finds_vlm_parts(family, tmp_path):
    build, loader = VLMS[family]
    model = saved_and_loaded(build, loader, tmp_path)
    arch = adapt(model)

    assert arch.family == family
    assert_decoder_found(arch, model)
    assert arch.vision_tower is not None and arch.projector is not None
    assert len(arch.projector_linears) == 2
    assert all(isinstance(lin, nn.Linear) for lin in arch.projector_linears)
    # The projector ends in the language model's width.
    assert arch.projector_linears[-1].out_features == HIDDEN
    assert all(p is not arch.language_model for p in arch.projector.modules())
    assert arch.image_token_id == IMAGE_TOKEN

    input_ids = torch.tensor([[1, 5, 90, 90, 90, 7, 2], [1, 90, 90, 90, 6, 8, 2]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(arch.visual_token_mask(input_ids), expected)


def test_qwen_projector_is_the_merger(tmp_path):
    build, loader = VLMS["qwen2_5_vl"]
    model = saved_and_loaded(build, loader, tmp_path)
    arch = adapt(model)
    assert arch.projector is model.model.visual.merger
    assert arch.vision_tower is model.model.visual
    # The merger concatenates 2x2 patches (4 * 32) before projecting to the text width.
    assert [lin.in_features for lin in arch.projector_linears] == [128, 128]


@pytest.mark.parametrize("family", list(TEXT_MODELS))
def test_adapt_finds_text_model_parts(family, tmp_path):
    build, loader = TEXT_MODELS[family]
    model = saved_and_loaded(build, loader, tmp_path)
    arch = adapt(model)

    assert arch.family == family
    assert_decoder_found(arch, model)
    assert arch.language_model is model.model
    assert arch.projector is None and arch.vision_tower is None
    assert arch.projector_linears == []
    assert arch.image_token_id is None
    input_ids = torch.tensor([[1, 90, 3, 2]])
    assert not arch.visual_token_mask(input_ids).any()
    assert arch.visual_token_mask(input_ids).shape == input_ids.shape


def test_head_dim_from_config_when_not_hidden_over_heads():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**TEXT, "head_dim": 16}))
    arch = adapt(model)
    assert arch.head_dim == 16
    assert arch.o_proj(0).in_features == 6 * 16


def test_unsupported_model_is_rejected_with_the_supported_list():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel") as info:
        adapt(model)
    assert "LlavaForConditionalGeneration" in str(info.value)
    assert "Qwen2_5_VLForConditionalGeneration" in str(info.value)


def test_base_model_without_head_is_rejected():
    model = LlamaForCausalLM(LlamaConfig(**TEXT)).model
    with pytest.raises(ValueError, match="no language-model head"):
        adapt(model)


def test_visual_token_mask_rejects_float_input():
    arch = adapt(LlamaForCausalLM(LlamaConfig(**TEXT)))
    with pytest.raises(TypeError, match="integer tensor"):
        arch.visual_token_mask(torch.zeros(1, 3))
