"""Checks of notebook parameters: a wrong value gets an error that says what was wrong and what
is accepted, before any work starts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from locus.arch import check_model_type
from locus.zoo import named_models

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_model(model: str, kind: str | None = None) -> str:
    """A model the zoo serves by name (embedded or real; of ``kind`` 'vlm' or 'chat' if given)
    or an existing local folder."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a string (model name or folder), got {model!r}")
    model = str(model)
    named = named_models()
    names = sorted(n for n, k in named.items() if kind is None or k == kind)
    if model in named:
        if model not in names:
            raise ValueError(f"model {model!r} is not a {kind} model; accepted: {names} "
                             "or a local checkpoint folder")
        return model
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model {model!r} is neither an embedded model nor a real one "
                                f"{names}, nor an existing local Hugging Face checkpoint folder")
    check_folder_architecture(model, kind)
    return model


def check_folder_architecture(folder: str | os.PathLike, kind: str | None = None) -> str:
    """The ``model_type`` of a checkpoint folder's config.json, checked to be a family
    ``locus.arch`` supports (of ``kind`` 'vlm' or 'chat' if given); the error names them."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: a Hugging Face checkpoint folder "
                                "is one saved with save_pretrained")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a JSON object with a model_type") from err
    try:
        return check_model_type(model_type, kind)
    except ValueError as err:
        raise ValueError(f"model {str(folder)!r}: {err}") from None


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | dict | None) -> str | dict | None:
    """None (the whole model on ``device``), one of accelerate's strategies
    (``DEVICE_MAP_STRATEGIES``: "auto" fills the GPUs in order, then the CPU) or an explicit
    {module name: device} dict, for a model larger than one device."""
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map must be None, one of {DEVICE_MAP_STRATEGIES} or a "
                         f"non-empty {{module name: device}} dict, got {device_map!r}")
    for name, device in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"device_map keys must be module names, got {name!r}")
        if device in ("disk", "meta"):
            raise ValueError(f"device_map[{name!r}] = {device!r}: offloading to disk is not "
                             "supported; place modules on GPUs (ints or 'cuda:N') or 'cpu'")
        check_device(f"cuda:{device}" if isinstance(device, int) else device)
    return device_map


def check_data(path: str | os.PathLike | None) -> Path | None:
    """None (use the generated toy data) or an existing JSONL file."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"data must be None or a path to a JSONL file, got {path!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} does not exist (None uses the toy world)")
    return Path(path)


def check_positive_int(name: str, value) -> int:
    """A positive integer (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_number(name: str, value, accepted: Callable[[float], bool], what: str) -> float:
    """A real number (booleans refused) for which ``accepted`` holds; ``what`` says the range
    in the error, e.g. "> 0"."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not accepted(value):
        raise ValueError(f"{name} must be a number {what}, got {value!r}")
    return float(value)


def check_list(name: str, value) -> list:
    """A list (or tuple) parameter. papermill's ``-p`` passes ``[1, 2]`` as a string: lists
    go through ``-y`` or ``-f`` instead, which the error says."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be a list, got {value!r}; on the command line pass lists "
                        f"as YAML: -y '{name}: [...]' (papermill -p makes them strings)")
    return list(value)


def check_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps', available on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (use 'cpu' or 'cuda')") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    """None (the checkpoint's own dtype) or one of DTYPES' names."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not accepted; use None or one of {sorted(DTYPES)}")
    return DTYPES[dtype]
