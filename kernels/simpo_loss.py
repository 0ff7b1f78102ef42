"""Triton kernels of the object-weighted SimPO loss: per-token log-softmax-gather, forward and backward.

One program per token row; the vocabulary is walked in ``BLOCK_V`` blocks with an online log-sum-exp, so a row of
any length (V = 16,384 for Janus's image head, or an odd V) never has to fit one block. All arithmetic is float32
whatever the logits' dtype.

- forward: ``lse_t = log sum_v exp(z_tv)``, ``logp_t = z_t[y_t] - lse_t``.
- backward: ``dz_tv = g_t * (1[v = y_t] - exp(z_tv - lse_t))`` (the derivative of ``logp_t``), written in the
  logits' dtype, optionally in place over the logits (the fused head path recomputes a chunk's logits and turns
  them into their gradient without a second buffer).

The weighted reduction over tokens (``sum_t w_t logp_t``) is done by the caller (inside the fused op for the fused
loss): it is O(T) work and keeps these kernels shared by the plain and the fused loss. Launchers take 2-D ``(N, V)``
logits with a unit stride along V; callers flatten.

Both kernels are autotuned per vocabulary size over ``CONFIGS`` (block size x warps; Janus's V = 16,384 fits one
block of 16,384, as Liger-Kernel takes it); blocks wider than the vocabulary are pruned. The interpreter has no
warps and no GPU to time on: it runs the first configuration, 4,096 wide, so CI walks several blocks of an 8,200
vocabulary through the online log-sum-exp. The backward restores its output between timed runs, since it may
write over the logits. ``ospo_fast.kernels.aot`` compiles every configuration for sm_80 and sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_V, num_warps); the first is the interpreter's
CONFIGS = ((4096, 8), (1024, 4), (4096, 4), (8192, 8), (16384, 16), (16384, 32))


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop blocks wider than the vocabulary needs (at least 1,024); under the interpreter keep only the first."""
    n_vocab = {**named_args, **kwargs}["n_vocab"]  # positional launches fill named_args, keyword ones kwargs
    widest = max(1024, triton.next_power_of_2(n_vocab))
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= widest] or configs[:1]
    return kept[:1] if triton.knobs.runtime.interpret else kept


def _autotune(**extra):
    return triton.autotune(configs=[triton.Config({"BLOCK_V": b}, num_warps=w) for b, w in CONFIGS],
                           key=["n_vocab"], prune_configs_by={"early_config_prune": _prune}, **extra)


@_autotune()
@triton.jit
def _logp_fwd_kernel(logits_ptr, targets_ptr, logp_ptr, lse_ptr, stride_row, n_vocab, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    # online log-sum-exp: running max m and running sum s of exp(z - m), one vocabulary block at a time
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(base + target).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_target - lse)


@triton.jit
def _round_to_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), still as float32. The GPU's cast rounds this way, but
    the CPU interpreter truncates; rounding explicitly first makes both give the same (correctly rounded) result."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@_autotune(restore_value=["out_ptr"])
@triton.jit
def _logp_bwd_kernel(grad_ptr, logits_ptr, targets_ptr, lse_ptr, out_ptr, stride_row, stride_out, n_vocab,
                     BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    out = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_V)
    g = tl.load(grad_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        valid = cols < n_vocab
        z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)  # (BLOCK_V,)
        onehot = tl.where(cols == target, 1.0, 0.0)
        dz = g * (onehot - tl.exp(z - lse))
        if ROUND_BF16:
            dz = _round_to_bf16(dz)
        tl.store(out + cols, dz.to(out_ptr.dtype.element_ty), mask=valid)


def _check_2d(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D (N, V) with unit stride along V, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}; flatten and call .contiguous() first")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(logits.shape[:1])}, got {tuple(targets.shape)}")


def token_logprobs_fwd_triton(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) any float dtype, targets (N,) long -> (logp (N,) float32, lse (N,) float32)."""
    _check_2d(logits, targets)
    n_rows, n_vocab = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        _logp_fwd_kernel[(n_rows,)](logits, targets.contiguous(), logp, lse, logits.stride(0), n_vocab)
    return logp, lse


def token_logprobs_bwd_triton(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """d logp / d logits times ``grad``: grad (N,), logits (N, V), targets (N,), lse (N,) -> (N, V) in logits' dtype.

    ``out`` may be ``logits`` itself (in place: each element is read before it is written, by the same program).
    """
    _check_2d(logits, targets)
    n_rows, n_vocab = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    if out.shape != logits.shape or out.stride(1) != 1:
        raise ValueError(f"out must be (N, V) = {tuple(logits.shape)} with unit stride along V, "
                         f"got {tuple(out.shape)} strides {out.stride()}")
    if n_rows:
        _logp_bwd_kernel[(n_rows,)](grad.contiguous(), logits, targets.contiguous(), lse.contiguous(), out,
                                    logits.stride(0), out.stride(0), n_vocab, ROUND_BF16=out.dtype == torch.bfloat16)
    return out
