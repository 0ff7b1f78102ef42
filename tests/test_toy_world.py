"""The toy world (scenes, renders, captions, splits) and its exact judge.

Oracles we did not write: skimage's connected components and region centroids on the renders, the project
tokenizer on every caption word.
"""

import dataclasses

import numpy as np
import pytest
from skimage import measure

from ospo_fast.toy import world
from ospo_fast.toy.judge import JudgeConfig, classify_shape, find_blobs, judge, judge_batch


def _scenes(seed: int, n: int, p_single: float = 0.3) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, p_single) for _ in range(n)]


def _unrelated_scene_pairs(seed: int, n: int, p_single: float) -> list[tuple[world.Scene, world.Scene]]:
    """``n`` (base, other) scenes sharing no colour, so a render of ``other`` is loosely wrong for ``base``'s caption
    (``other`` always has two objects)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        base = world.sample_scene(rng, p_single=p_single)
        other = world.sample_scene(rng, p_single=0.0)
        while {o.color for o in other.objects} & {o.color for o in base.objects}:
            other = world.sample_scene(rng, p_single=0.0)
        pairs.append((base, other))
    return pairs


# ------------------------------------------------------------------------------------------------- world

@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_world_is_deterministic_per_seed(seed):
    a, b = _scenes(seed, 20), _scenes(seed, 20)
    assert a == b
    for sa, sb in zip(a, b):
        assert np.array_equal(world.render(sa), world.render(sb))
        assert world.caption(sa) == world.caption(sb)
    assert a != _scenes(seed + 1, 20)


def test_render_format_and_caption_structure():
    for scene in _scenes(3, 100):
        image = world.render(scene)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        text, struct = world.caption(scene), world.structure(scene)
        assert set(struct) == {"objects", "attributes", "relations"}
        for obj in struct["objects"]:
            assert f" {obj}" in f" {text}"  # object words appear literally
        assert len(struct["attributes"]) == len(struct["objects"])
        assert len(struct["relations"]) == (1 if len(scene.objects) == 2 else 0)
        assert world.spec_from_structure(struct) == world.spec_of(scene)


def test_caption_example_matches_the_pipeline_format():
    spec = world.SceneSpec(("circle", "square"), ("red", "blue"), "left of")
    assert world.caption_of_spec(spec) == "a red circle to the left of a blue square"
    assert world.structure_of_spec(spec) == {
        "objects": ["circle", "square"], "attributes": [["circle", "red"], ["square", "blue"]],
        "relations": [["circle", "left of", "square"]]}


def test_relation_and_geometry_hold_on_every_render():
    """Objects stay inside the image, never overlap, and skimage finds exactly one region per object whose
    centroid satisfies the caption's relation."""
    for scene in _scenes(4, 120, p_single=0.0):
        masks = [world.object_mask(o) for o in scene.objects]
        assert not (masks[0] & masks[1]).any()
        for obj, mask in zip(scene.objects, masks):
            x0, y0, x1, y1 = obj.box()
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
            assert mask.sum() > 0
        labels = measure.label(np.any(world.render(scene) != world.BACKGROUND, axis=-1), connectivity=2)
        regions = measure.regionprops(labels)
        assert len(regions) == 2
        (ya, xa), (yb, xb) = [np.argwhere(m).mean(0) for m in masks]
        dx, dy = xa - xb, ya - yb
        expect = {"left of": dx < -abs(dy), "right of": dx > abs(dy), "above": dy < -abs(dx), "below": dy > abs(dx)}
        assert expect[scene.relation], (scene, dx, dy)


def test_splits_are_disjoint_complete_and_stable():
    train, held = world.split_specs("train"), world.split_specs("heldout")
    assert len(train) + len(held) == len(world.all_specs()) == 18 + 720
    assert not {world.caption_of_spec(s) for s in train} & {world.caption_of_spec(s) for s in held}
    assert 0.08 < len(held) / len(world.all_specs()) < 0.17
    first = world.sample_prompts(40, "heldout", seed=5)
    assert first == world.sample_prompts(40, "heldout", seed=5)
    assert first != world.sample_prompts(40, "heldout", seed=6)
    assert all(world.is_heldout(r["prompt"]) for r in first)
    assert not any(world.is_heldout(r["prompt"]) for r in world.sample_prompts(100, "train", seed=5))
    assert {r["category"] for r in world.sample_prompts(100, "train")} == {"color", "spatial_2d"}
    with pytest.raises(ValueError, match="split"):
        world.split_specs("test")


def test_every_caption_word_is_one_token():
    from ospo_fast.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    words = {w for s in world.all_specs() for w in world.caption_of_spec(s).split()}
    for word in sorted(words):
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))


def test_bad_specs_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="hexagon"):
        world.scene_from_spec(world.SceneSpec(("hexagon",), ("red",)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="distinct"):
        world.scene_from_spec(world.SceneSpec(("circle", "circle"), ("red", "blue"), "above"),
                              np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------- judge

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_judge_is_exact_on_ground_truth(seed):
    scenes = _scenes(100 + seed, 120)
    results = judge_batch(np.stack([world.render(s) for s in scenes]), [world.structure(s) for s in scenes])
    assert all(r.strict and r.loose for r in results)


def test_judge_blobs_match_skimage_regions():
    for scene in _scenes(9, 40):
        image = world.render(scene)
        blobs = find_blobs(image)
        assert len(blobs) == len(scene.objects)
        for obj in scene.objects:
            blob = next(b for b in blobs if b.color == obj.color)
            region = measure.regionprops(world.object_mask(obj).astype(np.uint8))[0]
            # the judge opens each colour mask (3x3) before labelling: centroids move by well under a pixel
            assert abs(blob.cy - region.centroid[0]) < 0.75 and abs(blob.cx - region.centroid[1]) < 0.75


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("size", list(range(world.OBJECT_SIZE[0], world.OBJECT_SIZE[1] + 1)) + [13, 29])
def test_shape_classifier_every_size(shape, size):
    mask = world.object_mask(world.ToyObject(shape, "red", 32, 32, size))
    assert classify_shape(mask)[0] == shape


def test_judge_negatives():
    spec = world.SceneSpec(("circle", "square"), ("red", "blue"), "left of")
    image = world.render(world.scene_from_spec(spec, np.random.default_rng(0)))
    good = world.structure_of_spec(spec)
    assert judge(image, good).strict
    wrong_rel = {**good, "relations": [["circle", "right of", "square"]]}
    assert not judge(image, wrong_rel).loose and not judge(image, wrong_rel).strict
    wrong_colour = {**good, "attributes": [["circle", "green"], ["square", "blue"]]}
    assert not judge(image, wrong_colour).loose
    wrong_shape = world.structure_of_spec(world.SceneSpec(("triangle", "square"), ("red", "blue"), "left of"))
    result = judge(image, wrong_shape)
    assert result.loose and not result.strict
    single = world.structure_of_spec(world.SceneSpec(("circle",), ("red",)))
    result = judge(image, single)  # the blue square is an extra object
    assert result.loose and not result.strict and result.details["extra_blobs"] == 1
    # the pipeline's toy vocabulary spells relations as in captions
    alias = {**good, "relations": [["circle", "to the left of", "square"]]}
    assert judge(image, alias).strict


@pytest.mark.parametrize("sigma", [8.0, 20.0])
def test_judge_tolerates_generation_noise(sigma):
    """Pixel noise and a 1-px blur (what a VQ decoder does to edges) do not change the verdict."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    scenes = _scenes(11, 60)
    ok = 0
    for scene in scenes:
        image = ndimage.uniform_filter(world.render(scene).astype(np.float32), size=(3, 3, 1))
        image = np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)
        ok += judge(image, world.structure(scene)).strict
    assert ok / len(scenes) >= 0.95


def test_judge_bad_inputs():
    image = world.render(_scenes(0, 1)[0])
    with pytest.raises(ValueError, match="no colour attribute"):
        judge(image, {"objects": ["circle"], "attributes": [["circle", "wooden"]], "relations": []})
    with pytest.raises(ValueError, match="RGB"):
        judge(image[..., 0], {"objects": [], "attributes": [], "relations": []})
    with pytest.raises(ValueError, match="structures"):
        judge_batch(image[None], [])
    spec = world.SceneSpec(("circle", "square"), ("red", "blue"), "left of")
    with pytest.raises(ValueError, match="relation"):
        judge(world.render(world.scene_from_spec(spec, np.random.default_rng(0))),
              {**world.structure_of_spec(spec), "relations": [["circle", "inside", "square"]]})


def test_judge_config_is_a_dataclass():
    assert dataclasses.is_dataclass(JudgeConfig) and JudgeConfig().min_area > 0


def test_mask_localisation_on_ground_truth():
    import numpy as np

    from ospo_fast.toy import world
    from ospo_fast.toy.evaluate import mask_localisation, object_cells

    scene = world.sample_scene(np.random.default_rng(3))
    image = world.render(scene)
    truth = object_cells(image, 8)
    perfect = mask_localisation([image], [truth])
    assert perfect["precision"] == 1.0 and perfect["recall"] == 1.0 and 0 < perfect["chance"] < 1
    inverted = mask_localisation([image], [~truth])
    assert inverted["precision"] == 0.0


def test_pair_judgement_on_rendered_pairs(tmp_path):
    """Chosen = a render of the base prompt, rejected = a render of another caption: the judge says so exactly."""
    from ospo_fast.runstore import RunStore
    from ospo_fast.toy.evaluate import pair_judgement

    prompts, rows = [], []
    for i, (base, other) in enumerate(_unrelated_scene_pairs(5, 6, p_single=0.0)):
        base_id = f"p{i:06d}"
        prompts.append({"id": base_id, "structure": world.structure(base)})
        rows.append({"id": f"{base_id}-n0", "base_id": base_id,
                     "chosen": {"image": world.render(base)}, "rejected": {"image": world.render(other)}})
    store = RunStore(tmp_path)  # committed as the pipeline commits a run: pair_judgement reads it checked
    store.write_chunk("prompts", 0, prompts, [])
    store.merge("prompts")
    store.write_chunk("images", 0, rows, [])
    candidates = store.merge("images")
    store.write_final("pairs.jsonl", candidates[:4])
    judged = pair_judgement(tmp_path)
    assert judged["kept"]["n"] == 4 and judged["candidates"]["n"] == 6
    for part in judged.values():
        assert part["chosen_strict"] == part["chosen_loose"] == part["chosen_better"] == 1.0
        assert part["rejected_strict"] == part["rejected_loose"] == part["rejected_better"] == 0.0


def test_rule_question_truths_agree_with_the_judge():
    """On noisy renders the per-question truths are all true exactly when the judge says strict (no extra object in
    a two-object world); a wrong shape falsifies its object question only, a flipped relation the relation only."""
    from ospo_fast.stages.questions import rule_questions
    from ospo_fast.toy.judge import rule_question_truths

    rng = np.random.default_rng(21)
    for scene in _scenes(13, 40):
        image = np.clip(world.render(scene) + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
        truth = world.structure(scene)
        for structure in (truth, world.structure(_scenes(int(rng.integers(1 << 30)), 1)[0])):
            truths = rule_question_truths(image, structure)
            assert len(truths) == len(rule_questions(structure))
            if len(structure["objects"]) == len(scene.objects):
                assert all(t for _, t in truths) == judge(image, structure).strict
    spec = world.SceneSpec(("circle", "square"), ("red", "blue"), "left of")
    image = world.render(world.scene_from_spec(spec, np.random.default_rng(0)))
    good = world.structure_of_spec(spec)
    assert rule_question_truths(image, good) == [("object", True), ("object", True), ("relation", True)]
    wrong_shape = world.structure_of_spec(world.SceneSpec(("triangle", "square"), ("red", "blue"), "left of"))
    assert rule_question_truths(image, wrong_shape) == [("object", False), ("object", True), ("relation", True)]
    flipped = {**good, "relations": [["circle", "right of", "square"]]}
    assert rule_question_truths(image, flipped) == [("object", True), ("object", True), ("relation", False)]
    missing = world.structure_of_spec(world.SceneSpec(("circle", "square"), ("green", "blue"), "left of"))
    assert rule_question_truths(image, missing) == [("object", False), ("object", True), ("relation", False)]
    with pytest.raises(ValueError, match="counts"):
        rule_question_truths(image, {**good, "counts": {"circle": 2}})


def test_pair_self_vqa_scores_the_answers_against_the_judge(tmp_path):
    """Chosen = a render of the base prompt, rejected = a render with no shared colour; the model said yes to every
    question of both: right on every chosen answer, wrong on every rejected one; non-rule questions are refused."""
    from ospo_fast.runstore import RunStore, StoreError
    from ospo_fast.stages.questions import rule_questions
    from ospo_fast.toy.evaluate import pair_self_vqa

    prompts, rows = [], []
    for i, (base, other) in enumerate(_unrelated_scene_pairs(6, 5, p_single=0.4)):
        base_id = f"p{i:06d}"
        structure = world.structure(base)
        questions = rule_questions(structure)
        prompts.append({"id": base_id, "structure": structure})
        rows.append({"id": f"{base_id}-n0", "base_id": base_id, "questions": questions,
                     "chosen": {"image": world.render(base), "vqa": [[0.8, 0.2]] * len(questions)},
                     "rejected": {"image": world.render(other), "vqa": [[0.6, 0.4]] * len(questions)}})
    store = RunStore(tmp_path)
    store.write_chunk("prompts", 0, prompts, [])
    store.merge("prompts")
    store.write_chunk("vqa", 0, rows, [])
    scored = store.merge("vqa")
    # kept: one scored pair, and a best-of-N style pair that is no scored record (its two sides the same right image)
    store.write_final("pairs.jsonl", [scored[0], dict(scored[0], id="p000000-bon", rejected=scored[0]["chosen"])])
    result = pair_self_vqa(tmp_path)
    n_questions = sum(len(r["questions"]) for r in rows)
    n_relations = sum(len(p["structure"]["relations"]) for p in prompts)
    candidates = result["candidates"]
    assert candidates["n"] == 2 * n_questions and candidates["relation"]["n"] == 2 * n_relations
    for kind in ("object", "relation", "all"):
        assert candidates[kind]["accuracy"] == candidates[kind]["true_rate"] == 0.5
    assert result["kept"]["n"] == 4 * len(rows[0]["questions"]) and result["kept"]["all"]["accuracy"] == 0.75
    with pytest.raises(StoreError):
        pair_self_vqa(tmp_path / "missing")
    other_dir = tmp_path / "model_questions"
    store = RunStore(other_dir)
    store.write_chunk("prompts", 0, prompts, [])
    store.merge("prompts")
    store.write_chunk("vqa", 0, [dict(rows[0], questions=["Is it nice?"])], [])
    store.merge("vqa")
    store.write_final("pairs.jsonl", [])
    with pytest.raises(ValueError, match="questions.source=rules"):
        pair_self_vqa(other_dir)


def test_paired_change_and_standard_errors(tmp_path):
    """The change after - before is the per-image mean difference, its error the paired one (scipy's ttest_rel
    statistic is mean / se); the rates' errors are the binomial ones; mismatched prompts or seeds are refused."""
    from scipy import stats

    from ospo_fast.store import atomic_write_jsonl
    from ospo_fast.toy.evaluate import paired_change, standard_error

    rng = np.random.default_rng(3)
    before, after = rng.random(40) < 0.3, rng.random(40) < 0.5
    loose_before, loose_after = before | (rng.random(40) < 0.2), after | (rng.random(40) < 0.2)
    for name, strict, loose in (("before", before, loose_before), ("after", after, loose_after)):
        atomic_write_jsonl(tmp_path / name / "verdicts.jsonl",
                           [{"prompt": f"p{i}", "seed": i, "strict": bool(s), "loose": bool(lo)}
                            for i, (s, lo) in enumerate(zip(strict, loose))])
    change = paired_change(tmp_path / "before", tmp_path / "after")
    assert change["n"] == 40
    assert change["strict"] == pytest.approx(after.mean() - before.mean())
    assert change["loose"] == pytest.approx(loose_after.mean() - loose_before.mean())
    t = stats.ttest_rel(after.astype(float), before.astype(float)).statistic
    assert change["strict"] / change["strict_se"] == pytest.approx(t)
    assert standard_error(0.25, 48) == pytest.approx(np.std([1] * 12 + [0] * 36) / np.sqrt(48))
    assert np.isnan(standard_error(0.5, 0))
    atomic_write_jsonl(tmp_path / "other" / "verdicts.jsonl", [{"prompt": "p0", "seed": 1, "strict": 1, "loose": 1}])
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_change(tmp_path / "before", tmp_path / "other")


def test_plain_background_cells_are_the_cells_no_object_mask_touches():
    """From pixels, as the recipe and the probe compute it; checked against the objects' own masks, cell by cell."""
    import numpy as np
    import pytest

    from ospo_fast.toy import world

    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng) for _ in range(12)]
    images = np.stack([world.render(scene) for scene in scenes])
    for grid in (8, 16):
        background = world.plain_background_cells(images, grid)
        patch = world.SIZE // grid
        for scene, cells in zip(scenes, background):
            drawn = np.zeros((world.SIZE, world.SIZE), dtype=bool)
            for obj in scene.objects:
                drawn |= world.object_mask(obj)
            touched = drawn.reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1)
            assert np.array_equal(cells, ~touched) and touched.any() and cells.any()
    assert world.plain_background_cells(world.empty_render()[None], 8).all()
    tokens = np.arange(64)[None].repeat(2, 0)
    tokens[1, :32] = -1  # the second image's top half has other codes than the empty image
    empty = np.stack([world.empty_render()] * 2)
    assert world.background_code_share(tokens, np.arange(64)[None], empty) == 0.75
    with pytest.raises(ValueError, match="grid that divides"):
        world.plain_background_cells(images, 7)
