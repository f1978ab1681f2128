"""The synthetic benchmark (`todre.scenes`): scenes, questions and metrics checked against ground truth
recomputed from the objects and the label mask."""
import math, os, time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from todre.scenes import (ANSWERS, COLOUR_RGB, COLOURS, COUNT_WORDS, FAMILIES, GRID, IMAGE_SIZE, MARGIN, MAX_OBJECTS,
                          MIN_SEPARATION, PATCH, PLURALS, SHAPES, SIZES, SceneObject, iter_samples, make_scenes,
                          normalize_answer, object_coverage, patch_object_fraction, pope_metrics, accuracy_by_family,
                          question_vocabulary, render_scene, scene_questions, split_seed, split_words)

N_SCENES = 200


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(split_seed("test", i)) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def questions(scenes):
    return [(s, q) for s in scenes for q in scene_questions(s, s.seed)]


# ---------------------------------------------------------------- scenes

def test_deterministic_from_seed():
    a, b, c = render_scene(11), render_scene(11), render_scene(12)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.label, b.label) and a.objects == b.objects
    assert scene_questions(a, 3) == scene_questions(b, 3)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_split_seeds_disjoint():
    ranges = {s: (split_seed(s, 0), split_seed(s, 10**9 - 1)) for s in ("train", "val", "test")}
    spans = sorted(ranges.values())
    assert all(hi < lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))
    for bad in [("dev", 0), ("train", -1), ("train", 10**9)]:
        with pytest.raises(ValueError): split_seed(*bad)


def test_n_objects(scenes):
    counts = {len(s.objects) for s in scenes}
    assert counts == set(range(1, MAX_OBJECTS + 1))
    for n in range(1, MAX_OBJECTS + 1): assert len(render_scene(1000 + n, n_objects=n).objects) == n
    with pytest.raises(ValueError): render_scene(0, n_objects=0)


def test_objects_inside_and_apart(scenes):
    for s in scenes:
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
            assert o.center == ((x0 + x1) / 2, (y0 + y1) / 2)
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
                gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
                assert max(gap_x, gap_y) >= MARGIN, (s.seed, a, b)


def test_label_matches_objects(scenes):
    pixels_of = lambda s: np.asarray(s.image).astype(int)
    for s in scenes[:60]:
        img = pixels_of(s)
        assert s.label.dtype == np.uint8 and s.label.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert s.label.max() == len(s.objects)
        for i, o in enumerate(s.objects):
            ys, xs = np.nonzero(s.label == i + 1)
            assert len(ys) > 0
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box
            colours = img[ys, xs]
            assert (colours == colours[0]).all() # one solid colour per object
            assert np.abs(colours[0] - np.array(COLOUR_RGB[o.colour])).max() <= 20
        # no background pixel looks like an object colour
        bg = img[s.label == 0]
        assert (bg.max(1) - bg.min(1)).max() < 60 and bg.max() <= 205


def test_sizes():
    areas = {size: [] for size in SIZES}
    for seed in range(100):
        s = render_scene(seed)
        for i, o in enumerate(s.objects): areas[o.size].append(int((s.label == i + 1).sum()))
    assert max(areas["small"]) < min(areas["medium"]) and max(areas["medium"]) < min(areas["large"])
    assert max(areas["small"]) < 10 * PATCH * PATCH / 2 # a small object covers only a few patches


def test_rendering_speed():
    "50 scenes in under a second (the best of three tries, as the CPU may be shared)."
    render_scene(0)
    def fifty():
        t = time.perf_counter()
        for i in range(50): render_scene(i)
        return time.perf_counter() - t
    assert min(fifty() for _ in range(3)) < 1.0


# ---------------------------------------------------------------- questions

def test_answers_and_vocabulary(questions):
    vocab = set(question_vocabulary())
    assert {"?", ","} <= vocab and "color" in vocab and "colour" not in vocab
    families = {q.family for _, q in questions}
    assert families == set(FAMILIES) and set(ANSWERS) == set(FAMILIES)
    for _, q in questions:
        assert q.answer in ANSWERS[q.family], q
        assert q.answer == q.answer.lower() and " " not in q.answer
        for w in split_words(q.question) + split_words(q.answer): assert w in vocab, (w, q)
        assert (q.negative != "") == (q.family == "exist" and q.answer == "no"), q


def test_exist_balanced_and_negatives_absent(questions):
    exist = [(s, q) for s, q in questions if q.family == "exist"]
    yes = np.mean([q.answer == "yes" for _, q in exist])
    assert 0.4 <= yes <= 0.6
    kinds = {q.negative for _, q in exist if q.answer == "no"}
    assert kinds == {"random", "popular", "adversarial"}
    for s, q in exist:
        colour, shape = split_words(q.question)[3:5]
        present = {(o.colour, o.shape) for o in s.objects}
        assert ((colour, shape) in present) == (q.answer == "yes"), q
        if q.negative == "adversarial":
            assert any(o.colour == colour or o.shape == shape for o in s.objects)
        if q.negative == "popular":
            top_shape = max(sum(o.shape == x for o in s.objects) for x in SHAPES)
            top_colour = max(sum(o.colour == x for o in s.objects) for x in COLOURS)
            assert sum(o.shape == shape for o in s.objects) == top_shape or sum(o.colour == colour for o in s.objects) == top_colour


def test_count_answers(questions):
    for s, q in questions:
        if q.family != "count": continue
        words = split_words(q.question)
        if words[2] == "objects": n = len(s.objects)
        elif words[2] in COLOURS: n = sum(o.colour == words[2] for o in s.objects)
        else:
            shape = next(k for k, v in PLURALS.items() if v == words[2])
            n = sum(o.shape == shape for o in s.objects)
        assert q.answer == COUNT_WORDS[n], q


def find(scene, colour=None, shape=None):
    "The one object of `scene` matching the description (asserting it is unique)."
    found = [o for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape)]
    assert len(found) == 1, (colour, shape, scene.objects)
    return found[0]


def test_spatial_answers(questions):
    spatial = [(s, q) for s, q in questions if q.family == "spatial"]
    assert len(spatial) > 100 and np.mean([q.answer == "yes" for _, q in spatial]) == 0.5
    for s, q in spatial:
        w = split_words(q.question) # is the c1 s1 <relation...> the c2 s2 ?
        a, b = find(s, w[2], w[3]), find(s, w[-3], w[-2])
        relation = " ".join(w[4:-4])
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
        d = sign * (a.center[axis] - b.center[axis])
        assert abs(d) >= MIN_SEPARATION
        assert q.answer == ("yes" if d > 0 else "no"), q


def test_attribute_and_two_object_answers(questions):
    for s, q in questions:
        w = split_words(q.question)
        if q.family == "colour": assert q.answer == find(s, shape=w[4]).colour
        elif q.family == "shape": assert q.answer == find(s, colour=w[4]).shape
        elif q.family == "two_object":
            if w[-2] == "color": same = find(s, shape=w[2]).colour == find(s, shape=w[5]).colour
            else: same = find(s, colour=w[2]).shape == find(s, colour=w[6]).shape
            assert q.answer == ("yes" if same else "no"), q


def test_iter_samples_plain_python():
    samples = list(iter_samples(3, "train", 5))
    assert {s.seed for s, _ in samples} == {5, 6, 7}
    assert [q for _, q in samples] == [q for i in range(5, 8) for q in scene_questions(render_scene(i), i)]


# ---------------------------------------------------------------- datasets

def test_make_scenes_round_trip(tmp_path):
    from datasets import load_dataset
    ds = make_scenes(2, seed=4, split="val")
    assert set(ds.column_names) == {"image", "label", "scene_id", "family", "question", "answer", "negative", "objects"}
    assert set(ds["scene_id"]) == {split_seed("val", 4), split_seed("val", 5)}
    assert len(ds) == sum(1 for _ in iter_samples(2, "val", 4))
    path = str(tmp_path / "scenes.parquet")
    ds.to_parquet(path)
    back = load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "cache"))
    assert back.features == ds.features and len(back) == len(ds)
    row = back[len(back) - 1]
    scene = render_scene(row["scene_id"])
    assert np.array_equal(np.asarray(row["label"]), scene.label)
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(scene.image))
    assert row["objects"] == [o.to_dict() for o in scene.objects]
    assert row["question"] == ds[len(ds) - 1]["question"] and row["answer"] == ds[len(ds) - 1]["answer"]


# ---------------------------------------------------------------- metrics

def test_normalize_answer():
    cases = {"Yes.": "yes", "  NO, it is not": "no", "2": "two", "0": "zero", "8": "eight", "9": "9",
             "The circle.": "circle", "": "", "?!": "", "Red": "red"}
    for text, want in cases.items(): assert normalize_answer(text) == want, text


def test_accuracy_by_family():
    acc = accuracy_by_family(["yes", "no", "Three", "blue", "circle"], ["yes", "yes", "three", "red", "circle"],
                             ["exist", "exist", "count", "colour", "shape"])
    assert acc == {"exist": 0.5, "colour": 0.0, "shape": 1.0, "count": 1.0, "overall": 0.6}
    with pytest.raises(ValueError): accuracy_by_family(["yes"], ["yes", "no"], ["exist"])


def test_pope_metrics():
    # answers: 4 yes, 4 no; predictions: tp=3, fn=1, fp=1, tn=3; the count question is ignored
    preds = ["yes", "yes", "Yes.", "no", "yes", "no", "no", "no", "two"]
    answers = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "three"]
    m = pope_metrics(preds, answers)
    assert math.isclose(m["precision"], 0.75) and math.isclose(m["recall"], 0.75) and math.isclose(m["f1"], 0.75)
    assert math.isclose(m["yes_ratio"], 0.5) and math.isclose(m["accuracy"], 0.75)
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


def synthetic_label():
    "Two square objects at known places: object 1 fills token (0, 0), object 2 covers 10 % of token (1, 1) only."
    label = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    label[0:PATCH, 0:PATCH] = 1
    label[PATCH:PATCH + 7, PATCH:PATCH + 3] = 2 # 21 pixels of 196: 10.7 %
    return label


def test_patch_object_fraction():
    frac = patch_object_fraction(synthetic_label())
    assert frac.shape == (GRID * GRID, 2)
    assert frac[0, 0] == 1.0 and frac[1:, 0].sum() == 0
    assert math.isclose(frac[GRID + 1, 1], 21 / 196) and math.isclose(frac[:, 1].sum(), 21 / 196)
    with pytest.raises(ValueError): patch_object_fraction(np.zeros((10, 10), np.uint8))


def test_object_coverage_hand_computed():
    label = synthetic_label()
    objects = [SceneObject("square", "red", "large", (0, 0, 14, 14), (7, 7)),
               SceneObject("square", "blue", "small", (14, 14, 17, 21), (15.5, 17.5))]
    c = object_coverage([0], label, objects)
    assert c == dict(objects=0.5, small=0.0, n_objects=2, n_small=1)
    c = object_coverage([GRID + 1], label, objects)
    assert c["objects"] == 0.5 and c["small"] == 1.0
    assert object_coverage([GRID + 1], label, objects, min_fraction=0.2)["objects"] == 0.0
    assert object_coverage([1, 2, GRID], label, objects)["objects"] == 0.0 # neighbours do not count
    assert object_coverage(np.array([0, GRID + 1]), label, [o.to_dict() for o in objects])["objects"] == 1.0
    with pytest.raises(ValueError): object_coverage([GRID * GRID], label, objects)


def test_object_coverage_all_and_none(scenes):
    for s in scenes[:50]:
        full = object_coverage(np.arange(GRID * GRID), s.label, s.objects)
        assert full["objects"] == 1.0 and full["n_objects"] == len(s.objects)
        if full["n_small"]: assert full["small"] == 1.0
        none = object_coverage([], s.label, s.objects)
        assert none["objects"] == 0.0
        inferred = object_coverage(np.arange(GRID * GRID), s.label)
        assert inferred["n_small"] == full["n_small"] and inferred["n_objects"] == full["n_objects"]
