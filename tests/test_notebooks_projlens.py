"""The ProjLens notebooks run end to end on a tiny random LLaVA and a tiny JSONL data file (the
real-checkpoint path), with the cache and the figures in a temporary folder."""

import json
from pathlib import Path

import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks" / "projlens"
TINY = {"steps": 2, "batch_size": 4, "max_new_tokens": 4, "progress": False, "threads": 2,
        "seeds": [0, 1]}  # two seeds: the spreads and the per-seed verdicts run
EXPECTED = {
    "01_projector_backdoor": (dict(sweep_rates=[0.2], n_probe_images=6),
                              {"projector_backdoor_asr", "projector_backdoor_asr_exact",
                               "projector_backdoor_clean_kept"}),
    "02_low_rank": (dict(ks=[0, 1], authors_ks_w1=[1], authors_ks_w2=[0, 1], n_images=4,
                         n_grid_images=4),
                    {"dw_looks_full_rank", "no_trigger_neurons", "backdoor_low_rank",
                     "backdoor_low_rank_authors", "backdoor_low_rank_authors_grid",
                     "removal_kills_backdoor"}),
    "03_activation_shift": (dict(n_images=4),
                            {"shift_rank_one_two", "shift_shared_direction",
                             "shift_decodes_to_target", "shift_decodes_to_target_authors",
                             "shift_linear_in_norm",
                             "shift_linear_in_norm_robust", "shift_linear_in_norm_per_image",
                             "triggered_larger_norm"}),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One cache and figures folder for the three notebooks, so 02 and 03 reuse 01's
    projectors as they do in a full run."""
    return tmp_path_factory.mktemp("projlens_run")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_notebook_runs_on_a_tiny_checkpoint(name, workdir, tiny_llava_dir, tiny_vqa_jsonl,
                                           monkeypatch):
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(workdir / "checkpoints"))
    extra, claim_ids = EXPECTED[name]
    figures = workdir / "figures"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(workdir / f"{name}.ipynb"),
        parameters={"model": str(tiny_llava_dir), "data": str(tiny_vqa_jsonl),
                    "figures_dir": str(figures), **TINY, **extra},
        kernel_name="locus", cwd=str(NOTEBOOKS), progress_bar=False,
    )
    claims = json.loads((figures / "claims" / f"projlens__{name}.json").read_text())
    assert {c["claim_id"] for c in claims} == claim_ids
    assert all(c["verdict"] in ("holds", "partly", "does not hold", "not run") for c in claims)
    for claim in claims:
        assert all((figures / f).is_file() for f in claim["figures"])
    assert list((workdir / "checkpoints" / "projlens").rglob("tensors.safetensors"))


def test_bad_parameter_is_refused_with_a_clear_error(workdir, tiny_llava_dir, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="variants must be"):
        papermill.execute_notebook(
            str(NOTEBOOKS / "03_activation_shift.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"model": str(tiny_llava_dir), "variants": ["backdoor"],
                        "figures_dir": str(tmp_path)},
            kernel_name="locus", cwd=str(NOTEBOOKS), progress_bar=False,
        )
