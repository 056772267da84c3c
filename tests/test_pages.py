"""The static HTML pages: two committed executed notebooks and the index are rendered, then opened
in headless Chromium, which must load every figure and show the verdict tables."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from locus import matrix, pages, results

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_toy_world", "safeseek/02_alignment_circuit"]  # two small executed notebooks
FIGURES = ROOT / "figures"  # the committed claims (run_tests.sh points figures elsewhere)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a test copy of a page: after the load event (which waits for every image) it writes
# what the browser rendered into the DOM, for --dump-dom to return.
PROBE = """<script>
window.addEventListener("load", () => {
  const report = {
    images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
    tables: [...document.querySelectorAll("table")].map(
      t => [...t.querySelectorAll("th")].map(th => th.textContent.trim())),
    verdicts: [...document.querySelectorAll("td strong")].map(s => s.textContent.trim())
      .filter(text => VERDICTS.includes(text)).length,
  };
  const out = document.createElement("pre");
  out.id = "locus-probe";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>
""".replace("VERDICTS", json.dumps(list(results.VERDICTS)))


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def probe(page: Path, profile: Path) -> dict:
    """What Chromium rendered of ``page`` (a test copy with the probe script)."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", copy.as_uri(),
                    profile=profile).stdout
    found = re.search(r'<pre id="locus-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run in {copy.name}"
    return json.loads(html.unescape(found[1]))


def screenshot_is_not_blank(page: Path, target: Path, profile: Path) -> bool:
    _chromium("--window-size=1280,1600", f"--screenshot={target}", page.as_uri(), profile=profile)
    grey = Image.open(target).convert("L")
    return ImageStat.Stat(grey).stddev[0] > 10 and sum(n > 0 for n in grey.histogram()) > 20


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    executed = {(nb, "toy"): ROOT / "notebooks" / f"{nb}.ipynb" for nb in NOTEBOOKS}
    return out, pages.build(executed, out, FIGURES)


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run "
                    "installs it): the HTML pages are not checked in a browser")
    return tmp_path / "profile"


def _image_outputs(notebook: Path) -> int:
    cells = json.loads(notebook.read_text())["cells"]
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))


def _claim_rows(notebook: Path) -> int:
    """Rows of the verdict table the notebook printed (markdown output with a verdict column)."""
    cells = json.loads(notebook.read_text())["cells"]
    texts = ["".join(o["data"]["text/markdown"]) for c in cells for o in c.get("outputs", [])
             if "text/markdown" in o.get("data", {})]
    table = next(t for t in texts if "| verdict |" in t)
    return sum(line.startswith("| ") for line in table.splitlines()) - 1


def test_the_probe_sees_a_broken_figure(tmp_path, browser):
    page = tmp_path / "control.html"
    good = pages.render_notebook(ROOT / "notebooks" / "00_toy_world.ipynb",
                                 tmp_path / "good.html", "index.html", "t")
    first_image = re.search(r'<img[^>]*src="data:image/png;base64,[^"]+"[^>]*>', good.read_text())
    page.write_text(f'<html><body>{first_image[0]}<img src="data:image/png;base64,AAAA">'
                    "</body></html>")
    assert probe(page, browser)["images"] == [True, False]


@pytest.mark.parametrize("notebook", NOTEBOOKS[1:])
def test_a_notebook_page_renders_its_figures_and_verdicts(site, browser, notebook, tmp_path):
    out, _ = site
    source = ROOT / "notebooks" / f"{notebook}.ipynb"
    page = out / "toy" / f"{notebook}.html"
    seen = probe(page, browser)
    assert seen["images"] == [True] * _image_outputs(source) and seen["images"]
    assert any("verdict" in headers for headers in seen["tables"])
    assert seen["verdicts"] == _claim_rows(source) > 0
    assert "cdnjs" not in page.read_text()  # self-contained: nothing fetched
    assert screenshot_is_not_blank(page, tmp_path / "page.png", browser)


def test_the_index_shows_findings_notebooks_and_the_claims_report(site, browser, tmp_path):
    out, index = site
    seen = probe(index, browser)
    runs = results.load_runs(FIGURES)
    claims = [c for run in runs.values() for c in run]
    report_tables = [h for h in seen["tables"] if "verdict" in h]
    assert len(report_tables) == len({c.notebook for c in claims})
    assert seen["verdicts"] == len(claims)
    assert seen["tables"][0] == ["paper", "finding", "notebook"]
    text = index.read_text()
    for nb in NOTEBOOKS:
        assert f'href="toy/{nb}.html"' in text and (out / "toy" / f"{nb}.html").is_file()
    assert screenshot_is_not_blank(index, tmp_path / "index.png", browser)


def test_findings_link_only_rendered_notebooks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n| paper | finding | notebook |\n|---|---|---|\n"
                      "| A | x | `notebooks/a/01_x.ipynb` |\n| | y | `notebooks/a/02_y.ipynb` |\n\n"
                      "after\n")
    table = pages.findings_markdown(readme, {"a/01_x": "toy/a/01_x.html"}.get)
    assert table.splitlines()[2:] == ["| A | x | [a/01_x](toy/a/01_x.html) |",
                                      "| | y | `a/02_y` |"]
    readme.write_text("# no table\n")
    with pytest.raises(ValueError, match="findings table"):
        pages.findings_markdown(readme, {}.get)


def test_executed_copies_are_found_per_run(tmp_path):
    for run in ("toy", "smollm2"):
        (tmp_path / run / "a").mkdir(parents=True)
        (tmp_path / run / "a" / "01_x.ipynb").write_text("{}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "01_x.ipynb").write_text("{}")  # not inside a run folder: ignored
    found = pages.find_executed(tmp_path, ["a/01_x"])
    assert sorted(found) == [("a/01_x", "smollm2"), ("a/01_x", "toy")]
    plan = [matrix.Run("a/01_x", "zzz", (("model", "m"),)), matrix.Run("a/01_x", "toy")]
    assert pages._run_order("a/01_x", ["smollm2", "toy", "zzz"], plan) == ["toy", "zzz", "smollm2"]


def test_the_index_links_every_run_and_its_report_column(tmp_path):
    figures = tmp_path / "figures"
    results.ClaimSheet("00_toy_world", figures, model="toy-vlm").record("c", "s", "1", "1",
                                                                        "holds")
    results.ClaimSheet("00_toy_world", figures / "smol", model="smol-llava").record(
        "c", "s", "1", "0", "does not hold")
    source = ROOT / "notebooks" / "00_toy_world.ipynb"
    plan = [matrix.Run("00_toy_world", "toy"), matrix.Run("00_toy_world", "smol", (("m", "x"),))]
    index = pages.build({("00_toy_world", "smol"): source, ("00_toy_world", "toy"): source},
                        tmp_path / "html", figures, plan=plan)
    text = index.read_text()
    assert '<a href="toy/00_toy_world.html">toy</a> · <a href="smol/00_toy_world.html">smol</a>' \
        in text
    assert '<th><a href="toy/00_toy_world.html">toy-vlm</a></th>' in text
    assert '<th><a href="smol/00_toy_world.html">smol-llava</a></th>' in text
    assert 'class="verdict-does-not-hold">does not hold</strong>' in text
    assert (tmp_path / "html" / "smol" / "00_toy_world.html").read_text().count(
        'href="../index.html"') == 1
