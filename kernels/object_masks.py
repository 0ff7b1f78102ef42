"""Triton kernel of the object-mask op: one program per (image, object) map does min-max normalisation, the
256-bin histogram, Otsu's threshold (bit-exact with skimage, see ``ospo_fast/ops/object_masks.py``), the scale
and the binary mask, all on the device with no host synchronisation. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``. Union and smoothing are done by the caller.

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
