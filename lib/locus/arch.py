"""Architecture adapter: one view of the decoder parts of the supported Hugging Face models.

Analyses and interventions need the same handful of modules (decoder layers, attention, o_proj,
MLP projections, norms, the multimodal projector) and sizes (heads, key/value heads, head dim)
whatever the checkpoint. `adapt(model)` finds them once, by `config.model_type`, so the rest of
the library never spells out model-specific attribute paths.

Two layouts differ from Llama's and are described here rather than in each analysis:

- sandwich norms (Gemma-2, Gemma-3): the attention and MLP outputs are normed again before they
  are added to the residual stream (`post_attention_layernorm`, `post_feedforward_layernorm`),
  and the MLP reads `pre_feedforward_layernorm`; `attention_update` gives the attention update
  the layer really adds, `pre_mlp_norm` the norm the MLP reads;
- fused projections (Phi-3): q, k and v are row blocks of one `qkv_proj`, gate and up of one
  `gate_up_proj`; `rows(i, name)` gives every projection as a block of rows of its linear, so
  per-head and per-neuron code slices fused and separate weights alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Family:
    """Where one family keeps its parts: paths under the model's `.model` (None: absent; the
    language model None means `.model` itself), and its layer layout."""

    model_class: str
    language_model: str | None = None
    vision_tower: str | None = None
    projector: str | None = None
    mlp_projector: bool = False  # the projector is Linear -> activation -> Linear
    sandwich_norms: bool = False
    fused_projections: bool = False


def _vlm(model_class: str, mlp_projector: bool = True, language_model: str = "language_model",
         vision_tower: str = "vision_tower", projector: str = "multi_modal_projector") -> _Family:
    return _Family(model_class, language_model, vision_tower, projector, mlp_projector)


_FAMILIES: dict[str, _Family] = {
    "llava": _vlm("LlavaForConditionalGeneration"),
    "llava_next": _vlm("LlavaNextForConditionalGeneration"),
    "llava_onevision": _vlm("LlavaOnevisionForConditionalGeneration"),
    "qwen2_vl": _vlm("Qwen2VLForConditionalGeneration", vision_tower="visual",
                     projector="visual.merger"),
    "qwen2_5_vl": _vlm("Qwen2_5_VLForConditionalGeneration", vision_tower="visual",
                       projector="visual.merger"),
    "qwen3_vl": _vlm("Qwen3VLForConditionalGeneration", vision_tower="visual",
                     projector="visual.merger"),
    "internvl": _vlm("InternVLForConditionalGeneration"),
    # Idefics3 / SmolVLM: pixel shuffle, then one linear (no MLP) into the text width.
    "idefics3": _vlm("Idefics3ForConditionalGeneration", False, "text_model", "vision_model",
                     "connector"),
    "smolvlm": _vlm("SmolVLMForConditionalGeneration", False, "text_model", "vision_model",
                    "connector"),
    # Gemma-3: SigLIP, then average pooling, a norm and one projection matrix (no nn.Linear).
    "gemma3": _Family("Gemma3ForConditionalGeneration", "language_model", "vision_tower",
                      "multi_modal_projector", sandwich_norms=True),
    "llama": _Family("LlamaForCausalLM"),
    "qwen2": _Family("Qwen2ForCausalLM"),
    "qwen3": _Family("Qwen3ForCausalLM"),
    "mistral": _Family("MistralForCausalLM"),
    "gemma2": _Family("Gemma2ForCausalLM", sandwich_norms=True),
    "gemma3_text": _Family("Gemma3ForCausalLM", sandwich_norms=True),
    "phi3": _Family("Phi3ForCausalLM", fused_projections=True),
}



def _describe(model_types) -> str:
    """"ModelClass (model_type), ..." for the given model types."""
    return ", ".join(f"{_FAMILIES[t].model_class} ({t})" for t in model_types)


SUPPORTED = _describe(_FAMILIES)
VLM_FAMILIES = tuple(t for t, f in _FAMILIES.items() if f.vision_tower is not None)
TEXT_FAMILIES = tuple(t for t, f in _FAMILIES.items() if f.vision_tower is None)
MLP_PROJECTOR_FAMILIES = tuple(t for t, f in _FAMILIES.items() if f.mlp_projector)
PROJECTIONS = ("q", "k", "v", "gate", "up")


def supported_text(kind: str | None = None) -> str:
    """The supported model classes (with their model_type) as a sentence: all of them, or only
    the vision-language ("vlm") or text-only ("chat") ones."""
    return _describe({None: _FAMILIES, "vlm": VLM_FAMILIES, "chat": TEXT_FAMILIES}[kind])


def check_model_type(model_type: str | None, kind: str | None = None) -> str:
    """Raise a ValueError naming the supported families unless ``model_type`` (a checkpoint's
    config.model_type) is supported, and of ``kind`` ("vlm" or "chat") when given."""
    family = _FAMILIES.get(model_type)
    is_vlm = family is not None and family.vision_tower is not None
    if family is None or (kind == "vlm" and not is_vlm) or (kind == "chat" and is_vlm):
        what = {None: "", "vlm": "vision-language ", "chat": "text-only causal-LM "}[kind]
        raise ValueError(
            f"model_type {model_type!r} is not a supported {what}architecture; supported: "
            f"{supported_text(kind)}"
        )
    return model_type


@dataclass(frozen=True)
class Rows:
    """Rows ``[start, stop)`` of a linear's output: one projection (q, k, v, gate, up), the whole
    linear or one block of a fused one."""

    linear: nn.Linear
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Number of rows (output features) of the projection."""
        return self.stop - self.start

    def index(self, start: int = 0, stop: int | None = None) -> slice:
        """Rows ``[start, stop)`` of the projection as a slice of the linear's rows."""
        stop = self.size if stop is None else stop
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"rows [{start}, {stop}) outside a projection of {self.size} rows")
        return slice(self.start + start, self.start + stop)

    @property
    def weight(self) -> torch.Tensor:
        """The projection's block of the weight (a view: writing to it writes the linear)."""
        return self.linear.weight[self.index()]

    @property
    def bias(self) -> torch.Tensor | None:
        """The projection's block of the bias (a view), or None."""
        return None if self.linear.bias is None else self.linear.bias[self.index()]


def _whole(linear: nn.Linear) -> Rows:
    return Rows(linear, 0, linear.out_features)


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

    @property
    def _spec(self) -> _Family:
        return _FAMILIES[self.family]

    def attention(self, i: int) -> nn.Module:
        """Self-attention module of decoder layer i."""
        return self.layers[i].self_attn

    def rows(self, i: int, name: str) -> Rows | None:
        """Projection ``name`` ("q", "k", "v", "gate", "up") of layer i as rows of its linear
        (a block of the fused qkv_proj / gate_up_proj for Phi-3); None for the gate of an
        ungated MLP."""
        if name not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {name!r}")
        if self._spec.fused_projections:
            return self._fused_rows(i, name)
        parent = self.attention(i) if name in ("q", "k", "v") else self.mlp(i)
        linear = getattr(parent, f"{name}_proj", None)
        return None if linear is None else _whole(linear)

    def _fused_rows(self, i: int, name: str) -> Rows:
        """Phi-3: qkv_proj rows are [q | k | v], gate_up_proj rows are [gate | up]."""
        if name in ("gate", "up"):
            width = self.intermediate_size
            start = 0 if name == "gate" else width
            return Rows(self.mlp(i).gate_up_proj, start, start + width)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        start, width = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[name]
        return Rows(self.attention(i).qkv_proj, start, start + width)

    def q_proj(self, i: int) -> nn.Linear:
        """The linear computing layer i's queries (Phi-3: the fused qkv_proj; see `rows`)."""
        return self.rows(i, "q").linear

    def k_proj(self, i: int) -> nn.Linear:
        """The linear computing layer i's keys (Phi-3: the fused qkv_proj; see `rows`)."""
        return self.rows(i, "k").linear

    def v_proj(self, i: int) -> nn.Linear:
        """The linear computing layer i's values (Phi-3: the fused qkv_proj; see `rows`)."""
        return self.rows(i, "v").linear

    def o_proj(self, i: int) -> nn.Linear:
        """Output projection of layer i; its input is the concatenation of the heads."""
        return self.attention(i).o_proj

    def mlp(self, i: int) -> nn.Module:
        """Feed-forward block of layer i."""
        return self.layers[i].mlp

    def up_proj(self, i: int) -> nn.Linear:
        """The linear computing layer i's MLP up projection (Phi-3: the fused gate_up_proj)."""
        return self.rows(i, "up").linear

    def gate_proj(self, i: int) -> nn.Linear | None:
        """The linear computing layer i's MLP gate (Phi-3: gate_up_proj), None if ungated."""
        gate = self.rows(i, "gate")
        return None if gate is None else gate.linear

    def down_proj(self, i: int) -> nn.Linear:
        """Down projection of layer i's MLP; its input is the intermediate (neuron) activation."""
        return self.mlp(i).down_proj

    def input_norm(self, i: int) -> nn.Module:
        """Norm applied to the residual stream before attention in layer i."""
        return self.layers[i].input_layernorm

    def pre_mlp_norm(self, i: int) -> nn.Module:
        """Norm applied to the residual stream before the MLP in layer i (Gemma:
        pre_feedforward_layernorm, else post_attention_layernorm)."""
        layer = self.layers[i]
        if self._spec.sandwich_norms:
            return layer.pre_feedforward_layernorm
        return layer.post_attention_layernorm

    def attention_update(self, i: int, attention_output: torch.Tensor) -> torch.Tensor:
        """What layer i adds to the residual stream for this attention output: the output
        itself, or its post-attention norm for sandwich-norm families (Gemma-2/3)."""
        if self._spec.sandwich_norms:
            return self.layers[i].post_attention_layernorm(attention_output)
        return attention_output

    def mlp_projector_linears(self) -> list[nn.Linear]:
        """The projector's linears, checked to form a Linear -> activation -> Linear MLP (what
        the projector weight-update tools analyse)."""
        if not self._spec.mlp_projector:
            what = "no projector" if self.projector is None else (
                f"a {type(self.projector).__name__} with {len(self.projector_linears)} linear(s)")
            raise ValueError(
                f"{self._spec.model_class} ({self.family}) has {what}, not a "
                "Linear -> activation -> Linear MLP projector; the projector tools support: "
                + _describe(MLP_PROJECTOR_FAMILIES)
            )
        return self.projector_linears

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
    spec = _FAMILIES[family]
    text_config = model.config.get_text_config()
    language_model = _submodule(model.model, spec.language_model) or model.model
    projector = _submodule(model.model, spec.projector)
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
        vision_tower=_submodule(model.model, spec.vision_tower),
        lm_head=model.lm_head,
        final_norm=language_model.norm,
        image_token_id=_image_token_id(model.config) if spec.vision_tower else None,
    )
    _check_shapes(arch)
    return arch


def _family(model: nn.Module) -> str:
    """The model's config.model_type, checked to be supported and to have a language-model head."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
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
    """Fail early when the config's sizes disagree with the projection weights: every
    projection has its expected width, and the blocks of each linear tile its output."""
    kv = arch.num_kv_heads * arch.head_dim
    expected = {"q": arch.num_heads * arch.head_dim, "k": kv, "v": kv,
                "gate": arch.intermediate_size, "up": arch.intermediate_size}
    sizes = (f"heads {arch.num_heads}, key/value heads {arch.num_kv_heads}, head_dim "
             f"{arch.head_dim}, intermediate {arch.intermediate_size}")
    covered: dict[nn.Linear, int] = {}
    for name, width in expected.items():
        rows = arch.rows(0, name)
        if rows is None:
            continue
        if rows.size != width:
            raise ValueError(f"{arch.family}: the {name} projection has {rows.size} rows, "
                             f"expected {width} ({sizes})")
        covered[rows.linear] = covered.get(rows.linear, 0) + rows.size
    for linear, width in covered.items():
        if linear.out_features != width:
            raise ValueError(f"{arch.family}: a fused projection has {linear.out_features} "
                             f"rows, its blocks {width} ({sizes})")
    o_in = arch.o_proj(0).in_features
    if o_in != expected["q"]:
        raise ValueError(
            f"{arch.family}: o_proj input width {o_in} != num_heads*head_dim "
            f"{arch.num_heads}*{arch.head_dim}"
        )
