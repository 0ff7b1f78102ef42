"""Object masks: Otsu thresholds bit-exact with skimage, union and smoothing against scipy, every backend equal to
the reference, edge cases (constant, NaN, padded objects), layer selection."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu

from ospo_fast._backend import cpp_available
from ospo_fast.config import MaskConfig
from ospo_fast.ops.object_masks import (
    aggregate_columns,
    object_masks,
    object_masks_ref,
    select_layers,
    soft_mask,
)
from tests.eager_reference import eager_object_maps
from tests.gpu import TRITON, backend_device

BACKENDS = [
    "ref",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="ospo_fast._C not built")),
    TRITON,  # CUDA tensors on a GPU, CPU tensors under TRITON_INTERPRET=1 (tests.gpu.backend_device)
]


def _maps(kind: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(shape, generator=g)
    if kind == "peaked":  # attention-like: a few hot cells over a low floor
        x = torch.rand(shape, generator=g) * 0.01
        hot = torch.rand(shape, generator=g) > 0.97
        return x + hot * torch.rand(shape, generator=g)
    if kind == "bimodal":
        lo = 0.2 + 0.05 * torch.randn(shape, generator=g)
        hi = 0.7 + 0.05 * torch.randn(shape, generator=g)
        return torch.where(torch.rand(shape, generator=g) > 0.6, hi, lo)
    if kind == "ties":  # few distinct values: many empty bins, so exact variance ties decide the threshold
        return torch.randint(0, 5, shape, generator=g).float()
    if kind == "softmax":  # what attention columns look like: tiny values, large dynamic range
        return torch.softmax(3 * torch.randn(shape, generator=g).flatten(-2), -1).view(shape) * 1e-3
    raise ValueError(kind)


def _skimage_masks(norm: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Oracle on (B, O, G1, G2) maps normalised in float64: thresholds (B, O) float64 (skimage's Otsu x the scale
    as float32, as the op defines it), masks (B, O, G1, G2) bool."""
    thr = np.zeros(norm.shape[:2], dtype=np.float64)
    for b in range(norm.shape[0]):
        for o in range(norm.shape[1]):
            thr[b, o] = threshold_otsu(norm[b, o], nbins=256) * float(np.float32(scale))
    return thr, norm > thr[:, :, None, None]


def _numpy_minmax(x: np.ndarray) -> np.ndarray:
    """(B, O, G1, G2) any float -> the same maps min-max normalised in float64 (constant maps -> zeros)."""
    x = x.astype(np.float64)
    flat = x.reshape(*x.shape[:2], -1)
    lo, hi = flat.min(-1)[..., None, None], flat.max(-1)[..., None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > lo, (x - lo) / (hi - lo), 0.0)


def _assert_equals_skimage(out, maps: torch.Tensor, scale: float = 0.8) -> None:
    norm = _numpy_minmax(maps.double().cpu().numpy())
    np.testing.assert_array_equal(out.maps.cpu().numpy(), norm.astype(np.float32))
    thr, masks = _skimage_masks(norm, scale)
    np.testing.assert_array_equal(out.thresholds.cpu().numpy(), thr.astype(np.float32))
    np.testing.assert_array_equal(out.masks.cpu().numpy(), masks)
    np.testing.assert_array_equal(out.union.cpu().numpy(), masks.any(axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shape", [
    ("random", (2, 3, 8, 8)), ("peaked", (4, 2, 24, 24)), ("bimodal", (2, 3, 24, 24)), ("ties", (3, 4, 8, 8)),
    ("softmax", (2, 2, 24, 24)), ("peaked", (3, 47, 9, 131)),
])
def test_thresholds_and_masks_equal_skimage(backend, kind, shape):
    maps = _maps(kind, shape).to(backend_device(backend))
    _assert_equals_skimage(object_masks(maps, backend=backend), maps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float32, torch.finfo(torch.float32).max),
                                       (torch.float64, 1e300)])
def test_range_beyond_float32_equals_skimage(backend, dtype, big):
    """A finite map whose max - min overflows float32 (float32 normalisation gave NaN cells and an empty mask with no
    error) normalises like skimage's float64 one; float64 maps beyond float32's range stay float64."""
    g = torch.Generator().manual_seed(4)
    maps = (torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64) * 2 - 1).to(dtype) * big  # (B, O, G, G)
    maps[0, 0, 0, 0], maps[0, 0, 0, 1] = -big, big  # the full range in one map
    maps[1, 1] = torch.where(maps[1, 1] > 0, 1.0, -1.0).to(dtype) * big  # two values only: Otsu splits them
    maps = maps.to(backend_device(backend))
    out = object_masks(maps, backend=backend)
    assert not torch.isnan(out.maps).any() and bool(out.masks[1, 1].any())
    _assert_equals_skimage(out, maps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 0.0), (torch.bfloat16, 4 * 2**-8), (torch.float16, 4 * 2**-11)])
def test_low_precision_inputs(backend, dtype, atol):
    """Low-precision maps are upcast; the normalised map stays within the input's rounding of the fp32 one and
    the thresholds and masks are skimage's on the upcast map normalised in float64."""
    maps = _maps("bimodal", (3, 5, 24, 24), seed=1).to(backend_device(backend))
    out = object_masks(maps.to(dtype), backend=backend)
    torch.testing.assert_close(out.maps, object_masks_ref(maps).maps, atol=atol, rtol=0)
    _assert_equals_skimage(out, maps.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_equal_reference(backend):
    maps = torch.cat([_maps(k, (2, 3, 24, 24), seed=3) for k in ("random", "peaked", "ties")], dim=1)
    valid = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    maps, valid = maps.to(backend_device(backend)), valid.to(backend_device(backend))
    config = MaskConfig(otsu_scale=0.7)
    ref = object_masks_ref(maps, config, object_valid=valid)
    out = object_masks(maps, config, backend=backend, object_valid=valid)
    for name in ("maps", "thresholds", "masks", "union"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=0, rtol=0)
    torch.testing.assert_close(out.soft, ref.soft, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_and_padded_objects(backend):
    maps = _maps("peaked", (2, 3, 8, 8))
    maps[0, 1] = 0.25  # constant map
    maps[1, 2] = float("nan")  # garbage in a padded object is ignored
    valid = torch.tensor([[True, True, True], [True, True, False]])
    maps, valid = maps.to(backend_device(backend)), valid.to(backend_device(backend))
    out = object_masks(maps, backend=backend, object_valid=valid)
    assert threshold_otsu(np.full((8, 8), 0.0, np.float32)) == 0.0  # skimage on the normalised constant map
    assert torch.all(out.maps[0, 1] == 0) and out.thresholds[0, 1] == 0 and not out.masks[0, 1].any()
    assert not out.masks[1, 2].any()
    torch.testing.assert_close(out.union, out.masks.any(dim=1), atol=0, rtol=0)
    assert not torch.isnan(out.maps).any()


def test_all_constant_image_gives_zero_soft_mask():
    out = object_masks_ref(torch.ones(1, 2, 8, 8))
    assert not out.union.any() and torch.all(out.soft == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_map_raises_naming_image_and_object(bad):
    maps = _maps("random", (2, 3, 8, 8))
    maps[1, 2, 4, 5] = bad
    with pytest.raises(ValueError, match="image 1, object 2"):
        object_masks(maps, backend="ref")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(B, O, G, G\)"):
        object_masks(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="object_valid"):
        object_masks(torch.rand(2, 3, 8, 8), object_valid=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(3, 24, 24), (2, 9, 13)])
def test_soft_mask_equals_scipy_gaussian(shape):
    binary = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.8
    out = soft_mask(binary, kernel=5, sigma=1.0)
    for i in range(shape[0]):
        smooth = gaussian_filter(binary[i].numpy().astype(np.float64), sigma=1.0, mode="mirror", truncate=2.0)
        smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
        np.testing.assert_allclose(out[i].numpy(), smooth, atol=1e-6)
    assert out.dtype == torch.float32 and out.min() == 0 and out.max() == 1


def test_custom_op_fake_and_schema():
    from ospo_fast.ops.object_masks import _object_masks_op

    maps, valid = torch.rand(2, 3, 8, 8), torch.ones(2, 3, dtype=torch.bool)
    torch.library.opcheck(_object_masks_op, (maps, valid, 0.8, 5, 1.0, "ref"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles():
    fn = torch.compile(lambda m: object_masks(m, backend="ref").soft, backend="eager")
    maps = _maps("peaked", (2, 2, 8, 8))
    torch.testing.assert_close(fn(maps), object_masks_ref(maps).soft)


@pytest.mark.parametrize("num_layers,skip,expected", [
    (30, 5, list(range(5, 25))), (24, 5, list(range(5, 19))), (12, 5, [5, 6]), (11, 5, [5]), (10, 5, [4, 5]),
    (3, 5, [1]), (2, 5, [0, 1]), (1, 5, [0]), (6, 0, list(range(6))),
])
def test_select_layers(num_layers, skip, expected):
    assert select_layers(num_layers, skip) == expected


def test_select_layers_rejects_bad_values():
    with pytest.raises(ValueError, match="num_layers"):
        select_layers(0)
    with pytest.raises(ValueError, match="skip"):
        select_layers(12, -1)


def test_aggregate_columns_means_heads_layers_tokens():
    cols = torch.rand(4, 3, 2, 10)  # (L, H, S, Q)
    valid = torch.tensor([True, False])
    torch.testing.assert_close(aggregate_columns(cols, valid), cols[:, :, 0].mean(dim=(0, 1)))
    torch.testing.assert_close(aggregate_columns(cols), cols.mean(dim=(0, 1, 2)))


# -- the fused op: captured scores -> masks and soft masks (issue 19a) --------------------------------------------
def _scores(b=3, o=5, s=7, g1=11, g2=13, heads=4, layers=3, seed=0):
    """Raw per-layer, per-head attention columns (L, H, B, O, S, G1, G2) float32 (softmax-like, large dynamic
    range), the capture's sums over layers and heads, ragged sub-token and object padding, and the counts."""
    from ospo_fast.ops.object_masks import CapturedScores

    g = torch.Generator().manual_seed(seed)
    cols = torch.softmax(3 * torch.randn(layers, heads, b, o, s, g1 * g2, generator=g), -1)
    cols = cols.view(layers, heads, b, o, s, g1, g2) * 1e-2
    n_real = torch.randint(1, s + 1, (b, o), generator=g)
    token_valid = torch.arange(s)[None, None, :] < n_real[..., None]  # (B, O, S)
    cols = torch.where(token_valid[None, None, :, :, :, None, None], cols, float("nan"))  # padding never read
    object_valid = torch.ones(b, o, dtype=torch.bool)
    object_valid[0, o - 2:] = False
    object_valid[b - 1, o - 1] = False
    sums = cols.sum(dim=(0, 1))  # (B, O, S, G1, G2) float32, as the capture accumulates
    counts = torch.full((b, g1, g2), float(layers))
    return cols, CapturedScores(sums, counts, heads, token_valid), object_valid


def _numpy_maps(scores, object_valid) -> np.ndarray:
    """float64 maps in the op's defined order: sub-tokens added in ascending order, one division."""
    x, tv = scores.sums.numpy().astype(np.float64), scores.token_valid.numpy()
    acc = np.zeros(x.shape[:2] + x.shape[3:])
    for s in range(x.shape[2]):
        acc = acc + np.where(tv[:, :, s, None, None], x[:, :, s], 0.0)
    denom = scores.counts.numpy().astype(np.float64)[:, None] * (tv.sum(-1) * scores.heads)[:, :, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(object_valid.numpy()[:, :, None, None], acc / denom, 0.0)


def _soft_scipy(union: np.ndarray) -> np.ndarray:
    out = np.zeros(union.shape)
    for i in range(union.shape[0]):
        smooth = gaussian_filter(union[i].astype(np.float64), sigma=1.0, mode="mirror", truncate=2.0)
        span = smooth.max() - smooth.min()
        out[i] = (smooth - smooth.min()) / span if span > 0 else 0.0
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_scores_equals_skimage_and_reference(backend):
    """3 images x 5 objects x 7 sub-tokens on an 11x13 grid, padded sub-tokens and objects: maps are the mean
    over heads, layers and real sub-tokens (today's aggregate_columns), thresholds and masks are skimage's bit for
    bit, the soft mask is scipy's Gaussian of the union, and every backend equals the reference."""
    from ospo_fast.ops.object_masks import object_masks_from_scores, object_masks_from_scores_ref

    cols, scores, valid = _scores()
    dev = backend_device(backend)
    on_dev = type(scores)(scores.sums.to(dev), scores.counts.to(dev), scores.heads, scores.token_valid.to(dev))
    out = object_masks_from_scores(on_dev, backend=backend, object_valid=valid.to(dev))
    maps = _numpy_maps(scores, valid)
    for b, o in [(1, 0), (2, 3)]:  # the mean is today's aggregate_columns over (L, H, S, Q) columns
        want = aggregate_columns(cols[:, :, b, o].flatten(-2), scores.token_valid[b, o]).double()
        np.testing.assert_allclose(maps[b, o].reshape(-1), want.numpy(), rtol=1e-5)
    norm = _numpy_minmax(maps)
    thr, masks = _skimage_masks(norm, 0.8)
    masks &= valid.numpy()[:, :, None, None]
    np.testing.assert_array_equal(out.maps.cpu().numpy(), norm.astype(np.float32))
    np.testing.assert_array_equal(out.thresholds.cpu().numpy(), thr.astype(np.float32))
    np.testing.assert_array_equal(out.masks.cpu().numpy(), masks)
    np.testing.assert_array_equal(out.union.cpu().numpy(), masks.any(axis=1))
    np.testing.assert_allclose(out.soft.cpu().numpy(), _soft_scipy(masks.any(axis=1)), atol=1e-6)
    ref = object_masks_from_scores_ref(scores, object_valid=valid)
    for name in ("maps", "thresholds", "masks", "union"):
        torch.testing.assert_close(getattr(out, name).cpu(), getattr(ref, name), atol=0, rtol=0)
    torch.testing.assert_close(out.soft.cpu(), ref.soft, atol=1e-6, rtol=0)
    assert not out.masks[0, 3:].any() and not out.masks[2, 4].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_scores_constant_empty_and_uncaptured(backend):
    """A constant map gives an empty mask; an image whose maps are all constant a zero soft mask; a cell never
    captured (count 0) or a NaN score is a ValueError naming the image and object."""
    from ospo_fast.ops.object_masks import CapturedScores, object_masks_from_scores

    dev = backend_device(backend)
    _, scores, valid = _scores(b=2, o=3, s=2, g1=8, g2=8, seed=1)
    sums = scores.sums.clone()
    sums[0] = 0.5  # image 0: every object constant
    out = object_masks_from_scores(CapturedScores(sums.to(dev), scores.counts.to(dev), 4,
                                                  scores.token_valid.to(dev)), backend=backend)
    assert torch.all(out.thresholds[0] == 0) and not out.masks[0].any() and torch.all(out.soft[0] == 0)
    assert out.union[1].any() and out.soft[1].max() == 1
    counts = scores.counts.clone()
    counts[1, 3, 4] = 0  # never captured
    with pytest.raises(ValueError, match="image 1, object 0"):
        object_masks_from_scores(CapturedScores(scores.sums.to(dev), counts.to(dev), 4, scores.token_valid.to(dev)),
                                 backend=backend)
    sums = scores.sums.clone()
    sums[1, 2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 1, object 2"):
        object_masks_from_scores(CapturedScores(sums.to(dev), scores.counts.to(dev), 4, scores.token_valid.to(dev)),
                                 backend=backend)


def test_from_scores_bad_shapes_raise():
    from ospo_fast.ops.object_masks import CapturedScores, object_masks_from_scores

    _, s, _ = _scores(b=2, o=2, s=2, g1=8, g2=8)
    with pytest.raises(ValueError, match=r"\(B, O, S, G1, G2\)"):
        object_masks_from_scores(CapturedScores(s.sums[0], s.counts, 4, s.token_valid))
    with pytest.raises(ValueError, match="counts"):
        object_masks_from_scores(CapturedScores(s.sums, s.counts[:, :4], 4, s.token_valid))
    with pytest.raises(ValueError, match="token_valid"):
        object_masks_from_scores(CapturedScores(s.sums, s.counts, 4, s.token_valid[:, :1]))
    with pytest.raises(ValueError, match="gaussian kernel 5"):
        object_masks_from_scores(CapturedScores(s.sums[..., :2, :], s.counts[:, :2], 4, s.token_valid))


def test_from_scores_custom_op_fake_and_compiles():
    """The op has a fake implementation (opcheck) and runs whole inside torch.compile(fullgraph=True)."""
    from ospo_fast.ops.object_masks import _from_scores_op, object_masks_from_scores_ref

    _, s, valid = _scores(b=2, o=3, s=2, g1=8, g2=8)
    torch.library.opcheck(_from_scores_op, (s.sums, s.counts, s.token_valid, valid, 4, 0.8, 5, 1.0, "ref"),
                          test_utils=("test_schema", "test_faketensor"))

    def fused(sums, counts, token_valid, valid):
        return _from_scores_op(sums, counts, token_valid, valid, 4, 0.8, 5, 1.0, "ref")

    got = torch.compile(fused, fullgraph=True, backend="eager")(s.sums, s.counts, s.token_valid, valid)
    ref = object_masks_from_scores_ref(s, object_valid=valid)
    assert torch.equal(got[3], ref.union) and torch.equal(got[2], ref.masks)
    torch.testing.assert_close(got[4], ref.soft, atol=0, rtol=0)


def _eager_maps(bundle, prompts, tokens, objects) -> torch.Tensor:
    """The reference code's method on a real (tiny) Janus (tests.eager_reference), on prompts + image tokens."""
    from ospo_fast.engine.object_attention import object_token_positions, teacher_forced_inputs

    batch = teacher_forced_inputs(bundle, prompts, tokens)
    return eager_object_maps(bundle, batch, object_token_positions(bundle.tokenizer, batch["input_ids"], objects))


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_scores_of_a_real_capture_equal_eager_and_skimage(tiny_bundle, backend):
    """The stage's path: a teacher-forced capture of the tiny Janus -> the fused op gives the masks and union of
    the eager output_attentions maps thresholded by object_masks_ref (skimage's Otsu), padded objects ignored."""
    from ospo_fast.engine.object_attention import objects_valid, teacher_forced_object_scores
    from ospo_fast.ops.object_masks import CapturedScores, object_masks_from_scores

    prompts = ["a red car and a blue bench near a tree", "a dog", "two cats beside a lamp"]
    objects = [["car", "bench", "tree"], ["dog"], ["cats", "lamp"]]
    tokens = torch.randint(0, tiny_bundle.model.config.vq_config.num_embeddings, (3, tiny_bundle.grid ** 2),
                           generator=torch.Generator().manual_seed(0))
    scores = teacher_forced_object_scores(tiny_bundle, prompts, tokens, objects)
    valid = objects_valid(objects)
    dev = backend_device(backend)
    out = object_masks_from_scores(CapturedScores(scores.sums.to(dev), scores.counts.to(dev), scores.heads,
                                                  scores.token_valid.to(dev)), backend=backend,
                                   object_valid=valid.to(dev))
    want = object_masks_ref(_eager_maps(tiny_bundle, prompts, tokens, objects), object_valid=valid)
    assert torch.equal(out.masks.cpu(), want.masks) and torch.equal(out.union.cpu(), want.union)
    torch.testing.assert_close(out.soft.cpu(), want.soft, atol=1e-6, rtol=0)


def test_from_scores_of_in_flight_capture_equal_eager_and_skimage():
    """The stage's ``generation`` context: scores captured during decoding (batches of 2, the last one ragged)
    -> the fused op gives the masks of the eager output_attentions maps of the same tokens (object_masks_ref)."""
    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.engine.object_attention import objects_valid
    from ospo_fast.models import load_janus
    from ospo_fast.ops.object_masks import object_masks_from_scores

    bundle = load_janus("builtin:tiny-4", device="cpu")
    prompts = ["a red car", "a blue bench and a green apple near the tall tree", "a cat"]
    objects = [["car"], ["bench", "apple", "tree"], ["cat"]]
    batch = generate_images(bundle, prompts, [7, 11, 7], ImageConfig(batch_size=2, compile=False), objects=objects)
    valid = objects_valid(objects)
    out = object_masks_from_scores(batch.object_scores, backend="ref", object_valid=valid)
    want = object_masks_ref(_eager_maps(bundle, prompts, batch.tokens, objects), object_valid=valid)
    assert torch.equal(out.masks, want.masks) and torch.equal(out.union, want.union)
    torch.testing.assert_close(batch.object_maps, _eager_maps(bundle, prompts, batch.tokens, objects), atol=1e-6,
                               rtol=1e-4)
