"""The embedded models by name, and ``load`` for embedded names and local checkpoints alike.

Embedded models are trained by this project (``locus.training``) the first time they are asked
for and cached under ``checkpoints/`` keyed by their sizes and training config; the small default
checkpoints are committed, so notebooks and tests load instead of train.
Retrain from scratch with ``python -m locus.zoo --retrain all``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from locus import checkpoints, data, models, training
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
                "parent": parent, "world": data.world_vocabulary()}


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
    """Held-out samples of the toy world (a seed no training run uses)."""
    if kind == "vlm":
        return data.make_vqa_samples(n_per_family, HELD_OUT_SEED)
    return data.make_chat_samples(n_per_family, HELD_OUT_SEED, aligned=aligned)


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


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, progress: bool = True):
    """A model and its processor (VLM) or tokenizer (LM), from an embedded name (see
    ``EMBEDDED``) or a local Hugging Face checkpoint folder, on ``device`` in ``dtype``."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    if str(name_or_path) in EMBEDDED:
        folder = embedded_folder(str(name_or_path), progress)
    else:
        folder = Path(name_or_path)
        if not folder.exists():
            raise FileNotFoundError(
                f"model {str(name_or_path)!r} is neither an embedded model "
                f"({', '.join(sorted(EMBEDDED))}) nor an existing local checkpoint folder"
            )
    return models.load_checkpoint(folder, device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train (or retrain) the embedded toy models.")
    parser.add_argument("--retrain", nargs="+", metavar="NAME", required=True,
                        help=f"model names, or 'all': {', '.join(EMBEDDED)}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(EMBEDDED) if args.retrain == ["all"] else args.retrain
    for name in names:
        folder = train_embedded(name)
        record = checkpoints.read_manifest(folder)
        print(f"{name}: {record['train_seconds']} s, accuracy {record['held_out_accuracy']}")


if __name__ == "__main__":
    main()
