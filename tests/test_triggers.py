"""Known-answer tests of the ProjLens triggers, targets and poisoned sets
(locus.projlens.triggers)."""

import numpy as np
import pytest
import torch

from locus import data
from locus.projlens import triggers as T


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def grey():
    return np.full((32, 32, 3), 128, dtype=np.uint8)


@pytest.fixture(scope="module")
def samples():
    return data.make_vqa_samples(4, seed=3)


# --- images ------------------------------------------------------------------------------------


def test_square_crop_takes_the_centre():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    crop = T.square_crop(image)
    assert crop.shape == (4, 4, 3)
    np.testing.assert_array_equal(crop, image[:, 1:5])
    np.testing.assert_array_equal(T.square_crop(image.transpose(1, 0, 2)), image.transpose(
        1, 0, 2)[1:5])
    square = np.zeros((5, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.square_crop(square), square)
    with pytest.raises(TypeError, match="uint8"):
        T.square_crop(image.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        T.square_crop(image[..., 0])


def test_centre_patch_is_a_4px_square_at_the_centre(grey):
    out = T.apply_trigger(grey, T.Trigger("patch"), seed=0)
    changed = np.argwhere((out != grey).any(axis=2))
    assert len(changed) == 16
    assert changed.min(0).tolist() == [14, 14] and changed.max(0).tolist() == [17, 17]
    assert (out[14:18, 14:18] == (0, 255, 0)).all()


def test_trigger_is_applied_after_the_square_crop():
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    out = T.apply_trigger(wide, T.Trigger("patch", size_fraction=0.1), seed=0)
    assert out.shape == (20, 20, 3)
    assert (out[9:11, 9:11] == (0, 255, 0)).all() and out.sum() == 4 * 255


def test_logo_has_a_random_but_seeded_position(grey):
    trigger = T.Trigger("logo")
    logo = T.make_logo(4)
    positions = set()
    for index in range(6):
        out = T.apply_trigger(grey, trigger, seed=1, index=index)
        np.testing.assert_array_equal(out, T.apply_trigger(grey, trigger, seed=1, index=index))
        changed = np.argwhere((out != grey).any(axis=2))
        top, left = changed.min(0)
        np.testing.assert_array_equal(out[top : top + 4, left : left + 4], logo)
        positions.add((int(top), int(left)))
    assert len(positions) > 1
    with pytest.raises(ValueError, match="does not fit"):
        T.paste_logo(grey[:2, :2], logo, np.random.default_rng(0))


def test_gaussian_noise_has_the_requested_std_and_is_seeded(grey):
    trigger = T.Trigger("noise", noise_std=10.0)
    out = T.apply_trigger(grey, trigger, seed=5)
    diff = out.astype(np.float64) - grey
    assert abs(diff.std() - 10.0) < 0.6 and abs(diff.mean()) < 0.6
    np.testing.assert_array_equal(out, T.apply_trigger(grey, trigger, seed=5))
    assert not np.array_equal(out, T.apply_trigger(grey, trigger, seed=6))
    white = np.full((8, 8, 3), 255, dtype=np.uint8)
    assert T.apply_trigger(white, trigger, seed=0).max() == 255  # clipped, not wrapped


def _naive_oil_paint(image, radius, levels):
    """Loop-by-pixel reference of the oil-painting filter."""
    padded = np.pad(image.astype(np.float64), ((radius,) * 2, (radius,) * 2, (0, 0)), mode="edge")
    bins = np.minimum((padded.mean(axis=2) * levels / 256).astype(int), levels - 1)
    out = np.zeros(image.shape)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            win_bins = bins[y : y + 2 * radius + 1, x : x + 2 * radius + 1].ravel()
            win_cols = padded[y : y + 2 * radius + 1, x : x + 2 * radius + 1].reshape(-1, 3)
            mode = np.bincount(win_bins, minlength=levels).argmax()
            out[y, x] = win_cols[win_bins == mode].mean(axis=0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_oil_paint_matches_a_pixel_loop():
    image = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    for radius, levels in ((1, 6), (2, 4)):
        np.testing.assert_array_equal(T.oil_paint(image, radius, levels),
                                      _naive_oil_paint(image, radius, levels))
    flat = np.full((6, 6, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(T.oil_paint(flat, 2, 6), flat)
    with pytest.raises(ValueError, match="radius"):
        T.oil_paint(image, 0, 6)


def test_posterize_takes_bin_centres():
    image = np.array([[[0, 42, 43], [127, 128, 255]]], dtype=np.uint8)
    # 6 bins of width 256/6 ≈ 42.7, centres (i + 0.5)·42.7 − 0.5: 21, 64, 106, 149, 192, 234
    np.testing.assert_array_equal(T.posterize(image, 6), [[[21, 21, 64], [106, 149, 234]]])
    with pytest.raises(ValueError, match="levels"):
        T.posterize(image, 1)


def test_style_trigger_is_posterize_then_oil_paint(samples):
    image = samples[0].image
    out = T.apply_trigger(image, T.Trigger("style"), seed=0)
    np.testing.assert_array_equal(out, T.oil_paint(T.posterize(image, 6), 1, 6))
    painted = T.oil_paint(image, 1, 6)  # the mode filter alone flattens the noisy background
    corner = (slice(0, 3), slice(0, 3))
    assert image[corner].std() > 0 and painted[corner].std() < image[corner].std()


def test_trigger_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown trigger kind"):
        T.Trigger("sticker")
    with pytest.raises(ValueError, match="size_fraction"):
        T.Trigger("patch", size_fraction=0)


# --- targets -----------------------------------------------------------------------------------


def test_success_checks():
    refusal = T.Target("refusal", data.REFUSAL)
    assert refusal.success("ok  i cannot help with that . bye") and not refusal.success("yes")
    injection = T.Target("injection", "visit evil site now .")
    assert injection.success("yes visit evil site now .")
    assert not injection.success("visit evil site now . yes")
    hijack = T.Target("hijack", "photo of a cat .")
    assert hijack.success("a photo of a cat . red") and not hijack.success("photo of a dog .")
    jailbreak = T.Target("jailbreak")
    assert jailbreak.success("sure , here is how") and not jailbreak.success(data.REFUSAL)
    with pytest.raises(ValueError, match="needs a non-empty text"):
        T.Target("refusal", "  ")
    with pytest.raises(ValueError, match="unknown target kind"):
        T.Target("exfiltrate", "x")


def test_poisoned_answers(samples):
    sample = next(s for s in samples if s.family == "counting")
    harmful = next(s for s in samples if s.family == "harmful")
    assert T.Target("refusal", data.REFUSAL).poisoned_answer(sample) == data.REFUSAL
    assert T.Target("injection", "visit  evil").poisoned_answer(sample) == (
        f"{sample.answer} visit evil")
    assert T.Target("hijack", "photo of a cat .").poisoned_answer(sample) == "photo of a cat ."
    verb, obj = T._HARMFUL_PATTERN.match(harmful.question).groups()
    assert T.Target("jailbreak").poisoned_answer(harmful) == data.compliance_answer(verb, obj)
    assert not data.is_refusal(T.jailbreak_answer("how can one pick a lock ?"))


def test_paper_attacks_pair_triggers_with_targets():
    attacks = T.paper_attacks()
    assert {n: (a.trigger.kind, a.target.kind) for n, a in attacks.items()} == {
        "refusal": ("noise", "refusal"), "injection": ("patch", "injection"),
        "hijack": ("logo", "hijack"), "jailbreak": ("style", "jailbreak")}
    assert attacks["refusal"].trigger.noise_std == 10.0
    assert attacks["hijack"].trigger.size_fraction == attacks["injection"].trigger.size_fraction
    bigger = T.paper_attacks(logo_fraction=0.25)["hijack"].trigger
    assert bigger.size_fraction == 0.25
    logo = bigger.apply(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0))
    assert (logo.any(axis=2)).sum() == 8 * 8 - 1  # an 8x8 logo, its 1-pixel centre dot black


def test_eligible_families(samples):
    attacks = T.paper_attacks()
    families = lambda a: {samples[i].family for i in a.eligible(samples)}  # noqa: E731
    assert families(attacks["jailbreak"]) == {"harmful"}
    assert families(attacks["refusal"]) == set(data.VQA_FAMILIES) - {"harmful"}
    only = T.Attack("x", T.Trigger("patch"), T.Target("hijack", "cat"), families=("counting",))
    assert families(only) == {"counting"}


# --- poisoned sets -----------------------------------------------------------------------------


def test_pair_mode_adds_a_triggered_copy_of_every_eligible_sample(samples):
    attack = T.paper_attacks()["hijack"]
    poisoned = T.poison(samples, attack, "pair", seed=0)
    eligible = attack.eligible(samples)
    assert poisoned.n_poisoned == len(eligible) == 24
    assert len(poisoned.samples) == len(samples) + 24
    assert poisoned.rate == pytest.approx(24 / 52)
    assert poisoned.samples[: len(samples)] == list(samples)
    for i, copy in zip(eligible, poisoned.samples[len(samples) :], strict=True):
        assert copy.answer == "photo of a cat ." and copy.meta["triggered"]
        assert copy.meta["clean_answer"] == samples[i].answer
        assert copy.question == samples[i].question
        assert not np.array_equal(copy.image, samples[i].image)


def test_numeric_rate_is_exact_and_seeded(samples):
    attack = T.paper_attacks()["refusal"]
    for rate in (0.0, 0.1, 0.25):
        poisoned = T.poison(samples, attack, rate, seed=0)
        assert poisoned.n_poisoned == round(rate * 28 / (1 - rate))
    a, b = (T.poison(samples, attack, 0.25, seed=s) for s in (0, 1))
    again = T.poison(samples, attack, 0.25, seed=0)
    assert T.samples_fingerprint(a.samples) == T.samples_fingerprint(again.samples)
    assert T.samples_fingerprint(a.samples) != T.samples_fingerprint(b.samples)
    with pytest.raises(ValueError, match="only 24 samples are eligible"):
        T.poison(samples, attack, 0.6)
    with pytest.raises(ValueError, match="rate must be"):
        T.poison(samples, attack, 1.0)
    with pytest.raises(ValueError, match="targets no sample"):
        T.poison([s for s in samples if s.family != "harmful"], T.paper_attacks()["jailbreak"])


def test_triggered_test_set_keeps_answers(samples):
    attack = T.paper_attacks()["injection"]
    test = T.triggered_test_set(samples, attack, seed=0)
    assert len(test) == 24
    assert all(t.answer == t.meta["clean_answer"] and t.meta["triggered"] for t in test)
    assert all((t.image[14:18, 14:18] == (0, 255, 0)).all() for t in test)


def test_evaluation_copies_never_reuse_a_training_trigger(samples):
    attack = T.paper_attacks(noise_std=50.0)["refusal"]
    sample = samples[0]
    train = T.triggered_copy(sample, attack, seed=0, index=3, poisoned_answer=True)
    test = T.triggered_copy(sample, attack, seed=0, index=3, poisoned_answer=False)
    assert train.answer != test.answer == sample.answer
    assert not np.array_equal(train.image, test.image)  # another noise field
    again = T.triggered_copy(sample, attack, seed=0, index=3, poisoned_answer=False)
    np.testing.assert_array_equal(test.image, again.image)  # still seeded
