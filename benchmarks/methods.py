"""The methods the benchmark compares, each doing the same computation on the same model.

Tasks, on a causal LM (token ids in, logits out):

- *capture*: the residual stream of every layer at some of the three sites of ``locus.hooks``
  (``input`` = X_in, ``attn`` = X_in + attention output, ``ffn`` = layer output), returned as
  ``{layer: {site: (batch, tokens, hidden) tensor}}``: every layer's input (what
  ``output_hidden_states`` also gives), or all three sites;
- *ablation*: the logits with one attention head removed, i.e. that head's slice of o_proj's
  input set to zero.

Methods: locus (``capture_residuals``, ``gated_units``), a plain forward and
``output_hidden_states=True`` (baselines that capture less), nnsight's tracing and
TransformerLens's ``TransformerBridge``. Each peer wraps its own copy of the model (both alter
the modules they wrap), built once, outside the timed calls. A peer that is not installed, or
cannot be built offline, is reported as unavailable with the reason instead of failing the run.
``check_*`` compare every method's tensors with locus's and raise if they differ, so a table is
printed only when all its rows computed the same thing.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from locus.arch import adapt
from locus.hooks import SITES, capture_residuals
from locus.safeseek.masks import gated_units

States = dict[int, dict[str, torch.Tensor]]
Batch = dict[str, torch.Tensor]
# Largest |difference| allowed, relative to the largest |value| of locus's tensor: float32
# round-off of a re-ordered computation (TransformerLens computes attention itself).
REL_TOL = 1e-4


class Unavailable(RuntimeError):
    """A peer library that is not installed or cannot run here; the message says why."""


LAYER_INPUTS = ("input",)


@dataclass
class Method:
    """One way to run the tasks: ``capture(batch, sites)`` for the site sets in
    ``capture_sites``, and ``ablate(batch, layer, head)`` unless None."""

    name: str
    capture: Callable[[Batch, tuple[str, ...]], States]
    ablate: Callable[[Batch, int, int], torch.Tensor] | None = None
    capture_sites: tuple[tuple[str, ...], ...] = (LAYER_INPUTS, SITES)


# --------------------------------------------------------------------------------------------
# locus and the two baselines
# --------------------------------------------------------------------------------------------


def locus_method(model: nn.Module) -> Method:
    """Residual capture with ``locus.hooks`` and a head ablation with ``locus.safeseek.masks``."""
    arch = adapt(model)

    def capture(batch: Batch, sites: tuple[str, ...]) -> States:
        with capture_residuals(model, sites=sites) as cap:
            model(**batch)
        return cap.states

    def ablate(batch: Batch, layer: int, head: int) -> torch.Tensor:
        gates = torch.ones(arch.num_layers, arch.num_heads)
        gates[layer, head] = 0.0
        with gated_units(model, gates, None):
            return model(**batch).logits

    return Method("locus", capture, ablate)


def plain_method(model: nn.Module) -> Method:
    """A forward pass that captures nothing: the floor every method is measured against."""

    def forward(batch: Batch, *_) -> torch.Tensor:
        return model(**batch).logits

    return Method("plain forward", forward, forward, ())


def hidden_states_method(model: nn.Module) -> Method:
    """``output_hidden_states=True``: each layer's input (and the final norm's output, which is
    not compared); it has no ``attn`` site."""

    def capture(batch: Batch, sites: tuple[str, ...]) -> States:
        hidden = model(**batch, output_hidden_states=True).hidden_states
        return {i: {"input": state} for i, state in enumerate(hidden[:-1])}

    return Method("output_hidden_states", capture, None, (LAYER_INPUTS,))


# --------------------------------------------------------------------------------------------
# nnsight
# --------------------------------------------------------------------------------------------


def nnsight_method(model: nn.Module) -> Method:
    """nnsight's ``trace`` on an ``NNsight`` wrapper of a copy of the model."""
    try:
        import nnsight
    except ImportError as err:
        raise Unavailable(f"nnsight is not installed ({err}); pip install -e '.[bench]'") from err
    own = copy.deepcopy(model)
    arch = adapt(own)
    traced = nnsight.NNsight(own)
    layers = _envoy(traced, _module_path(own, arch.layers))
    head_dim = arch.head_dim

    def capture(batch: Batch, sites: tuple[str, ...]) -> States:
        with traced.trace(**batch):
            saved = nnsight.save([])
            for layer in layers:  # in execution order, as nnsight requires
                x_in = layer.input
                if sites == LAYER_INPUTS:
                    saved.append({"input": x_in})
                else:
                    x_attn = x_in + layer.self_attn.output[0]
                    saved.append({"input": x_in, "attn": x_attn, "ffn": layer.output})
        return dict(enumerate(saved))

    def ablate(batch: Batch, layer: int, head: int) -> torch.Tensor:
        with traced.trace(**batch):
            o_proj = layers[layer].self_attn.o_proj
            o_proj.input[..., head * head_dim:(head + 1) * head_dim] = 0.0
            logits = traced.output.logits.save()
        return logits

    return Method("nnsight", capture, ablate)


def _module_path(root: nn.Module, target: nn.Module) -> str:
    """The dotted name of `target` inside `root`."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in the model")


def _envoy(traced, path: str):
    """nnsight's proxy of the submodule at a dotted path."""
    return functools.reduce(getattr, path.split("."), traced)


# --------------------------------------------------------------------------------------------
# TransformerLens 4: TransformerBridge
# --------------------------------------------------------------------------------------------


def transformer_lens_method(model: nn.Module, tokenizer=None) -> Method:
    """TransformerLens's ``TransformerBridge`` around a copy of the Hugging Face model:
    ``run_with_cache`` on the resid_pre / resid_mid / resid_post hooks, and a ``hook_z`` edit
    (the per-head input of o_proj) with ``run_with_hooks``."""
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import (
            build_bridge_from_module,
        )
    except ImportError as err:
        raise Unavailable(
            f"TransformerLens 4 is not installed ({err}); pip install -e '.[bench]'"
        ) from err
    own = copy.deepcopy(model)
    architecture = own.config.architectures[0] if own.config.architectures else None
    architecture = architecture or type(own).__name__
    try:  # from a module, so nothing is fetched from a hub (the model may have no tokenizer)
        bridge = build_bridge_from_module(own, architecture, hf_config=own.config,
                                          tokenizer=tokenizer)
    except Exception as err:  # the bridge lacks this architecture, or needs the network
        raise Unavailable(f"TransformerBridge cannot wrap {architecture}: {err}") from err
    num_layers = adapt(own).num_layers
    kinds = {"input": "pre", "attn": "mid", "ffn": "post"}

    def capture(batch: Batch, sites: tuple[str, ...]) -> States:
        names = {f"blocks.{i}.hook_resid_{kinds[site]}": (i, site)
                 for i in range(num_layers) for site in sites}
        _, cache = bridge.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"],
                                         names_filter=list(names))
        states: States = {i: {} for i in range(num_layers)}
        for name, (i, site) in names.items():
            states[i][site] = cache[name]
        return states

    def ablate(batch: Batch, layer: int, head: int) -> torch.Tensor:
        def zero_head(z: torch.Tensor, hook) -> torch.Tensor:  # z: (batch, pos, head, d_head)
            z[:, :, head] = 0.0
            return z

        return bridge.run_with_hooks(batch["input_ids"], attention_mask=batch["attention_mask"],
                                     fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])

    return Method("TransformerLens", capture, ablate)


# --------------------------------------------------------------------------------------------
# Checks: the same computation, or no table
# --------------------------------------------------------------------------------------------


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|, after checking the shapes agree."""
    if value.shape != reference.shape:
        raise AssertionError(f"shape {tuple(value.shape)} != reference {tuple(reference.shape)}")
    value, reference = value.detach().float(), reference.detach().float()
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((value - reference).abs().max() / scale)


def check_states(name: str, states: States, reference: States) -> float:
    """Raise unless `states` holds every (layer, site) of `reference` within ``REL_TOL``;
    return the largest relative difference."""
    if sorted(states) != sorted(reference):
        raise AssertionError(f"{name}: layers {sorted(states)} != {sorted(reference)}")
    worst = 0.0
    for i, sites in reference.items():
        for site, ref in sites.items():
            diff = relative_difference(states[i][site], ref)
            if diff > REL_TOL:
                raise AssertionError(f"{name}: layer {i} site {site!r} differs from locus by "
                                     f"{diff:.2e} (relative), above {REL_TOL:.0e}")
            worst = max(worst, diff)
    return worst


def check_logits(name: str, logits: torch.Tensor, reference: torch.Tensor,
                 unedited: torch.Tensor) -> float:
    """Raise unless `logits` match locus's edited logits within ``REL_TOL`` and the edit
    changed the logits by far more than that; return the relative difference."""
    effect = relative_difference(reference, unedited)
    if effect <= 100 * REL_TOL:
        raise AssertionError(f"the ablation changes the logits by only {effect:.2e}: choose "
                             "another head, or the comparison cannot tell methods apart")
    diff = relative_difference(logits, reference)
    if diff > REL_TOL:
        raise AssertionError(f"{name}: edited logits differ from locus by {diff:.2e}")
    return diff


def available_methods(model: nn.Module, tokenizer=None) -> tuple[list[Method], dict[str, str]]:
    """locus, the baselines and every peer that can run here; the reasons for those that
    cannot, by name."""
    methods = [locus_method(model), plain_method(model), hidden_states_method(model)]
    unavailable = {}
    for name, build in (("nnsight", nnsight_method),
                        ("TransformerLens", functools.partial(transformer_lens_method,
                                                              tokenizer=tokenizer))):
        try:
            methods.append(build(model))
        except Unavailable as err:
            unavailable[name] = str(err)
    return methods, unavailable


@torch.no_grad()
def check_all(model: nn.Module, methods: list[Method], batch: Batch, layer: int,
              head: int) -> dict[tuple[str, str], float]:
    """Run every method once on `batch` and check it against locus (raises on a mismatch);
    the largest relative difference by (task, method name), tasks named by ``task_name``."""
    ours = methods[0]
    if ours.name != "locus":
        raise ValueError("the first method must be locus's, the reference")
    edited = ours.ablate(batch, layer, head)
    unedited = model(**batch).logits
    diffs = {}
    for sites in ours.capture_sites:
        reference = ours.capture(batch, sites)
        for method in methods:
            if sites in method.capture_sites:
                diffs[task_name(sites), method.name] = check_states(
                    method.name, method.capture(batch, sites), reference)
    for method in methods:
        if method.ablate is not None and method.name != "plain forward":
            diffs["ablation", method.name] = check_logits(
                method.name, method.ablate(batch, layer, head), edited, unedited)
    return diffs


def task_name(sites: tuple[str, ...]) -> str:
    """The name of the capture task of these sites."""
    return "capture: layer inputs" if sites == LAYER_INPUTS else "capture: " + ", ".join(sites)
