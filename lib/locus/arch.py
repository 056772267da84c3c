"""Architecture adapter: one view of the decoder parts of the supported Hugging Face models.

Analyses and interventions need the same handful of modules (decoder layers, attention, o_proj,
MLP projections, norms, the multimodal projector) and sizes (heads, key/value heads, head dim)
whatever the checkpoint. `adapt(model)` finds them once, by `config.model_type`, so the rest of
the library never spells out model-specific attribute paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> (path of the vision tower, path of the projector) under the model's `.model`;
# (None, None) for text-only models.
_VISION_PARTS: dict[str, tuple[str | None, str | None]] = {
    "llava": ("vision_tower", "multi_modal_projector"),
    "llava_next": ("vision_tower", "multi_modal_projector"),
    "llava_onevision": ("vision_tower", "multi_modal_projector"),
    "qwen2_vl": ("visual", "visual.merger"),
    "qwen2_5_vl": ("visual", "visual.merger"),
    "llama": (None, None),
    "qwen2": (None, None),
    "mistral": (None, None),
}

SUPPORTED = (
    "LlavaForConditionalGeneration (llava), LlavaNextForConditionalGeneration (llava_next), "
    "LlavaOnevisionForConditionalGeneration (llava_onevision), "
    "Qwen2VLForConditionalGeneration (qwen2_vl), Qwen2_5_VLForConditionalGeneration (qwen2_5_vl), "
    "LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2), MistralForCausalLM (mistral)"
)


@dataclass(frozen=True, eq=False)
class Arch:
    """The decoder modules and sizes of one model; `family` is its `config.model_type`."""

    family: str
    language_model: nn.Module
    layers: nn.ModuleList
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    projector: nn.Module | None
    projector_linears: list[nn.Linear]
    vision_tower: nn.Module | None
    lm_head: nn.Module
    final_norm: nn.Module
    image_token_id: int | None

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    def attention(self, i: int) -> nn.Module:
        """Self-attention module of decoder layer i."""
        return self.layers[i].self_attn

    def q_proj(self, i: int) -> nn.Linear:
        """Query projection of layer i."""
        return self.attention(i).q_proj

    def k_proj(self, i: int) -> nn.Linear:
        """Key projection of layer i."""
        return self.attention(i).k_proj

    def v_proj(self, i: int) -> nn.Linear:
        """Value projection of layer i."""
        return self.attention(i).v_proj

    def o_proj(self, i: int) -> nn.Linear:
        """Output projection of layer i; its input is the concatenation of the heads."""
        return self.attention(i).o_proj

    def mlp(self, i: int) -> nn.Module:
        """Feed-forward block of layer i."""
        return self.layers[i].mlp

    def up_proj(self, i: int) -> nn.Linear:
        """Up projection of layer i's MLP."""
        return self.mlp(i).up_proj

    def gate_proj(self, i: int) -> nn.Linear | None:
        """Gate projection of layer i's MLP, or None for an ungated MLP."""
        return getattr(self.mlp(i), "gate_proj", None)

    def down_proj(self, i: int) -> nn.Linear:
        """Down projection of layer i's MLP; its input is the intermediate (neuron) activation."""
        return self.mlp(i).down_proj

    def input_norm(self, i: int) -> nn.Module:
        """Norm applied to the residual stream before attention in layer i."""
        return self.layers[i].input_layernorm

    def post_attention_norm(self, i: int) -> nn.Module:
        """Norm applied to the residual stream before the MLP in layer i."""
        return self.layers[i].post_attention_layernorm

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor shaped like input_ids, True where a position holds an image token."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            raise TypeError(f"input_ids must be an integer tensor, got {type(input_ids).__name__}")
        if self.image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.image_token_id


def adapt(model: nn.Module) -> Arch:
    """Find the decoder modules and sizes of a supported model (see `SUPPORTED`)."""
    family = _family(model)
    text_config = model.config.get_text_config()
    language_model = model.model.language_model if _is_vlm(family) else model.model
    vision_path, projector_path = _VISION_PARTS[family]
    projector = _submodule(model.model, projector_path)
    num_heads = text_config.num_attention_heads
    arch = Arch(
        family=family,
        language_model=language_model,
        layers=language_model.layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        projector=projector,
        projector_linears=_linears(projector),
        vision_tower=_submodule(model.model, vision_path),
        lm_head=model.lm_head,
        final_norm=language_model.norm,
        image_token_id=_image_token_id(model.config) if _is_vlm(family) else None,
    )
    _check_shapes(arch)
    return arch


def _family(model: nn.Module) -> str:
    """The model's config.model_type, checked to be supported and to have a language-model head."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _VISION_PARTS:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (model_type={model_type!r}); "
            f"supported: {SUPPORTED}"
        )
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise ValueError(
            f"{type(model).__name__} has no language-model head; pass the full model, one of: "
            f"{SUPPORTED}"
        )
    return model_type


def _is_vlm(family: str) -> bool:
    """True for the vision-language families."""
    return _VISION_PARTS[family][0] is not None


def _submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    """root.get_submodule(path), or None when path is None."""
    return None if path is None else root.get_submodule(path)


def _linears(module: nn.Module | None) -> list[nn.Linear]:
    """The nn.Linear layers inside module, in registration order ([] for None)."""
    if module is None:
        return []
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _image_token_id(config) -> int:
    """The config's image token id (`image_token_id`, else `image_token_index`)."""
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        name = type(config).__name__
        raise ValueError(f"{name} has neither image_token_id nor image_token_index")
    return int(token_id)


def _check_shapes(arch: Arch) -> None:
    """Fail early when the config's head sizes disagree with the projection weights."""
    q_out = arch.q_proj(0).out_features
    k_out = arch.k_proj(0).out_features
    o_in = arch.o_proj(0).in_features
    if not q_out == o_in == arch.num_heads * arch.head_dim:
        raise ValueError(
            f"{arch.family}: q_proj/o_proj widths {q_out}/{o_in} != num_heads*head_dim "
            f"{arch.num_heads}*{arch.head_dim}"
        )
    if k_out != arch.num_kv_heads * arch.head_dim:
        raise ValueError(
            f"{arch.family}: k_proj width {k_out} != num_kv_heads*head_dim "
            f"{arch.num_kv_heads}*{arch.head_dim}"
        )
