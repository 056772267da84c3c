"""The Lost-in-Attention notebooks run end to end on a tiny random LLaVA checkpoint and a tiny
local JSONL file (the real-checkpoint path), record their claims, and refuse bad parameters."""

import json
from pathlib import Path

import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks" / "lost_in_attention"


def execute(name, tmp_path, monkeypatch, **parameters):
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path / "checkpoints"))
    figures = tmp_path / "figures"
    pm.execute_notebook(
        str(NOTEBOOKS / name), str(tmp_path / name),
        parameters={"figures_dir": str(figures), **parameters},
        kernel_name="locus", cwd=str(NOTEBOOKS), progress_bar=False,
    )
    return figures


def claims(figures, notebook):
    path = figures / "claims" / f"lost_in_attention__{notebook}.json"
    return {c["claim_id"]: c for c in json.loads(path.read_text())}


def test_residual_geometry_notebook_runs_on_a_local_checkpoint(tiny_llava_dir, tiny_vqa_jsonl,
                                                               tmp_path, monkeypatch):
    figures = execute("01_residual_geometry.ipynb", tmp_path, monkeypatch,
                      model=str(tiny_llava_dir), data=str(tiny_vqa_jsonl), n_per_family=2,
                      seeds=[0, 1], batch_size=4)
    recorded = claims(figures, "01_residual_geometry")
    assert set(recorded) == {"decoupling", "decoupling__authors_code", "noise_controls",
                             "noise_controls__authors_code", "attention_rid_near_eps_rope"}
    assert all(c["verdict"] in ("holds", "partly", "does not hold") for c in recorded.values())
    for stem in ("lia_fig_layer_rid_mixig", "lia_table_rid_mixig"):
        assert (figures / f"{stem}.png").is_file() and (figures / f"{stem}.pdf").is_file()


def test_attention_replacement_notebook_runs_on_a_local_checkpoint(tiny_llava_dir,
                                                                   tiny_vqa_jsonl, tmp_path,
                                                                   monkeypatch):
    figures = execute("02_attention_replacement.ipynb", tmp_path, monkeypatch,
                      model=str(tiny_llava_dir), data=str(tiny_vqa_jsonl), n_per_family=2,
                      seeds=[0, 1], batch_size=8, max_new_tokens=2, prune_after=1,
                      modes=["dirichlet", "vision_prior"])
    recorded = claims(figures, "02_attention_replacement")
    assert set(recorded) == {f"{claim}{suffix}" for suffix in ("", "__authors_code")
                             for claim in ("replacement_comparable_or_better",
                                           "text_heavy_exception", "other_predefined_vectors")}
    assert all(c["verdict"] in ("holds", "partly", "does not hold", "not run")
               for c in recorded.values())
    for stem in ("lia_table_replacement_accuracy", "lia_fig_layer_band_sweep"):
        assert (figures / f"{stem}.png").is_file() and (figures / f"{stem}.pdf").is_file()


def test_a_missing_data_file_is_refused_before_any_work(tiny_llava_dir, tmp_path, monkeypatch):
    with pytest.raises(pm.PapermillExecutionError, match="does not exist"):
        execute("02_attention_replacement.ipynb", tmp_path, monkeypatch,
                model=str(tiny_llava_dir), data=str(tmp_path / "missing.jsonl"))
