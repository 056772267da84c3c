"""Residual-stream capture around each decoder layer's two residual additions.

A decoder layer updates the residual stream twice:
`X_attn = X_in + self_attn(norm(X_in))` and `X_ffn = X_attn + mlp(norm(X_attn))` (= layer output;
Gemma-2/3 norm each update once more before adding it, see `Arch.attention_update`).
Two hooks per layer read these states without touching the computation: a pre-hook on the
norm its MLP reads (whose input is X_attn, the sum the layer itself computed, so nothing is
recomputed) and a forward hook on the layer, which sees its input X_in and its output X_ffn.
Sites are named "input", "attn" and "ffn". X_in is the state the layer receives: where a model
adds something between layers (Qwen3-VL's DeepStack visual features after its first layers),
layer i+1's input differs from layer i's output by exactly that.

Layers may live on different devices (a model loaded with a ``device_map``): each layer's
states are gathered on the device of that layer's output (``stream_residuals``) or on the CPU
(``capture_residuals``).

Token selection "visual" / "text" needs the input_ids of the forward pass. Pass `input_ids=` to
fix them for every forward pass inside the context, or leave it out: then a pre-hook on the
model's forward reads the `input_ids` it is called with (keyword or first positional argument),
which also follows `generate()` step by step. Hooks are removed when the context exits, also
when its body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from locus.arch import Arch, adapt

SITES = ("input", "attn", "ffn")
TOKEN_CHOICES = ("all", "visual", "text")

LayerCallback = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass
class ResidualCapture:
    """States of the latest forward pass: `states[layer][site]` is (batch, tokens, hidden)."""

    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


@contextmanager
def capture_residuals(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    tokens: str | torch.Tensor = "all",
    sites: Iterable[str] = SITES,
    dtype: torch.dtype = torch.float32,
    input_ids: torch.Tensor | None = None,
) -> Iterator[ResidualCapture]:
    """Record the residual states of the selected layers, detached, on CPU, in `dtype`.

    Each forward pass inside the context replaces the states of the previous one (with
    `generate()`, the last step's states remain). `tokens` is "all", "visual", "text", or a bool
    mask of shape (seq,) or (batch, seq) that selects the same number of tokens in every row.
    Tensors that need no cast, move or selection share memory with the model's activations.
    """
    capture = ResidualCapture()

    def store(layer: int, states: dict[str, torch.Tensor]) -> None:
        capture.states[layer] = states

    with _residual_hooks(model, store, layers, tokens, sites, dtype, "cpu", input_ids):
        yield capture


@contextmanager
def stream_residuals(
    model: nn.Module,
    callback: LayerCallback,
    layers: Iterable[int] | None = None,
    tokens: str | torch.Tensor = "all",
    sites: Iterable[str] = SITES,
    dtype: torch.dtype = torch.float32,
    input_ids: torch.Tensor | None = None,
) -> Iterator[None]:
    """Call `callback(layer, {site: tensor})` as each selected layer finishes, keeping nothing.

    Tensors stay on the layer's device (detached, in `dtype`), so a long model is analysed one
    layer at a time without holding every layer's states. Arguments as in `capture_residuals`.
    """
    with _residual_hooks(model, callback, layers, tokens, sites, dtype, None, input_ids):
        yield


@contextmanager
def _residual_hooks(
    model: nn.Module,
    on_layer: LayerCallback,
    layers: Iterable[int] | None,
    tokens: str | torch.Tensor,
    sites: Iterable[str],
    dtype: torch.dtype,
    device: str | None,
    input_ids: torch.Tensor | None,
) -> Iterator[None]:
    """Register the hooks of a `_ResidualTap` on the selected layers; remove them on exit."""
    arch = adapt(model)
    layer_ids = _layer_indices(layers, arch.num_layers)
    tap = _ResidualTap(arch, on_layer, tokens, _site_tuple(sites), _check_dtype(dtype), device)
    handles = []
    try:
        if input_ids is not None:
            tap.set_input_ids(input_ids)
        elif tap.needs_input_ids:
            handles.append(model.register_forward_pre_hook(tap.read_input_ids, with_kwargs=True))
        for i in layer_ids:
            layer = arch.layers[i]
            if "attn" in tap.sites:
                norm = arch.pre_mlp_norm(i)
                handles.append(norm.register_forward_pre_hook(partial(tap.on_mlp_norm_input, i)))
            handles.append(layer.register_forward_hook(partial(tap.on_layer_output, i),
                                                       with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ResidualTap:
    """Hook callbacks that assemble the residual states of each layer and hand them on."""

    def __init__(
        self,
        arch: Arch,
        on_layer: LayerCallback,
        tokens: str | torch.Tensor,
        sites: tuple[str, ...],
        dtype: torch.dtype,
        device: str | None,
    ) -> None:
        self.arch = arch
        self.on_layer = on_layer
        self.tokens = _check_tokens(tokens)
        self.sites = sites
        self.dtype = dtype
        self.device = device
        self.mask = tokens if isinstance(tokens, torch.Tensor) else None
        self.attn_states: dict[int, torch.Tensor] = {}

    @property
    def needs_input_ids(self) -> bool:
        """True when the token selection depends on the input_ids."""
        return self.tokens in ("visual", "text")

    def set_input_ids(self, input_ids: torch.Tensor) -> None:
        """Derive the token mask of "visual" / "text" from input_ids (no-op for other choices)."""
        if not self.needs_input_ids:
            return
        visual = self.arch.visual_token_mask(input_ids)
        self.mask = _check_mask(visual if self.tokens == "visual" else ~visual)

    def read_input_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model forward pre-hook: take the token mask from this call's input_ids."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        if input_ids is None:
            raise ValueError(
                f"tokens={self.tokens!r} needs input_ids, but the model was called without them; "
                "pass input_ids= to the capture"
            )
        self.set_input_ids(input_ids)

    def on_mlp_norm_input(self, i: int, module: nn.Module, args: tuple) -> None:
        """Pre-hook of the norm the MLP reads: keep the selected tokens of its input, X_attn."""
        self.attn_states[i] = self._select(args[0].detach())

    def on_layer_output(self, i: int, module: nn.Module, args: tuple, kwargs: dict,
                        output) -> None:
        """Layer forward hook: X_in is the layer's input, X_ffn its output; hand the layer's
        states on."""
        hidden = output[0] if isinstance(output, tuple) else output
        found = {}
        if "input" in self.sites:
            found["input"] = self._select((args[0] if args else kwargs["hidden_states"]).detach())
        if "attn" in self.sites:
            found["attn"] = self.attn_states.pop(i)
        if "ffn" in self.sites:
            found["ffn"] = self._select(hidden.detach())
        device = self.device or hidden.device
        self.on_layer(i, {site: self._convert(state, device) for site, state in found.items()})

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        """The selected token positions of a (batch, seq, hidden) state."""
        if self.mask is None:
            if self.needs_input_ids:
                raise ValueError(f"tokens={self.tokens!r} needs input_ids; none were seen")
            return hidden
        mask = self.mask.to(hidden.device)
        if mask.shape != hidden.shape[:2] and mask.shape != hidden.shape[1:2]:
            raise ValueError(
                f"token mask of shape {tuple(mask.shape)} does not fit hidden states of shape "
                f"{tuple(hidden.shape)}; expected (seq,) or (batch, seq)"
            )
        if mask.dim() == 1:
            return hidden[:, mask]
        return hidden[mask].view(hidden.shape[0], -1, hidden.shape[-1])

    def _convert(self, state: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Cast to the requested dtype on ``device``."""
        return state.to(device=device, dtype=self.dtype)


def _layer_indices(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    """Sorted distinct layer indices, all of them when layers is None."""
    if layers is None:
        return list(range(num_layers))
    chosen = list(layers)
    bad = [i for i in chosen if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range; expected ints in [0, {num_layers})")
    return sorted(set(chosen))


def _site_tuple(sites: Iterable[str]) -> tuple[str, ...]:
    """The requested sites in canonical order; a single name is accepted as a one-site tuple."""
    requested = {sites} if isinstance(sites, str) else set(sites)
    unknown = requested - set(SITES)
    if unknown or not requested:
        raise ValueError(f"sites must be a non-empty subset of {SITES}, got {sorted(requested)}")
    return tuple(site for site in SITES if site in requested)


def _check_tokens(tokens: str | torch.Tensor) -> str:
    """The token choice name ("mask" for a bool mask), after checking it is valid."""
    if isinstance(tokens, torch.Tensor):
        _check_mask(tokens)
        return "mask"
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"tokens must be one of {TOKEN_CHOICES} or a bool mask, got {tokens!r}")
    return tokens


def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    """Check a token mask: bool, (seq,) or (batch, seq), the same count in every row."""
    if mask.dtype != torch.bool or mask.dim() not in (1, 2):
        raise TypeError(
            f"token mask must be a bool tensor of shape (seq,) or (batch, seq), got "
            f"{mask.dtype} of shape {tuple(mask.shape)}"
        )
    if mask.dim() == 2:
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"token mask selects different numbers of tokens per row ({counts.tolist()}); "
                "states are (batch, tokens, hidden), so select equally many per row"
            )
    return mask


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    """Check that dtype is a torch dtype."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype
