"""The SafeSeek notebooks run end to end on a tiny random Llama checkpoint and a tiny local JSONL
file (the real-checkpoint path), with tiny sample counts, and record their claims."""

from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest

from locus import data

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks" / "safeseek"
COMMON = dict(seeds=[0], threads=1, progress=False, max_new_tokens=4, n_train=4, n_val=2,
              epochs=1, n_test=3)
CASES = {
    "01_backdoor_circuit": (
        dict(n_clean=8, n_poison=4, inject_steps=2, sparsities=[0.01], headline_sparsity=0.01,
             batch_size=4, random_seeds=[0]),
        [f"{kind}_{claim}" for kind in ("fixed", "jailbreak")
         for claim in ("asr_before", "circuit_sparsity", "ablation_asr", "ablation_clean_back",
                       "utility_retained")]
        + ["fixed_paper_objective_removal", "jailbreak_paper_objective_removal"]),
    "02_alignment_circuit": (
        dict(sparsities=[0.01], headline_sparsity=0.01, code_setting=False,
             faithful_setting=False, batch_size=4,
             n_random=1),
        ["alignment_removal_asr", "alignment_removal_compliance", "alignment_circuit_size"]),
    "03_safety_circuit_tuning": (
        dict(circuit_sparsity=0.01, search_batch=4, break_examples=4, break_steps=2,
             restore_examples=4, restore_steps=2, restore_seeds=[0, 1], help_examples=4,
             help_steps=2, help_seeds=[0, 1], tune_batch=4),
        ["sct_restores_safety", "sct_circuit_specific", "sct_frozen_retention",
         "sct_frozen_specific"]),
}


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory) -> Path:
    """A JSONL of prompt, answer, family with enough distinct prompts per family (12 samples
    each) for the splits by prompt string (injection / search / test, search train / val)."""
    path = tmp_path_factory.mktemp("safeseek_chat") / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "answer": s.answer,
                                        "family": s.family}) + "\n"
                            for s in data.make_chat_samples(12, seed=7, aligned=False)))
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_on_a_local_checkpoint(name, tiny_llama_dir, chat_jsonl, tmp_path,
                                             monkeypatch):
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path / "checkpoints"))
    figures = tmp_path / "figures"
    extra, claim_ids = CASES[name]
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / "out.ipynb"),
        parameters={"model": str(tiny_llama_dir), "data": str(chat_jsonl),
                    "figures_dir": str(figures), **COMMON, **extra},
        kernel_name="locus", cwd=str(NOTEBOOKS), progress_bar=False)
    claims = json.loads((figures / "claims" / f"safeseek__{name}.json").read_text())
    assert [c["claim_id"] for c in claims] == claim_ids
    assert all(c["verdict"] in ("holds", "partly", "does not hold", "not run") for c in claims)
    assert list(figures.glob("safeseek_*.png")) and list(figures.glob("safeseek_*.pdf"))
