"""The claims report: each notebook records the paper claims it tests and what it measured.

A notebook writes its records to ``<figures>/claims/<notebook>.json`` when run with its defaults
(the toy models), and to ``<figures>/<run>/claims/<notebook>.json`` when ``run_all.sh`` runs it on
another model (its ``figures_dir``); ``collect`` gathers every run's files into one flat list,
``figures/claims.json``, and a report a person reads, ``figures/REPORT.md``: one table per
notebook, a column of measured values and verdicts per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
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


def _cell(text: str) -> str:
    """A markdown table cell: "|" escaped, on one line."""
    return text.replace("|", "\\|").replace("\n", " ")


def claims_table(claims: list[Claim]) -> str:
    """A markdown table of claims, one row each ("|" inside a cell escaped)."""
    header = ["notebook", "claim", "paper states", "paper value", "measured", "verdict"]
    rows = [[_cell(s) for s in (c.notebook, c.claim_id, c.statement, c.paper_value, c.measured,
                                f"**{c.verdict}**")]
            for c in claims]
    return markdown_table(header, rows)


def load_runs(out_dir: str | os.PathLike | None = None) -> dict[str, list[Claim]]:
    """Every run's claims: the notebooks' defaults under ``<figures>/claims/`` (key ``""``),
    each other run under ``<figures>/<run>/claims/`` (key ``<run>``), in file-name order. Figure
    paths are made relative to the figures folder, so a run's figures name their folder."""
    folder = figures_dir(out_dir)
    runs = {}
    for claims_dir in [folder / "claims", *sorted(folder.glob("*/claims"))]:
        run = "" if claims_dir.parent == folder else claims_dir.parent.name
        prefix = f"{run}/" if run else ""
        claims = []
        for path in sorted(claims_dir.glob("*.json")):
            for record in json.loads(path.read_text()):
                claim = Claim(**record)
                claim.figures = [prefix + f for f in claim.figures]
                claims.append(claim)
        if claims:
            runs[run] = claims
    return runs


def load_claims(out_dir: str | os.PathLike | None = None) -> list[Claim]:
    """Every run's claims in one flat list (the defaults' first); see ``load_runs``."""
    return [c for claims in load_runs(out_dir).values() for c in claims]


def _verdict_counts(claims: list[Claim]) -> str:
    return ", ".join(f"{sum(c.verdict == v for c in claims)} {v}" for v in VERDICTS)


def _run_models(claims: list[Claim]) -> list[str]:
    return list(dict.fromkeys(c.model for c in claims))


def notebook_table(notebook: str, runs: dict[str, list[Claim]],
                   link: Callable[[str, str], str | None] | None = None) -> str:
    """One notebook's claims as a markdown table: the paper's statement and value, then per run
    that recorded claims of this notebook a column of measured values (headed by its models)
    and one of verdicts; "not run" where that run has no record of the claim. ``link(notebook,
    run)`` may give an address for a run's column header."""
    columns = {run: [c for c in claims if c.notebook == notebook] for run, claims in runs.items()}
    columns = {run: claims for run, claims in columns.items() if claims}
    rows: dict[str, Claim] = {}
    for claims in columns.values():
        for c in claims:
            rows.setdefault(c.claim_id, c)
    header = ["claim", "paper states", "paper value"]
    for run, claims in columns.items():
        title = " / ".join(_run_models(claims))
        href = link(notebook, run) if link else None
        header += [f"[{title}]({href})" if href else title, "verdict"]
    body = []
    for claim_id, first in rows.items():
        row = [claim_id, first.statement, first.paper_value]
        for claims in columns.values():
            several = len(_run_models(claims)) > 1
            found = next((c for c in claims if c.claim_id == claim_id), None)
            if found is None:
                row += ["not run", "—"]
            else:
                measured = f"{found.model}: {found.measured}" if several else found.measured
                row += [measured, f"**{found.verdict}**"]
        body.append([_cell(x) for x in row])
    return markdown_table(header, body)


def report_markdown(runs: dict[str, list[Claim]],
                    link: Callable[[str, str], str | None] | None = None, level: int = 2) -> str:
    """The claims report's body: verdict counts per run, then one table per notebook under a
    heading of ``level``; ``link`` as in ``notebook_table``."""
    lines = ["Verdicts per run:", ""]
    for run, claims in runs.items():
        name = run or "the notebooks' defaults"
        lines.append(f"- {name} ({', '.join(_run_models(claims))}): {_verdict_counts(claims)}.")
    notebooks = sorted({c.notebook for claims in runs.values() for c in claims})
    for notebook in notebooks:
        lines += ["", f"{'#' * level} {notebook}", "", notebook_table(notebook, runs, link)]
    return "\n".join(lines)


def collect(out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``claims.json`` (every run's records, one flat list) and ``REPORT.md`` into the
    figures folder."""
    folder = figures_dir(out_dir)
    runs = load_runs(folder)
    claims = [c for run_claims in runs.values() for c in run_claims]
    json_path = atomic_write_json(folder / "claims.json", [asdict(c) for c in claims])
    lines = [
        "# Claims report",
        "",
        "Generated by `run_all.sh` from the executed notebooks. Per claim: what the paper states "
        "and its value, then, for each model the notebook was run on, the measured value and the "
        "verdict; \"not run\" where that model's run recorded no such claim.",
        "",
        report_markdown(runs),
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
