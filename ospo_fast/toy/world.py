"""The toy world: procedural 64x64 RGB scenes of one or two coloured shapes on a plain background, their captions
and the structure the OSPO pipeline keeps with each prompt.

A scene is a plain dataclass; everything is deterministic given a ``numpy.random.Generator``. Two-object scenes
always use two different colours and two different shapes, so a colour names an object unambiguously and the
structure's object words are unique.

Structure format (the pipeline's):
``{"objects": ["circle", "square"], "attributes": [["circle", "red"], ["square", "blue"]],
"relations": [["circle", "left of", "square"]]}``.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import numpy as np

SIZE = 64
BACKGROUND = (235, 235, 235)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 180),
    "cyan": (20, 200, 210),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
CAPTION_RELATION = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OBJECT_SIZE = (16, 24)  # bounding-box side in pixels, inclusive range
HELDOUT_MOD = 8  # a caption is held out when crc32(caption) % HELDOUT_MOD == 0 (12.5% of the captions)


@dataclass(frozen=True)
class ToyObject:
    """One shape: ``(cx, cy)`` centre in pixels (x right, y down), ``size`` its bounding-box side."""

    shape: str
    color: str
    cx: int
    cy: int
    size: int

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive-exclusive pixel bounds."""
        x0, y0 = self.cx - self.size // 2, self.cy - self.size // 2
        return x0, y0, x0 + self.size, y0 + self.size


@dataclass(frozen=True)
class Scene:
    """One or two objects; ``relation`` (one of RELATIONS) links ``objects[0]`` to ``objects[1]``."""

    objects: tuple[ToyObject, ...]
    relation: str | None = None
    background: tuple[int, int, int] = field(default=BACKGROUND)


@dataclass(frozen=True)
class SceneSpec:
    """What a caption fixes: colours, shapes and relation, no geometry."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    relation: str | None = None


def all_specs() -> list[SceneSpec]:
    """Every caption the world can write: 18 single objects and 720 ordered pairs with a relation."""
    specs = [SceneSpec((s,), (c,)) for c in COLORS for s in SHAPES]
    for (c1, c2), (s1, s2), rel in itertools.product(itertools.permutations(COLORS, 2),
                                                   itertools.permutations(SHAPES, 2), RELATIONS):
        specs.append(SceneSpec((s1, s2), (c1, c2), rel))
    return specs


def _check_spec(spec: SceneSpec) -> None:
    n = len(spec.shapes)
    if n not in (1, 2) or len(spec.colors) != n:
        raise ValueError(f"a scene has 1 or 2 objects with one colour each, got shapes={spec.shapes} "
                         f"colors={spec.colors}")
    for s in spec.shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; use one of {SHAPES}")
    for c in spec.colors:
        if c not in PALETTE:
            raise ValueError(f"unknown colour {c!r}; use one of {COLORS}")
    if n == 2 and (spec.relation not in RELATIONS or len(set(spec.shapes)) < 2 or len(set(spec.colors)) < 2):
        raise ValueError(f"two objects need distinct shapes, distinct colours and a relation in {RELATIONS}; "
                         f"got {spec}")


def _place_one(rng: np.random.Generator, size: int) -> tuple[int, int]:
    half = size // 2
    return int(rng.integers(half + 1, SIZE - half - 1)), int(rng.integers(half + 1, SIZE - half - 1))


def _place_pair(rng: np.random.Generator, sizes: tuple[int, int], relation: str) -> list[tuple[int, int]]:
    """Centres for two objects so that ``relation`` holds clearly: along the main axis the boxes are at least
    4 px apart; across it the centres differ by at most 6 px."""
    h0, h1 = sizes[0] // 2, sizes[1] // 2
    gap = h0 + h1 + 4
    for _ in range(1000):
        first = int(rng.integers(h0 + 1, SIZE - h0 - 1))
        second = int(rng.integers(h1 + 1, SIZE - h1 - 1))
        if relation in ("left of", "above") and second - first < gap:
            continue
        if relation in ("right of", "below") and first - second < gap:
            continue
        lo = max(h0, h1) + 1
        across0 = int(rng.integers(lo, SIZE - lo))
        across1 = int(np.clip(across0 + rng.integers(-6, 7), lo, SIZE - lo - 1))
        if relation in ("left of", "right of"):
            return [(first, across0), (second, across1)]
        return [(across0, first), (across1, second)]
    raise RuntimeError(f"could not place objects of sizes {sizes} for {relation!r}")


def scene_from_spec(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Random geometry (sizes, positions) for a caption's colours, shapes and relation."""
    _check_spec(spec)
    sizes = tuple(int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1)) for _ in spec.shapes)
    centres = [_place_one(rng, sizes[0])] if len(sizes) == 1 else _place_pair(rng, sizes, spec.relation)
    objects = tuple(ToyObject(s, c, cx, cy, z) for s, c, (cx, cy), z in zip(spec.shapes, spec.colors, centres, sizes))
    return Scene(objects=objects, relation=spec.relation)


def sample_spec(rng: np.random.Generator, p_single: float = 0.2) -> SceneSpec:
    """A random caption spec: one object with probability ``p_single``, else an ordered pair with a relation."""
    if rng.random() < p_single:
        return SceneSpec((SHAPES[rng.integers(3)],), (COLORS[rng.integers(6)],))
    shapes = tuple(rng.choice(SHAPES, size=2, replace=False).tolist())
    colors = tuple(rng.choice(COLORS, size=2, replace=False).tolist())
    return SceneSpec(shapes, colors, RELATIONS[rng.integers(4)])


def sample_scene(rng: np.random.Generator, p_single: float = 0.2) -> Scene:
    """A random scene; the same generator state gives the same scene."""
    return scene_from_spec(sample_spec(rng, p_single), rng)


def spec_of(scene: Scene) -> SceneSpec:
    return SceneSpec(tuple(o.shape for o in scene.objects), tuple(o.color for o in scene.objects), scene.relation)


def _shape_mask(obj: ToyObject) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of one object."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    x0, y0, x1, y1 = obj.box()
    if obj.shape == "square":
        return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    if obj.shape == "circle":
        r = obj.size / 2
        cx, cy = x0 + r - 0.5, y0 + r - 0.5
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if obj.shape == "triangle":  # apex up, base at the bottom of the box
        inside_rows = (yy >= y0) & (yy < y1)
        t = (yy - y0 + 0.5) / obj.size  # 0 at the apex, 1 at the base
        half_width = t * obj.size / 2
        return inside_rows & (np.abs(xx - (x0 + obj.size / 2 - 0.5)) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")


def object_mask(obj: ToyObject) -> np.ndarray:
    """Boolean (64, 64) mask of the pixels ``obj`` covers when rendered alone."""
    return _shape_mask(obj)


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 (64, 64, 3) RGB, hard edges (no anti-aliasing)."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = scene.background
    for obj in scene.objects:
        image[_shape_mask(obj)] = PALETTE[obj.color]
    return image


def empty_render() -> np.ndarray:
    """A scene without objects: uint8 (SIZE, SIZE, 3), all ``BACKGROUND``."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    return image


def plain_background_cells(images: np.ndarray, grid: int) -> np.ndarray:
    """(B, grid * grid) bool, row-major: the cells of renders ``images`` (B, SIZE, SIZE, 3) uint8 that hold no pixel
    other than ``BACKGROUND``."""
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3) or SIZE % grid:
        raise ValueError(f"images of shape {images.shape} on a {grid}x{grid} grid: give renders (B, {SIZE}, {SIZE}, 3) "
                         f"and a grid that divides {SIZE}")
    drawn = (images != np.asarray(BACKGROUND, dtype=images.dtype)).any(-1)  # (B, SIZE, SIZE)
    patch = SIZE // grid
    return ~drawn.reshape(len(images), grid, patch, grid, patch).any(axis=(2, 4)).reshape(len(images), -1)


def background_code_share(tokens: np.ndarray, empty_tokens: np.ndarray, images: np.ndarray) -> float:
    """How local a tokenizer's codes are: the share of the plain-background cells of ``images`` whose code in
    ``tokens`` (B, N) equals the same cell's code in ``empty_tokens`` (1, N), the tokens of ``empty_render()``.
    1 for a tokenizer whose codes are local; near 0 when a background cell's code depends on the objects
    elsewhere in the image."""
    tokens, empty_tokens = np.asarray(tokens), np.asarray(empty_tokens)
    grid = int(round(tokens.shape[1] ** 0.5))
    background = plain_background_cells(images, grid)
    return float((tokens == empty_tokens)[background].mean())


def caption_of_spec(spec: SceneSpec) -> str:
    first = f"a {spec.colors[0]} {spec.shapes[0]}"
    if len(spec.shapes) == 1:
        return first
    return f"{first} {CAPTION_RELATION[spec.relation]} a {spec.colors[1]} {spec.shapes[1]}"


def caption(scene: Scene) -> str:
    """e.g. ``"a red circle to the left of a blue square"``."""
    return caption_of_spec(spec_of(scene))


def structure_of_spec(spec: SceneSpec) -> dict:
    objects = list(spec.shapes)
    relations = [[spec.shapes[0], spec.relation, spec.shapes[1]]] if spec.relation else []
    return {"objects": objects, "attributes": [[s, c] for s, c in zip(spec.shapes, spec.colors)],
            "relations": relations}


def structure(scene: Scene) -> dict:
    """The pipeline's structure dict: objects, [object, colour] bindings, [subject, relation, object] triples."""
    return structure_of_spec(spec_of(scene))


def spec_from_structure(struct: dict) -> SceneSpec:
    """Inverse of ``structure_of_spec``; raises ValueError on a structure the world cannot draw."""
    objects = list(struct.get("objects", []))
    colour_of = {obj: col for obj, col in struct.get("attributes", [])}
    missing = [o for o in objects if o not in colour_of]
    if missing:
        raise ValueError(f"structure {struct} gives no colour for {missing}; every object needs one attribute")
    relations = struct.get("relations", [])
    relation = None
    if relations:
        subj, relation, obj = relations[0]
        if [subj, obj] != objects[:2]:
            objects = [subj, obj]
    spec = SceneSpec(tuple(objects), tuple(colour_of[o] for o in objects), relation)
    _check_spec(spec)
    return spec


def is_heldout(caption_text: str) -> bool:
    """Deterministic split: True for the ~12.5% of captions kept out of training."""
    return zlib.crc32(caption_text.encode()) % HELDOUT_MOD == 0


def category_of(spec: SceneSpec) -> str:
    """The SPEC sub-category a toy prompt belongs to."""
    return "color" if len(spec.shapes) == 1 else "spatial_2d"


def split_specs(split: str) -> list[SceneSpec]:
    """All specs of ``split`` ("train" | "heldout"), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'")
    want = split == "heldout"
    return [s for s in all_specs() if is_heldout(caption_of_spec(s)) == want]


def sample_prompts(n: int, split: str = "train", seed: int = 0, p_single: float = 0.2) -> list[dict]:
    """``n`` prompt records ``{"prompt", "category", "structure"}`` from ``split``, deterministic per seed.
    Distinct captions as long as the split has enough (single objects drawn with probability ``p_single``),
    then repeats."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = np.random.default_rng([seed, 7919])
    specs = split_specs(split)
    singles = [s for s in specs if len(s.shapes) == 1]
    pairs = [s for s in specs if len(s.shapes) == 2]
    order_s = list(rng.permutation(len(singles))) if singles else []
    order_p = list(rng.permutation(len(pairs)))
    records = []
    counts = {"single": 0, "pair": 0}
    for _ in range(n):
        kind = "single" if singles and rng.random() < p_single else "pair"
        pool, order = (singles, order_s) if kind == "single" else (pairs, order_p)
        spec = pool[order[counts[kind] % len(order)]]
        counts[kind] += 1
        records.append({"prompt": caption_of_spec(spec), "category": category_of(spec),
                        "structure": structure_of_spec(spec)})
    return records
