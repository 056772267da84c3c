"""Static HTML pages of the executed notebooks, readable without Jupyter, and an index page.

``python -m locus.pages`` (run by ``run_all.sh``) turns every executed copy
``outputs/notebooks/<run>/<notebook>.ipynb`` into a self-contained page
``outputs/html/<run>/<notebook>.html`` (nbconvert; figures inline, no script fetched from the
network) and writes ``outputs/html/index.html``: README's findings table, one link per notebook
and run, and the claims report with a column per run.
"""

from __future__ import annotations

import argparse
import html
import os
import re
from collections.abc import Callable
from pathlib import Path

import jinja2
import mistune
import nbformat
from nbconvert import HTMLExporter

from locus import matrix, results
from locus.io import atomic_write_text
from locus.paths import REPO_ROOT

# nbconvert's JupyterLab page, without the scripts it would fetch from a CDN (require.js,
# MathJax, Mermaid: the notebooks use none of them) and with a link back to the index.
_PAGE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block body_header -%}
{{ super() }}
<nav style="padding: 8px 16px; font: 14px sans-serif">
<a href="{{ resources.index_href }}">&larr; all notebooks and the claims report</a></nav>
{%- endblock body_header -%}
"""

_INDEX_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1f2328; margin: 0; background: #fff; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 32px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 24px 0 6px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; font-size: 13.5px; }
th, td { border: 1px solid #d0d7de; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
code { font-size: 90%; background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
strong[class^="verdict-"] { white-space: nowrap; }
.verdict-holds { color: #1a7f37; }
.verdict-partly { color: #9a6700; }
.verdict-does-not-hold { color: #cf222e; }
.verdict-not-run { color: #6e7781; }
"""

_markdown = mistune.create_markdown(escape=True, plugins=["table"])


def render_notebook(source: Path, target: Path, index_href: str, title: str) -> Path:
    """Write one executed notebook as a self-contained HTML page with a link to the index."""
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"locus.html.j2": _PAGE_TEMPLATE})],
                            template_file="locus.html.j2", embed_images=True)
    notebook = nbformat.read(source, as_version=4)
    resources = {"metadata": {"name": title, "path": str(source.parent)},
                 "index_href": index_href}
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    return atomic_write_text(target, body)


def find_executed(out: Path, notebooks: list[str]) -> dict[tuple[str, str], Path]:
    """(notebook, run) -> its executed copy ``<out>/<run>/<notebook>.ipynb``, for every run
    folder under ``out``."""
    found = {}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        for nb in notebooks:
            path = run_dir / f"{nb}.ipynb"
            if path.is_file():
                found[nb, run_dir.name] = path
    return found


def findings_markdown(readme: Path, href: Callable[[str], str | None]) -> str:
    """README's findings table (the one headed paper | finding | notebook), each notebook cell a
    link to that notebook's page where ``href`` gives one."""
    lines = readme.read_text().splitlines()
    start = next((i for i, line in enumerate(lines)
                  if re.fullmatch(r"\|\s*paper\s*\|\s*finding\s*\|\s*notebook\s*\|", line.strip())),
                 None)
    if start is None:
        raise ValueError(f"{readme} has no findings table "
                         "(header '| paper | finding | notebook |')")
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(re.sub(r"`notebooks/([^`]+)\.ipynb`", lambda m: _notebook_link(m[1], href),
                            line))
    return "\n".join(table)


def _notebook_link(notebook: str, href: Callable[[str], str | None]) -> str:
    target = href(notebook)
    return f"[{notebook}]({target})" if target else f"`{notebook}`"


def _run_order(notebook: str, runs: list[str], plan: list[matrix.Run]) -> list[str]:
    """The matrix's runs of ``notebook`` first (its defaults' run leading), then the others."""
    listed = [r.name for r in sorted((r for r in plan if r.notebook == notebook),
                                     key=lambda r: not r.is_default)]
    return [r for r in listed if r in runs] + sorted(set(runs) - set(listed))


def _colour_verdicts(text: str) -> str:
    for verdict in results.VERDICTS:
        css = "verdict-" + verdict.replace(" ", "-")
        text = text.replace(f"<strong>{verdict}</strong>",
                            f'<strong class="{css}">{verdict}</strong>')
    return text


def index_page(title: str, findings: str, notebook_rows: list[str], report: str) -> str:
    """The index page: findings, notebooks and their runs, the claims report (markdown parts)."""
    notebooks = "\n".join(["| notebook | runs (one page each) |", "|---|---|", *notebook_rows])
    parts = [
        f"# {title}",
        "Static pages of the notebooks as `run_all.sh` executed them, readable without Jupyter: "
        "each page holds the notebook's text, code, tables and figures.",
        "## Findings", findings,
        "## Notebooks", notebooks,
        "## Claims report",
        "Per claim: the paper's statement and value, then for each model the notebook ran on "
        "the measured value and the verdict (\"not run\": that run recorded no such claim).",
        report,
    ]
    body = _colour_verdicts(_markdown("\n\n".join(parts)))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_INDEX_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n")


def build(executed: dict[tuple[str, str], Path], html_dir: Path,
          figures: str | os.PathLike | None = None, readme: Path = REPO_ROOT / "README.md",
          plan: list[matrix.Run] | None = None) -> Path:
    """Render every executed notebook into ``html_dir/<run>/<notebook>.html`` and write
    ``html_dir/index.html`` from README's findings and the claims under ``figures``; returns the
    index's path."""
    plan = matrix.read_matrix() if plan is None else plan
    pages: dict[tuple[str, str], str] = {}
    for (nb, run), source in executed.items():
        page = f"{run}/{nb}.html"
        up = "../" * page.count("/")
        render_notebook(source, html_dir / page, f"{up}index.html", f"{nb} ({run})")
        pages[nb, run] = page
    notebooks = list(dict.fromkeys(nb for nb, _ in executed))
    order = {nb: _run_order(nb, [r for n, r in pages if n == nb], plan) for nb in notebooks}

    def notebook_href(nb: str) -> str | None:
        return pages[nb, order[nb][0]] if order.get(nb) else None

    def run_href(nb: str, run: str) -> str | None:
        if not run:  # the report's key for the defaults' run
            run = next((r.name for r in plan if r.notebook == nb and r.is_default), "")
        return pages.get((nb, run))

    rows = [f"| {nb} | " + " · ".join(f"[{run}]({pages[nb, run]})" for run in order[nb]) + " |"
            for nb in notebooks]
    title = readme.read_text().splitlines()[0].lstrip("# ").strip()
    report = results.report_markdown(results.load_runs(figures), run_href, level=3)
    text = index_page(title, findings_markdown(readme, notebook_href), rows, report)
    return atomic_write_text(html_dir / "index.html", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the executed notebooks to HTML pages "
                                                 "and write an index page.")
    parser.add_argument("--notebooks", type=Path, default=REPO_ROOT / "outputs" / "notebooks",
                        help="folder of the executed copies, one subfolder per run")
    parser.add_argument("--html", type=Path, default=REPO_ROOT / "outputs" / "html",
                        help="folder of the pages")
    parser.add_argument("--figures", default=None, help="figures folder (default: figures/)")
    args = parser.parse_args(argv)
    executed = find_executed(args.notebooks, matrix.find_notebooks())
    index = build(executed, args.html, args.figures)
    print(f"wrote {len(executed)} notebook pages and {index}")


if __name__ == "__main__":
    main()
