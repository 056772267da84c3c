"""The residual geometry of a text-only causal LM: text prompts through the same library path as
image questions (``locus.lost_in_attention.geometry``)."""

import pytest

from locus import safety_data
from locus.arch import adapt
from locus.data import ChatSample
from locus.lost_in_attention import geometry


def test_default_text_prompts_are_the_projects_benign_questions():
    questions = safety_data.benign_questions()
    families = {q.family for q in questions}
    first = geometry.text_sample_set(None, 5, seed=0)
    assert {s.family for s in first} == families
    assert len(first) == sum(min(5, sum(q.family == f for q in questions)) for f in families)
    by_prompt = {q.prompt: q for q in questions}
    assert all(s.answer == by_prompt[s.prompt].answers[0] for s in first)
    assert len({s.prompt for s in first}) == len(first)
    assert first == geometry.text_sample_set(None, 5, seed=0)
    assert first != geometry.text_sample_set(None, 5, seed=1)


def test_text_model_geometry_measures_every_update_on_its_text_tokens(tiny_llama_dir,
                                                                     tiny_chat_jsonl):
    model, tokenizer = geometry.load_decoder(str(tiny_llama_dir), "cpu", None)
    arch = adapt(model)
    samples = geometry.samples_for(arch, tiny_chat_jsonl, 2, seed=0)
    assert samples and all(isinstance(s, ChatSample) for s in samples)
    batch = geometry.model_batches(tokenizer, samples, 4, "cpu", model.dtype)[0]
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 4
    table = geometry.residual_geometry(model, tokenizer, samples, seed=0, batch_size=4)
    assert {group for _, group, _ in table.keys()} == {"all", "text"}  # no visual tokens
    kinds = {kind for kind, _, _ in table.keys()}
    assert {"attn", "ffn", "noise_delta", "noise_qkv", "rope"} <= kinds
    for kind in ("attn", "ffn"):  # every token of a text model is a text token
        assert table.overall_mean(kind, "all", "rid") == table.overall_mean(kind, "text", "rid")
    assert list(table.layer_stats("attn", "all", "rid").layers) == list(range(arch.num_layers))


def test_text_models_pass_the_parameter_check_only_when_asked(tiny_llama_dir):
    args = (None, [0], "cpu", None, None, 1, ["text"])
    geometry.check_parameters(str(tiny_llama_dir), *args, kind=None, n_per_family=2)
    geometry.check_parameters("smollm2-135m-instruct", *args, kind=None, n_per_family=2)
    with pytest.raises(ValueError, match="not a vlm model"):
        geometry.check_parameters("smollm2-135m-instruct", *args, n_per_family=2)
