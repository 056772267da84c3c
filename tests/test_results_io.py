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
    assert "| paper/01_x | c1 |" in text and "**does not hold**" in text


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
