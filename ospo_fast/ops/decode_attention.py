"""Decode attention of the image engine: one query per row against only the filled slots of a static KV cache,
with the object capture's probabilities from the same log-sum-exp (issue 33).

A static cache of L slots per row holds, for row b, left padding in slots ``[0, start[b])``, real keys in
``[start[b], end[b])`` and not-yet-written slots from ``end[b]`` on. Attending over all L slots with a mask (what
SDPA does on a static cache) reads every slot every step; this op reads only ``[start, end)``, so the cost of a
step grows with the step, as the memory-bound floor of synthesis assumes::

    lse[b, h]   = logsumexp_{start[b] <= j < end[b]} (q[b, h] . k[b, g(h), j] * scale)
    out[b, h]   = sum_j exp(q . k_j * scale - lse) v[b, g(h), j]
    probs[b, h, s] = exp(q[b, h] . k[b, g(h), slots[b, s]] * scale - lse[b, h])   for b < capture_rows
                     (0 where the slot is outside [start, end), as in the attention matrix)

with g(h) = h // (H / Hkv) (MHA, GQA and MQA). ``probs`` is what the object-attention capture needs: the attention
each captured row's query pays to its object-word keys, without a second pass over the cache or a float32 copy of
K (SPEC stage 3; what the reference code reads from ``output_attentions``).

Backends (``decode_attention(..., backend=)``), one custom op ``ospo_fast::decode_attention`` (opaque to
torch.compile, a fake implementation for its shapes). ``attention_with_lse`` (SDPA that also returns the lse, for
any number of queries) is shared with the engine's teacher-forced mask pass:
- ``ref``: plain float32 PyTorch over the whole cache with the mask: the oracle;
- ``sdpa`` (CPU's "auto"): ``attention_with_lse``, PyTorch's CPU flash attention (the kernel
  ``F.scaled_dot_product_attention`` itself runs on the CPU, which also returns the log-sum-exp) on the slots up to
  the longest row's ``end``, left padding masked; the one host read (that length) is free on the CPU;
- ``triton`` (CUDA's "auto"; on CPU tensors under ``TRITON_INTERPRET=1``): ``kernels/decode_attention.py``,
  flash-decoding split over the key axis with the lengths read on the device, so one CUDA graph replays for every
  step. SPLITS comes from the shape (rows x heads against the GPU's multiprocessors), never from the step.
"""

from __future__ import annotations

import functools

import torch

from ospo_fast._backend import triton_available, triton_interpret

BACKENDS = ("auto", "ref", "sdpa", "triton")
BLOCK_N = 64  # keys per tile of the Triton kernel
MAX_SPLITS = 16
PROGRAMS_PER_SM = 8  # programs of 4 warps in flight per multiprocessor before the key axis is not split further


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                         scale: float, slots: torch.Tensor | None = None, capture_rows: int = 0):
    """The oracle, in float32 over all L slots. Shapes as ``decode_attention``."""
    b, h, _ = q.shape
    groups = h // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)  # (B, H, L, D)
    vf = v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", q.float(), kf) * scale  # (B, H, L)
    j = torch.arange(k.shape[2], device=q.device)
    visible = (j >= start[:, None].long()) & (j < end[:, None].long())  # (B, L)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H)
    out = torch.einsum("bhl,bhld->bhd", torch.exp(scores - lse[..., None]), vf).to(q.dtype)
    return out, lse, _probs_from_lse(q, k, lse, start, end, slots, capture_rows, scale)


def _probs_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                    slots: torch.Tensor | None, capture_rows: int, scale: float) -> torch.Tensor:
    """(capture_rows, H, S) float32 exp(q . k_slot * scale - lse), 0 at slots outside [start, end) (as the
    attention matrix has it); (0, H, 0) without slots."""
    h = q.shape[1]
    if slots is None or capture_rows == 0:
        return q.new_zeros((0, h, 0), dtype=torch.float32)
    r, hkv, d = capture_rows, k.shape[1], k.shape[3]
    index = slots[:r].long().clamp(min=0)  # (R, S)
    picked = k[:r].gather(2, index[:, None, :, None].expand(r, hkv, index.shape[1], d))  # (R, Hkv, S, D)
    picked = picked.float().repeat_interleave(h // hkv, dim=1)  # (R, H, S, D)
    scores = torch.einsum("rhd,rhsd->rhs", q[:r].float(), picked) * scale
    visible = (index >= start[:r, None].long()) & (index < end[:r, None].long())  # (R, S)
    return torch.where(visible[:, None, :], torch.exp(scores - lse[:r, :, None]), 0.0)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA that also returns the log-sum-exp of each query's scores, from the kernel SDPA itself runs.

    query (B, H, Tq, D), key/value (B, Hkv, Tk, D) (GQA/MQA: repeated to H heads, as transformers' SDPA path
    does), mask as transformers builds it for SDPA (bool (B|1, 1, Tq, Tk+), True = visible, or additive; None =
    causal for Tq > 1). Returns out (B, H, Tq, D) in the query's dtype and lse (B, H, Tq) float32. CPU:
    ``_scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` runs there); CUDA:
    ``_scaled_dot_product_efficient_attention`` with ``compute_log_sumexp`` (its bias padded to 16 keys, as PyTorch
    pads it)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    b, h, tq, _ = query.shape
    tk = key.shape[2]
    is_causal = mask is None and tq > 1
    bias = None
    if mask is not None:
        mask = mask[:, :, :, :tk]
        bias = mask.to(query.dtype) if mask.dtype != torch.bool else torch.zeros(
            mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=bias, scale=scale)
        return out, lse.float()
    if bias is not None:  # the memory-efficient kernel wants the bias's rows 16-element aligned
        padded = torch.zeros(*bias.shape[:-1], -(-tk // 16) * 16, dtype=bias.dtype, device=bias.device)
        padded[..., :tk] = bias
        bias = padded[..., :tk].expand(b, h, tq, tk)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, 0.0, is_causal, scale=scale)
    return out, lse[..., :tq].float()


def _decode_attention_sdpa(q, k, v, start, end, scale, slots, capture_rows):
    """CPU: ``attention_with_lse`` (PyTorch's CPU flash attention) on the slots [0, max end), left padding masked."""
    length = int(end.max())  # the CPU's own memory: no device sync
    j = torch.arange(length, device=q.device)
    visible = (j >= start[:, None].long()) & (j < end[:, None].long())  # (B, length)
    out, lse = attention_with_lse(q[:, :, None], k[:, :, :length], v[:, :, :length], visible[:, None, None, :],
                                  scale)  # (B, H, 1, D), (B, H, 1)
    lse = lse[..., 0]
    return out[:, :, 0], lse, _probs_from_lse(q, k, lse, start, end, slots, capture_rows, scale)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(rows_heads: int, max_keys: int, multiprocessors: int) -> int:
    """Key-axis splits: doubled while rows x heads x splits stays under PROGRAMS_PER_SM programs per multiprocessor
    and each split keeps at least two tiles after doubling (a power of two, at most MAX_SPLITS). From the shape
    only, so constant per graph: on an H100 (132 SMs) with a 641-slot cache, 16 images get 4 splits at
    Janus-Pro-1B width (32 rows x 16 heads) and 2 at 7B width (32 heads); 64 images or more get 1."""
    splits = 1
    while (splits < MAX_SPLITS and rows_heads * splits < PROGRAMS_PER_SM * multiprocessors
           and max_keys >= 2 * BLOCK_N * splits * 2):
        splits *= 2
    return splits


def _decode_attention_triton(q, k, v, start, end, scale, slots, capture_rows, splits: int | None = None):
    import triton

    from ospo_fast.kernels.decode_attention import _decode_combine_kernel, _decode_partial_kernel

    b, h, d = q.shape
    if splits is None:
        sms = _multiprocessors(q.device.index or 0) if q.is_cuda else 4
        splits = num_splits(b * h, k.shape[2], sms)
    block_d = triton.next_power_of_2(d)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    start32, end32 = start.to(torch.int32), end.to(torch.int32)
    part_out = torch.empty(b * h * splits, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, dtype=torch.float32, device=q.device)
    groups = h // k.shape[1]
    _decode_partial_kernel[(b * h, splits)](
        q, k, v, start32, end32, part_out, part_lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), h, groups, scale, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        SPLITS=splits, num_warps=4)
    capture = slots is not None and capture_rows > 0
    n_slots = slots.shape[1] if capture else 0
    probs = torch.empty(capture_rows if capture else 0, h, n_slots, dtype=torch.float32, device=q.device)
    slots32 = slots[:capture_rows].clamp(min=0).to(torch.int32).contiguous() if capture else start32
    _decode_combine_kernel[(b * h,)](
        part_out, part_lse, out, lse, q, k, start32, end32, slots32, probs, out.stride(0), out.stride(1),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), h, groups, scale,
        capture_rows if capture else 0, max(n_slots, 1),
        HEAD_DIM=d, BLOCK_D=block_d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(max(n_slots, 1)),
        CAPTURE=capture, num_warps=4)
    return out, lse, probs


_IMPLS = {"ref": decode_attention_ref, "sdpa": _decode_attention_sdpa, "triton": _decode_attention_triton}


def pick_decode_backend(backend: str, q: torch.Tensor) -> str:
    """``auto``: Triton on CUDA, the CPU flash path elsewhere. An explicit choice that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"decode attention backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else ("sdpa" if q.device.type == "cpu" else "ref")
    if backend == "sdpa" and q.device.type != "cpu":
        raise ValueError(f"decode attention backend='sdpa' runs on the CPU, got {q.device}; use 'auto' or 'triton'")
    if backend == "triton" and not (triton_available() and (q.is_cuda or triton_interpret())):
        raise ValueError("decode attention backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing triton, for CPU tensors); use 'auto'")
    return backend


@torch.library.custom_op("ospo_fast::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                         scale: float, slots: torch.Tensor | None, capture_rows: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, probs = _IMPLS[backend](q, k, v, start, end, scale, slots, capture_rows)
    return out.contiguous(), lse.contiguous(), probs.contiguous()


@_decode_attention_op.register_fake
def _(q, k, v, start, end, scale, slots, capture_rows, backend):
    b, h, d = q.shape
    captured = slots is not None and capture_rows > 0
    return (q.new_empty((b, h, d)), q.new_empty((b, h), dtype=torch.float32),
            q.new_empty((capture_rows if captured else 0, h, slots.shape[1] if captured else 0), dtype=torch.float32))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                     scale: float, slots: torch.Tensor | None = None, capture_rows: int = 0,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's attention over the filled slots of a static cache.

    q: (B, H, D) the step's queries (post-RoPE); k, v: (B, Hkv, L, D) the cache (H a multiple of Hkv); start, end:
    (B,) int device tensors, row b's real keys are slots [start[b], end[b]); scale: the softmax scale; slots:
    (>= capture_rows, S) long key slots whose probabilities the capture wants (-1: padding, computed at slot 0),
    or None; capture_rows: how many leading rows are captured. Returns out (B, H, D) in q's dtype, lse (B, H)
    float32, probs (capture_rows, H, S) float32 ((0, H, 0) without capture).
    """
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[3]:
        raise ValueError(f"decode_attention needs q (B, H, D) and k, v (B, Hkv, L, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if slots is not None and capture_rows > slots.shape[0]:
        raise ValueError(f"capture_rows={capture_rows} but slots has {slots.shape[0]} rows")
    return _decode_attention_op(q, k, v, start, end, float(scale), slots, int(capture_rows),
                                pick_decode_backend(backend, q))
