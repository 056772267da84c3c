"""Tests for locus.lost_in_attention.geometry: per-layer RID/MixIG of attention and FFN updates
equal the metrics of the model's own residual states, the controls (Noise Δ, Noise QKV, ε_RoPE)
are what they say, and the verdict rules follow the numbers."""

import math

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from locus.arch import adapt
from locus.hooks import capture_residuals
from locus.lost_in_attention import geometry as G
from locus.lost_in_attention.metrics import LayerMetricTable, mixig, rid

IMAGE_TOKEN = 60
PAD = 0
NUM_LAYERS = 3
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
V = IMAGE_TOKEN
IDS = torch.tensor([
    [1, 5, V, V, V, V, 7, 8, 9, 10],
    [PAD, PAD, 1, V, V, V, V, 11, 12, 13],
])
MASK = (IDS != PAD).long()


def tiny_llava(dtype=torch.float32):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, image_size=16, patch_size=8)
    config = LlavaConfig(text_config=LlamaConfig(**TEXT), vision_config=vision,
                         image_token_index=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config).eval().to(dtype)


def batch(dtype=torch.float32):
    torch.manual_seed(2)
    return {"input_ids": IDS, "attention_mask": MASK,
            "pixel_values": torch.randn(2, 3, 16, 16, dtype=dtype)}


def run(model, config=None, **kwargs):
    table = LayerMetricTable()
    G.record_updates(model, batch(model.dtype), table, config or G.GeometryConfig(),
                     torch.Generator().manual_seed(0), **kwargs)
    return table


def captured_states(model):
    with torch.no_grad(), capture_residuals(model, dtype=torch.float64) as cap:
        model(**batch(), use_cache=False)
    return cap.states


def one_value(table, kind, group, metric, layer, sample):
    """The value recorded for one (layer, sample): samples are added in row order."""
    return table._values[(kind, group, metric)][layer][sample]


def test_attention_and_ffn_metrics_equal_the_metrics_of_the_captured_states():
    model = tiny_llava()
    table = run(model)
    states = captured_states(model)
    real = MASK[1].bool()  # row 1 is left-padded: padding is left out
    for layer in range(NUM_LAYERS):
        x_in, x_attn, x_ffn = (states[layer][s][1, real] for s in ("input", "attn", "ffn"))
        expected_attn = rid(x_in, x_attn, rtol=G.rank_rtol(torch.float32, x_in.shape))
        assert one_value(table, "attn", "all", "rid", layer, 1) == pytest.approx(
            expected_attn.rid, rel=1e-9, abs=1e-12)
        assert one_value(table, "attn", "all", "mixig", layer, 1) == pytest.approx(
            mixig(x_in, x_attn), rel=1e-9, abs=1e-12)
        expected_ffn = rid(x_attn, x_ffn, rtol=G.rank_rtol(torch.float32, x_in.shape))
        assert one_value(table, "ffn", "all", "rid", layer, 1) == pytest.approx(
            expected_ffn.rid, rel=1e-9, abs=1e-12)


def test_ffn_is_measured_against_the_attention_state_and_the_layer_input():
    model = tiny_llava()
    table = run(model, G.GeometryConfig(groups=("all",)))
    states = captured_states(model)
    x_in, x_attn, x_ffn = (states[2][s][0] for s in ("input", "attn", "ffn"))
    rtol = G.rank_rtol(torch.float32, x_in.shape)
    assert one_value(table, "ffn_input", "all", "rid", 2, 0) == pytest.approx(
        rid(x_in, x_ffn, rtol=rtol).rid, rel=1e-9)
    assert one_value(table, "ffn", "all", "rid", 2, 0) == pytest.approx(
        rid(x_attn, x_ffn, rtol=rtol).rid, rel=1e-9)
    for variant, metric in G.MIXIG_METRICS.items():
        assert one_value(table, "ffn_input", "all", metric, 2, 0) == pytest.approx(
            mixig(x_in, x_ffn, variant), rel=1e-9, abs=1e-12)
        assert one_value(table, "ffn", "all", metric, 2, 0) == pytest.approx(
            mixig(x_attn, x_ffn, variant), rel=1e-9, abs=1e-12)


def test_token_groups_split_real_tokens_into_visual_and_text():
    masks = G.token_group_masks(adapt(tiny_llava()), IDS, MASK)
    assert masks["all"].sum(1).tolist() == [10, 8]
    assert masks["visual"].sum(1).tolist() == [4, 4]
    assert masks["text"].sum(1).tolist() == [6, 4]
    assert not (masks["visual"] & masks["text"]).any()
    table = run(tiny_llava())
    for group in G.TOKEN_GROUPS:
        assert table.layer_stats("attn", group, "rid").count.tolist() == [2] * NUM_LAYERS


def test_rope_baseline_is_the_rid_to_the_unrotated_attention_state():
    model = tiny_llava()
    arch = adapt(model)
    table = run(model, G.GeometryConfig(groups=("all",)))
    states = captured_states(model)
    x_in = states[0]["input"][0:1].float()
    seq = x_in.shape[1]
    cos, sin = arch.language_model.rotary_emb(x_in, torch.arange(seq)[None])
    causal = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        unrotated = arch.attention(0)(
            hidden_states=arch.input_norm(0)(x_in),
            position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)),
            attention_mask=causal,
        )[0]
    x_attn = states[0]["attn"][0]
    expected = rid(x_attn, x_in[0].double() + unrotated[0].double(),
                   rtol=G.rank_rtol(torch.float32, x_attn.shape))
    got = one_value(table, "rope", "all", "rid", 0, 0)
    assert got == pytest.approx(expected.rid, rel=1e-4)
    assert 0 < got < one_value(table, "attn", "all", "rid", 0, 0)


def test_noise_delta_is_seeded_and_differs_from_attention():
    model = tiny_llava()
    first, second = run(model), run(model)
    assert first._values[("noise_delta", "all", "rid")] == second._values[
        ("noise_delta", "all", "rid")]
    attn = first.overall_mean("attn", "all", "rid")
    noise = first.overall_mean("noise_delta", "all", "rid")
    assert noise != attn


def test_noised_qkv_copy_matches_each_tensors_moments_and_leaves_the_model_alone():
    model = tiny_llava()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noised = G.noised_qkv_copy(model, torch.Generator().manual_seed(0))
    again = G.noised_qkv_copy(model, torch.Generator().manual_seed(0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    arch, narch = adapt(model), adapt(noised)
    for i in range(NUM_LAYERS):
        for name in ("q_proj", "k_proj", "v_proj"):
            w, nw = getattr(arch, name)(i).weight.detach(), getattr(narch, name)(i).weight
            assert not torch.equal(w, nw)
            assert torch.equal(nw, getattr(adapt(again), name)(i).weight)
            nw = nw.detach()
            # 32 x 32 or 16 x 32 entries: sample mean within 4 standard errors, std within 10%
            assert float(nw.mean()) == pytest.approx(float(w.mean()),
                                                     abs=4 * float(w.std()) / nw.numel() ** 0.5)
            assert float(nw.std()) == pytest.approx(float(w.std()), rel=0.1)
        assert torch.equal(arch.o_proj(i).weight, narch.o_proj(i).weight)
        assert torch.equal(arch.down_proj(i).weight, narch.down_proj(i).weight)


def test_residual_geometry_records_every_kind_and_the_column_degeneracy(tiny_vqa_jsonl):
    from locus import models

    torch.manual_seed(0)
    sizes = models.ToyVLMConfig(vision_width=32, text_width=64, text_layers=2,
                                text_heads=4, text_kv_heads=2, text_intermediate=128)
    model, processor = models.build_toy_vlm(sizes)
    samples = G.sample_set(tiny_vqa_jsonl, 2, seed=0)
    assert {s.family for s in samples} == set(G.BENCHMARK_FAMILIES)
    table = G.residual_geometry(model.eval(), processor, samples, seed=0, batch_size=4)
    kinds = {kind for kind, _, _ in table.keys()}
    assert kinds == set(G.UPDATE_KINDS)
    # 26-30 tokens per sample < hidden size 64: full row rank, the column term is 0 (degenerate)
    # from layer 1 on, where no two rows are equal any more.
    stats = table.layer_stats("attn", "all", "col_degenerate")
    assert stats.mean[1] == 1.0
    assert table.layer_stats("attn", "all", "delta_d_col").mean[1] < 1e-12
    summary = G.summarize_seeds([table], "all")
    assert set(summary.kinds) == set(G.UPDATE_KINDS)
    assert "Noise QKV" in G.summary_markdown(summary)


def test_text_only_model_has_no_visual_group():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
    table = LayerMetricTable()
    G.record_updates(model, {"input_ids": IDS[:, 4:]}, table)
    groups = {group for _, group, _ in table.keys()}
    assert groups == {"all", "text"}


def test_bfloat16_model_is_measured_in_float64():
    model = tiny_llava(torch.bfloat16)
    table = run(model, G.GeometryConfig(groups=("all",)))
    value = table.overall_mean("attn", "all", "rid")
    assert math.isfinite(value) and 0 < value <= 2
    assert G.rank_rtol(torch.bfloat16, (10, 32)) == 1e-3


def test_sample_set_is_seeded_and_uses_held_out_seeds(tiny_vqa_jsonl):
    a = G.sample_set(None, 3, seed=1)
    b = G.sample_set(None, 3, seed=1)
    assert [s.question for s in a] == [s.question for s in b]
    assert len(a) == 3 * len(G.BENCHMARK_FAMILIES)
    one = G.sample_set(tiny_vqa_jsonl, 1, seed=0)
    assert len(one) == len(G.BENCHMARK_FAMILIES)
    with pytest.raises(ValueError, match="no samples of the families"):
        G.sample_set(tiny_vqa_jsonl, 1, seed=0, families=("nonexistent",))


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="mixig_power"):
        G.GeometryConfig(mixig_power=0)
    with pytest.raises(ValueError, match="groups"):
        G.GeometryConfig(groups=("image",))
    with pytest.raises(ValueError, match="mixig_variant"):
        G.Reading("x", mixig_variant="max")
    with pytest.raises(ValueError, match="rid_ffn"):
        G.Reading("x", rid_ffn="attn")
    with pytest.raises(ValueError, match="input_ids"):
        G.record_updates(tiny_llava(), {"inputs_embeds": torch.zeros(1, 3, 32)},
                         LayerMetricTable())
    with pytest.raises(TypeError, match="LayerMetricTable"):
        G.record_updates(tiny_llava(), batch(), {})


def synthetic_table(attn, ffn, rope=0.05):
    """A table with constant (rid, mixig) per kind over 2 layers."""
    table = LayerMetricTable()
    for layer in range(2):
        for kind, (r, m) in {"attn": attn, "ffn": ffn, "noise_delta": (0.6, -0.8)}.items():
            table.add(layer, kind, "all", rid=r, mixig=m, delta_s=0.0, delta_d_col=0.0,
                      delta_d_row=r, col_degenerate=1.0)
        table.add(layer, "rope", "all", rid=rope, delta_s=0.0, delta_d_col=0.0,
                  delta_d_row=rope, col_degenerate=1.0)
    return table


def test_decoupling_verdict_rules():
    paper_like = [synthetic_table((0.06, 0.6), (0.2, 0.02)) for _ in range(3)]
    check = G.decoupling_check(G.summarize_seeds(paper_like))
    assert check.verdict == "holds"
    assert check.attn_rid_over_eps_rope == pytest.approx(1.2)
    assert check.rope_verdict == "partly"
    assert check.controls_rid_above_attn and check.controls_mixig_below_attn

    one_seed_off = paper_like[:2] + [synthetic_table((0.3, 0.6), (0.2, 0.02))]
    check = G.decoupling_check(G.summarize_seeds(one_seed_off))
    assert check.rid_attn_below_ffn and not check.rid_rule_every_seed
    assert check.verdict == "partly"

    ties = [synthetic_table((0.2, 0.025), (0.205, 0.02))]  # differences below the 0.01 margin
    assert G.decoupling_check(G.summarize_seeds(ties)).verdict == "does not hold"
    assert G.decoupling_check(G.summarize_seeds(ties), margin=0.0).verdict == "holds"

    reversed_ = [synthetic_table((0.3, 0.0), (0.1, 0.1))]
    assert G.decoupling_check(G.summarize_seeds(reversed_)).verdict == "does not hold"
    summary = G.summarize_seeds(paper_like)
    assert summary.std["attn"]["rid"] == 0.0
    assert math.isnan(summary.mean["rope"]["mixig"])


def test_notebook_parameter_checks(tiny_llava_dir, tiny_vqa_jsonl, tmp_path):
    ok = dict(model=str(tiny_llava_dir), data_path=str(tiny_vqa_jsonl), seeds=[0, 1],
              device="cpu", dtype=None, figures_dir=None, threads=2,
              families=list(G.BENCHMARK_FAMILIES))
    G.check_parameters(**ok, n_per_family=3)
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        G.check_parameters(**{**ok, "model": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="not a vlm model"):
        G.check_parameters(**{**ok, "model": "toy-chat"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        G.check_parameters(**{**ok, "data_path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(TypeError, match="seeds"):
        G.check_parameters(**{**ok, "seeds": [0, 0]})
    with pytest.raises(ValueError, match="dtype"):
        G.check_parameters(**{**ok, "dtype": "float8"})
    with pytest.raises(ValueError, match="not toy-world families"):
        G.check_parameters(**{**ok, "data_path": None, "families": ["existence", "maths"]})
    with pytest.raises(TypeError, match="n_per_family"):
        G.check_parameters(**ok, n_per_family=0)


def planted_mix(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each token becomes a random convex mix of the tokens, as attention does: no new
    directions, more similar tokens."""
    n = x.shape[0]
    weights = torch.softmax(2 * torch.randn(n, n, generator=g, dtype=torch.float64), -1)
    return (0.2 * torch.eye(n, dtype=torch.float64) + 0.8 * weights) @ x


def planted_expand(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each token gets its own new direction, orthogonal to the state's row space."""
    n, h = x.shape
    basis = torch.linalg.qr(torch.cat([torch.linalg.svd(x, full_matrices=False)[2],
                                       torch.randn(n, h, generator=g, dtype=torch.float64)]).T)[0]
    return x + 3 * x.norm() / n**0.5 * basis[:, -n:].T


def planted_tables(attn_mixes: bool, seeds: int = 3) -> list[LayerMetricTable]:
    """Tables of metrics measured on planted updates of random low-rank states (12 tokens,
    width 40, rank 6): ``attn_mixes`` gives the mixing update to attention and the expanding
    one to the FFN, else the other way round."""
    tables = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x_in = torch.randn(12, 6, generator=g, dtype=torch.float64) @ torch.randn(
            6, 40, generator=g, dtype=torch.float64)
        table = LayerMetricTable()
        for layer in range(2):
            first, second = (planted_mix, planted_expand) if attn_mixes else (planted_expand,
                                                                             planted_mix)
            x_attn = first(x_in, g)
            x_ffn = second(x_attn, g)
            noise = x_in + torch.randn(x_in.shape, generator=g, dtype=torch.float64) * (
                (x_attn - x_in).norm() / x_in.numel() ** 0.5)
            for kind, (a, b) in {"attn": (x_in, x_attn), "ffn": (x_attn, x_ffn),
                                 "ffn_input": (x_in, x_ffn), "noise_delta": (x_in, noise),
                                 "noise_qkv": (x_in, noise)}.items():
                gains = {m: mixig(a, b, v) for v, m in G.MIXIG_METRICS.items()}
                table.add(layer, kind, "all", rid(a, b), **gains)
        tables.append(table)
    return tables


def test_decoupling_rule_detects_a_planted_mixing_attention_and_expanding_ffn():
    planted = G.summarize_seeds(planted_tables(attn_mixes=True))
    swapped = G.summarize_seeds(planted_tables(attn_mixes=False))
    for variant in ("sharpened", "last_row_sharpened"):
        for rid_ffn in ("ffn", "ffn_input"):
            reading = G.Reading(variant, rid_ffn=rid_ffn, mixig_variant=variant)
            assert G.decoupling_check(planted, reading=reading).verdict == "holds"
            assert G.decoupling_check(swapped, reading=reading).verdict == "does not hold"
            # Random noise of the attention update's norm is no mixing update: the control rule
            # separates it from the planted mixing attention, not from the expanding one.
            assert G.decoupling_check(planted, reading=reading).controls_verdict == "holds"
            assert G.decoupling_check(swapped, reading=reading).controls_verdict != "holds"
    # The mixing update stays in the row space (no row term); the expanding one leaves it.
    assert planted.mean["attn"]["delta_d_row"] < 1e-9 < planted.mean["ffn"]["delta_d_row"]
    # RID alone tells the two apart under the paper's reading too, but the mean-over-rows TME
    # does not: decorrelating tokens whose cosines have both signs pushes every weight
    # (cos + 1)/2 towards 1/2 and *raises* it, so the planted expanding attention scores as
    # the bigger mixer.
    paper_swapped = G.decoupling_check(swapped, reading=G.PAPER_READING)
    assert not paper_swapped.rid_attn_below_ffn and paper_swapped.mixig_attn_above_ffn


def test_readings_pick_their_ffn_reference_variant_and_layers():
    tables = []
    for _ in range(2):
        table = LayerMetricTable()
        for layer, attn_rid in ((0, 0.9), (1, 0.1), (2, 0.1)):
            table.add(layer, "attn", "all", rid=attn_rid, mixig=0.0, mixig_last_row_sharpened=0.2)
            table.add(layer, "ffn", "all", rid=0.05, mixig=0.0, mixig_last_row_sharpened=0.0)
            table.add(layer, "ffn_input", "all", rid=0.3, mixig=0.0,
                      mixig_last_row_sharpened=0.1)
        tables.append(table)
    # Layer 0 dominates the equal-weight mean: attention RID 0.367 over all layers, 0.1 from 1.
    (all_layers, paper), = G.reading_checks(tables, "all", [G.PAPER_READING])
    assert all_layers.mean["attn"]["rid"] == pytest.approx(1.1 / 3)
    assert paper.verdict == "does not hold"
    (_, code), = G.reading_checks(tables, "all", [G.CODE_READING])
    assert code.mixig_attn_above_ffn and not code.rid_attn_below_ffn and code.verdict == "partly"
    later = G.Reading("code, from layer 1", "ffn_input", "ffn", "last_row_sharpened", 1)
    (summary, check), = G.reading_checks(tables, "all", [later])
    assert summary.mean["attn"]["rid"] == pytest.approx(0.1) and check.verdict == "holds"
    with pytest.raises(ValueError, match="starts at layer 5"):
        G.reading_checks(tables, "all", [G.Reading("x", first_layer=5)])
    readings = G.specification_readings()
    assert len(readings) == 24 and len({r.name for r in readings}) == 24
    assert G.verdict_counts([(summary, check)], "verdict") == {"holds": 1}
    assert "FFN (vs X_in)" in G.KIND_LABELS.values()
