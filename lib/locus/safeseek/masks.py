"""Differentiable unit masks over attention heads and MLP neurons, and circuits as unit lists.

A *unit* is an attention head or an MLP neuron of the language model. A per-head gate multiplies
the head's slice of the **input of o_proj** (``num_heads * head_dim`` features, head h at
``[h*head_dim, (h+1)*head_dim)``, whatever the number of key/value heads), so a gate of 0 removes
exactly that head's contribution; a per-neuron gate multiplies the MLP's intermediate activation
(the input of down_proj). Gates are applied with forward pre-hooks that are removed when the
context exits, also when its body raises.

A ``UnitMask`` holds one logit per unit giving the unit's *membership in the circuit*. Modes:
"full" (no gating), "circuit only" (gate = membership: everything outside the circuit removed)
and "circuit removed" (gate = 1 - membership). Two gates are offered:

- "ste": straight-through sigmoid, as in the SafeSeek code: the forward pass uses the hard value
  ``sigmoid(z / T) > 0.5`` and the gradient flows through ``sigmoid(z / T)``;
- "hard_concrete": the L0 gate of Louizos et al. (2018): a stretched, clamped concrete sample in
  training mode, its deterministic value in eval mode.

A ``Circuit`` is the readable result: the (layer, head) and (layer, neuron) pairs it contains,
exported to and loaded from JSON with its sparsity.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from locus.arch import adapt
from locus.io import atomic_write_json

GATES = ("ste", "hard_concrete")
MODES = ("full", "circuit removed", "circuit only")
UNITS = ("heads", "neurons")
NORMS = ("sum", "module", "mean")
# Hard-concrete stretch interval and temperature (Louizos et al., 2018).
HC_GAMMA, HC_ZETA, HC_BETA = -0.1, 1.1, 2.0 / 3.0

Gates = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class UnitShape:
    """How many units a model has: layers x heads and layers x MLP neurons."""

    num_layers: int
    num_heads: int
    intermediate_size: int

    @classmethod
    def of(cls, model: nn.Module) -> UnitShape:
        """The unit shape of a supported model (see ``locus.arch``)."""
        arch = adapt(model)
        return cls(arch.num_layers, arch.num_heads, arch.intermediate_size)

    @property
    def num_units(self) -> int:
        """Heads plus neurons."""
        return self.num_layers * (self.num_heads + self.intermediate_size)


# --------------------------------------------------------------------------------------------
# Applying gates to a model
# --------------------------------------------------------------------------------------------


@contextmanager
def gated_units(
    model: nn.Module, head_gates: torch.Tensor | None, neuron_gates: torch.Tensor | None
) -> Iterator[None]:
    """Multiply each head's o_proj-input slice by ``head_gates[layer, head]`` and each neuron's
    down_proj input by ``neuron_gates[layer, neuron]`` inside the context (None: leave that kind
    of unit alone). Gates may carry gradients; they are cast to the activations' dtype. A layer
    whose gates are all exactly 1 and carry no gradient gets no hook (scaling by 1 is exact)."""
    arch = adapt(model)
    shape = UnitShape(arch.num_layers, arch.num_heads, arch.intermediate_size)
    _check_gates(head_gates, (shape.num_layers, shape.num_heads), "head_gates")
    _check_gates(neuron_gates, (shape.num_layers, shape.intermediate_size), "neuron_gates")
    gate_heads = _gated_layers(head_gates, shape.num_layers)
    gate_neurons = _gated_layers(neuron_gates, shape.num_layers)
    handles = []
    try:
        for i in range(arch.num_layers):
            if gate_heads[i]:
                hook = partial(_scale_heads, head_gates[i], arch.head_dim)
                handles.append(arch.o_proj(i).register_forward_pre_hook(hook))
            if gate_neurons[i]:
                hook = partial(_scale_features, neuron_gates[i])
                handles.append(arch.down_proj(i).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gated_layers(gates: torch.Tensor | None, num_layers: int) -> list[bool]:
    """Per layer, whether its gates can change the forward pass or its gradient: they carry a
    gradient or are not all exactly 1 (all False for None)."""
    if gates is None:
        return [False] * num_layers
    if gates.requires_grad:
        return [True] * num_layers
    return (gates != 1).any(dim=1).tolist()


def _scale_heads(gate: torch.Tensor, head_dim: int, module: nn.Module, args: tuple) -> tuple:
    """o_proj pre-hook: scale head h's slice of the input by gate[h]."""
    x = args[0]
    scale = gate.to(device=x.device, dtype=x.dtype).repeat_interleave(head_dim)
    return (x * scale, *args[1:])


def _scale_features(gate: torch.Tensor, module: nn.Module, args: tuple) -> tuple:
    """down_proj pre-hook: scale neuron n of the input by gate[n]."""
    x = args[0]
    return (x * gate.to(device=x.device, dtype=x.dtype), *args[1:])


def _check_gates(gates: torch.Tensor | None, shape: tuple[int, int], name: str) -> None:
    """Gates must be None or a floating tensor of the model's (layers, units) shape."""
    if gates is None:
        return
    if not isinstance(gates, torch.Tensor) or not gates.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor or None, got {type(gates)}")
    if tuple(gates.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(gates.shape)}; the model needs {shape}")


def mode_gates(membership: Gates, mode: str) -> Gates:
    """Gates that realise ``mode`` from circuit membership (heads, neurons) in [0, 1]."""
    check_mode(mode)
    if mode == "full":
        return None, None
    if mode == "circuit only":
        return membership
    return tuple(None if m is None else 1.0 - m for m in membership)


def check_mode(mode: str) -> str:
    """Raise a ValueError unless ``mode`` is one of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


@contextmanager
def apply_circuit(
    model: nn.Module, circuit: UnitMask | Circuit, mode: str
) -> Iterator[None]:
    """Run ``model`` in ``mode`` ("full", "circuit removed", "circuit only") for a trainable
    ``UnitMask`` (its current gates) or a fixed ``Circuit``."""
    gates = mode_gates(circuit.membership(), mode)
    with gated_units(model, *gates):
        yield


# --------------------------------------------------------------------------------------------
# Trainable masks
# --------------------------------------------------------------------------------------------


class UnitMask(nn.Module):
    """One trainable logit per head and per MLP neuron: the unit's membership in a circuit.

    ``units`` chooses the kinds of unit the mask acts on ("heads", "neurons" or both); units of
    a kind left out are never gated and never in the circuit. ``init`` is the initial logit of
    every unit: positive starts with every unit in the circuit, negative with an empty circuit.
    ``temperature`` divides the logits of the "ste" gate.
    """

    def __init__(
        self,
        shape: UnitShape,
        gate: str = "ste",
        temperature: float = 1.0,
        init: float = 3.0,
        units: tuple[str, ...] = UNITS,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (isinstance(init, int | float) and math.isfinite(init)):
            raise ValueError(f"init must be a finite number (a logit), got {init!r}")
        if not units or not set(units) <= set(UNITS):
            raise ValueError(f"units must be a non-empty subset of {UNITS}, got {units!r}")
        self.shape = shape
        self.gate = gate
        self.temperature = float(temperature)
        self.units = tuple(u for u in UNITS if u in units)
        full = partial(torch.full, fill_value=float(init), dtype=torch.float32, device=device)
        self.head_logits = nn.Parameter(full((shape.num_layers, shape.num_heads)),
                                        requires_grad="heads" in units)
        self.neuron_logits = nn.Parameter(full((shape.num_layers, shape.intermediate_size)),
                                          requires_grad="neurons" in units)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> UnitMask:
        """A mask sized for ``model``'s units, on the model's device."""
        device = next(model.parameters()).device
        return cls(UnitShape.of(model), device=device, **kwargs)

    def _logits(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The logits of the masked kinds (None for a kind left out)."""
        return (self.head_logits if "heads" in self.units else None,
                self.neuron_logits if "neurons" in self.units else None)

    def membership(self) -> Gates:
        """Gates (heads, neurons) in [0, 1], None for a kind left out: hard 0/1 with a
        straight-through gradient ("ste"); a stretched concrete sample in training mode or its
        deterministic value in eval mode ("hard_concrete")."""
        return tuple(None if z is None else self._gate(z) for z in self._logits())

    def _gate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.gate == "ste":
            soft = torch.sigmoid(logits / self.temperature)
            return (soft > 0.5).to(soft.dtype) + soft - soft.detach()
        if not self.training:
            return _hard_concrete_mean(logits)
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / HC_BETA)
        return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def soft(self) -> Gates:
        """Soft membership (heads, neurons) in [0, 1], None for a kind left out:
        ``sigmoid(z / T)`` ("ste") or the deterministic gate ("hard_concrete")."""
        if self.gate == "ste":
            return tuple(None if z is None else torch.sigmoid(z / self.temperature)
                         for z in self._logits())
        return tuple(None if z is None else _hard_concrete_mean(z) for z in self._logits())

    def size(self, norm: str = "sum") -> torch.Tensor:
        """Differentiable circuit size: the L1 norm of the soft gates ``sigmoid(z / T)``
        ("ste") or the expected L0 norm ("hard_concrete"), aggregated by ``norm`` (see
        ``NORMS``): "sum" over all units (the paper's sum over units); "module", one mean per
        module summed, i.e. the mean over each layer's heads plus the mean over each layer's
        neurons (the authors' code, which averages each masked module and sums the modules;
        per unit λ / heads-per-layer and λ / neurons-per-layer); "mean", one mean over all
        heads plus one over all neurons (``num_layers`` times weaker than "module")."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        total = torch.zeros((), device=self.head_logits.device)
        for z in self._logits():
            if z is None:
                continue
            if self.gate == "ste":
                density = torch.sigmoid(z / self.temperature)
            else:
                density = torch.sigmoid(z - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))
            total = total + {"sum": density.sum, "mean": density.mean,
                             "module": lambda d=density: d.mean(1).sum()}[norm]()
        return total

    @torch.no_grad()
    def circuit(self) -> Circuit:
        """The units whose deterministic gate exceeds 0.5."""
        was_training = self.training
        self.eval()
        gates = self.membership()
        self.train(was_training)
        heads, neurons = (torch.zeros_like(z, dtype=torch.bool) if g is None else g > 0.5
                          for g, z in zip(gates, (self.head_logits, self.neuron_logits),
                                          strict=True))
        return Circuit.from_membership(self.shape, heads, neurons, self.units)


def _hard_concrete_mean(logits: torch.Tensor) -> torch.Tensor:
    """The deterministic hard-concrete gate: the stretched, clamped sigmoid of the logit."""
    return (torch.sigmoid(logits) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Circuits: readable lists of units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Circuit:
    """A set of heads and neurons: sorted (layer, head) and (layer, neuron) pairs. ``units``
    names the kinds of unit the circuit covers: a kind left out is never gated (kept in every
    mode) and counts neither in nor against the sparsity."""

    shape: UnitShape
    heads: tuple[tuple[int, int], ...]
    neurons: tuple[tuple[int, int], ...]
    units: tuple[str, ...] = UNITS

    def __post_init__(self) -> None:
        if not self.units or not set(self.units) <= set(UNITS):
            raise ValueError(f"units must be a non-empty subset of {UNITS}, got {self.units!r}")
        for name, pairs, width in (("heads", self.heads, self.shape.num_heads),
                                   ("neurons", self.neurons, self.shape.intermediate_size)):
            bad = [p for p in pairs
                   if not (0 <= p[0] < self.shape.num_layers and 0 <= p[1] < width)]
            if bad:
                raise ValueError(f"{name} {bad[:5]} out of range for {self.shape}")
            if len(set(pairs)) != len(pairs):
                raise ValueError(f"{name} contains duplicates")
            if pairs and name not in self.units:
                raise ValueError(f"circuit lists {name} but covers only {self.units}")

    @classmethod
    def from_membership(cls, shape: UnitShape, heads: torch.Tensor, neurons: torch.Tensor,
                        units: tuple[str, ...] = UNITS) -> Circuit:
        """The circuit of the True entries of bool tensors (layers, heads), (layers, neurons)."""
        return cls(shape, _pairs(heads), _pairs(neurons), tuple(units))

    @classmethod
    def empty(cls, shape: UnitShape, units: tuple[str, ...] = UNITS) -> Circuit:
        """The circuit with no units."""
        return cls(shape, (), (), tuple(units))

    def membership(self) -> Gates:
        """Float 0/1 tensors (layers, heads) and (layers, neurons), 1 for the circuit's units;
        None for a kind the circuit does not cover."""
        heads = torch.zeros(self.shape.num_layers, self.shape.num_heads)
        neurons = torch.zeros(self.shape.num_layers, self.shape.intermediate_size)
        for layer, head in self.heads:
            heads[layer, head] = 1.0
        for layer, neuron in self.neurons:
            neurons[layer, neuron] = 1.0
        return (heads if "heads" in self.units else None,
                neurons if "neurons" in self.units else None)

    @property
    def head_fraction(self) -> float:
        """Fraction of all heads in the circuit."""
        return len(self.heads) / (self.shape.num_layers * self.shape.num_heads)

    @property
    def neuron_fraction(self) -> float:
        """Fraction of all MLP neurons in the circuit."""
        return len(self.neurons) / (self.shape.num_layers * self.shape.intermediate_size)

    @property
    def sparsity(self) -> float:
        """Fraction of the covered units (heads and/or neurons) that are in the circuit."""
        per_layer = {"heads": self.shape.num_heads, "neurons": self.shape.intermediate_size}
        covered = self.shape.num_layers * sum(per_layer[u] for u in self.units)
        return (len(self.heads) + len(self.neurons)) / covered

    def heads_per_layer(self) -> list[int]:
        """Number of circuit heads in each layer."""
        return [sum(layer == i for layer, _ in self.heads) for i in range(self.shape.num_layers)]

    def neurons_per_layer(self) -> list[int]:
        """Number of circuit neurons in each layer."""
        return [sum(layer == i for layer, _ in self.neurons)
                for i in range(self.shape.num_layers)]

    def to_dict(self) -> dict:
        """A JSON-able description: the shape, the covered kinds, the unit lists, the sparsity."""
        return {
            "shape": {"num_layers": self.shape.num_layers, "num_heads": self.shape.num_heads,
                      "intermediate_size": self.shape.intermediate_size},
            "units": list(self.units),
            "heads": [list(p) for p in self.heads],
            "neurons": [list(p) for p in self.neurons],
            "sparsity": {"heads": self.head_fraction, "neurons": self.neuron_fraction,
                         "units": self.sparsity},
        }

    @classmethod
    def from_dict(cls, record: dict) -> Circuit:
        """The circuit of a ``to_dict`` record."""
        missing = {"shape", "heads", "neurons"} - set(record)
        if missing:
            raise ValueError(f"circuit record lacks keys {sorted(missing)}; expected shape, "
                             "heads, neurons (as written by Circuit.save)")
        return cls(UnitShape(**record["shape"]), tuple(tuple(p) for p in record["heads"]),
                   tuple(tuple(p) for p in record["neurons"]),
                   tuple(record.get("units", UNITS)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as readable JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read a circuit written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"circuit file {path} does not exist")
        return cls.from_dict(json.loads(path.read_text()))

    def __or__(self, other: Circuit) -> Circuit:
        """The union of two circuits of the same model."""
        if other.shape != self.shape:
            raise ValueError(f"circuits of different models: {self.shape} vs {other.shape}")
        units = tuple(u for u in UNITS if u in self.units or u in other.units)
        return Circuit(self.shape, tuple(sorted(set(self.heads) | set(other.heads))),
                       tuple(sorted(set(self.neurons) | set(other.neurons))), units)


def _pairs(flags: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Sorted (row, column) pairs of the True entries of a 2-D bool tensor."""
    return tuple((int(r), int(c)) for r, c in torch.nonzero(flags.detach().cpu().bool()).tolist())
