"""The library's layout: a shared core at the top of ``locus`` and one subpackage per paper, with
imports pointing one way (core ← papers ← notebooks): no core module imports a paper, and no
paper imports another paper."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib" / "locus"
PAPERS = ("lost_in_attention", "projlens", "safeseek")


def _imported_locus_modules(path: Path) -> set[str]:
    """Every ``locus...`` module a file imports (``from locus import x`` counts as locus.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("locus")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locus"):
            if node.module == "locus":
                found |= {f"locus.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def _paper_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PAPERS else None


def test_every_paper_is_a_subpackage():
    for paper in PAPERS:
        assert (LIB / paper / "__init__.py").is_file(), paper
    flat = {p.stem for p in LIB.glob("*.py")}
    assert not flat & set(PAPERS), f"paper modules left at the top level: {flat & set(PAPERS)}"


@pytest.mark.parametrize("path", sorted(LIB.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_paper(path):
    papers = {m for m in _imported_locus_modules(path) if _paper_of(m)}
    assert not papers, f"core module {path.name} imports paper code: {sorted(papers)}"


@pytest.mark.parametrize("paper", PAPERS)
def test_papers_import_the_core_and_never_each_other(paper):
    for path in sorted((LIB / paper).glob("*.py")):
        others = {m for m in _imported_locus_modules(path) if _paper_of(m) not in (None, paper)}
        assert not others, f"{paper}/{path.name} imports another paper: {sorted(others)}"


def test_the_layout_check_sees_a_cross_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from locus.safeseek import masks\nfrom locus import zoo\n")
    assert _imported_locus_modules(bad) == {"locus.safeseek", "locus.zoo"}
    assert _paper_of("locus.safeseek") == "safeseek" and _paper_of("locus.zoo") is None
