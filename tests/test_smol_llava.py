"""smol-llava: the answer-position loss and the teacher-forced check on a tiny toy LLaVA (cheap),
the staged training's determinism and step rule on it (tiny counts), the splits by image; then,
with the cached SmolLM2, the assembled model (decoder bit-identical, LLaVA's prompt order through
SmolLM2's chat format, one image token per patch) and the committed parts (hashes verified, a
corrupt or missing copy refused or rebuilt with a message). The build itself
(``python -m locus.smol_llava --build``) is not run here."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from locus import checkpoints, data, models, real_models, smol_llava, splits, zoo
from locus.evaluation import generate_answers

TINY = smol_llava.SmolLlavaRecipe(vision_width=32, tower_pool=8, tower_steps=3, tower_batch=8,
                                  batch_size=4, align_steps=2, tune_steps=4, eval_every=2,
                                  lora_r=2)  # the build's bfloat16 autocast


def _tiny_samples(n: int, seed: int) -> list:
    return data.make_vqa_samples(n, seed, ("existence", "counting", "text"))


def test_the_answer_position_loss_equals_the_full_logits_loss(make_tiny_vlm):
    model, processor = make_tiny_vlm()
    samples = _tiny_samples(2, seed=3)
    pool = smol_llava.encode_pool(model, processor, samples)
    fast = smol_llava.answer_loss(model, pool.batch, pool.features)
    pixels = processor.image_processor([s.image for s in samples],
                                       return_tensors="pt")["pixel_values"]
    batch = pool.batch
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], pixel_values=pixels).logits
    keep = int(batch["keep"])
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, -keep:-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
        reduction="none").view_as(targets)
    counts = (targets != -100).sum(1)
    assert (counts >= 2).all()  # every answer has a token and the end-of-turn token
    full = (per_token.sum(1) / counts).mean()
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_the_teacher_forced_check_agrees_with_greedy_generation(make_tiny_vlm):
    model, processor = make_tiny_vlm()
    samples = _tiny_samples(3, seed=4)
    pool = smol_llava.encode_pool(model, processor, samples)
    said = generate_answers(model, processor, samples, max_new_tokens=1, progress=False)
    with torch.no_grad():
        first = smol_llava.answer_logits(model, pool.batch, pool.features)[:, 0].argmax(-1)
    tokenizer = processor.tokenizer
    want = [tokenizer(s.answer, add_special_tokens=False).input_ids[0] for s in samples]
    greedy_right = [tokenizer.convert_tokens_to_ids(p) == w if p else False
                    for p, w in zip(said, want, strict=True)]
    assert [int(t) == w for t, w in zip(first, want, strict=True)] == greedy_right
    rates = smol_llava.exact_by_family(model, pool, TINY)
    assert set(rates) == {"existence", "counting", "text"}
    assert all(0 <= r <= 1 for r in rates.values())


def test_the_stages_are_deterministic_and_the_rule_keeps_a_validation_check(make_tiny_vlm):
    torch.set_num_threads(1)
    samples = {"train": _tiny_samples(6, seed=5), "val": _tiny_samples(2, seed=6)}
    runs = []
    for _ in range(2):
        model, processor = make_tiny_vlm()
        adapted, record = smol_llava.train(model, processor, TINY, samples, progress=False)
        runs.append((smol_llava.small_parts(model), record, adapted))
    (parts, record, adapted), (again, repeat, _) = runs
    assert len(record["align_losses"]) == 2
    steps = [c["step"] for c in record["validation_checks"]]
    assert steps[-1] <= 4 and record["chosen_step"] in steps
    for key in ("align_losses", "tune_losses", "validation_checks", "chosen_step"):
        assert record[key] == repeat[key], key
    for name, tensor in parts.items():
        assert torch.equal(tensor, again[name]), name
    lora = [n for n, p in adapted.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)  # the tower gets no adapter


def test_the_pools_are_split_by_image_and_held_out_images_are_never_trained_on():
    recipe = dataclasses.replace(smol_llava.SmolLlavaRecipe(), pool_per_family=40,
                                 val_fraction=0.25)
    found = smol_llava.pools(recipe)
    keys = {k: {smol_llava.image_key(s) for s in v} for k, v in found.items()}
    assert not keys["train"] & keys["val"] and not (keys["train"] | keys["val"]) & keys["test"]
    assert len(found["val"]) == pytest.approx(0.25 * 7 * 40, abs=2)
    assert found["test"][0].question == zoo.held_out_samples("vlm", 200)[0].question
    with pytest.raises(ValueError, match="share"):
        splits.assert_disjoint({"a": found["val"], "b": found["val"][:1]}, smol_llava.image_key)


BASE = smol_llava.SmolLlavaRecipe().base
BASE_STATUS = checkpoints.entry_status(real_models.models_root() / BASE,
                                       real_models.spec(BASE).config())
real = pytest.mark.skipif(BASE_STATUS != "valid",
                          reason=f"needs the converted {BASE} (its cache is {BASE_STATUS}: run "
                                 "the set-up)")
PARTS = smol_llava.parts_folder()
parts = pytest.mark.skipif(not (PARTS / checkpoints.MANIFEST).is_file() or BASE_STATUS != "valid",
                           reason=f"needs the committed parts in {PARTS} and the converted {BASE}")


@pytest.fixture(scope="module")
def assembled():
    torch.set_num_threads(1)
    return smol_llava.build()


@real
def test_the_decoder_is_the_cached_smollm2_bit_for_bit(assembled):
    model, _ = assembled
    base, _ = models.load_checkpoint(real_models.folder(BASE))
    decoder = model.model.language_model.state_dict()
    for name, tensor in base.model.state_dict().items():
        assert torch.equal(decoder[name], tensor), name
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert model.config.text_config.vocab_size == base.config.vocab_size == 49152
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features,
            projector.linear_2.out_features) == (64, 576, 576)


@real
def test_the_image_comes_before_the_question_one_token_per_patch(assembled):
    model, processor = assembled
    sample = data.make_vqa_samples(1, seed=3, families=("spatial",))[0]
    prompt = smol_llava.vqa_prompt(processor, sample.question)
    ids = processor(text=[prompt], images=[sample.image], return_tensors="pt")["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    patches = (data.IMAGE_SIZE // model.config.vision_config.patch_size) ** 2
    assert len(image) == patches == 16
    assert (image.diff() == 1).all()  # one block
    question = processor.tokenizer(sample.question, add_special_tokens=False).input_ids
    text = ids.tolist()
    start = next(i for i in range(len(text)) if text[i:i + len(question)] == question)
    assert image[-1] < start
    assert prompt.endswith("<|im_start|>assistant\n")


@real
def test_a_text_conversation_renders_as_smollm2_renders_it(assembled):
    _, processor = assembled
    original = AutoTokenizer.from_pretrained(real_models.folder(BASE))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    assert (processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=False)
            == original.apply_chat_template(messages, add_generation_prompt=True,
                                            tokenize=False))


@parts
def test_the_committed_parts_verify_by_hash_and_match_the_recipe():
    record = smol_llava.verified_parts()
    assert smol_llava.parts_status() == "valid", "rebuild: python -m locus.smol_llava --build"
    assert set(record["files"]) >= {smol_llava.PARTS_FILE, smol_llava.ADAPTER_FILE}
    assert sum((PARTS / f).stat().st_size for f in record["files"]) < 10e6
    for family in data.VQA_FAMILIES:
        assert record["metrics"][family]["accuracy"]["n"] == 200


@parts
def test_corrupt_or_missing_parts_are_refused_saying_how_to_rebuild(tmp_path, monkeypatch):
    copy_ = tmp_path / "real" / smol_llava.NAME
    shutil.copytree(PARTS, copy_)
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path))
    (copy_ / smol_llava.PARTS_FILE).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="corrupt.*locus.smol_llava --build"):
        smol_llava.verified_parts()
    shutil.rmtree(copy_)
    with pytest.raises(FileNotFoundError, match="no trained parts"):
        smol_llava.folder()


@parts
def test_a_missing_or_corrupt_merged_model_is_merged_from_the_parts_saying_so(tmp_path, capsys):
    torch.set_num_threads(1)
    target = smol_llava.folder(root=tmp_path)
    assert "is missing; merging it from the committed parts" in capsys.readouterr().err
    assert smol_llava.folder(root=tmp_path) == target and not capsys.readouterr().err
    merged = load_file(target / "model.safetensors")
    base = load_file(real_models.folder(BASE) / "model.safetensors")
    adapter = load_file(PARTS / smol_llava.ADAPTER_FILE)
    recipe = smol_llava.recipe_from(smol_llava.verified_parts()["config"]["recipe"])
    prefix = "language_model.model.layers.0.self_attn.q_proj"  # as LLaVA checkpoints save
    lora = {k.split(".lora_")[1]: v for k, v in adapter.items()
            if ".layers.0.self_attn.q_proj." in k}
    delta = recipe.lora_alpha / recipe.lora_r * lora["B.weight"] @ lora["A.weight"]
    torch.testing.assert_close(merged[f"{prefix}.weight"],
                               base["model.layers.0.self_attn.q_proj.weight"] + delta,
                               atol=1e-6, rtol=0)
    assert torch.equal(merged["language_model.model.layers.0.mlp.down_proj.weight"],
                       base["model.layers.0.mlp.down_proj.weight"])  # no adapter there
    parts_ = load_file(PARTS / smol_llava.PARTS_FILE)
    assert torch.equal(merged["multi_modal_projector.linear_1.weight"],
                       parts_["multi_modal_projector.linear_1.weight"])
    (target / "model.safetensors").write_bytes(b"corrupt")
    assert smol_llava.folder(root=tmp_path) == target
    assert "is corrupt; merging it from the committed parts" in capsys.readouterr().err
    model, processor = models.load_checkpoint(target)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.image_token == smol_llava.IMAGE_TOKEN
    assert processor.tokenizer.chat_template == smol_llava.chat_template(recipe.system)


def test_a_stored_recipe_reads_back():
    recipe = smol_llava.SmolLlavaRecipe()
    stored = json.loads(json.dumps(smol_llava.parts_config(recipe)))["recipe"]
    assert smol_llava.recipe_from(stored) == recipe
