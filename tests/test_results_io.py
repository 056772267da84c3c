"""The claims report, atomic writes and the checkpoint cache."""

import json

import pytest
import torch

from locus import checkpoints, io, results


def test_claim_sheets_collect_into_report(tmp_path):
    sheet = results.ClaimSheet("paper/01_x", tmp_path, model="toy-vlm")
    sheet.record("c1", "a claim", "0.5", "0.6", results.verdict_at_least(0.6, 0.5), ["f.png"])
    sheet.record("c1", "a claim", "0.5", "0.4", results.verdict_at_least(0.4, 0.5))  # replaces
    results.ClaimSheet("paper/02_y", tmp_path, model="/models/llava-1.5-7b-hf/").record(
        "c2", "b", "1", "-", "not run")
    json_path, md_path = results.collect(tmp_path)
    records = json.loads(json_path.read_text())
    assert [(r["claim_id"], r["model"], r["verdict"]) for r in records] == [
        ("c1", "toy-vlm", "does not hold"), ("c2", "llava-1.5-7b-hf", "not run")]
    text = md_path.read_text()
    assert "## paper/01_x" in text and "| c1 | a claim | 0.5 | 0.4 | **does not hold** |" in text
    assert "| claim | paper states | paper value | llava-1.5-7b-hf | verdict |" in text


def test_report_has_a_column_per_run_and_says_not_run(tmp_path):
    toy = results.ClaimSheet("paper/01_x", tmp_path, model="toy-chat")
    toy.record("c1", "s1", "0.5", "0.6", "holds", ["f.png"])
    toy.record("c2", "s2", "1", "0.2", "does not hold")
    results.ClaimSheet("paper/02_y", tmp_path, model="toy-chat").record("c3", "s3", "1", "1",
                                                                        "holds")
    real = results.ClaimSheet("paper/01_x", tmp_path / "smol", model="/ckpt/smollm2-135m/")
    real.record("c1", "s1", "0.5", "0.3", "does not hold", ["f.png"])
    real.record("c4", "s4", "2", "3", "partly")  # a claim only this run records
    json_path, md_path = results.collect(tmp_path)
    records = json.loads(json_path.read_text())  # one flat list, the defaults' run first
    assert [(r["notebook"], r["claim_id"], r["model"], r["figures"]) for r in records] == [
        ("paper/01_x", "c1", "toy-chat", ["f.png"]), ("paper/01_x", "c2", "toy-chat", []),
        ("paper/02_y", "c3", "toy-chat", []),
        ("paper/01_x", "c1", "smollm2-135m", ["smol/f.png"]),
        ("paper/01_x", "c4", "smollm2-135m", [])]
    text = md_path.read_text()
    first, second = text.split("## paper/01_x")[1].split("## paper/02_y")
    assert ("| claim | paper states | paper value | toy-chat | verdict | smollm2-135m | verdict |"
            in first)
    assert "| c1 | s1 | 0.5 | 0.6 | **holds** | 0.3 | **does not hold** |" in first
    assert "| c2 | s2 | 1 | 0.2 | **does not hold** | not run | — |" in first
    assert "| c4 | s4 | 2 | not run | — | 3 | **partly** |" in first
    table_02 = second.split("## Figures")[0]
    assert "| claim | paper states | paper value | toy-chat | verdict |\n" in table_02
    assert "smollm2" not in table_02  # a model without claims of a notebook gets no column
    assert "- smol (smollm2-135m): 0 holds, 1 partly, 1 does not hold, 0 not run." in text
    assert "- [smol/f.png](smol/f.png)" in text


def test_a_run_of_two_models_names_the_model_in_each_cell(tmp_path):
    sheet = results.ClaimSheet("00_world", tmp_path, model="toy-vlm")
    sheet.record("vlm", "v", "1", "0.9", "holds")
    sheet.record("chat", "c", "1", "0.8", "holds", model="toy-chat")
    table = results.notebook_table("00_world", results.load_runs(tmp_path),
                                   link=lambda nb, run: f"{run or 'toy'}/{nb}.html")
    assert "| [toy-vlm / toy-chat](toy/00_world.html) | verdict |" in table
    assert "| chat | c | 1 | toy-chat: 0.8 | **holds** |" in table


def test_bad_verdict_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds"):
        results.ClaimSheet("n", tmp_path, model="toy-chat").record("c", "s", "1", "1", "true")


def test_verdict_rules():
    assert results.verdict_at_most(0.05, 0.05) == "holds"
    assert results.verdict_at_least(float("nan"), 1) == "not run"


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.txt"
    io.atomic_write_text(target, "old")

    def failing(path):
        path.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        io.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_cached_tensors_detects_stale_and_corrupt(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(4.0)}

    first = checkpoints.cached_tensors("proj", {"lr": 1}, compute, root=tmp_path)
    again = checkpoints.cached_tensors("proj", {"lr": 1}, compute, root=tmp_path)
    assert len(calls) == 1 and torch.equal(first["w"], again["w"])
    checkpoints.cached_tensors("proj", {"lr": 2}, compute, root=tmp_path)  # stale: rebuilt
    assert len(calls) == 2
    folder = tmp_path / "proj"
    assert checkpoints.entry_status(folder, {"lr": 2}) == "valid"
    (folder / "tensors.safetensors").write_bytes(b"garbage")  # corrupt: rebuilt
    assert checkpoints.entry_status(folder, {"lr": 2}) == "corrupt"
    checkpoints.cached_tensors("proj", {"lr": 2}, compute, root=tmp_path)
    assert len(calls) == 3 and checkpoints.entry_status(folder, {"lr": 2}) == "valid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_saved_figures_are_byte_identical_across_runs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    def draw(path):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        io.atomic_save_figure(fig, path)
        plt.close(fig)
        return path.read_bytes()

    for suffix in (".png", ".pdf"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # matplotlib's clock for file dates
        first = draw(tmp_path / f"a{suffix}")
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "2000000000")  # a later run must not show
        assert draw(tmp_path / f"b{suffix}") == first


def test_markdown_table_formats_floats_and_nan():
    table = results.markdown_table(["a", "b", "c"], [["x", 0.12345, float("nan")]], digits=2)
    assert table == "| a | b | c |\n|---|---|---|\n| x | 0.12 | nan |"
