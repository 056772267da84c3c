"""locus.spatial: the relation parser agrees with the data's own answers, the data report and
the question-only baseline count what they say, probes read what is there and nothing more,
and the stage features are the tensors of one forward pass."""

import numpy as np
import pytest
import torch

from locus import data, models, spatial, training, zoo
from locus.data import Scene, VQASample


@pytest.fixture(scope="module")
def spatial_samples():
    return data.make_vqa_samples(300, 7, ("spatial",))


def test_relation_parts_give_the_datas_answers(spatial_samples):
    rels = [(s, spatial.relation_parts(s)) for s in spatial_samples]
    rels = [(s, r) for s, r in rels if r is not None]
    assert len(rels) > 150
    assert all(spatial.relation_holds(r) == (s.answer == "yes") for s, r in rels)
    forms = {spatial.spatial_form(s) for s in spatial_samples}
    assert forms == {"where", "left of", "right of", "above", "below"}


def test_relation_parts_refuse_an_object_not_in_the_scene():
    sample = VQASample(np.zeros((32, 32, 3), np.uint8), "is the red square left of the blue "
                       "circle ?", "yes", "spatial", {"objects": [(0, 0, "red", "square")]})
    with pytest.raises(ValueError, match="not in its scene"):
        spatial.relation_parts(sample)


def test_data_report_counts(spatial_samples):
    report = spatial.data_report(spatial_samples)
    assert sum(f["n"] for f in report["forms"].values()) == len(spatial_samples)
    rels = [r for r in map(spatial.relation_parts, spatial_samples) if r is not None]
    assert report["relation_questions"] == len(rels)
    assert report["same_column_rate"] == pytest.approx(np.mean([r.a[1] == r.b[1] for r in rels]))
    assert 0.35 < report["question_only"]["relation"]["accuracy"]["rate"] < 0.65
    assert report["question_only"]["where"]["accuracy"]["rate"] < 0.45  # four answers
    assert report["order_shortcut"]["vertical"] > 0.85 > report["order_shortcut"]["horizontal"]


def test_question_only_baseline_finds_a_question_that_gives_its_answer_away():
    image = np.zeros((32, 32, 3), np.uint8)
    leaky = [VQASample(image + i, f"is the red square {r} the blue circle ?",
                       "yes" if r == "above" else "no", "spatial", {})
             for i in range(40) for r in ("above", "below")]
    found = spatial.question_only_baseline(leaky[:40], leaky[40:])
    assert found["accuracy"]["rate"] == 1.0 and found["test_questions_seen_in_train"] == 1.0


def test_probe_reads_a_linear_label_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    groups = [i // 3 for i in range(600)]
    readable = spatial.probe(x, (x[:, 2] > 0).long(), groups)
    assert readable.accuracy["rate"] > 0.95 and readable.converged
    assert readable.n_train + readable.n_test == 600
    noise = spatial.probe(x, torch.randint(0, 2, (600,), generator=gen), groups)
    assert noise.accuracy["hi"] > 0.5 - 0.02 and noise.accuracy["rate"] < 0.62


def test_probe_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="N groups"):
        spatial.probe(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), [0, 1])


def test_patch_pixels_are_the_cells_in_reading_order():
    pixels = torch.arange(2 * 3 * 32 * 32, dtype=torch.float).reshape(2, 3, 32, 32)
    patches = spatial.patch_pixels(pixels)
    assert patches.shape == (2, 16, 192)
    cell = 1 * 4 + 2  # row 1, column 2
    assert torch.equal(patches[1, cell], pixels[1, :, 8:16, 16:24].reshape(-1))


def test_coordinate_question_answers_the_named_objects_place():
    rng = np.random.default_rng(0)
    scene = Scene([(2, 1, "red", "square"), (0, 3, "blue", "circle"), (0, 2, "blue", "circle")])
    for _ in range(20):
        question, answer, meta = spatial.coordinate_question(scene, rng)
        assert "red square" in question  # the only uniquely named object
        assert answer == data.NUMBER_WORDS[1 if "x of" in question else 2]
        assert spatial.spatial_form(VQASample(None, question, answer, "spatial")) == meta["form"]


@pytest.fixture(scope="module")
def tiny_vlm():
    training.seed_everything(0)
    cfg = models.ToyVLMConfig(text_layers=2)
    return models.build_toy_vlm(cfg)


def test_stage_features_are_one_forward_pass(tiny_vlm, spatial_samples):
    model, processor = tiny_vlm
    chosen = spatial_samples[:5]
    feats = spatial.stage_features(model, processor, chosen, batch_size=2, progress=False)
    assert spatial.decoder_layers(feats) == 3
    from locus.prompts import encode_vqa
    batch = encode_vqa(processor, chosen)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        tower = model.model.vision_tower(batch["pixel_values"]).last_hidden_state[:, 1:]
    where = batch["input_ids"] == model.config.image_token_id
    assert torch.allclose(feats["tower"], tower, atol=1e-5)
    assert torch.allclose(feats["visual.2"], out.hidden_states[2][where].reshape(5, 16, -1),
                          atol=1e-5)
    assert torch.allclose(feats["answer.1"], out.hidden_states[1][:, -1], atol=1e-5)
    assert feats["projector"].shape == (5, 16, model.config.text_config.hidden_size)


def test_patch_probes_find_place_in_the_tower_and_not_in_pixels(spatial_samples):
    model, processor = zoo.load("toy-vlm", progress=False)
    feats = spatial.stage_features(model, processor, spatial_samples[:150], progress=False)
    found = spatial.patch_probes(feats, spatial_samples[:150], ["pixels", "tower"])
    assert found["tower"]["col"]["accuracy"]["rate"] > 0.9
    assert found["pixels"]["col"]["accuracy"]["rate"] < 0.5  # a cell's content has no place


def test_coordinate_samples_ask_about_unique_objects_only():
    found = spatial.coordinate_samples(80, 1)
    assert len(found) == 80 and {s.family for s in found} == {"spatial"}
    for s in found:
        names = [(c, sh) for *_, c, sh in s.meta["objects"]]
        assert len(set(names)) == len(names)
        axis, colour, shape = s.question.split()[3], *s.question.split()[-3:-1]
        row, col = next((r, c) for r, c, co, sh in s.meta["objects"] if (co, sh) == (colour, shape))
        assert s.answer == data.NUMBER_WORDS[col if axis == "x" else row]


def test_accuracy_by_shortcut_separates_a_model_that_follows_token_order(spatial_samples):
    rels = [(s, spatial.relation_parts(s)) for s in spatial_samples]
    chosen = [s for s, r in rels if r is not None]
    follows_order = [spatial.order_shortcut([spatial.relation_parts(s)]) == 1.0 for s in chosen]
    found = spatial.accuracy_by_shortcut(chosen, follows_order)
    for axis in ("horizontal", "vertical"):
        assert found[axis]["shortcut right"]["rate"] == 1.0
        assert found[axis]["shortcut wrong"]["rate"] == 0.0
    by_form = spatial.accuracy_by_form(chosen, follows_order)
    assert set(by_form) == {"left of", "right of", "above", "below"}
    assert by_form["above"]["rate"] > 0.8 > by_form["left of"]["rate"]


def test_reordered_visual_tokens_permute_each_images_tokens_only_inside_the_block(tiny_vlm):
    model, _ = tiny_vlm
    projector = model.model.multi_modal_projector
    x = torch.randn(3, 16, projector.linear_1.in_features)
    with torch.no_grad():
        plain = projector(x)
        with spatial.reordered_visual_tokens(model, "random", seed=0):
            shuffled = projector(x)
        with spatial.reordered_visual_tokens(model, "column-major"):
            columns = projector(x)
        after = projector(x)
    assert torch.equal(after, plain)
    assert not torch.equal(shuffled, plain)
    for i in range(3):  # the same rows of the same image, reordered
        order = [int((plain[i] == row).all(1).nonzero()) for row in shuffled[i]]
        assert sorted(order) == list(range(16))
    assert torch.equal(columns[:, 1], plain[:, 4])  # second token: row 1, column 0
    assert torch.equal(columns[:, 4], plain[:, 1])  # fifth token: row 0, column 1
    with pytest.raises(ValueError, match="accepted"):
        with spatial.reordered_visual_tokens(model, "diagonal"):
            pass


def test_where_words_score_the_row_and_the_column_apart(spatial_samples):
    where = [s for s in spatial_samples if spatial.spatial_form(s) == "where"]
    rows_only = [s.answer.split()[0] + (" right" if "left" in s.answer else " left")
                 for s in where]
    found = spatial.where_words(where, rows_only)
    assert found["row word"]["rate"] == 1.0 and found["column word"]["rate"] == 0.0
    assert spatial.where_words(where, [""] * len(where))["row word"]["rate"] == 0.0


def test_two_orders_hold_each_image_twice_the_second_column_major(tiny_vlm, spatial_samples):
    model, processor = tiny_vlm
    chosen = spatial_samples[:3]
    batch = spatial.encode_two_orders(processor, chosen, with_answers=True)
    image_id = model.config.image_token_id
    assert ((batch["input_ids"] == image_id).sum(1) == 32).all()
    assert batch["pixel_values"].shape[:2] == (3, 2)
    assert spatial.paired_images(batch)["pixel_values"].shape[0] == 6
    projector = model.model.multi_modal_projector
    x = torch.randn(4, 16, projector.linear_1.in_features)
    with torch.no_grad():
        plain = projector(x)
        with spatial.reordered_visual_tokens(model, "both"):
            both = projector(x)
            with pytest.raises(ValueError, match="twice"):
                projector(x[:3])
    assert torch.equal(both[0::2], plain[0::2])
    assert torch.equal(both[1::2, 1], plain[1::2, 4]) and torch.equal(both[1::2, 4], plain[1::2, 1])
    said = spatial.spatial_answers(model, processor, chosen, progress=False, visual_order="both")
    assert len(said) == 3 and all(isinstance(a, str) for a in said)
