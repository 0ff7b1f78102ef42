"""Triton kernel of the object-mask op: one program per (image, object) map does min-max normalisation, the
256-bin histogram, Otsu's threshold (bit-exact with skimage, see ``ospo_fast/ops/object_masks.py``), the scale
and the binary mask, all on the device with no host synchronisation. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``. Union and smoothing are done by the caller.

``_object_masks_from_scores_kernel`` is the fused op (issue 19a): one program per image, one launch per batch,
from the capture's sums over heads and layers (B, O, S, P) to the maps, thresholds, masks, union and the
Gaussian-smoothed, min-max normalised soft mask (see ``ospo_fast/ops/object_masks.py``).

Launch configuration: a map is one block (Otsu needs its whole histogram), so ``BLOCK`` is the next power of two of
the map size (a heuristic: 1,024 for Janus's 24x24 grid) and the autotuner picks the warps per map, once per map
size on a GPU. The interpreter has no warps: it runs the first configuration without benchmarking. Every kernel is
compiled for sm_80 and sm_90 in CI by ``kernels/aot.py`` (registers, spills, shared memory).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

NBINS = 256
WARPS = (4, 2, 8)  # autotuned per map size; the interpreter runs the first
# the fused kernel holds several float64 blocks per object at once: at 2 or 4 warps a 24x24 map (BLOCK 1,024)
# spills registers on sm_80/sm_90 (kernels/aot.py), from 8 warps it does not
FUSED_WARPS = (8, 16)


def _block(args: dict) -> int:
    """The whole map in one block: next power of two of P (at least 16)."""
    return max(triton.next_power_of_2(args["P"]), 16)


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """The interpreter has no warps to tune (and no GPU to time them on): keep the first configuration."""
    return configs[:1] if triton.knobs.runtime.interpret else configs


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in WARPS],
                 key=["P"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"BLOCK": _block})
@triton.jit
def _object_masks_otsu_kernel(x_ptr, norm_ptr, thr_ptr, mask_ptr, P, otsu_scale,
                              BLOCK: tl.constexpr, NBINS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < P
    # float64 throughout the normalisation: a finite float32 map spanning -3e38..3e38 overflows float32's span
    x = tl.load(x_ptr + row * P + offs, mask=inside, other=0.0).to(tl.float64)  # (BLOCK,)
    lo = tl.min(tl.where(inside, x, float("inf")), axis=0)
    hi = tl.max(tl.where(inside, x, float("-inf")), axis=0)
    n_bad = tl.sum(tl.where(inside & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), axis=0)
    span = hi - lo
    constant = span <= 0.0
    safe_span = tl.where(constant, 1.0, span)
    norm = tl.where(constant, 0.0, (x - lo) / safe_span)  # float64 `/` is IEEE division (div.rn.f64 on a GPU)
    bins = tl.maximum(tl.minimum(tl.floor(norm * NBINS).to(tl.int32), NBINS - 1), 0)  # NaN maps stay in range
    counts = tl.histogram(bins, NBINS, mask=inside).to(tl.int64)  # (NBINS,)

    # Otsu: exact weights and sums, float64 variance in skimage's order, first maximum.
    idx = tl.arange(0, NBINS)
    centers = (idx.to(tl.float64) * 2.0 + 1.0) / (2.0 * NBINS)
    w1 = tl.cumsum(counts, axis=0)
    s1 = tl.cumsum(counts.to(tl.float64) * centers, axis=0)
    total_w = tl.sum(counts, axis=0)
    total_s = tl.sum(counts.to(tl.float64) * centers, axis=0)
    w2 = total_w - w1
    m1 = s1 / tl.maximum(w1, 1).to(tl.float64)
    m2 = (total_s - s1) / tl.maximum(w2, 1).to(tl.float64)
    d = m1 - m2
    variance = (w1 * w2).to(tl.float64) * (d * d)
    variance = tl.where(idx < NBINS - 1, variance, -1.0)
    best = tl.argmax(variance, axis=0, tie_break_left=True)
    center = (best * 2 + 1).to(tl.float64) * (1.0 / (2 * NBINS))  # exact binary fraction (2i + 1) / 512
    threshold = tl.where(constant, 0.0, center * otsu_scale)  # float64: exact
    threshold = tl.where(n_bad > 0, float("nan"), threshold)  # the caller reports non-finite maps

    tl.store(norm_ptr + row * P + offs, norm.to(tl.float32), mask=inside)
    tl.store(mask_ptr + row * P + offs, (norm > threshold).to(tl.int8), mask=inside)
    tl.store(thr_ptr + row, threshold.to(tl.float32))


def object_masks_otsu_triton(maps: torch.Tensor, otsu_scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """(N, P) float -> normalised (N, P) float32, thresholds (N,) float32, masks (N, P) bool (float64 stays float64
    on the way in; the normalisation is float64 in the kernel)."""
    if maps.dim() != 2:
        raise ValueError(f"object_masks_otsu_triton expects (N, P), got shape {tuple(maps.shape)}")
    x = (maps if maps.dtype == torch.float64 else maps.to(torch.float32)).contiguous()
    n, p = x.shape
    norm = torch.empty(n, p, dtype=torch.float32, device=x.device)
    thresholds = torch.empty(n, dtype=torch.float32, device=x.device)
    masks = torch.empty(n, p, dtype=torch.int8, device=x.device)
    if n == 0:
        return norm, thresholds, masks.bool()
    scale = float(np.float32(otsu_scale))  # a float32 value, as the kernel's scalar is on a GPU and in the interpreter
    _object_masks_otsu_kernel[(n,)](x, norm, thresholds, masks, p, scale, NBINS=NBINS)
    return norm, thresholds, masks.view(torch.bool)


# -- the fused op: captured scores -> maps, masks, union, soft mask (issue 19a) -------------------------------------
@triton.jit
def _reflect101(i, n):
    """Reflect-101 index (cv2's BORDER_REFLECT_101) of i in [0, n), for |i| < 2n - 1."""
    i = tl.abs(i)
    return tl.where(i >= n, 2 * (n - 1) - i, i)


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in FUSED_WARPS],
                 key=["P", "n_obj", "n_tok"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"BLOCK": _block})
@triton.jit
def _object_masks_from_scores_kernel(sums_ptr, counts_ptr, tvalid_ptr, ovalid_ptr, taps_ptr, norm_ptr, thr_ptr,
                                     mask_ptr, union_ptr, soft_ptr, counts_stride, n_obj, n_tok, G2, P, heads,
                                     otsu_scale,
                                     BLOCK: tl.constexpr, NBINS: tl.constexpr, KERNEL: tl.constexpr):
    """One program per image: every object's map (float64 mean over heads, layers and real sub-tokens, added in
    ascending sub-token order), min-max, Otsu x scale, mask; the union over valid objects; the 5x5 (KERNEL)
    Gaussian-smoothed union, min-max normalised. sums (B, O, S, P), counts (B, P) with row stride counts_stride
    (0: one row shared by all images), tvalid (B, O, S) bool, ovalid (B, O) bool, taps (KERNEL,) float64."""
    img = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < P
    counts = tl.load(counts_ptr + img * counts_stride + offs, mask=inside, other=0.0).to(tl.float64)  # (BLOCK,)
    union = tl.zeros([BLOCK], dtype=tl.int32)
    idx = tl.arange(0, NBINS)
    centers = (idx.to(tl.float64) * 2.0 + 1.0) / (2.0 * NBINS)
    for o in range(n_obj):
        bo = img * n_obj + o
        ov = tl.load(ovalid_ptr + bo) != 0
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        n_real = 0
        for s in range(n_tok):
            tv = tl.load(tvalid_ptr + bo * n_tok + s) != 0
            x = tl.load(sums_ptr + (bo * n_tok + s) * P + offs, mask=inside, other=0.0).to(tl.float64)
            acc += tl.where(tv, x, 0.0)
            n_real += tv.to(tl.int32)
        denom = counts * (heads * n_real).to(tl.float64)  # layers x heads x real sub-tokens
        v = acc / tl.where(denom > 0.0, denom, 1.0)
        v = tl.where(denom > 0.0, v, float("nan"))  # a never-captured cell: NaN, reported by the caller
        v = tl.where(ov & inside, v, 0.0)  # a padded object: a constant map
        lo = tl.min(tl.where(inside, v, float("inf")), axis=0)
        hi = tl.max(tl.where(inside, v, float("-inf")), axis=0)
        n_bad = tl.sum(tl.where(inside & ((v != v) | (tl.abs(v) == float("inf"))), 1, 0), axis=0)
        span = hi - lo
        constant = span <= 0.0
        norm = tl.where(constant, 0.0, (v - lo) / tl.where(constant, 1.0, span))  # float64, as the reference
        finite = tl.where(norm == norm, norm, 0.0)  # a NaN map gets a NaN threshold below; its bins do not matter
        bins = tl.maximum(tl.minimum(tl.floor(finite * NBINS).to(tl.int32), NBINS - 1), 0)
        counts_h = tl.histogram(bins, NBINS, mask=inside).to(tl.int64)  # (NBINS,)
        w1 = tl.cumsum(counts_h, axis=0)
        s1 = tl.cumsum(counts_h.to(tl.float64) * centers, axis=0)
        total_w = tl.sum(counts_h, axis=0)
        total_s = tl.sum(counts_h.to(tl.float64) * centers, axis=0)
        w2 = total_w - w1
        d = s1 / tl.maximum(w1, 1).to(tl.float64) - (total_s - s1) / tl.maximum(w2, 1).to(tl.float64)
        variance = tl.where(idx < NBINS - 1, (w1 * w2).to(tl.float64) * (d * d), -1.0)
        best = tl.argmax(variance, axis=0, tie_break_left=True)
        threshold = tl.where(constant, 0.0, (best * 2 + 1).to(tl.float64) * (1.0 / (2 * NBINS)) * otsu_scale)
        threshold = tl.where(n_bad > 0, float("nan"), threshold)
        mask = (norm > threshold) & ov
        union = union | mask.to(tl.int32)
        tl.store(norm_ptr + bo * P + offs, norm.to(tl.float32), mask=inside)
        tl.store(mask_ptr + bo * P + offs, mask.to(tl.int8), mask=inside)
        tl.store(thr_ptr + bo, threshold.to(tl.float32))
    tl.store(union_ptr + img * P + offs, union.to(tl.int8), mask=inside)
    tl.debug_barrier()  # the union is read back at neighbouring cells below
    row, col = offs // G2, offs % G2
    g1 = P // G2
    smooth = tl.zeros([BLOCK], dtype=tl.float64)
    for dr in tl.static_range(KERNEL):
        rr = _reflect101(row + dr - KERNEL // 2, g1)
        tap_r = tl.load(taps_ptr + dr)
        for dc in tl.static_range(KERNEL):
            cc = _reflect101(col + dc - KERNEL // 2, G2)
            u = tl.load(union_ptr + img * P + rr * G2 + cc, mask=inside, other=0)
            smooth += tl.where(u != 0, tap_r * tl.load(taps_ptr + dc), 0.0)
    lo_s = tl.min(tl.where(inside, smooth, float("inf")), axis=0)
    span_s = tl.max(tl.where(inside, smooth, float("-inf")), axis=0) - lo_s
    soft = tl.where(span_s > 0.0, (smooth - lo_s) / tl.where(span_s > 0.0, span_s, 1.0), 0.0)
    tl.store(soft_ptr + img * P + offs, soft.to(tl.float32), mask=inside)


def object_masks_from_scores_triton(sums: torch.Tensor, counts: torch.Tensor, token_valid: torch.Tensor,
                                    object_valid: torch.Tensor, heads: int, otsu_scale: float, taps: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for B images. sums (B, O, S, G1, G2) float32/float64, counts (B, G1, G2), token_valid (B, O, S)
    bool, object_valid (B, O) bool, taps (K,) float64 -> maps (B, O, G1, G2) float32, thresholds (B, O) float32
    (NaN: non-finite map), masks (B, O, G1, G2) bool, union (B, G1, G2) bool, soft (B, G1, G2) float32."""
    if sums.dim() != 5:
        raise ValueError(f"object_masks_from_scores_triton expects sums (B, O, S, G1, G2), got {tuple(sums.shape)}")
    b, o, s, g1, g2 = sums.shape
    x = (sums if sums.dtype == torch.float64 else sums.to(torch.float32)).contiguous()
    dev = x.device
    norm = torch.empty(b, o, g1, g2, dtype=torch.float32, device=dev)
    thresholds = torch.empty(b, o, dtype=torch.float32, device=dev)
    masks = torch.empty(b, o, g1, g2, dtype=torch.int8, device=dev)
    union = torch.empty(b, g1, g2, dtype=torch.int8, device=dev)
    soft = torch.empty(b, g1, g2, dtype=torch.float32, device=dev)
    if b == 0:
        return norm, thresholds, masks.view(torch.bool), union.view(torch.bool), soft
    scale = float(np.float32(otsu_scale))
    c = counts.to(torch.float32).view(b, g1 * g2)  # the capture's counts are one row expanded over images: no copy
    c = c if c.stride(1) == 1 else c.contiguous()
    _object_masks_from_scores_kernel[(b,)](
        x, c, token_valid.to(torch.bool).contiguous(), object_valid.to(torch.bool).contiguous(),
        taps.to(torch.float64).contiguous(), norm, thresholds, masks, union, soft, c.stride(0), o, s, g2, g1 * g2,
        int(heads), scale, NBINS=NBINS, KERNEL=int(taps.numel()))
    return norm, thresholds, masks.view(torch.bool), union.view(torch.bool), soft
