"""The claims report: each notebook records the paper claims it tests and what it measured.

A notebook writes its records to ``<figures>/claims/<notebook>.json``; ``collect`` gathers every
notebook's file into ``figures/claims.json`` and a table a person reads, ``figures/REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from locus.io import atomic_write_json, atomic_write_text
from locus.paths import figures_dir

VERDICTS = ("holds", "partly", "does not hold", "not run")


@dataclass
class Claim:
    """One tested claim: what the paper states and what this run measured."""

    notebook: str
    model: str
    claim_id: str
    statement: str
    paper_value: str
    measured: str
    verdict: str
    figures: list[str] = field(default_factory=list)


def model_label(model: str | os.PathLike) -> str:
    """How a claim names its model: an embedded name as is, a checkpoint folder by its name."""
    text = str(model).rstrip("/\\")
    return Path(text).name if ("/" in text or os.sep in text) else text


def verdict_at_least(measured: float, target: float) -> str:
    """'holds' when ``measured >= target``, else 'does not hold'; NaN means 'not run'."""
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return "not run"
    return "holds" if measured >= target else "does not hold"


def verdict_at_most(measured: float, target: float) -> str:
    """'holds' when ``measured <= target``, else 'does not hold'; NaN means 'not run'."""
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return "not run"
    return "holds" if measured <= target else "does not hold"


class ClaimSheet:
    """The claims of one notebook run on one model; every ``record`` rewrites its JSON file
    atomically. ``model`` is the notebook's model parameter (an embedded name or a checkpoint
    folder, recorded by its folder name)."""

    def __init__(self, notebook: str, out_dir: str | os.PathLike | None = None, *,
                 model: str | os.PathLike):
        self.notebook = notebook
        self.model = model_label(model)
        self.path = figures_dir(out_dir) / "claims" / (notebook.replace("/", "__") + ".json")
        self.claims: list[Claim] = []
        self._save()

    def record(
        self,
        claim_id: str,
        statement: str,
        paper_value: str,
        measured: str,
        verdict: str,
        figures: list[str] | None = None,
        model: str | os.PathLike | None = None,
    ) -> Claim:
        """Add (or replace, by id) one claim and save the sheet; ``model`` overrides the sheet's
        model for a claim measured on another one (the toy world's chat claims)."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
        claim = Claim(
            self.notebook, model_label(model) if model is not None else self.model, claim_id,
            statement, str(paper_value), str(measured), verdict, list(figures or []),
        )
        self.claims = [c for c in self.claims if c.claim_id != claim_id] + [claim]
        self._save()
        return claim

    def markdown(self) -> str:
        """The sheet as a markdown table (for display in the notebook)."""
        return claims_table(self.claims)

    def _save(self) -> None:
        atomic_write_json(self.path, [asdict(c) for c in self.claims])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 3) -> str:
    """A markdown table; floats are printed with ``digits`` decimals, NaN as "nan"."""
    def cell(x) -> str:
        return f"{x:.{digits}f}" if isinstance(x, float) and not math.isnan(x) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def claims_table(claims: list[Claim]) -> str:
    """A markdown table of claims, one row each ("|" inside a cell escaped)."""
    header = ["notebook", "claim", "paper states", "paper value", "measured", "verdict"]
    rows = [[s.replace("|", "\\|") for s in (c.notebook, c.claim_id, c.statement, c.paper_value,
                                              c.measured, f"**{c.verdict}**")]
            for c in claims]
    return markdown_table(header, rows)


def load_claims(out_dir: str | os.PathLike | None = None) -> list[Claim]:
    """Every notebook's claims under ``<figures>/claims/``, in file-name order."""
    folder = figures_dir(out_dir) / "claims"
    claims = []
    for path in sorted(folder.glob("*.json")):
        claims += [Claim(**record) for record in json.loads(path.read_text())]
    return claims


def collect(out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``claims.json`` and ``REPORT.md`` into the figures folder from all sheets."""
    folder = figures_dir(out_dir)
    claims = load_claims(folder)
    json_path = atomic_write_json(folder / "claims.json", [asdict(c) for c in claims])
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    lines = [
        "# Claims report",
        "",
        "Generated by `run_all.sh` from the executed notebooks. Each row: what the paper states, "
        "what this run measured, and the verdict.",
        "",
        "Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".",
        "",
        claims_table(claims),
        "",
        "## Figures",
        "",
    ]
    figures = sorted({f for c in claims for f in c.figures})
    lines += [f"- [{f}]({f})" for f in figures] or ["(none)"]
    md_path = atomic_write_text(folder / "REPORT.md", "\n".join(lines) + "\n")
    return json_path, md_path


def main() -> None:
    parser = argparse.ArgumentParser(description="Collect notebook claims into a report.")
    parser.add_argument("--figures", default=None, help="figures folder (default: repo figures/)")
    args = parser.parse_args()
    for path in collect(args.figures):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
