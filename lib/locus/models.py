"""The embedded toy models and the one loader for embedded names and local checkpoints.

The toy VLM is a real ``LlavaForConditionalGeneration`` (tiny CLIP tower, 2-layer GELU MLP
projector, tiny Llama decoder); the toy chat LM is a real ``LlamaForCausalLM``. Both use real
``transformers`` tokenizers built from the toy world's vocabulary, with a chat template, so that
the code path is the one real checkpoints take.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from locus import data

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# The toy template puts an image message's text before its image: "user : <question> <image>
# assistant :". With the question first, visual tokens can attend to it (the causal mask lets a
# visual token see only what comes before it), which the tiny decoder needs to bind question
# words to patches within a few minutes of CPU training; real checkpoints keep their own order.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{{ m['role'] }} : {{ m['content'] }} "
    "{% else %}{{ m['role'] }} :"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>{% endif %}{% endfor %} "
    "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
# LLaVA-1.5's order, an option: "user : <image> <question> assistant :", so the question tokens
# (not only the answer's) can read the image, as in the papers' models.
IMAGE_FIRST_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{{ m['role'] }} : {{ m['content'] }} "
    "{% else %}{{ m['role'] }} :"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    " {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
PROMPT_ORDERS = {"question_first": CHAT_TEMPLATE, "image_first": IMAGE_FIRST_TEMPLATE}


@dataclass(frozen=True)
class ToyVLMConfig:
    """Sizes of the toy LLaVA."""

    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 384
    max_positions: int = 96


@dataclass(frozen=True)
class ToyChatConfig:
    """Sizes of the toy chat Llama (grouped-query attention: 2 key/value heads for 4 heads)."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_positions: int = 64


def build_word_tokenizer(vocabulary: list[str] | None = None,
                         chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level ``transformers`` tokenizer over the toy world's words, with a chat template."""
    words = vocabulary or data.world_vocabulary()
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        padding_side="left",
    )
    tok.chat_template = chat_template
    return tok


def build_toy_vlm(cfg: ToyVLMConfig = ToyVLMConfig(), prompt_order: str = "question_first"
                  ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised toy LLaVA and its processor (seed torch before calling);
    ``prompt_order`` names its chat template (``PROMPT_ORDERS``: the toy's question first, or
    LLaVA-1.5's image first)."""
    if prompt_order not in PROMPT_ORDERS:
        raise ValueError(
            f"unknown prompt_order {prompt_order!r}; accepted: {sorted(PROMPT_ORDERS)}")
    template = PROMPT_ORDERS[prompt_order]
    tokenizer = build_word_tokenizer(chat_template=template)
    patch = data.CELL
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=2 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=data.IMAGE_SIZE, patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width,
        intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1, image_token=SPECIAL_TOKENS["image"],
    )
    return model, processor


def build_toy_chat(cfg: ToyChatConfig = ToyChatConfig()) -> tuple[LlamaForCausalLM,
                                                               PreTrainedTokenizerFast]:
    """A freshly initialised toy chat Llama and its tokenizer (seed torch before calling)."""
    tokenizer = build_word_tokenizer(data.vocabulary("chat"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def config_dict(cfg) -> dict:
    """A model-size config as a plain dict (for cache keys and reports)."""
    return asdict(cfg)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    device_map: str | dict | None = None, max_memory: dict | None = None,
):
    """Load a local Hugging Face checkpoint folder: a vision-language model with its processor,
    or a causal LM with its tokenizer, chosen by the folder's config. With ``device_map`` the
    weights are placed by accelerate (``from_pretrained``'s ``device_map`` / ``max_memory``)
    instead of moved to ``device``."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face checkpoint folder (it needs a config.json); pass an "
            "embedded model name or a local folder saved with save_pretrained"
        )
    config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
    elif max_memory is not None:
        raise ValueError("max_memory caps the devices of a device_map; pass device_map too")
    if hasattr(config, "vision_config"):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        companion = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        companion = AutoTokenizer.from_pretrained(path)
        if companion.pad_token is None:
            companion.pad_token = companion.eos_token
        companion.padding_side = "left"
    placed = model if device_map is not None else model.to(device)
    return placed.eval(), companion
