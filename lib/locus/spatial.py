"""Where a VLM loses the spatial family's information: the data's own statistics, and linear
probes of an object's row and column, and of a relation's answer, from the features of each
stage (patch pixels, vision tower, projector, every decoder layer at the visual tokens and at
the answer position), trained and scored on images split apart.

A relation question "is the <a> <relation> the <b> ?" needs the columns (left / right) or rows
(above / below) of two named objects compared. ``relation_parts`` recovers a, b and the
relation from a sample; ``data_report`` measures label balance, the pairs for which neither
horizontal relation holds, and a question-only baseline; ``stage_features`` captures every
stage in one forward pass; ``probe`` fits a softmax probe to a stated convergence rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from peft import get_peft_model
from torch import nn
from tqdm import tqdm

from locus import data, models, prompts, smol_llava, splits, stats, training
from locus.data import VQASample
from locus.evaluation import exact_match, generate_answers
from locus.prompts import encode_vqa, to_model

RELATION_RE = re.compile(r"^is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?$")
COORDINATE_RE = re.compile(r"^what is the ([xy]) of the \w+ \w+ \?$")
HORIZONTAL = ("left of", "right of")
VERTICAL = ("above", "below")
PROXY_FORMS = ("where", *HORIZONTAL, *VERTICAL, "coordinate x", "coordinate y")


@dataclass(frozen=True)
class Relation:
    """A relation question's parts: the two named objects (row, col, colour, shape)."""

    a: tuple[int, int, str, str]
    b: tuple[int, int, str, str]
    relation: str


def relation_parts(sample: VQASample) -> Relation | None:
    """The objects and relation of a spatial relation question (None for any other question);
    a named object absent from the sample's scene is an error."""
    found = RELATION_RE.match(sample.question)
    if found is None:
        return None
    ca, sa, relation, cb, sb = found.groups()
    by_name = {(o[2], o[3]): tuple(o) for o in sample.meta["objects"]}
    missing = {n for n in ((ca, sa), (cb, sb)) if n not in by_name}
    if missing:
        raise ValueError(f"question {sample.question!r} names {sorted(missing)}, not in its scene")
    return Relation(by_name[ca, sa], by_name[cb, sb], relation)


def relation_holds(rel: Relation, relation: str | None = None) -> bool:
    """Whether ``relation`` (default: the asked one) holds between a and b (by cell)."""
    (ra, ca), (rb, cb) = rel.a[:2], rel.b[:2]
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb,
            "below": ra > rb}[relation or rel.relation]


def spatial_form(sample: VQASample) -> str:
    """A spatial question's form, from its text alone: the relation asked ("left of", ...),
    "coordinate x" / "y" (``coordinate_question``) or "where"."""
    relation = RELATION_RE.match(sample.question)
    if relation is not None:
        return relation.group(3)
    found = COORDINATE_RE.match(sample.question)
    return f"coordinate {found.group(1)}" if found else "where"


def question_only_baseline(train: Sequence[VQASample], test: Sequence[VQASample]) -> dict:
    """Accuracy on ``test`` of answering from the question alone: the training split's
    majority answer for the same question string, else for the same form, else overall."""
    by_question: dict[str, Counter] = {}
    by_form: dict[str, Counter] = {}
    for s in train:
        by_question.setdefault(s.question, Counter())[s.answer] += 1
        by_form.setdefault(spatial_form(s), Counter())[s.answer] += 1
    overall = Counter(s.answer for s in train)
    seen, hits = 0, []
    for s in test:
        counts = by_question.get(s.question) or by_form.get(spatial_form(s)) or overall
        seen += s.question in by_question
        hits.append(counts.most_common(1)[0][0] == s.answer)
    return {"accuracy": stats.rate_record(hits), "test_questions_seen_in_train": seen / len(test)}


def order_shortcut(rels: Sequence[Relation]) -> float:
    """The accuracy of answering from the visual tokens' order alone: "a comes before b in the
    row-major sequence" read as "a is left of / above b" (what a decoder that compares token
    positions, not columns, would answer)."""
    if not rels:
        raise ValueError("order_shortcut needs relation questions")
    hits = [((r.a[0] * data.GRID + r.a[1] < r.b[0] * data.GRID + r.b[1])
             == (r.relation in ("left of", "above"))) == relation_holds(r) for r in rels]
    return float(np.mean(hits))


def data_report(samples: Sequence[VQASample], seed: int = 0) -> dict:
    """The spatial family's data: count and yes-rate per form, how often a relation pair
    shares a column or a row (then both horizontal, or both vertical, relations are false),
    the accuracy of the token-order shortcut per axis (``order_shortcut``), and a
    question-only baseline (split by image, half and half)."""
    spatial = [s for s in samples if s.family == "spatial"]
    if not spatial:
        raise ValueError("data_report needs spatial samples")
    forms: dict[str, dict] = {}
    for form in ("where", *HORIZONTAL, *VERTICAL):
        chosen = [s for s in spatial if spatial_form(s) == form]
        answers = Counter(s.answer for s in chosen)
        forms[form] = {"n": len(chosen), "answers": dict(sorted(answers.items()))}
    rels = [r for r in map(relation_parts, spatial) if r is not None]
    same_col = [r.a[1] == r.b[1] for r in rels]
    same_row = [r.a[0] == r.b[0] for r in rels]
    train, test = splits.split_by_group(spatial, smol_llava.image_key, (0.5, 0.5), seed)
    return {
        "n_spatial": len(spatial), "forms": forms,
        "relation_questions": len(rels),
        "same_column_rate": float(np.mean(same_col)),
        "same_row_rate": float(np.mean(same_row)),
        "order_shortcut": {axis: order_shortcut([r for r in rels if r.relation in names])
                           for axis, names in (("horizontal", HORIZONTAL),
                                               ("vertical", VERTICAL))},
        "question_only": {
            kind: question_only_baseline([s for s in train if keep(s)],
                                         [s for s in test if keep(s)])
            for kind, keep in (("relation", lambda s: relation_parts(s) is not None),
                               ("where", lambda s: spatial_form(s) == "where"))},
    }


def patch_pixels(pixel_values: torch.Tensor, patch: int = data.CELL) -> torch.Tensor:
    """(N, 3, H, W) pixels as (N, patches, 3*patch*patch), patches in row-major order."""
    n, c, h, w = pixel_values.shape
    cut = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return cut.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), -1)


@torch.no_grad()
def stage_features(model, processor, samples: Sequence[VQASample], batch_size: int = 32,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """Every stage's features of a LLaVA model on ``samples``, one forward pass a batch:
    "pixels" and "tower" and "projector" (N, patches, width) per patch, and for each decoder
    residual layer L (0 = embeddings) "visual.L" (N, patches, width) at the image tokens and
    "answer.L" (N, width) at the last prompt position (where the answer is read out)."""
    if not samples:
        raise ValueError("stage_features needs samples")
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    image_id = model.config.image_token_id
    caught: dict[str, torch.Tensor] = {}

    def keep_tower(_module, _inputs, output) -> None:
        caught["tower"] = output.hidden_states[layer][:, 1:]

    out: dict[str, list[torch.Tensor]] = {}
    handle = tower.register_forward_hook(keep_tower)
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="stage features",
                          disable=not progress):
            batch = to_model(encode_vqa(processor, samples[start:start + batch_size]), model)
            result = model(**batch, output_hidden_states=True)
            where = batch["input_ids"] == image_id
            n = where.shape[0]
            found = {"pixels": patch_pixels(batch["pixel_values"]), "tower": caught["tower"],
                     "projector": result.image_hidden_states.reshape(n, -1,
                                                                     result.hidden_states[0].shape[-1])}
            for i, hidden in enumerate(result.hidden_states):
                found[f"visual.{i}"] = hidden[where].reshape(n, -1, hidden.shape[-1])
                found[f"answer.{i}"] = hidden[:, -1]
            for k, v in found.items():
                out.setdefault(k, []).append(v.float().cpu())
    finally:
        handle.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def decoder_layers(features: dict[str, torch.Tensor]) -> int:
    """The number of decoder residual layers in ``stage_features``'s output."""
    return sum(k.startswith("answer.") for k in features)


@dataclass(frozen=True)
class ProbeResult:
    """A probe's held-out accuracy (Wilson interval), the majority-class rate of its test set
    (chance), and whether its optimisation met the convergence rule."""

    accuracy: dict
    chance: float
    n_train: int
    n_test: int
    converged: bool

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "chance": self.chance, "n_train": self.n_train,
                "n_test": self.n_test, "converged": self.converged}


def probe(x: torch.Tensor, y: torch.Tensor, groups: Sequence, seed: int = 0,
          test_fraction: float = 0.3, weight_decay: float = 1e-3, max_iter: int = 500,
          tolerance: float = 1e-6) -> ProbeResult:
    """A linear softmax probe of labels ``y`` (N,) from features ``x`` (N, width), trained on
    the rows whose ``groups`` (e.g. image keys) fall in the training split and scored on the
    rest (disjoint by group). Features are standardised by the training rows; the L2-penalised
    cross-entropy is minimised by L-BFGS until the loss changes by under ``tolerance`` between
    steps (``converged``) or ``max_iter`` steps."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(groups) != len(y):
        raise ValueError(f"probe needs x (N, width), y (N,) and N groups; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {len(groups)}")
    rows = list(range(len(y)))
    train, test = splits.split_by_group(rows, lambda i: groups[i],
                                        (1 - test_fraction, test_fraction), seed)
    if not train or not test:
        raise ValueError("probe's split left no training or no test rows; add groups")
    train_i, test_i = torch.tensor(train), torch.tensor(test)
    classes, y_ids = torch.unique(y, return_inverse=True)
    x = x.double()
    mean, std = x[train_i].mean(0), x[train_i].std(0).clamp(min=1e-6)
    z = (x - mean) / std
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], len(classes)).double()
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=1,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (nn.functional.cross_entropy(head(z[train_i]), y_ids[train_i])
                + weight_decay * head.weight.pow(2).sum())
        loss.backward()
        return loss

    previous, converged = float("inf"), False
    for _ in range(max_iter):
        loss = optimiser.step(objective).item()
        if abs(previous - loss) < tolerance:
            converged = True
            break
        previous = loss
    with torch.no_grad():
        hits = (head(z[test_i]).argmax(1) == y_ids[test_i]).tolist()
    chance = Counter(y_ids[test_i].tolist()).most_common(1)[0][1] / len(test)
    return ProbeResult(stats.rate_record(hits), chance, len(train), len(test), converged)


def object_patch_targets(samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
    """One row per object of every sample: "sample" index, "patch" index (row-major cell),
    its "row" and "col"."""
    rows = [(i, r * data.GRID + c, r, c) for i, s in enumerate(samples)
            for r, c, *_ in s.meta["objects"]]
    table = torch.tensor(rows, dtype=torch.long)
    return {k: table[:, j] for j, k in enumerate(("sample", "patch", "row", "col"))}


def patch_probes(features: dict[str, torch.Tensor], samples: Sequence[VQASample],
                 stages: Sequence[str], seed: int = 0) -> dict[str, dict[str, dict]]:
    """Per stage, probes of the row and the column of each object from the features of the
    patch holding it (split by image)."""
    t = object_patch_targets(samples)
    groups = [smol_llava.image_key(samples[i]) for i in t["sample"].tolist()]
    out = {}
    for stage in stages:
        x = features[stage][t["sample"], t["patch"]]
        out[stage] = {k: probe(x, t[k], groups, seed).as_dict() for k in ("row", "col")}
    return out


def occupancy(samples: Sequence[VQASample]) -> torch.Tensor:
    """(N, cells) 1 where a sample's scene has an object, in row-major cell order."""
    out = torch.zeros(len(samples), data.GRID * data.GRID)
    for i, s in enumerate(samples):
        for r, c, *_ in s.meta["objects"]:
            out[i, r * data.GRID + c] = 1
    return out


def answer_targets(samples: Sequence[VQASample]) -> dict[str, dict[str, torch.Tensor]]:
    """For the relation questions among ``samples``, split by axis ("horizontal", "vertical",
    "all"): the row indices into ``samples`` ("index"), the answer (1 = yes), and the two
    objects' columns and rows."""
    out = {}
    rels = [(i, relation_parts(s)) for i, s in enumerate(samples)]
    rels = [(i, r) for i, r in rels if r is not None]
    for axis, names in (("horizontal", HORIZONTAL), ("vertical", VERTICAL),
                        ("all", HORIZONTAL + VERTICAL)):
        chosen = [(i, r) for i, r in rels if r.relation in names]
        out[axis] = {
            "index": torch.tensor([i for i, _ in chosen], dtype=torch.long),
            "answer": torch.tensor([relation_holds(r) for _, r in chosen], dtype=torch.long),
            "col_a": torch.tensor([r.a[1] for _, r in chosen], dtype=torch.long),
            "col_b": torch.tensor([r.b[1] for _, r in chosen], dtype=torch.long),
            "row_a": torch.tensor([r.a[0] for _, r in chosen], dtype=torch.long),
            "row_b": torch.tensor([r.b[0] for _, r in chosen], dtype=torch.long),
        }
    return out


def answer_probes(features: dict[str, torch.Tensor], samples: Sequence[VQASample],
                  seed: int = 0) -> dict[str, dict[str, dict]]:
    """Per decoder layer, probes at the answer position of relation questions: the answer of
    horizontal and of vertical questions, and the named objects' columns and rows (split by
    image); and, as "occupancy", the same probes from the scene's occupied cells alone, which
    read a named object's place only as far as the scene narrows it down without the name."""
    targets = answer_targets(samples)
    out = {}
    layers = [f"answer.{layer}" for layer in range(decoder_layers(features))]
    scenes = {"occupancy": occupancy(samples)}  # the reference that binds no name
    for name in [*layers, "occupancy"]:
        x = features[name] if name in features else scenes[name]
        found = {}
        for axis in ("horizontal", "vertical"):
            t = targets[axis]
            groups = [smol_llava.image_key(samples[i]) for i in t["index"].tolist()]
            found[f"answer_{axis}"] = probe(x[t["index"]], t["answer"], groups, seed).as_dict()
        t = targets["all"]
        groups = [smol_llava.image_key(samples[i]) for i in t["index"].tolist()]
        for k in ("col_a", "col_b", "row_a", "row_b"):
            found[k] = probe(x[t["index"]], t[k], groups, seed).as_dict()
        out[name] = found
    return out


def coordinate_question(scene: data.Scene, rng: np.random.Generator) -> tuple[str, str, dict]:
    """A coordinate question in the toy world's own words: "what is the x of the <c> <s> ?"
    (its column, a number word) or "... y ..." (its row), about a uniquely named object: the
    dense supervision of retrieving a named object's place that a relation's yes/no lacks."""
    names = [(c, s) for *_, c, s in scene.objects]
    named = [o for o in scene.objects if names.count((o[2], o[3])) == 1]
    if not named:
        raise ValueError("a coordinate question needs a uniquely named object in the scene")
    row, col, colour, shape = named[int(rng.integers(len(named)))]
    axis = "x" if rng.random() < 0.5 else "y"
    answer = data.NUMBER_WORDS[col if axis == "x" else row]
    return f"what is the {axis} of the {colour} {shape} ?", answer, {"form": f"coordinate {axis}"}


def coordinate_samples(n: int, seed: int) -> list[VQASample]:
    """``n`` coordinate questions (``coordinate_question``) on scenes of 2..MAX_OBJECTS
    objects, no two of one colour and shape, deterministic in ``seed``; family "spatial"."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = data.random_scene(rng, int(rng.integers(2, data.MAX_OBJECTS + 1)))
        if len({(c, s) for *_, c, s in scene.objects}) < len(scene.objects):
            continue  # a repeated name: the spatial family asks only about unique ones
        question, answer, meta = coordinate_question(scene, rng)
        out.append(VQASample(data.draw_scene(scene, rng), question, answer, "spatial",
                             {**meta, "objects": scene.objects}))
    return out


def toy_vlm_with_tower(source) -> tuple:
    """A fresh toy VLM (projector and decoder newly initialised; seed torch first) carrying
    ``source``'s vision tower: the proxy that retrains only what follows the tower."""
    model, processor = models.build_toy_vlm()
    model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())
    return model, processor


VISUAL_ORDERS = ("random", "column-major", "both")


@contextmanager
def reordered_visual_tokens(model, order: str, seed: int = 0):
    """Within the block, each image's projected patch tokens reach the decoder in another
    order: "random" (seeded, per image), so the token order carries no place and only the
    features do; "column-major", the cells read column by column, so the token order
    follows columns where LLaVA's row-major order follows rows; "both", for prompts that
    hold each image twice (``encode_two_orders``): the first copy row-major, the second
    column-major, so the token order follows both axes."""
    if order not in VISUAL_ORDERS:
        raise ValueError(f"unknown visual token order {order!r}; accepted: {VISUAL_ORDERS}")
    gen = torch.Generator().manual_seed(seed)
    columns = torch.arange(data.GRID * data.GRID).reshape(data.GRID, data.GRID).T.flatten()

    def permute(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        if order == "random":
            index = torch.argsort(torch.rand(output.shape[:2], generator=gen), dim=1)
        else:
            index = columns.expand(output.shape[0], -1).clone()
            if order == "both":
                if output.shape[0] % 2:
                    raise ValueError("order 'both' needs each image twice (encode_two_orders)")
                index[0::2] = torch.arange(output.shape[1])
        index = index.unsqueeze(-1).expand_as(output).to(output.device)
        return torch.gather(output, 1, index)

    handle = model.model.multi_modal_projector.register_forward_hook(permute)
    try:
        yield
    finally:
        handle.remove()


def visual_order_context(model, order: str | None, seed: int = 0):
    """``reordered_visual_tokens`` for an order, a no-op for None (LLaVA's own order)."""
    return nullcontext() if order is None else reordered_visual_tokens(model, order, seed)


def encode_two_orders(processor, samples: Sequence[VQASample], with_answers: bool = False
                      ) -> dict[str, torch.Tensor]:
    """``encode_vqa``'s batch with each sample's image twice in its prompt (two image parts,
    as LLaVA takes several images): the input of order "both". Its pixel values are stacked
    by sample, (N, 2, C, H, W), so a pool cut by sample keeps each pair (``paired_images``
    flattens them for the model)."""
    def prompt(question: str) -> str:
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)

    images = [s.image for s in samples for _ in range(2)]
    answers = [s.answer for s in samples] if with_answers else None
    batch = prompts.encode_with_answers(
        processor.tokenizer,
        lambda texts: processor(text=texts, images=images, return_tensors="pt", padding=True),
        [prompt(s.question) for s in samples], answers)
    pixels = batch["pixel_values"]
    return batch | {"pixel_values": pixels.reshape(len(samples), 2, *pixels.shape[1:])}


def paired_images(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``encode_two_orders`` batch as the model takes it: one image after another."""
    return batch | {"pixel_values": batch["pixel_values"].flatten(0, 1)}


def encoder_for(processor, order: str | None):
    """The training batch encoder of a visual order: two copies for "both", else one."""
    if order == "both":
        return lambda b: encode_two_orders(processor, b, with_answers=True)
    return lambda b: encode_vqa(processor, b, with_answers=True)


def tune(model, processor, samples: Sequence[VQASample], steps: int, batch_size: int = 64,
         lr: float = 1.5e-3, seed: int = 0, visual_order: str | None = None,
         progress: bool = True) -> list[float]:
    """Instruction-tune ``model``'s projector and decoder on ``samples`` (the tower frozen, as
    in toy-vlm's stage 2): ``steps`` AdamW steps with a cosine schedule, batches drawn with
    replacement (seeded) from the pool encoded once, the per-sample answer loss; the visual
    tokens in ``visual_order`` (``reordered_visual_tokens``; None: as LLaVA orders them).
    Returns the losses."""
    training.seed_everything(seed)
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    drawn = training.weighted_batches(  # the pool encoded once, as toy-vlm's stage 2
        samples, batch_size, seed, encoder_for(processor, visual_order))

    def batches(step: int) -> dict:
        batch = drawn(step)
        return paired_images(batch) if visual_order == "both" else batch

    with visual_order_context(model, visual_order, seed):
        return training.train_steps(model, params, batches, steps, lr, desc="spatial proxy",
                                    loss_fn=training.per_sample_lm_loss, progress=progress)


@torch.no_grad()
def two_order_answers(model, processor, samples: Sequence[VQASample], batch_size: int = 64
                      ) -> list[str]:
    """Greedy answers (at most four tokens) with each image twice, row- then column-major."""
    tokenizer = processor.tokenizer
    out: list[str] = []
    with reordered_visual_tokens(model, "both"):
        for start in range(0, len(samples), batch_size):
            batch = to_model(paired_images(encode_two_orders(
                processor, samples[start:start + batch_size])), model)
            ids = model.generate(**batch, max_new_tokens=4, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def spatial_answers(model, processor, samples: Sequence[VQASample], progress: bool = True,
                    visual_order: str | None = None) -> list[str]:
    """Greedy answers to ``samples`` (a spatial answer is at most two words), the visual
    tokens in ``visual_order`` ("random" is a training augmentation: scored in LLaVA's order)."""
    if visual_order == "both":
        return two_order_answers(model, processor, samples)
    with visual_order_context(model, visual_order if visual_order != "random" else None):
        return generate_answers(model, processor, samples, max_new_tokens=4,
                                progress=progress, desc="spatial answers")


def spatial_hits(model, processor, samples: Sequence[VQASample], progress: bool = True,
                 visual_order: str | None = None) -> list[bool]:
    """Greedy exact match of each of ``samples`` (``spatial_answers``)."""
    said = spatial_answers(model, processor, samples, progress, visual_order)
    return [exact_match(a, s.answer) for a, s in zip(said, samples, strict=True)]


def where_words(samples: Sequence[VQASample], answers: Sequence[str]) -> dict[str, dict]:
    """On the "where is ..." questions, how often each word of the quadrant is right: the
    first ("top" / "bottom": the row) and the second ("left" / "right": the column)."""
    found: dict[str, list[bool]] = {"row word": [], "column word": []}
    for s, said in zip(samples, answers, strict=True):
        if spatial_form(s) != "where":
            continue
        words = said.split() + ["", ""]
        truth = s.answer.split()
        found["row word"].append(words[0] == truth[0])
        found["column word"].append(words[1] == truth[1])
    if not found["row word"]:
        raise ValueError("where_words needs 'where' questions")
    return {k: stats.rate_record(v) for k, v in found.items()}


def accuracy_by_form(samples: Sequence[VQASample], hits: Sequence[bool]) -> dict[str, dict]:
    """The rate of ``hits`` per spatial form, with Wilson intervals."""
    found: dict[str, list[bool]] = {}
    for s, hit in zip(samples, hits, strict=True):
        found.setdefault(spatial_form(s), []).append(hit)
    return {form: stats.rate_record(h) for form, h in sorted(found.items())}


def accuracy_by_shortcut(samples: Sequence[VQASample], hits: Sequence[bool]) -> dict:
    """The rate of ``hits`` on relation questions per axis, apart for the questions that the
    token-order shortcut (``order_shortcut``) answers right and those it answers wrong: a
    model that compares places is as good on both; one that compares token order is not."""
    out: dict = {}
    for s, hit in zip(samples, hits, strict=True):
        rel = relation_parts(s)
        if rel is None:
            continue
        axis = "horizontal" if rel.relation in HORIZONTAL else "vertical"
        key = "shortcut right" if order_shortcut([rel]) == 1.0 else "shortcut wrong"
        out.setdefault(axis, {}).setdefault(key, []).append(hit)
    return {axis: {k: stats.rate_record(v) for k, v in sorted(d.items())}
            for axis, d in out.items()}


def tune_smol_llava(model, processor, samples: Sequence[VQASample], steps: int,
                    recipe: smol_llava.SmolLlavaRecipe | None = None, seed: int = 0,
                    visual_order: str | None = None, progress: bool = True) -> tuple:
    """Continue a trained smol-llava on ``samples``: a fresh LoRA adapter (the recipe's shape)
    and the projector trained ``steps`` steps as its stage 2 trains them (pre-encoded pool,
    logits at the answer positions, bfloat16 autocast), the tower and decoder frozen, the
    visual tokens in ``visual_order`` (as ``tune``). Returns the adapter merged, and the
    losses."""
    recipe = recipe or smol_llava.SmolLlavaRecipe()
    model.requires_grad_(False)
    pool = smol_llava.encode_pool(model, processor, samples)
    training.seed_everything(seed)
    adapted = get_peft_model(model, smol_llava.lora_config(recipe))
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(m, batch: dict) -> torch.Tensor:
        with torch.autocast("cpu", dtype=getattr(torch, recipe.compute_dtype)):
            return smol_llava.answer_loss(m, batch, batch["features"])

    with visual_order_context(model, visual_order, seed):
        losses = training.train_steps(
            model, params, smol_llava.weighted_batches(pool, recipe, seed), steps,
            recipe.tune_lr, desc="smol-llava spatial proxy", loss_fn=loss, progress=progress)
    return adapted.merge_and_unload().eval(), losses
