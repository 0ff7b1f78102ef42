"""Object masks from object-word attention maps (SPEC stage 3).

Per image b and object o, ``maps[b, o]`` is the (G, G) attention that the G*G image-token queries pay to the
object's word (already averaged over the selected layers, heads and sub-tokens). The reference code then:

1. min-max normalises the map;
2. thresholds it with Otsu (``skimage.filters.threshold_otsu(map, nbins=256)``) times 0.8;
3. ORs the binary masks of all objects of the prompt (the union);
4. smooths the union with a 5x5 Gaussian (sigma 1) and min-max normalises it per image: the SimPO weights m_t.

Normalisation is done in float64 in every backend: ``(x - min) / (max - min)`` of a finite float32 map is then
finite even where ``max - min`` overflows float32 (a map spanning -3e38..3e38 would give NaN cells in float32). The
returned ``maps`` are that float64 map rounded to float32; bins and masks use the float64 values.

Exactness against skimage (``threshold_otsu`` on the map normalised in float64): the 256 histogram edges
``linspace(0, 1, 257)`` are exact binary fractions, so a value's bin is ``min(floor(256 x), 255)`` exactly, and the
bin centres are ``(2i + 1) / 512``. Class weights and sums are then exact in float64, so the between-class variance
is computed with the same float64 operations as skimage (``w1 * w2 * (m1 - m2) ** 2``) and ``argmax`` takes the
first maximum as numpy does: every backend picks skimage's threshold bit for bit. The scale is used as a float32
number (the Triton kernel's scalar type): threshold = centre x float32(otsu_scale), exact in float64, and a cell is
in the mask when its float64 value exceeds it; ``thresholds`` are returned rounded to float32.

Defined edge cases:
- a constant map normalises to zeros, its threshold is 0 and its mask is empty (skimage returns the constant
  itself for a constant image; on the normalised map that is 0);
- a padded object (``object_valid`` False) is treated as a constant map and never joins the union;
- an image whose union is empty gets an all-zero soft mask;
- a NaN or infinite value in a valid object's map raises ValueError naming the image and object index.

Backends: ``object_masks_ref`` (plain torch, the oracle), ``kernels/object_masks.py`` (Triton, one program per
map, no host synchronisation) and ``csrc/object_masks.cpp`` (C++ with OpenMP over maps). Union and smoothing are
shared torch code. The public op is a ``torch.library`` custom op with a fake implementation.

The fused op (issue 19a), ``object_masks_from_scores``: from what the attention capture accumulates
(``CapturedScores``: per image, object, sub-token and cell, the probabilities summed over heads and the recorded
layers, and the layers recorded per cell) one call per batch (one Triton launch, or one C++ call with OpenMP over
images) forms the maps, the Otsu masks, the union and the soft mask. The map of a valid object is, in float64,
``(sum over its real sub-tokens s, in ascending s, of sums[s]) / (counts * heads * n_real_sub_tokens)``: the mean
over heads, layers and sub-tokens, with the same float64 operations in the same order in every backend, so the
maps, thresholds and masks are bit-identical across backends and equal to skimage on that map. A cell never captured
(count 0) gives a NaN map value and the NaN error below. ``object_masks_from_scores_ref`` is the oracle:
``maps_from_scores_ref`` then ``object_masks_ref``. The fused backends smooth in float64 (soft masks equal the
reference's float32 matrix smoothing within 1e-6).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ospo_fast._backend import pick_backend
from ospo_fast.config import MaskConfig

NBINS = 256


@dataclass
class ObjectMasks:
    """Result of ``object_masks``. Shapes: B images, O objects, G x G grid.

    maps: (B, O, G, G) float32, min-max normalised; thresholds: (B, O) float32, Otsu x otsu_scale;
    masks: (B, O, G, G) bool, float64 map > threshold; union: (B, G, G) bool, OR over valid objects;
    soft: (B, G, G) float32 in [0, 1], Gaussian-smoothed union min-max normalised per image (m_t).
    """

    maps: torch.Tensor
    thresholds: torch.Tensor
    masks: torch.Tensor
    union: torch.Tensor
    soft: torch.Tensor


def select_layers(num_layers: int, skip: int = 5) -> list[int]:
    """Layers whose attention forms the masks: all but the first and last ``skip`` (SPEC: k = 5).

    A model with too few layers (``num_layers <= 2 * skip``) shrinks k to ``(num_layers - 1) // 2`` so at least one
    middle layer stays (e.g. 10 layers, k=5 -> k=4 -> [4, 5]; 3 layers -> [1]; 1 or 2 layers -> all layers).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if skip < 0:
        raise ValueError(f"skip={skip} must be >= 0 (the number of first and last layers to leave out)")
    k = min(skip, (num_layers - 1) // 2)
    return list(range(k, num_layers - k))


def gaussian_kernel1d(kernel: int = 5, sigma: float = 1.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian taps (kernel,) as cv2.getGaussianKernel / scipy's gaussian_filter use."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"gaussian kernel size {kernel} must be odd and >= 1 (the reference uses 5)")
    if sigma <= 0:
        raise ValueError(f"gaussian sigma {sigma} must be > 0 (the reference uses 1.0)")
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    taps = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _minmax_per_image(x: torch.Tensor) -> torch.Tensor:
    """(N, G, G) -> (N, G, G): (x - min) / (max - min) per image; a constant image becomes zeros."""
    flat = x.flatten(1)
    lo = flat.amin(dim=1)[:, None, None]
    span = flat.amax(dim=1)[:, None, None] - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def soft_mask(binary: torch.Tensor, kernel: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """(N, G, G) bool/float -> (N, G, G) float32: separable Gaussian smoothing with reflect-101 borders (cv2's
    default BORDER_REFLECT_101, scipy's mode="mirror"), then min-max normalised per image (all zeros if constant).
    """
    if binary.dim() != 3:
        raise ValueError(f"soft_mask expects (N, G, G), got shape {tuple(binary.shape)}")
    n, h, w = binary.shape
    pad = kernel // 2
    if pad >= min(h, w):  # reflect-101 needs pad < side
        raise ValueError(f"gaussian kernel {kernel} needs a grid larger than {pad} cells per side, got {h}x{w}")
    x = binary.to(torch.float32)
    rows = _blur_matrix(h, kernel, sigma, x.device)  # (G, G): smoothing with the borders folded in
    cols = _blur_matrix(w, kernel, sigma, x.device)
    return _minmax_per_image(rows @ x @ cols.T)  # (N, G, G)


def _blur_matrix(n: int, kernel: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n, n) float32 matrix M with (M @ v)[i] = sum_k tap[k] * v[reflect101(i + k - kernel // 2)]."""
    taps = gaussian_kernel1d(kernel, sigma, dtype=torch.float64)
    pad = kernel // 2
    src = torch.arange(n)[:, None] + torch.arange(kernel)[None, :] - pad  # (n, kernel)
    src = src.abs()
    src = torch.where(src >= n, 2 * (n - 1) - src, src)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.scatter_add_(1, src, taps.expand(n, kernel).contiguous())
    return m.to(device=device, dtype=torch.float32)


def aggregate_columns(columns: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average raw attention columns to one map value per query, as the reference: heads, layers, sub-tokens.

    columns: (L, H, S, Q) attention of Q queries to S sub-token keys in L layers and H heads;
    valid: (S,) bool, the real sub-tokens (default all). Returns (Q,) float32.
    """
    if columns.dim() != 4:
        raise ValueError(f"aggregate_columns expects (L, H, S, Q), got shape {tuple(columns.shape)}")
    per_token = columns.float().mean(dim=1).mean(dim=0)  # (S, Q)
    if valid is not None:
        if not bool(valid.any()):
            raise ValueError("aggregate_columns: no valid sub-token; every object needs at least one key position")
        per_token = per_token[valid]
    return per_token.mean(dim=0)


def otsu_from_normalised_ref(norm: torch.Tensor, constant: torch.Tensor, otsu_scale: float) -> torch.Tensor:
    """(N, P) normalised float64 maps, (N,) bool constant flags -> (N,) float64 thresholds (Otsu x otsu_scale).

    Bit-exact with skimage's threshold_otsu(nbins=256) on maps spanning exactly [0, 1] (see the module docstring).
    """
    n, p = norm.shape
    bins = torch.clamp((norm * NBINS).floor().to(torch.int64), 0, NBINS - 1)  # (N, P); NaN maps land anywhere
    counts = torch.zeros(n, NBINS, dtype=torch.int64, device=norm.device)
    counts.scatter_add_(1, bins, torch.ones_like(bins))  # (N, 256)
    centers = (torch.arange(NBINS, dtype=torch.float64, device=norm.device) * 2 + 1) / (2 * NBINS)
    w1 = counts.cumsum(1)  # exact integer class weights
    s1 = (counts.double() * centers).cumsum(1)  # exact: dyadic values far below 2**53
    total_w = w1[:, -1:]
    total_s = s1[:, -1:]
    w2_next = (total_w - w1)[:, :-1]  # weight of bins i+1.. ; >= 1 since the last bin holds the max
    m1 = s1[:, :-1] / w1[:, :-1].clamp(min=1)
    m2 = (total_s - s1)[:, :-1] / w2_next.clamp(min=1)
    variance = (w1[:, :-1] * w2_next).double() * (m1 - m2) ** 2  # (N, 255), skimage's variance12
    idx = variance.argmax(dim=1)  # first maximum, as numpy
    threshold = centers[idx] * scale_as_float32(otsu_scale)  # exact: 9-bit centre x 24-bit scale
    return torch.where(constant, torch.zeros_like(threshold), threshold)


def scale_as_float32(otsu_scale: float) -> float:
    """``otsu_scale`` rounded to float32 (as the Triton kernel receives it), as a Python float."""
    return float(np.float32(otsu_scale))


def _prepare(maps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, O, G, G) any float, (B, O) bool or None (all valid) -> (B*O, G*G) float32 (float64 stays float64),
    padded objects zeroed."""
    x = maps if maps.dtype == torch.float64 else maps.to(torch.float32)
    if valid is not None:
        x = torch.where(valid[:, :, None, None], x, 0.0)
    return x.flatten(2).flatten(0, 1)


def _per_map_ref(flat: torch.Tensor, otsu_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, P) float32/float64 -> normalised (N, P) float32, thresholds (N,) float32, masks (N, P) bool.

    Normalised in float64 so that a finite map whose range overflows float32 still normalises."""
    x = flat.double()  # (N, P)
    lo = x.amin(dim=1, keepdim=True)  # amin / amax propagate NaN
    hi = x.amax(dim=1, keepdim=True)
    span = hi - lo  # finite for any finite float32 map
    constant = span[:, 0] <= 0
    norm = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)  # (N, P) float64 in [0, 1]
    thresholds = otsu_from_normalised_ref(norm, constant, otsu_scale)  # (N,) float64
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))[:, 0]  # a non-finite map gets a NaN threshold
    thresholds = torch.where(bad, float("nan"), thresholds)
    return norm.float(), thresholds.float(), norm > thresholds[:, None]


def _per_map(flat: torch.Tensor, otsu_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        return torch.ops.ospo_fast_C.object_masks_otsu(flat, float(otsu_scale))
    if backend == "triton":
        from ospo_fast.kernels.object_masks import object_masks_otsu_triton

        return object_masks_otsu_triton(flat, otsu_scale)
    return _per_map_ref(flat, otsu_scale)


def _finish(norm: torch.Tensor, thresholds: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None,
            shape: torch.Size, kernel: int, sigma: float) -> tuple[torch.Tensor, ...]:
    b, o, g1, g2 = shape
    masks = masks.view(b, o, g1, g2)
    if valid is not None:
        masks = masks & valid[:, :, None, None]
    union = masks.any(dim=1)  # (B, G, G)
    soft = soft_mask(union, kernel, sigma)
    return norm.view(b, o, g1, g2), thresholds.view(b, o), masks, union, soft


def _check(maps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, O, G, G), got shape {tuple(maps.shape)}; add a batch or object axis")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating tensor, got dtype {maps.dtype}")
    b, o = maps.shape[:2]
    if valid is None:
        return None
    if valid.shape != (b, o):
        raise ValueError(f"object_valid must be (B, O) = {(b, o)}, got {tuple(valid.shape)}")
    return valid.to(device=maps.device, dtype=torch.bool)


def _check_finite(thresholds: torch.Tensor) -> None:
    """Every backend gives a map with a NaN/inf value a NaN threshold (padded objects were zeroed before)."""
    bad = torch.isnan(thresholds)  # (B, O)
    if bool(bad.any()):  # one host sync on (B, O) values
        b, o = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"object map of image {b}, object {o} has NaN/inf values; the attention capture produced "
                         "no finite map for it (check that every image cell was captured and the key positions)")


def object_masks_ref(maps: torch.Tensor, config: MaskConfig | None = None,
                     object_valid: torch.Tensor | None = None) -> ObjectMasks:
    """Plain-torch object masks (the oracle). maps: (B, O, G, G) float; object_valid: (B, O) bool."""
    config = config or MaskConfig()
    valid = _check(maps, object_valid)
    norm, thr, masks = _per_map_ref(_prepare(maps, valid), config.otsu_scale)
    out = ObjectMasks(*_finish(norm, thr, masks, valid, maps.shape, config.gaussian_kernel, config.gaussian_sigma))
    _check_finite(out.thresholds)
    return out


@torch.library.custom_op("ospo_fast::object_masks", mutates_args=())
def _object_masks_op(maps: torch.Tensor, valid: torch.Tensor | None, otsu_scale: float, kernel: int, sigma: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    norm, thr, masks = _per_map(_prepare(maps, valid), otsu_scale, backend)
    return _finish(norm, thr, masks, valid, maps.shape, kernel, sigma)


@_object_masks_op.register_fake
def _(maps, valid, otsu_scale, kernel, sigma, backend):
    b, o, g1, g2 = maps.shape
    f32 = dict(dtype=torch.float32, device=maps.device)
    return (maps.new_empty((b, o, g1, g2), **f32), maps.new_empty((b, o), **f32),
            maps.new_empty((b, o, g1, g2), dtype=torch.bool), maps.new_empty((b, g1, g2), dtype=torch.bool),
            maps.new_empty((b, g1, g2), **f32))


@dataclass
class CapturedScores:
    """What the object-attention capture accumulates for B images, O objects, S sub-tokens and a G1 x G2 grid.

    sums: (B, O, S, G1, G2) float32 (float64 kept), attention probabilities of each cell's query to each sub-token
    key, summed over heads and the recorded layers; counts: (B, G1, G2) float, layers recorded per cell (0: never
    captured); heads: attention heads per layer; token_valid: (B, O, S) bool, False for padded sub-tokens.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    heads: int
    token_valid: torch.Tensor


def maps_from_scores_ref(scores: CapturedScores, object_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, O, G1, G2) float64 maps: mean over heads, recorded layers and real sub-tokens, in the fused backends'
    order (sub-tokens added in ascending order, then one division); padded objects are zeros. Never-captured
    cells are NaN (0 / 0)."""
    valid = _check_scores(scores, object_valid)
    x, tv = scores.sums, scores.token_valid.to(device=scores.sums.device, dtype=torch.bool)
    acc = torch.zeros(x.shape[:2] + x.shape[3:], dtype=torch.float64, device=x.device)  # (B, O, G1, G2)
    for s in range(x.shape[2]):
        acc = acc + torch.where(tv[:, :, s, None, None], x[:, :, s].double(), 0.0)
    per_cell = (tv.sum(-1) * int(scores.heads)).double()  # (B, O): heads x real sub-tokens
    maps = acc / (scores.counts.double()[:, None] * per_cell[:, :, None, None])
    return torch.where(valid[:, :, None, None], maps, 0.0)


def _check_scores(scores: CapturedScores, object_valid: torch.Tensor | None) -> torch.Tensor:
    """Shape checks of the fused op's inputs; returns object_valid as (B, O) bool (all True if None)."""
    x = scores.sums
    if x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"scores.sums must be a floating (B, O, S, G1, G2) tensor, got {x.dtype} "
                         f"{tuple(x.shape)}; take it from ObjectAttentionCapture.scores()")
    b, o, s, g1, g2 = x.shape
    if tuple(scores.counts.shape) != (b, g1, g2):
        raise ValueError(f"scores.counts must be (B, G1, G2) = {(b, g1, g2)}, got {tuple(scores.counts.shape)}")
    if tuple(scores.token_valid.shape) != (b, o, s):
        raise ValueError(f"scores.token_valid must be (B, O, S) = {(b, o, s)}, got "
                         f"{tuple(scores.token_valid.shape)}")
    if int(scores.heads) < 1:
        raise ValueError(f"scores.heads={scores.heads} must be >= 1 (attention heads per layer)")
    valid = torch.ones(b, o, dtype=torch.bool, device=x.device) if object_valid is None else object_valid
    if tuple(valid.shape) != (b, o):
        raise ValueError(f"object_valid must be (B, O) = {(b, o)}, got {tuple(valid.shape)}")
    return valid.to(device=x.device, dtype=torch.bool)


def _check_kernel_fits(kernel: int, g1: int, g2: int) -> None:
    if kernel // 2 >= min(g1, g2):  # reflect-101 needs pad < side
        raise ValueError(f"gaussian kernel {kernel} needs a grid larger than {kernel // 2} cells per side, "
                         f"got {g1}x{g2}")


def object_masks_from_scores_ref(scores: CapturedScores, config: MaskConfig | None = None,
                                 object_valid: torch.Tensor | None = None) -> ObjectMasks:
    """The fused op's oracle, composed of today's functions: ``maps_from_scores_ref`` then ``object_masks_ref``."""
    valid = _check_scores(scores, object_valid)
    return object_masks_ref(maps_from_scores_ref(scores, valid), config, object_valid=valid)


@functools.lru_cache(maxsize=8)
def _taps(kernel: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(kernel,) float64 Gaussian taps on ``device``, made once per setting (no per-call host work)."""
    return gaussian_kernel1d(kernel, sigma, dtype=torch.float64, device=device)


@torch.library.custom_op("ospo_fast::object_masks_from_scores", mutates_args=())
def _from_scores_op(sums: torch.Tensor, counts: torch.Tensor, token_valid: torch.Tensor, object_valid: torch.Tensor,
                    heads: int, otsu_scale: float, kernel: int, sigma: float, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend in ("cpp", "triton"):
        taps = _taps(kernel, sigma, sums.device)  # (K,) float64
        if backend == "cpp":
            return torch.ops.ospo_fast_C.object_masks_from_scores(sums, counts, token_valid, object_valid, heads,
                                                                  float(otsu_scale), taps)
        from ospo_fast.kernels.object_masks import object_masks_from_scores_triton

        return object_masks_from_scores_triton(sums, counts, token_valid, object_valid, heads, otsu_scale, taps)
    maps = maps_from_scores_ref(CapturedScores(sums, counts, heads, token_valid), object_valid)
    norm, thr, masks = _per_map_ref(_prepare(maps, object_valid), otsu_scale)
    return _finish(norm, thr, masks, object_valid, maps.shape, kernel, sigma)


@_from_scores_op.register_fake
def _(sums, counts, token_valid, object_valid, heads, otsu_scale, kernel, sigma, backend):
    b, o, _, g1, g2 = sums.shape
    f32 = dict(dtype=torch.float32, device=sums.device)
    return (sums.new_empty((b, o, g1, g2), **f32), sums.new_empty((b, o), **f32),
            sums.new_empty((b, o, g1, g2), dtype=torch.bool), sums.new_empty((b, g1, g2), dtype=torch.bool),
            sums.new_empty((b, g1, g2), **f32))


def object_masks_from_scores(scores: CapturedScores, config: MaskConfig | None = None, backend: str = "auto",
                             object_valid: torch.Tensor | None = None) -> ObjectMasks:
    """Object masks and soft masks of B images straight from the capture's accumulators, in one op (issue 19a).

    scores: ``CapturedScores`` (sums (B, O, S, G1, G2), counts (B, G1, G2), heads, token_valid (B, O, S));
    object_valid: (B, O) bool, False for padded objects (default all valid); backend: "auto" | "ref" | "cpp" |
    "triton" ("auto": ``config.backend``). Returns ObjectMasks whose maps are the min-max normalised means over
    heads, layers and sub-tokens (see the module docstring). Raises ValueError naming the image and object of a map
    with NaN/inf values or never-captured cells.
    """
    config = config or MaskConfig()
    if backend == "auto":
        backend = config.backend
    valid = _check_scores(scores, object_valid)
    _check_kernel_fits(int(config.gaussian_kernel), *scores.sums.shape[3:])
    sums = scores.sums if scores.sums.dtype == torch.float64 else scores.sums.float()
    resolved = pick_backend(backend, sums)
    out = ObjectMasks(*_from_scores_op(sums, scores.counts.float(), scores.token_valid.to(torch.bool), valid,
                                       int(scores.heads), float(config.otsu_scale), int(config.gaussian_kernel),
                                       float(config.gaussian_sigma), resolved))
    _check_finite(out.thresholds)
    return out


def object_masks(maps: torch.Tensor, config: MaskConfig | None = None, backend: str = "auto",
                 object_valid: torch.Tensor | None = None) -> ObjectMasks:
    """Object masks of B images with O objects each (SPEC stage 3).

    maps: (B, O, G, G) float (any float dtype; normalised in float64); object_valid: (B, O) bool, False for padded
    objects; backend: "auto" | "ref" | "cpp" | "triton" (default ``config.backend`` when config is given and
    backend is "auto"). Returns ObjectMasks (see its docstring). Raises ValueError on NaN/inf in a valid map.
    """
    config = config or MaskConfig()
    if backend == "auto":
        backend = config.backend
    valid = _check(maps, object_valid)
    resolved = pick_backend(backend, maps)
    out = ObjectMasks(*_object_masks_op(maps, valid, float(config.otsu_scale), int(config.gaussian_kernel),
                                        float(config.gaussian_sigma), resolved))
    _check_finite(out.thresholds)
    return out
