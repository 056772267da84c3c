"""Replacing the visual attention of the answer-producing token ("Lost in Attention", claim 2).

The intervention acts inside the attention computation, through ``transformers``'
``AttentionInterface``: a custom attention function (registered once under
:data:`IMPLEMENTATION`, with the eager float mask so causal and padding masks keep working) is
switched on for the decoder only, by ``model.set_attn_implementation``, and switched back when
:func:`replaced_visual_attention` exits, also on error. In the chosen layers it computes eager
attention and, before the mask is added and the softmax taken, changes the pre-softmax scores of
the **last query row** (the token that produces the next answer token, at prefill and at every
decoding step) on the **visual key positions** of the chosen heads:

``scores ← (1 - λ) · scores + λ · a``

``a`` is one vector over a sample's visual tokens, reused for every chosen head, layer and step
(drawn again at each prefill). Modes (:data:`VECTOR_MODES`):

- ``"dirichlet"``: a Dirichlet(1) point on the simplex (the authors' "Gaussian noise" mode);
- ``"gaussian"``: standard Gaussian logits;
- ``"uniform"``: the same value on every visual key (equal post-softmax weights among them);
- ``"vision_prior"``: softmax of the attention each patch receives in the vision tower's last
  layer — from the CLS query when the tower has one more token than the decoder has visual
  tokens (LLaVA's "default" feature selection), else averaged over all queries;
- ``"complexity"``: softmax of the per-patch complexity, mean absolute gray-level gradient plus
  intensity variance, min-max normalised over the image's patches.

Moment matching (optional, on by default as in the authors' Llama/Qwen2 code) sets the mean of
``a`` over the visual keys to ``m = |mean score| / 2``, with the mean score taken over the last
query row's unmasked keys in all heads of that layer call (per sample): probability vectors are
rescaled (``a = p · m / mean(p)``, as the authors do), Gaussian logits — zero-mean, so a rescale
is undefined — are shifted (``a = z - mean(z) + m``).

Heads: all, an explicit tuple, or a :class:`HeadBand` — per sample and layer call, the heads
whose score ``-mean(non-visual pre-softmax scores of the last query)`` lies between the band's
two quantiles over heads (inclusive, linear interpolation). Layers: "all", "all_but_0" or an
explicit tuple.

Two comparison interventions beyond the paper use the same machinery:

- ``"drop"``: the visual keys of the last query row are masked out entirely in the chosen
  heads and layers (its attention goes to text keys only);
- ``"prune"`` (FastV-style, :func:`pruning_config`): in every layer from ``k`` on and all heads,
  the visual key positions are masked for every non-visual query (prefill and decoding), so from
  layer ``k`` on no text token reads the image, as if the visual tokens had been dropped from
  the sequence after layer ``k - 1``. Unlike FastV, which keeps the half of the visual tokens that
  receive the most attention, *all* visual tokens are pruned.

The last query row must be a real token at prefill, so batches must be left-padded.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from locus.arch import Arch, adapt

IMPLEMENTATION = "locus_visual_replacement"
VECTOR_MODES = ("dirichlet", "gaussian", "uniform", "vision_prior", "complexity")
MASK_MODES = ("drop", "prune")
MODES = VECTOR_MODES + MASK_MODES
LAYER_CHOICES = ("all", "all_but_0")


@dataclass(frozen=True)
class HeadBand:
    """Heads whose score -mean(non-visual scores of the last query) lies in the quantile band
    [low, high] over the layer's heads (LLaVA-1.5 default 0.3-0.6, Qwen 0.3-0.9)."""

    low: float = 0.3
    high: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"HeadBand needs 0 <= low <= high <= 1, got {self.low}, {self.high}")


@dataclass(frozen=True)
class ReplacementConfig:
    """What to replace: ``mode`` (one of :data:`MODES`), blend ``lam`` in [0, 1],
    ``moment_matching``, ``heads`` ("all", a :class:`HeadBand` or a tuple of head indices),
    ``layers`` ("all", "all_but_0" or a tuple of layer indices) and the ``seed`` of the random
    vectors."""

    mode: str = "dirichlet"
    lam: float = 1.0
    moment_matching: bool = True
    heads: str | HeadBand | tuple[int, ...] = HeadBand()
    layers: str | tuple[int, ...] = "all_but_0"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float) or not (
            0.0 <= self.lam <= 1.0
        ):
            raise ValueError(f"lam must be a number in [0, 1], got {self.lam!r}")
        if not (self.heads == "all" or isinstance(self.heads, HeadBand) or _int_tuple(self.heads)):
            raise ValueError(
                f"heads must be 'all', a HeadBand or a non-empty tuple of head indices, got "
                f"{self.heads!r}"
            )
        if not (self.layers in LAYER_CHOICES or _int_tuple(self.layers)):
            raise ValueError(
                f"layers must be one of {LAYER_CHOICES} or a non-empty tuple of layer indices, "
                f"got {self.layers!r}"
            )
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")


def _int_tuple(value) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def pruning_config(num_layers: int, after_layer: int) -> ReplacementConfig:
    """FastV-style pruning: every visual token is hidden from every text query in layers
    ``after_layer .. num_layers - 1`` (layers ``0 .. after_layer - 1`` see the image)."""
    if not 0 <= after_layer < num_layers:
        raise ValueError(f"after_layer must be in [0, {num_layers}), got {after_layer}")
    return ReplacementConfig(mode="prune", heads="all",
                             layers=tuple(range(after_layer, num_layers)))


def chosen_layers(layers: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The layer indices a config's ``layers`` names, checked against the model."""
    if layers == "all":
        return tuple(range(num_layers))
    if layers == "all_but_0":
        return tuple(range(1, num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range; the model has {num_layers} layers")
    return tuple(sorted(set(layers)))


# ----------------------------------------------------------------------------------------------
# The attention function


def _expand_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), as transformers does
    for grouped-query attention."""
    if n_rep == 1:
        return states
    batch, kv_heads, seq, dim = states.shape
    expanded = states[:, :, None].expand(batch, kv_heads, n_rep, seq, dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq, dim)


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    edit=None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (the same operations as transformers' eager path, with Gemma-2's logit
    soft-capping when ``softcap`` is set); ``edit(scores, mask)`` may change the pre-softmax
    scores before the mask is added."""
    n_rep = query.shape[1] // key.shape[1]
    key_states = _expand_kv(key, n_rep)
    value_states = _expand_kv(value, n_rep)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = None if attention_mask is None else attention_mask[:, :, :, : key_states.shape[-2]]
    if edit is not None:
        scores = edit(scores, mask)
    if mask is not None:
        scores = scores + mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
    return output, weights


# attention module -> (replacement state, layer index); filled only inside the context manager
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _replacement_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: the intervention in chosen layers, the model's own
    implementation elsewhere."""
    scaling = module.scaling if scaling is None else scaling
    entry = _ACTIVE.get(module)
    if entry is None:
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout,
                                softcap=kwargs.get("softcap"))
    state, layer = entry
    if layer not in state.layers:
        return state.original(module, query, key, value, attention_mask, scaling=scaling,
                              dropout=dropout, **kwargs)
    return _eager_attention(module, query, key, value, attention_mask, scaling, dropout,
                            edit=partial(state.edit_scores, layer), softcap=kwargs.get("softcap"))


AttentionInterface.register(IMPLEMENTATION, _replacement_attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


# ----------------------------------------------------------------------------------------------
# Per-sample vectors


def dirichlet_vector(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Dirichlet(1) draw on the n-simplex (normalised standard exponentials), float64."""
    exponential = -torch.log1p(-torch.rand(n, generator=generator, dtype=torch.float64))
    return exponential / exponential.sum()


def patch_complexity(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch complexity of (images, channels, H, W) pixels, row-major over the patch grid:
    mean |horizontal| + mean |vertical| gray-level difference + gray-level variance, min-max
    normalised over each image's patches. Returns (images, patches), float64."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] not in (1, 3):
        raise ValueError(
            f"pixel_values must be (images, 1 or 3 channels, H, W), got {tuple(pixel_values.shape)}"
        )
    x = pixel_values.detach().to(torch.float64).cpu()
    if x.shape[1] == 3:
        x = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    else:
        x = x[:, 0]
    images, height, width = x.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch {patch_size}")
    patches = x.reshape(images, height // patch_size, patch_size, width // patch_size, patch_size)
    patches = patches.permute(0, 1, 3, 2, 4).reshape(images, -1, patch_size, patch_size)
    grad = (patches[..., :, 1:] - patches[..., :, :-1]).abs().mean((-2, -1)) + (
        patches[..., 1:, :] - patches[..., :-1, :]
    ).abs().mean((-2, -1))
    score = grad + patches.var(dim=(-2, -1), unbiased=False)
    low, high = score.min(dim=1, keepdim=True).values, score.max(dim=1, keepdim=True).values
    return (score - low) / (high - low).clamp_min(1e-12)


def received_attention(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention (images, queries, keys), averaged over heads, of a CLIP/SigLIP-style
    vision attention module (``q_proj``, ``k_proj``, ``num_heads``, ``scale``) on its input."""
    needed = ("q_proj", "k_proj", "num_heads")
    if not all(hasattr(attn, name) for name in needed):
        raise ValueError(
            f"vision_prior needs a vision attention module with q_proj, k_proj and num_heads "
            f"(CLIP/SigLIP-style); {type(attn).__name__} has not"
        )
    images, tokens, _ = hidden.shape
    q = attn.q_proj(hidden).view(images, tokens, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(hidden).view(images, tokens, attn.num_heads, -1).transpose(1, 2)
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    weights = torch.softmax((q @ k.transpose(-1, -2)).to(torch.float64) * scale, dim=-1)
    return weights.mean(dim=1)


def _last_vision_attention(vision_tower: nn.Module) -> nn.Module:
    """The last self-attention module of a vision tower."""
    found = [m for name, m in vision_tower.named_modules()
             if name.endswith("self_attn") or name.endswith(".attn")]
    if not found:
        raise ValueError(f"no attention module found in {type(vision_tower).__name__}")
    return found[-1]


# ----------------------------------------------------------------------------------------------
# The replacement state


class ReplacementState:
    """What one :func:`replaced_visual_attention` context knows: the config, the visual key
    positions and vectors of the current batch, and the vision-tower captures."""

    def __init__(
        self, arch: Arch, config: ReplacementConfig, original, visual_mask: torch.Tensor | None,
        patch_size: int | None,
    ) -> None:
        self.arch = arch
        self.config = config
        self.original = original
        self.layers = chosen_layers(config.layers, arch.num_layers)
        self.fixed_visual_mask = visual_mask
        self.patch_size = patch_size
        self.generator = torch.Generator().manual_seed(config.seed)
        self.key_visual: torch.Tensor | None = None
        self.base: torch.Tensor | None = None
        self.vision_attention: torch.Tensor | None = None
        self.pixel_values: torch.Tensor | None = None
        self.prefill_calls = 0
        # Per sample, how many trailing query rows a prefill edits (None: the last one only).
        # Teacher-forced scoring sets it to (answer tokens + 1): the rows that produce the
        # answer and its end, each edited as generate() edits it at its own decoding step.
        self.query_rows: torch.Tensor | None = None

    # -- hooks ---------------------------------------------------------------------------------

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model pre-hook: at a prefill (no cached tokens) read the visual key positions."""
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            return
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        if self.fixed_visual_mask is not None:
            visual = self.fixed_visual_mask
            if input_ids is not None and visual.shape != input_ids.shape:
                raise ValueError(
                    f"visual_mask has shape {tuple(visual.shape)} but the model was called with "
                    f"input_ids of shape {tuple(input_ids.shape)}"
                )
        elif input_ids is None:
            raise ValueError(
                "the model was called without input_ids; pass visual_mask= (bool, batch × seq) "
                "to replaced_visual_attention"
            )
        else:
            visual = self.arch.visual_token_mask(input_ids)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(
            attention_mask[:, -1].all()
        ):
            raise ValueError(
                "the last position of some row is padding: left-pad the batch, so that the last "
                "query row is the answer-producing token"
            )
        self.key_visual = visual.to(torch.bool)
        self.base = None
        self.prefill_calls += 1

    def on_vision_tower(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Vision tower pre-hook: keep the pixels (for the complexity prior)."""
        pixels = args[0] if args else kwargs.get("pixel_values")
        self.pixel_values = pixels.detach()

    def on_vision_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Last vision attention pre-hook: the attention each token receives there."""
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            self.vision_attention = received_attention(module, hidden.detach())

    # -- vectors -------------------------------------------------------------------------------

    def _base_vectors(self, device: torch.device) -> torch.Tensor:
        """(batch, prefill length) float64: each sample's vector on its visual positions, 0
        elsewhere; drawn once per prefill."""
        if self.base is None:
            visual = self.key_visual
            base = torch.zeros(visual.shape, dtype=torch.float64)
            for row in range(visual.shape[0]):
                n = int(visual[row].sum())
                if n:
                    base[row, visual[row].cpu()] = self._sample_vector(row, n)
            self.base = base
        return self.base.to(device)

    def _sample_vector(self, row: int, n: int) -> torch.Tensor:
        mode = self.config.mode
        if mode == "dirichlet":
            return dirichlet_vector(n, self.generator)
        if mode == "gaussian":
            return torch.randn(n, generator=self.generator, dtype=torch.float64)
        if mode == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        if mode == "complexity":
            if self.pixel_values is None:
                raise ValueError("mode 'complexity' needs the image: no vision tower call seen")
            scores = patch_complexity(self.pixel_values[row : row + 1], self.patch_size)[0]
            return torch.softmax(self._fit(scores, n, "complexity"), dim=0)
        if self.vision_attention is None:
            raise ValueError("mode 'vision_prior' needs the image: no vision tower call seen")
        attention = self.vision_attention[row]
        tokens = attention.shape[0]
        received = attention[0, 1:] if tokens == n + 1 else attention.mean(dim=0)
        return torch.softmax(self._fit(received, n, "vision_prior"), dim=0)

    @staticmethod
    def _fit(scores: torch.Tensor, n: int, mode: str) -> torch.Tensor:
        if scores.numel() != n:
            raise ValueError(
                f"mode {mode!r} gives {scores.numel()} patch scores but the sample has {n} visual "
                "tokens; it supports one image per sample whose patches map one-to-one to "
                "visual tokens (LLaVA-1.5 style)"
            )
        return scores.cpu()

    def _key_visual(self, batch: int, keys: int, device: torch.device) -> torch.Tensor:
        """The visual key mask padded with False to the current key length (decoding steps)."""
        if self.key_visual is None:
            raise ValueError("no prefill was seen: call the model (or generate) inside the context")
        visual = self.key_visual.to(device)
        if visual.shape[0] != batch or visual.shape[1] > keys:
            raise ValueError(
                f"visual mask of shape {tuple(visual.shape)} does not fit a batch of {batch} "
                f"with {keys} keys"
            )
        pad = torch.zeros(batch, keys - visual.shape[1], dtype=torch.bool, device=device)
        return torch.cat([visual, pad], dim=1)

    # -- the edit ------------------------------------------------------------------------------

    def edit_scores(self, layer: int, scores: torch.Tensor, mask: torch.Tensor | None):
        """Change the pre-softmax scores (batch, heads, queries, keys) of a chosen layer: the last
        query row, or at a prefill the trailing :attr:`query_rows` of each sample."""
        batch, heads, queries, keys = scores.shape
        key_visual = self._key_visual(batch, keys, scores.device)
        if self.config.mode == "prune":
            valid_last = (torch.ones(batch, keys, dtype=torch.bool, device=scores.device)
                          if mask is None else mask[:, 0, -1, :] == 0)
            heads_on = self._chosen_heads(scores[:, :, -1:, :], key_visual,
                                          valid_last[:, None, :])[:, :, 0]
            return self._prune(scores, key_visual, heads_on)
        rows_on = self._rows_on(batch, queries, scores.device)
        n_rows = rows_on.shape[1]
        tail = scores[:, :, -n_rows:, :]
        valid = (torch.ones(batch, n_rows, keys, dtype=torch.bool, device=scores.device)
                 if mask is None else mask[:, 0, -n_rows:, :] == 0)
        heads_on = self._chosen_heads(tail, key_visual, valid)
        target = (heads_on & rows_on[:, None, :])[..., None] & key_visual[:, None, None, :]
        if self.config.mode == "drop":
            new_tail = tail.masked_fill(target, torch.finfo(scores.dtype).min)
        else:
            vector = self._vector(tail, key_visual, valid)[:, None].to(scores.dtype)
            lam = self.config.lam
            new_tail = torch.where(target, (1 - lam) * tail + lam * vector, tail)
        return torch.cat([scores[:, :, :-n_rows], new_tail], dim=2)

    def _rows_on(self, batch: int, queries: int, device: torch.device) -> torch.Tensor:
        """(batch, R) bool over the last R query rows: which rows of each sample are edited."""
        if queries == 1 or self.query_rows is None:
            return torch.ones(batch, 1, dtype=torch.bool, device=device)
        counts = self.query_rows.to(device)
        if counts.shape != (batch,) or int(counts.min()) < 1 or int(counts.max()) > queries:
            raise ValueError(f"query_rows must be {batch} counts in [1, {queries}], got "
                             f"{self.query_rows.tolist()}")
        n_rows = int(counts.max())
        return torch.arange(n_rows, device=device)[None, :] >= n_rows - counts[:, None]

    def _chosen_heads(self, rows, key_visual, valid) -> torch.Tensor:
        """(batch, heads, R) bool: the heads to change for each sample and edited query row, from
        that row's scores (batch, heads, R, keys) and valid keys (batch, R, keys)."""
        batch, heads, n_rows, _ = rows.shape
        spec = self.config.heads
        if spec == "all":
            return torch.ones(batch, heads, n_rows, dtype=torch.bool, device=rows.device)
        if not isinstance(spec, HeadBand):
            bad = [h for h in spec if h >= heads]
            if bad:
                raise ValueError(f"heads {bad} out of range; the model has {heads} heads")
            chosen = torch.zeros(batch, heads, n_rows, dtype=torch.bool, device=rows.device)
            chosen[:, list(spec)] = True
            return chosen
        text_keys = (valid & ~key_visual[:, None, :])[:, None].to(torch.float32)
        head_score = -(rows.float() * text_keys).sum(-1) / text_keys.sum(-1).clamp_min(1)
        bounds = torch.quantile(
            head_score, torch.tensor([spec.low, spec.high], device=rows.device), dim=1
        )
        return (head_score >= bounds[0][:, None]) & (head_score <= bounds[1][:, None])

    def _vector(self, rows, key_visual, valid) -> torch.Tensor:
        """(batch, R, keys) float64: the replacement vector a on the visual keys of each edited
        row, moment-matched to that row's mean score over its valid keys in all heads."""
        keys = rows.shape[-1]
        base = self._base_vectors(rows.device)
        base = torch.cat([base, base.new_zeros(base.shape[0], keys - base.shape[1])], dim=1)
        base = base[:, None, :]
        if not self.config.moment_matching:
            return base.expand(-1, rows.shape[2], -1)
        valid = valid[:, None].to(torch.float64)
        mean_score = (rows.to(torch.float64) * valid).sum((1, 3)) / (
            valid.sum((1, 3)) * rows.shape[1]
        ).clamp_min(1)
        target = (mean_score.abs() / 2)[..., None]
        visual = key_visual[:, None, :]
        n_visual = visual.sum(-1, keepdim=True).clamp_min(1).to(torch.float64)
        base_mean = base.sum(-1, keepdim=True) / n_visual
        if self.config.mode == "gaussian":
            return torch.where(visual, base - base_mean + target, base.expand_as(target * base))
        return base * target / base_mean.clamp_min(1e-300)

    def _prune(self, scores, key_visual, heads_on) -> torch.Tensor:
        """Mask the visual keys for every non-visual query of the chosen heads."""
        queries, keys = scores.shape[2], scores.shape[3]
        query_visual = key_visual[:, keys - queries :]
        blocked = (~query_visual)[:, None, :, None] & key_visual[:, None, None, :]
        blocked = blocked & heads_on[:, :, None, None]
        return scores.masked_fill(blocked, torch.finfo(scores.dtype).min)


# ----------------------------------------------------------------------------------------------
# The context manager


def _text_config(model: nn.Module):
    return model.config.get_text_config()


def _set_decoder_implementation(model: nn.Module, name: str) -> None:
    """Switch only the decoder (text config) to attention implementation ``name``."""
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)
    if _text_config(model)._attn_implementation != name:
        raise RuntimeError(f"could not switch the decoder's attention implementation to {name!r}")


def _implementation_function(name: str):
    """The attention function the model used before the context (eager has no registry entry)."""
    if name in (None, "eager"):
        return _eager_call
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, _eager_call)


def _eager_call(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _eager_attention(module, query, key, value, attention_mask, scaling, dropout,
                            softcap=kwargs.get("softcap"))


@contextmanager
def replaced_visual_attention(
    model: nn.Module,
    config: ReplacementConfig = ReplacementConfig(),
    visual_mask: torch.Tensor | None = None,
) -> Iterator[ReplacementState]:
    """Run ``model`` with the visual attention of the last query replaced (see the module doc).

    ``visual_mask`` (bool, batch × prefill length) fixes the visual key positions; by default
    they are read from the ``input_ids`` of each prefill (image-token positions). The model's
    attention implementation, hooks and state are restored when the context exits, also when
    its body raises.
    """
    if not isinstance(config, ReplacementConfig):
        raise TypeError(f"config must be a ReplacementConfig, got {type(config).__name__}")
    if visual_mask is not None and (
        not isinstance(visual_mask, torch.Tensor) or visual_mask.dtype != torch.bool
        or visual_mask.ndim != 2
    ):
        raise TypeError("visual_mask must be a bool tensor of shape (batch, seq)")
    arch = adapt(model)
    original_name = _text_config(model)._attn_implementation
    if original_name == IMPLEMENTATION:
        raise ValueError("the model is already inside replaced_visual_attention; nesting is not "
                         "supported")
    needs_image = config.mode in ("vision_prior", "complexity")
    if needs_image and arch.vision_tower is None:
        raise ValueError(f"mode {config.mode!r} needs a vision tower; {arch.family} has none")
    patch_size = getattr(getattr(model.config, "vision_config", None), "patch_size", None)
    state = ReplacementState(arch, config, _implementation_function(original_name),
                             visual_mask, patch_size)
    handles = [model.register_forward_pre_hook(state.on_model_call, with_kwargs=True)]
    try:
        if config.mode == "complexity":
            handles.append(arch.vision_tower.register_forward_pre_hook(
                state.on_vision_tower, with_kwargs=True))
        if config.mode == "vision_prior":
            handles.append(_last_vision_attention(arch.vision_tower).register_forward_pre_hook(
                state.on_vision_attention, with_kwargs=True))
        for i in range(arch.num_layers):
            _ACTIVE[arch.attention(i)] = (state, i)
        _set_decoder_implementation(model, IMPLEMENTATION)
        yield state
    finally:
        for handle in handles:
            handle.remove()
        for i in range(arch.num_layers):
            _ACTIVE.pop(arch.attention(i), None)
        if _text_config(model)._attn_implementation != original_name:
            _set_decoder_implementation(model, original_name)


# ----------------------------------------------------------------------------------------------
# Layer bands for the sweep


def layer_bands(num_layers: int, width: int, stride: int = 1) -> list[tuple[int, ...]]:
    """Contiguous bands of ``width`` layers, starting every ``stride`` layers, for the
    layer-band sweep."""
    if not 1 <= width <= num_layers or stride < 1:
        raise ValueError(f"width must be in [1, {num_layers}] and stride >= 1, got {width}, "
                         f"{stride}")
    return [tuple(range(start, start + width))
            for start in range(0, num_layers - width + 1, stride)]
