"""Training data of the toy build: scenes of the toy world and their renders as model inputs, where the objects lie
on the 8x8 grid, and the yes/no questions (with their answer tokens) the understanding path is trained on."""

from __future__ import annotations

import numpy as np
import torch

from ospo_fast.toy import world
from recipes.toy_janus.model import GRID, IMAGE_SIZE, PATCH


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def scene_batch(rng: np.random.Generator, n: int, split: str | None = None) -> tuple[list, np.ndarray]:
    """``n`` scenes (from ``split``'s captions when given) and their renders, uint8 (n, 64, 64, 3)."""
    specs = world.split_specs(split) if split else None
    scenes = []
    for _ in range(n):
        if specs is None:
            scene = world.sample_scene(rng)
            while world.is_heldout(world.caption(scene)):
                scene = world.sample_scene(rng)
        else:
            scene = world.scene_from_spec(specs[rng.integers(len(specs))], rng)
        scenes.append(scene)
    return scenes, np.stack([world.render(s) for s in scenes])


def cell_owners(scene: world.Scene) -> np.ndarray:
    """(GRID * GRID, PATCH * PATCH) int: per grid cell (row-major: the image tokens' and the SigLIP patches' order),
    the index in ``scene.objects`` of the object drawn at each of its pixels, -1 on background. Objects are counted
    as drawn (a later object hides an earlier one)."""
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1)
    for index, obj in enumerate(scene.objects):
        owner[world.object_mask(obj)] = index
    return owner.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)


def object_cell_weights(scenes: list, fg_weight: float, min_cover: float) -> torch.Tensor:
    """(B, GRID * GRID) T2I loss weights: ``fg_weight`` on the cells an object covers by at least ``min_cover``
    (``object_regions``), 1 elsewhere. Where the objects are is a property of the training image, like the VQ's
    ``fg_weight``; nothing here touches the attention."""
    covered = torch.stack([torch.stack(list(object_regions(scene, min_cover).values())).any(0) for scene in scenes])
    return 1.0 + (fg_weight - 1.0) * covered.float()


def object_regions(scene: world.Scene, min_cover: float) -> dict[str, torch.Tensor]:
    """Each shape word of ``scene`` -> (GRID * GRID,) bool: the VQ grid cells (row-major, the image tokens' order)
    that objects of that shape cover by at least ``min_cover`` of their pixels, as drawn (a later object hides an
    earlier one). Two objects of one shape share the word (the caption's first occurrence), so their regions join."""
    cells = cell_owners(scene)
    regions: dict[str, torch.Tensor] = {}
    for index, obj in enumerate(scene.objects):
        covered = torch.from_numpy((cells == index).mean(-1) >= min_cover)
        regions[obj.shape] = regions.get(obj.shape, torch.zeros_like(covered)) | covered
    return regions


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First tokens of the answers right after ``<|Assistant|>:`` (the chat template writes ``": " + answer``):
    ([" yes", " Yes"], [" no", " No"]) as ``ospo_fast.engine.vqa.answer_token_ids`` reads them; SPEC stage 4
    takes the max over each pair. The model is trained on " yes" / " no"."""
    first = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "Yes", "no", "No")}
    return [first["yes"], first["Yes"]], [first["no"], first["No"]]


def answer_ids(tokenizer) -> tuple[int, int]:
    """The training targets: the first tokens of " yes" and " no"."""
    yes, no = answer_token_ids(tokenizer)
    return yes[0], no[0]


QUESTION_KINDS = ("there", "there", "there_shape", "is_colour", "rel_shapes", "rel_full", "there_rel")
# Phase und's mix: shape and relation questions twice as often (the colour ones are learnt first, see BUILD.md).
UND_QUESTION_KINDS = ("there", "there_shape", "there_shape", "is_colour", "rel_shapes", "rel_shapes", "rel_full",
                      "rel_full", "there_rel", "there_rel")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def make_question(spec: world.SceneSpec, rng: np.random.Generator, yes: bool,
                  kinds: tuple[str, ...] = QUESTION_KINDS) -> str:
    """A yes/no question about a scene spec whose true answer is ``yes``. Templates:
    ``Is there a {colour} {shape}?``, ``Is there a {shape}?``, ``Is the {shape} {colour}?``,
    ``Is the {shape} {relation} the {shape}?``, ``Is the {colour} {shape} {relation} the {colour} {shape}?``,
    ``Is there a {colour} {shape} {relation} a {colour} {shape}?`` (relation as in captions, e.g. "to the left of")."""
    pairs = list(zip(spec.colors, spec.shapes))
    if not spec.relation:
        kinds = tuple(k for k in kinds if not k.startswith(("rel_", "there_rel")))
    kind = kinds[rng.integers(len(kinds))]
    if kind == "there_shape" and not yes and len(pairs) == len(world.SHAPES):
        kind = "there"
    if kind == "there":
        if yes:
            c, s = pairs[rng.integers(len(pairs))]
        else:
            options = [(c, s) for c in world.COLORS for s in world.SHAPES if (c, s) not in pairs]
            hard = [(c, s) for c, s in options if c in spec.colors or s in spec.shapes]
            pool = hard if rng.random() < 0.7 else options
            c, s = pool[rng.integers(len(pool))]
        return f"Is there a {c} {s}?"
    if kind == "there_shape":
        pool = list(spec.shapes) if yes else [s for s in world.SHAPES if s not in spec.shapes]
        return f"Is there a {pool[rng.integers(len(pool))]}?"
    if kind == "is_colour":
        c, s = pairs[rng.integers(len(pairs))]
        if not yes:
            others = [x for x in world.COLORS if x != c]
            c = others[rng.integers(len(others))]
        return f"Is the {s} {c}?"
    (c1, s1), (c2, s2) = pairs
    rel = spec.relation
    if rng.random() < 0.5:  # ask it the other way round
        (c1, s1), (c2, s2), rel = (c2, s2), (c1, s1), _OPPOSITE[rel]
    if not yes:
        if kind != "rel_shapes" and rng.random() < 0.4:  # swap the colour binding instead of the relation
            c1, c2 = c2, c1
        else:
            others = [r for r in world.RELATIONS if r != rel]
            rel = others[rng.integers(len(others))]
    phrase = world.CAPTION_RELATION[rel]
    if kind == "rel_shapes":
        return f"Is the {s1} {phrase} the {s2}?"
    if kind == "rel_full":
        return f"Is the {c1} {s1} {phrase} the {c2} {s2}?"
    return f"Is there a {c1} {s1} {phrase} a {c2} {s2}?"
