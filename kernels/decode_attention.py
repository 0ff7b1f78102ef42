"""Triton kernels of the image engine's decode attention: one query per row against only the filled KV slots,
split over the key axis (flash-decoding), with the object capture in the combine step.

Row b of a static KV cache (B, Hkv, L, D) holds real keys in slots ``start[b] <= j < end[b]`` (left padding before
``start``, unwritten slots from ``end`` on); both are int32 device tensors, so one launch (and one CUDA graph)
serves every decode step. Two kernels:

- ``_decode_partial_kernel``, grid (B * H, SPLITS): program (b, h, split) walks its share of the row's filled
  key tiles (``BLOCK_N`` keys each) with an online softmax and writes its partial output, normalised, and its
  log-sum-exp. The keys of a row are split into SPLITS contiguous ranges of whole tiles; a split with no tile writes
  lse = -inf. One program per query head: with MHA (Janus-Pro) every K/V byte is read once; with GQA/MQA the heads
  of a group re-read their shared K/V (from L2 on a GPU).
- ``_decode_combine_kernel``, grid (B * H,): merges the SPLITS partials by their log-sum-exps into the output (the
  query's dtype) and the float32 lse of the row and head. With ``CAPTURE`` it then writes, for the first
  ``capture_rows`` rows, the probability of each of the row's ``n_slots`` object keys,
  ``exp(q . k_s * scale - lse)`` (0 for a slot outside the row's [start, end)), computed from the same scaled query
  and the same lse as the output: no extra pass over the cache.

All arithmetic is float32 whatever the cache dtype. ``ospo_fast.ops.decode_attention`` launches them, picks SPLITS
from the shape only (never from the step, so a CUDA graph replays) and holds the PyTorch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, part_out_ptr, part_lse_ptr,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                           n_heads, groups, scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // groups
    start = tl.load(start_ptr + b)
    end = tl.load(end_ptr + b)
    tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
    per_split = tl.cdiv(tiles, SPLITS) * BLOCK_N  # keys per split, whole tiles
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    q = q * scale  # (BLOCK_D,)
    k_row = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_row = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    m = tl.full((), float("-inf"), tl.float32)  # running max of the scores
    s = tl.zeros((), tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_D,), tl.float32)  # running sum of exp(score - m) * v
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < hi
        tile = ok[:, None] & d_ok[None, :]
        k = tl.load(k_row + cols[:, None].to(tl.int64) * stride_kn + d[None, :], mask=tile, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_N,)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new)  # (BLOCK_N,)
        v = tl.load(v_row + cols[:, None].to(tl.int64) * stride_vn + d[None, :], mask=tile, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
    part = bh.to(tl.int64) * SPLITS + split
    tl.store(part_out_ptr + part * BLOCK_D + d, acc / tl.where(s > 0, s, 1.0))
    tl.store(part_lse_ptr + part, m + tl.log(s))  # -inf for an empty split


@triton.jit
def _decode_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, q_ptr, k_ptr, start_ptr, end_ptr,
                           slots_ptr, probs_ptr,
                           stride_ob, stride_oh, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                           n_heads, groups, scale, capture_rows, n_slots, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                           CAPTURE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    parts = bh.to(tl.int64) * SPLITS + tl.arange(0, SPLITS)  # (SPLITS,)
    lses = tl.load(part_lse_ptr + parts)
    top = tl.max(lses, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a row without keys: weights 0, lse -inf
    weights = tl.exp(lses - top)  # (SPLITS,)
    total = tl.sum(weights, axis=0)
    partial = tl.load(part_out_ptr + parts[:, None] * BLOCK_D + d[None, :])  # (SPLITS, BLOCK_D)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total > 0, total, 1.0)
    lse = top + tl.log(total)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + bh, lse)
    if CAPTURE:
        if b < capture_rows:
            kvh = h // groups
            q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0)
            q = q.to(tl.float32) * scale
            j = tl.arange(0, BLOCK_S)
            j_ok = j < n_slots
            slots = tl.load(slots_ptr + b.to(tl.int64) * n_slots + j, mask=j_ok, other=0)  # (BLOCK_S,)
            seen = (slots >= tl.load(start_ptr + b)) & (slots < tl.load(end_ptr + b))  # as the attention matrix
            k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                        + slots[:, None].to(tl.int64) * stride_kn + d[None, :],
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            picked = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,)
            tl.store(probs_ptr + bh.to(tl.int64) * n_slots + j, tl.where(seen, tl.exp(picked - lse), 0.0), mask=j_ok)
