"""The checkpoint cache: trained models and tensors keyed by the config that made them.

An entry is a folder ``<root>/<name>/`` holding what ``save_pretrained`` writes (or a
``tensors.safetensors``) and a ``locus_cache.json`` manifest with the config and the SHA-256 of
every file. An entry whose config differs is rebuilt; one whose files do not match the manifest
(half-written, corrupt) is detected and rebuilt. Entries are written to a temporary folder and
renamed into place, so an interrupted build never leaves a half-written entry behind, and get
the usual permissions (0644 files, 0755 folders under the common umask).

Entries of the embedded models and of what is computed from them live in the repository's
``checkpoints/`` (committed); those of every other model (a real model, a user's folder) live in
the user cache (``locus.paths.cache_dir()``), never inside the repository: ``artefact_root``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from locus.paths import REPO_ROOT, cache_dir

MANIFEST = "locus_cache.json"


def checkpoint_root(override: str | os.PathLike | None = None) -> Path:
    """Where cached entries live: ``override``, ``$LOCUS_CHECKPOINTS``, else ``<repo>/checkpoints``
    (the small default checkpoints are committed there)."""
    return Path(override or os.environ.get("LOCUS_CHECKPOINTS") or REPO_ROOT / "checkpoints")


def artefact_root(model: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """Where the artefacts computed for ``model`` (circuits, backdoored copies, fine-tuned
    projectors) are cached: ``override``, else ``$LOCUS_CHECKPOINTS``, else the repository's
    ``checkpoints/`` for an embedded model and ``<user cache>/checkpoints`` for any other."""
    if override or os.environ.get("LOCUS_CHECKPOINTS"):
        return checkpoint_root(override)
    from locus.zoo import EMBEDDED  # the zoo is built on this module

    return checkpoint_root() if str(model) in EMBEDDED else cache_dir() / "checkpoints"


def _usual_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions the umask gives new files
    (mkdtemp makes 0700, some writers 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def config_key(config: dict) -> str:
    """A short stable hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (model files are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def entry_status(folder: Path, config: dict) -> str:
    """'valid', 'missing', 'stale' (made by another config) or 'corrupt' (files changed)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "missing"
    try:
        record = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "corrupt"
    if record.get("key") != config_key(config):
        return "stale"
    return "valid" if record.get("files") == _file_hashes(folder) else "corrupt"


def write_entry(folder: Path, config: dict, write: Callable[[Path], None],
                extra: dict | None = None) -> Path:
    """Build an entry with ``write(tmp_folder)`` and move it into place atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(tmp)
        record = {"key": config_key(config), "config": config, "files": _file_hashes(tmp),
                  **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2, default=str) + "\n")
        _usual_permissions(tmp)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_manifest(folder: Path) -> dict:
    """The manifest of an entry (config, file hashes and any extra record such as timings)."""
    return json.loads((folder / MANIFEST).read_text())


def cached_tensors(
    name: str, config: dict, compute: Callable[[], dict[str, torch.Tensor]],
    root: str | os.PathLike | None = None, extra: Callable[[], dict] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors from the cache entry ``name`` if it was made by ``config``, else ``compute()``d
    and cached. Use it for small artefacts (a fine-tuned projector, a mask)."""
    folder = checkpoint_root(root) / name
    if entry_status(folder, config) != "valid":
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        write_entry(folder, config, lambda tmp: save_file(tensors, tmp / "tensors.safetensors"),
                    extra() if extra else None)
    return load_file(folder / "tensors.safetensors")
