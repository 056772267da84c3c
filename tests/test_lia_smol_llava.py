"""Lost in Attention on smol-llava (the real SmolLM2 decoder, 30 layers, 9 heads / 3 key-value
heads, 16 visual tokens): teacher forcing scores the real tokenizer's whole answer as greedy
decoding says it, the residual geometry sees the visual tokens in every layer, and the
replacement notebook runs end to end on the model with tiny counts (its matrix run,
./run_all.sh, runs both notebooks at full counts)."""

import json
from pathlib import Path

import papermill as pm
import pytest
import torch

from locus import checkpoints, real_models, smol_llava
from locus.arch import adapt
from locus.data import make_vqa_samples
from locus.lost_in_attention import benchmark as B
from locus.lost_in_attention import geometry

BASE = smol_llava.SmolLlavaRecipe().base
READY = (checkpoints.entry_status(real_models.models_root() / BASE,
                                  real_models.spec(BASE).config()) == "valid"
         and (smol_llava.parts_folder() / checkpoints.MANIFEST).is_file())
pytestmark = pytest.mark.skipif(not READY, reason=f"needs the converted {BASE} and the committed "
                                                  "smol-llava parts (run the set-up)")
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks" / "lost_in_attention"


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    return geometry.load_vlm("smol-llava", "cpu", None)


def test_teacher_forcing_scores_the_whole_answer_as_decoding_says_it(smol):
    model, processor = smol
    samples = [s for s in make_vqa_samples(12, 4242, ("spatial", "attribute"))
               if " " in s.answer or s.family == "attribute"][:6]
    assert any(" " in s.answer for s in samples)  # a two-word answer is among them
    batch, answers = B.encode_teacher_forced(processor, samples)
    tokenizer = processor.tokenizer
    for row, (sample, ids) in enumerate(zip(samples, answers, strict=True)):
        assert ids == tokenizer(sample.answer, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == sample.answer  # no space-prefixed " top"
        assert batch["input_ids"][row, -len(ids):].tolist() == ids
    forced = B.correct_teacher_forced(model, processor, samples, None, 8, 3)
    assert forced.any()  # re-tokenizing "prompt answer" scored every answer wrong
    assert forced.tolist() == B.correct_generated(model, processor, samples, None, 8, 3).tolist()


def _execute(name, tmp_path, **parameters):
    figures = tmp_path / "figures"
    pm.execute_notebook(str(NOTEBOOKS / name), str(tmp_path / name),
                        parameters={"model": "smol-llava", "figures_dir": str(figures),
                                    "n_per_family": 2, "seeds": [0], **parameters},
                        kernel_name="locus", cwd=str(NOTEBOOKS), progress_bar=False)
    notebook = name.removesuffix(".ipynb")
    path = figures / "claims" / f"lost_in_attention__{notebook}.json"
    return {c["claim_id"]: c for c in json.loads(path.read_text())}


def test_the_residual_geometry_sees_16_visual_tokens_in_30_layers(smol):
    model, processor = smol
    samples = make_vqa_samples(1, 4243, ("existence", "text"))
    batch = geometry.model_batches(processor, samples, 2, "cpu", model.dtype)[0]
    assert adapt(model).visual_token_mask(batch["input_ids"]).sum(1).tolist() == [16, 16]
    table = geometry.residual_geometry(model, processor, samples, seed=0, noise_qkv=False,
                                       batch_size=2)
    assert {group for _, group, _ in table.keys()} == {"all", "visual", "text"}
    assert {kind for kind, _, _ in table.keys()} == set(geometry.UPDATE_KINDS) - {"noise_qkv"}
    assert list(table.layer_stats("attn", "visual", "rid").layers) == list(range(30))
    # The visual tokens are a part of the whole: their RID is not the all-token one.
    assert table.overall_mean("attn", "visual", "rid") != table.overall_mean("attn", "all", "rid")


def test_the_replacement_notebook_runs_on_smol_llava(tmp_path):
    recorded = _execute("02_attention_replacement.ipynb", tmp_path, batch_size=4,
                        families=["existence", "text"], modes=["dirichlet"], sweep_width=15,
                        sweep_stride=15)
    assert set(recorded) == {f"{claim}{suffix}" for suffix in ("", "__authors_code")
                             for claim in ("replacement_comparable_or_better",
                                           "text_heavy_exception", "other_predefined_vectors")}
    assert {c["model"] for c in recorded.values()} == {"smol-llava"}
    paper = recorded["replacement_comparable_or_better"]
    assert "layers [16, 17, 18, 19, 20, 21, 22]" in paper["statement"]
    for stem in ("lia_table_replacement_accuracy", "lia_fig_layer_band_sweep"):
        assert (tmp_path / "figures" / f"{stem}.png").is_file()
