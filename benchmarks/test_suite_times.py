"""How long the README test command takes, and where the time goes.

Runs ``./run_tests.sh`` (the README's test command) with a JUnit report, then summarises: the
whole command's wall time (set-up included), the library suite (``tests/``), the notebook checks
(nbval over ``notebooks/``), the slowest test and the slowest notebook cell, against the goals of
issue 11 (the command ≤ 20 min, the library suite ≤ 3 min, no nbval cell over 3 min). The load
average before and after is printed beside them: on a shared machine times grow with the load.

    python3 benchmarks/test_suite_times.py   # -> benchmarks/results/test_suite_times.md
    python3 benchmarks/test_suite_times.py -- -k masks  # extra arguments go to pytest

Only the standard library is used, so it runs before the project's venv exists.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"command": 20 * 60, "library": 3 * 60, "cell": 3 * 60}


def run_suite(extra: list[str]) -> tuple[float, int, Path]:
    """Run the README test command with a JUnit report; return (wall seconds, exit code, report)."""
    report = Path(tempfile.mkdtemp()) / "junit.xml"
    start = time.monotonic()
    code = subprocess.call(["./run_tests.sh", f"--junitxml={report}", *extra], cwd=ROOT)
    return time.monotonic() - start, code, report


def durations(report: Path) -> list[tuple[str, float]]:
    """(test id, seconds) of every test case in a JUnit report."""
    cases = ET.parse(report).getroot().iter("testcase")
    return [(f"{c.get('classname')}::{c.get('name')}", float(c.get("time", 0))) for c in cases]


def summary(wall: float, code: int, cases: list[tuple[str, float]], load: tuple) -> str:
    """The markdown summary: totals per part, the slowest items, each goal met or missed."""
    library = [(n, t) for n, t in cases if not n.startswith("notebooks")]
    cells = [(n, t) for n, t in cases if n.startswith("notebooks")]

    def verdict(value: float, goal: str) -> str:
        return f"{value:.0f} s ({'meets' if value <= GOALS[goal] else 'misses'} ≤ {GOALS[goal]} s)"

    slow_cell = max(cells, key=lambda c: c[1], default=("(none)", 0.0))
    lines = [
        "# The README test command's time",
        "",
        f"exit code {code}; {len(cases)} tests; load average {load[0]} before, {load[1]} after "
        f"({os.cpu_count()} cores)",
        "",
        "| part | time |",
        "|---|---|",
        f"| `./run_tests.sh`, wall, set-up included | {verdict(wall, 'command')} |",
        "| library suite (`tests/`, sum of test times) | "
        f"{verdict(sum(t for _, t in library), 'library')} |",
        f"| notebook checks (nbval, sum of cell times) | {sum(t for _, t in cells):.0f} s |",
        f"| slowest nbval cell: `{slow_cell[0]}` | {verdict(slow_cell[1], 'cell')} |",
        "",
        "Slowest ten:",
        "",
    ]
    lines += [f"- {t:.1f} s `{n}`" for n, t in sorted(cases, key=lambda c: -c[1])[:10]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/test_suite_times.md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    before = os.getloadavg()[0]
    wall, code, report = run_suite(args.pytest_args)
    text = summary(wall, code, durations(report), (f"{before:.1f}", f"{os.getloadavg()[0]:.1f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)
    sys.exit(code)


if __name__ == "__main__":
    main()
