"""Stage 5 loss: object-weighted SimPO plus SFT (SPEC.md, "Preference optimisation"), plain and fused with the head.

Formulas (rows 0..P-1 of a batch are the chosen images y_w, rows P..2P-1 the rejected y_l of the same prompts;
logp_t = log pi(y_t | x, y_<t) over the image head's V = 16,384 codes; m_t in [0, 1] the caller's object mask):

    w_t = 1 + alpha * m_t
    "weighted_mean" (reference code, the default):  r(y) = sum_t w_t logp_t / sum_t w_t
    "length" (paper):                                r(y) = sum_t w_t logp_t / |y|         (|y| = T tokens)
    z = beta * (r(y_w) - r(y_l) - gamma_beta_ratio)
    L_ObjSimPO = mean_pairs[ -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z) ]   (ls = label_smoothing)
    L_SFT      = mean_{chosen rows, t} -logp_t                                       (unweighted)
    loss       = L_ObjSimPO + sft_weight * L_SFT

Where beta enters. The reference code multiplies the whole margin by beta = 5 and subtracts gamma = beta *
gamma_beta_ratio = 2.5 (as TRL's CPOTrainer does with ``simpo_gamma / beta``). The paper writes the weights as
w_t = beta (1 + alpha m_t), beta = 0.5, divides by |y| and takes -log sigmoid(r_w - r_l - gamma): pulling the
constant beta out of both rewards gives exactly z above, so the paper's variant is ``normalization="length",
beta=0.5`` (its gamma is ``beta * gamma_beta_ratio``). In both modes the reported rewards are beta * r(y) (the
paper's r in "length" mode; TRL's ``chosen_rewards`` when alpha = 0): ``chosen_reward`` / ``rejected_reward`` are
batch means of beta * r(y_w) / beta * r(y_l), ``margin`` the batch mean of beta * (r(y_w) - r(y_l)) (gamma not
subtracted), ``accuracy`` the fraction of pairs with r(y_w) > r(y_l). Those four are detached; ``loss``,
``simpo_loss`` and ``sft_loss`` carry gradients. Everything is float32 whatever the logits' dtype.

Entry points:
- ``obj_simpo_loss(logits, ...)``: from materialised (2P, T, V) logits.
- ``fused_obj_simpo_loss(hidden, weight, bias, ...)``: from the head's last hidden states, in one custom op each
  way (``ospo_fast::simpo_fused_row_sums``): the per-token log-probs stay a scratch buffer inside the op, reduced
  there to each row's sum_t w_t logp_t and sum_t logp_t, so only O(P) scalars leave it (sum_t w_t needs no
  log-probs); its backward forms d loss / d logp_t = g_weighted[row] w_t + g_plain[row] from those scalars'
  gradients and runs the chunked head backward (no autograd nodes per token, no (2P, T) round trip).
  The (2P*T, V) logits are never materialised: tokens are processed ``chunk_tokens`` at a time
  (``default_chunk_tokens``: 512 on a CPU, larger on a GPU; the kernels walk the vocabulary
  in blocks with an online log-sum-exp); the backward recomputes
  each chunk's logits, turns them in place into d(logits) and accumulates dH = dlogits @ W and, only where autograd
  asks for them (a frozen head, the LoRA default, skips both), dW += dlogits^T @ H and db += sum dlogits, added
  straight into float32 accumulators (no (V, D) temporary per chunk).
- Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype before the fused op, as autocast
  casts F.linear's inputs on the naive path (and as Liger-Kernel's fused linear losses do): a float32 head weight
  with bf16 activations computes bf16 logits, and the weight's gradient flows back through the cast in float32.
- ``token_logprobs(logits, targets)`` / ``fused_token_logprobs(hidden, weight, bias, targets)``: per-token
  log-probs (the first feeds ``obj_simpo_loss``; ``preference_loss_from_logprobs`` and
  ``preference_loss_from_row_sums`` share the formulas).
Backends: "ref" (plain PyTorch), "cpp" (``csrc/simpo_loss.cpp``, CPU), "triton" (``kernels/simpo_loss.py``).
The compiled paths are ``torch.library`` custom ops (``ospo_fast::simpo_token_logprobs``,
``ospo_fast::simpo_fused_token_logprobs``, ``ospo_fast::simpo_fused_row_sums``) with fake impls and registered
autograd, so they trace under ``torch.compile``. Value checks (targets in [0, V), mask weights in [0, 1]) read
tensors back to the host; they run when ``check_values=True`` (the default of the public functions). The trainer
validates its pairs once at load time (``ospo_fast.train.data``) and passes ``check_values=False``, so a training
step never synchronises on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ospo_fast._backend import pick_backend
from ospo_fast.config import LossConfig

CPU_CHUNK_TOKENS = 512  # 512 x 16,384 logits: 32 MiB in fp32, 16 MiB in bf16 (fits a CPU's caches and threads)
GPU_CHUNK_TOKENS = (1024, 8192)  # a GPU's range: big enough for full-occupancy GEMMs, at most 1/32 of its memory


@dataclass
class PreferenceLossOutput:
    """0-dim float32 tensors. ``loss``, ``simpo_loss`` and ``sft_loss`` carry gradients; ``chosen_reward``,
    ``rejected_reward`` (batch means of beta * r(y)), ``margin`` (batch mean of beta * (r(y_w) - r(y_l))) and
    ``accuracy`` (fraction of pairs with r(y_w) > r(y_l)) are detached, for logging."""

    loss: torch.Tensor
    simpo_loss: torch.Tensor
    sft_loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Per-token kernels: logits (N, V), targets (N,) -> logp (N,) f32, lse (N,) f32; backward -> d(logits) (N, V)
# ---------------------------------------------------------------------------------------------------------------

def _fwd_ref(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(logits.float(), dim=-1)  # (N,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1).float() - lse
    return logp, lse


def _bwd_ref(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    dz = torch.exp(logits.float() - lse[:, None]).mul_(-grad[:, None].float())  # (N, V) = -g * softmax
    dz.scatter_add_(-1, targets[:, None], grad[:, None].float())  # + g * onehot
    if out is None:
        return dz.to(logits.dtype)
    return out.copy_(dz)


def _fwd_cpp(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.ospo_fast_C.simpo_token_logprobs_fwd(logits, targets)


def _bwd_cpp(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        return torch.ops.ospo_fast_C.simpo_token_logprobs_bwd(grad, logits, targets, lse)
    torch.ops.ospo_fast_C.simpo_token_logprobs_bwd_out(grad, logits, targets, lse, out)
    return out


def _fwd_triton(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ospo_fast.kernels.simpo_loss import token_logprobs_fwd_triton

    return token_logprobs_fwd_triton(logits, targets)


def _bwd_triton(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    from ospo_fast.kernels.simpo_loss import token_logprobs_bwd_triton

    return token_logprobs_bwd_triton(grad, logits, targets, lse, out=out)


_KERNELS: dict[str, tuple[Callable, Callable]] = {
    "ref": (_fwd_ref, _bwd_ref), "cpp": (_fwd_cpp, _bwd_cpp), "triton": (_fwd_triton, _bwd_triton)}


def _kernels(backend: str) -> tuple[Callable, Callable]:
    if backend not in _KERNELS:
        raise ValueError(f"resolved backend must be one of {tuple(_KERNELS)}, got {backend!r}")
    return _KERNELS[backend]


# ---------------------------------------------------------------------------------------------------------------
# Custom op 1: token log-probs from materialised logits
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("ospo_fast::simpo_token_logprobs", mutates_args=())
def _token_logprobs_op(logits: torch.Tensor, targets: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), targets (N,) -> (logp (N,) f32, lse (N,) f32)."""
    return _kernels(backend)[0](logits.contiguous(), targets.contiguous())


@_token_logprobs_op.register_fake
def _(logits, targets, backend):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32), logits.new_empty(logits.shape[:1],
                                                                                       dtype=torch.float32)


@torch.library.custom_op("ospo_fast::simpo_token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                                backend: str) -> torch.Tensor:
    """grad (N,) f32 -> d(logits) (N, V) in the logits' dtype."""
    return _kernels(backend)[1](grad.contiguous(), logits.contiguous(), targets.contiguous(), lse.contiguous())


@_token_logprobs_backward_op.register_fake
def _(grad, logits, targets, lse, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _token_logprobs_setup(ctx, inputs, output) -> None:
    logits, targets, backend = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _token_logprobs_backward(ctx, grad_logp, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _token_logprobs_backward_op(grad_logp, logits, targets, lse, ctx.backend), None, None


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


# ---------------------------------------------------------------------------------------------------------------
# Custom op 2: token log-probs fused with the head's last Linear, chunked over tokens
# ---------------------------------------------------------------------------------------------------------------

def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


@torch.library.custom_op("ospo_fast::simpo_fused_token_logprobs", mutates_args=())
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
              chunk_tokens: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D), bias (V,) | None, targets (N,) -> (logp (N,) f32, lse (N,) f32)."""
    return _head_forward(hidden, weight, bias, targets, chunk_tokens, backend)


def _head_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  chunk_tokens: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused head's forward, ``chunk_tokens`` rows of logits at a time: (logp (N,) f32, lse (N,) f32)."""
    fwd = _kernels(backend)[0]
    logp = hidden.new_empty(hidden.shape[:1], dtype=torch.float32)
    lse = torch.empty_like(logp)
    for s, e in _chunks(hidden.shape[0], chunk_tokens):
        logits = F.linear(hidden[s:e], weight, bias)  # (C, V), the only logits alive
        logp[s:e], lse[s:e] = fwd(logits, targets[s:e])
    return logp, lse


@_fused_op.register_fake
def _(hidden, weight, bias, targets, chunk_tokens, backend):
    return (hidden.new_empty(hidden.shape[:1], dtype=torch.float32),
            hidden.new_empty(hidden.shape[:1], dtype=torch.float32))


def _head_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   lse: torch.Tensor, chunks: list[tuple[int, int]], grad_of: Callable[[int, int], torch.Tensor],
                   backend: str, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused head's backward, chunk by chunk: ``grad_of(s, e)`` gives d loss / d logp of tokens s..e-1 (C,) f32;
    returns (dH (N, D), dW (V, D), db (V,)) in the inputs' dtypes, each an empty (0,) tensor where ``needs`` =
    [dH, dW, db] says it is not needed (a frozen head skips dW's GEMM and db's reduction). dW and db accumulate in
    float32 across chunks; how each chunk's dW product is taken: ``_add_weight_grad``."""
    need_h, need_w, need_b = needs
    exact = _exact_weight_grad(hidden)
    bwd = _kernels(backend)[1]
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else hidden.new_empty(0)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    d_bias = torch.zeros(weight.shape[:1], dtype=torch.float32, device=weight.device) if need_b else None
    for s, e in chunks:
        h = hidden[s:e]  # (C, D)
        logits = F.linear(h, weight, bias)  # (C, V), recomputed
        dlogits = bwd(grad_of(s, e), logits, targets[s:e], lse[s:e], out=logits)  # (C, V), in place over logits
        if need_h:
            torch.mm(dlogits, weight, out=d_hidden[s:e])  # (C, D)
        if d_weight is not None:
            _add_weight_grad(d_weight, dlogits, h, exact)  # (V, D) += (V, C) @ (C, D)
        if d_bias is not None:
            d_bias.add_(dlogits.sum(0, dtype=torch.float32))
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (d_hidden, d_weight.to(weight.dtype) if d_weight is not None else weight.new_empty(0),
            d_bias.to(bias_dtype) if d_bias is not None else weight.new_empty(0, dtype=bias_dtype))


def _exact_weight_grad(hidden: torch.Tensor) -> bool:
    """Where dW's chunk products are taken in float32 (``_add_weight_grad``): float32 inputs, and any CPU input."""
    return hidden.dtype == torch.float32 or hidden.device.type == "cpu"


def _add_weight_grad(d_weight: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, exact: bool) -> None:
    """d_weight (V, D) float32 += dlogits.T (V, C) @ h (C, D).

    exact: the product in float32, added straight into the accumulator (``addmm_``, no (V, D) temporary; bf16
    inputs are upcast, their products exact). Otherwise (a GPU with bf16/fp16 inputs) the product runs in the
    inputs' dtype on the tensor cores, float32-accumulated inside the GEMM and rounded once per chunk, as autograd
    rounds the naive loss's dW, then added in float32: on the first H200 run the float32 GEMM (no tensor cores)
    made the fused loss 3.8x slower than the naive one (31.9 vs 8.4 ms at Janus-Pro-1B shapes, 16 pairs). The
    temporary is one (V, D) in bf16 per chunk (64 MiB for Janus-Pro-1B), and a GPU takes few, large chunks."""
    if exact:
        d_weight.addmm_(dlogits.t().float(), h.float())  # .float() is a no-op in fp32
    else:
        d_weight.add_(torch.mm(dlogits.t(), h))


def _head_backward_fake(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_h, need_w, need_b = needs
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0),
            weight.new_empty(weight.shape[:1] if need_b else (0,), dtype=bias_dtype))


def _needs(ctx) -> list[bool]:
    """[dH, dW, db] that autograd asks for (inputs 0, 1, 2 of the fused ops)."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return [bool(need_h), bool(need_w), bool(need_b and ctx.has_bias)]


@torch.library.custom_op("ospo_fast::simpo_fused_token_logprobs_backward", mutates_args=())
def _fused_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       targets: torch.Tensor, lse: torch.Tensor, chunk_tokens: int, backend: str,
                       needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (N,) f32 -> (dH (N, D), dW (V, D), db (V,)); see ``_head_backward`` (``needs`` = [dH, dW, db])."""
    return _head_backward(hidden, weight, bias, targets, lse, _chunks(hidden.shape[0], chunk_tokens),
                          _slicer(grad.float().contiguous()), backend, needs)


@_fused_backward_op.register_fake
def _(grad, hidden, weight, bias, targets, lse, chunk_tokens, backend, needs):
    return _head_backward_fake(hidden, weight, bias, needs)


def _fused_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, chunk_tokens, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.chunk_tokens, ctx.backend, ctx.has_bias = chunk_tokens, backend, bias is not None
    ctx.mark_non_differentiable(output[1])


def _fused_backward(ctx, grad_logp, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    needs = _needs(ctx)
    if not any(needs):
        return None, None, None, None, None, None
    grads = _fused_backward_op(grad_logp, hidden, weight, bias, targets, lse, ctx.chunk_tokens, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# ---------------------------------------------------------------------------------------------------------------
# Custom op 3: the fused head with the loss's token reduction inside: only O(rows) scalars leave it
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("ospo_fast::simpo_fused_row_sums", mutates_args=())
def _row_sums_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                 token_weights: torch.Tensor, chunk_tokens: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (R, T, D), weight (V, D), bias (V,) | None, targets (R, T), token_weights (R, T) f32 ->
    (weighted (R,) = sum_t w_t logp_t, plain (R,) = sum_t logp_t, lse (R, T)), all f32; lse is kept for the
    backward only. The per-token log-probs are a scratch buffer inside the op, reduced in two ops after the last
    chunk: they never become an autograd tensor."""
    rows, row_len = targets.shape
    logp, lse = _head_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), chunk_tokens,
                              backend)  # (N,), (N,)
    logp = logp.view(rows, row_len)
    return (logp * token_weights).sum(-1), logp.sum(-1), lse.view(rows, row_len)


@_row_sums_op.register_fake
def _(hidden, weight, bias, targets, token_weights, chunk_tokens, backend):
    rows = targets.shape[0]
    return (hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, dtype=torch.float32),
            hidden.new_empty(targets.shape, dtype=torch.float32))


@torch.library.custom_op("ospo_fast::simpo_fused_row_sums_backward", mutates_args=())
def _row_sums_backward_op(grad_weighted: torch.Tensor, grad_plain: torch.Tensor, hidden: torch.Tensor,
                          weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                          token_weights: torch.Tensor, lse: torch.Tensor, chunk_tokens: int, backend: str,
                          needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R,) f32 gradients of the row sums -> (dH (R, T, D), dW, db): d loss / d logp_t = g_weighted[r] w_t +
    g_plain[r] (one fused multiply-add over the (R, T) weights), then the chunked head backward."""
    grad = torch.addcmul(grad_plain.float()[:, None], grad_weighted.float()[:, None], token_weights)  # (R, T)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    d_hidden, d_weight, d_bias = _head_backward(flat, weight, bias, targets.reshape(-1), lse.reshape(-1),
                                                _chunks(flat.shape[0], chunk_tokens), _slicer(grad.reshape(-1)),
                                                backend, needs)
    return d_hidden.view(hidden.shape) if needs[0] else d_hidden, d_weight, d_bias


def _slicer(grad: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda s, e: grad[s:e]


@_row_sums_backward_op.register_fake
def _(grad_weighted, grad_plain, hidden, weight, bias, targets, token_weights, lse, chunk_tokens, backend, needs):
    return _head_backward_fake(hidden, weight, bias, needs)


def _row_sums_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, token_weights, chunk_tokens, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, token_weights, output[2])
    ctx.chunk_tokens, ctx.backend, ctx.has_bias = chunk_tokens, backend, bias is not None
    ctx.mark_non_differentiable(output[2])


def _row_sums_backward(ctx, grad_weighted, grad_plain, grad_lse):
    hidden, weight, bias, targets, token_weights, lse = ctx.saved_tensors
    needs = _needs(ctx)
    if not any(needs):
        return (None,) * 7
    if grad_weighted is None or grad_plain is None:  # a loss that uses only one of the two sums
        zero = hidden.new_zeros(targets.shape[0], dtype=torch.float32)
        grad_weighted, grad_plain = (zero if g is None else g for g in (grad_weighted, grad_plain))
    grads = _row_sums_backward_op(grad_weighted, grad_plain, hidden, weight, bias, targets, token_weights, lse,
                                  ctx.chunk_tokens, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_row_sums_op.register_autograd(_row_sums_backward, setup_context=_row_sums_setup)


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------

def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: logits (..., V) any float dtype, targets (...) long -> log pi(target) (...) float32.

    Materialises the float32 log-softmax; plain autograd. The test oracle."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, backend: str = "auto",
                   check_values: bool = True) -> torch.Tensor:
    """Per-token log-probabilities: logits (..., V), targets (...) long -> (...) float32, differentiable.

    ``backend``: "auto" (Triton on CUDA, C++ on CPU where built, else reference), "ref", "cpp", "triton".
    ``check_values``: check targets lie in [0, V) (reads min/max back to the host: a sync on a GPU)."""
    _check_targets(logits, targets, check_values)
    resolved = _resolve_backend(backend, logits.device)
    if resolved == "ref":
        return token_logprobs_ref(logits, targets)
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    logp, _ = _token_logprobs_op(flat, targets.reshape(-1), resolved)
    return logp.view(targets.shape)


def default_chunk_tokens(device: torch.device, vocab: int, dim: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the fused head: ``chunk_tokens_for`` on this device (its total memory on a GPU)."""
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return chunk_tokens_for(device.type, vocab, dim, torch.empty((), dtype=dtype).element_size(), memory)


def chunk_tokens_for(device_type: str, vocab: int, dim: int, itemsize: int, device_memory: int) -> int:
    """How many tokens the fused head processes at once; the chunk's logits, (C, V) in the head's dtype, are the
    only large buffer of the forward and of the backward (turned in place into d(logits)).

    CPU: ``CPU_CHUNK_TOKENS`` = 512 (a 512 x 16,384 fp32 chunk is 32 MiB; bigger chunks only miss the caches).
    CUDA: the largest power of two whose (C, V) chunk plus its (C, D) slices fit 1/32 of the device's memory,
    clamped to ``GPU_CHUNK_TOKENS`` = [1024, 8192] (Janus-Pro, V 16,384 bf16: 8192 tokens = 256 MiB, i.e. one or
    two chunks for 16 pairs x 576 tokens on an 80 GB GPU; at least 1024 rows keeps each GEMM large)."""
    if device_type != "cuda":
        return CPU_CHUNK_TOKENS
    low, high = GPU_CHUNK_TOKENS
    per_token = (vocab + 2 * dim) * itemsize
    fit = max(1, device_memory // 32 // per_token)
    return max(low, min(high, 1 << (fit.bit_length() - 1)))


@torch.compiler.assume_constant_result
def _chunk_tokens(chunk_tokens: int | None, device: torch.device, vocab: int, dim: int, dtype: torch.dtype) -> int:
    return chunk_tokens if chunk_tokens is not None else default_chunk_tokens(device, vocab, dim, dtype)


def _autocast_head(hidden: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inside ``torch.autocast`` on hidden's device: cast hidden, weight and bias to the autocast dtype (what
    autocast does to F.linear's inputs on the naive path; Liger-Kernel's fused linear losses do the same), so the
    chunked logits are computed in that dtype and gradients flow back through the casts to float32 leaves."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def fused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, backend: str = "auto", chunk_tokens: int | None = None,
                         check_values: bool = True) -> torch.Tensor:
    """log softmax(hidden @ weight^T + bias)[target] without materialising the logits.

    hidden (..., D), weight (V, D), bias (V,) | None, one dtype (or any mix under ``torch.autocast``: then all
    three are cast to the autocast dtype), targets (...) long -> (...) float32; differentiable in hidden, weight
    and bias. At most ``chunk_tokens`` x V logits are alive at once (forward and backward); None: the device's
    ``default_chunk_tokens``. ``check_values``: check targets lie in [0, V) (a host sync)."""
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    _check_head(hidden, weight, bias, targets, chunk_tokens, check_values)
    resolved = _resolve_backend(backend, hidden.device)
    chunk = _chunk_tokens(chunk_tokens, hidden.device, weight.shape[0], weight.shape[1], weight.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    logp, _ = _fused_op(flat, weight, bias, targets.reshape(-1), chunk, resolved)
    return logp.view(targets.shape)


def preference_loss_from_logprobs(logp: torch.Tensor, mask_weights: torch.Tensor,
                                  config: LossConfig) -> PreferenceLossOutput:
    """The loss of the module docstring from per-token log-probs.

    logp (2P, T) float, rows 0..P-1 chosen, P..2P-1 rejected; mask_weights (2P, T) in [0, 1]."""
    if logp.dim() != 2 or logp.shape[0] < 2 or logp.shape[0] % 2 or mask_weights.shape != logp.shape:
        raise ValueError(f"logp must be (2P, T) with P >= 1 and mask_weights the same shape, got "
                         f"{tuple(logp.shape)} and {tuple(mask_weights.shape)}")
    logp = logp.float()
    w = token_weights(mask_weights, config)  # (2P, T)
    return preference_loss_from_row_sums((w * logp).sum(-1), logp.sum(-1), w.sum(-1), logp.shape[-1], config)


def token_weights(mask_weights: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """w_t = 1 + alpha * m_t: (2P, T) float32."""
    return 1.0 + config.alpha * mask_weights.float()


def preference_loss_from_row_sums(weighted: torch.Tensor, plain: torch.Tensor, weight_sums: torch.Tensor,
                                  tokens: int, config: LossConfig) -> PreferenceLossOutput:
    """The loss of the module docstring from per-row sums (2P,) f32, rows 0..P-1 chosen, P..2P-1 rejected:
    weighted = sum_t w_t logp_t, plain = sum_t logp_t, weight_sums = sum_t w_t; ``tokens`` = T per row."""
    if config.normalization not in ("weighted_mean", "length"):
        raise ValueError(f"LossConfig.normalization={config.normalization!r}: use 'weighted_mean' or 'length'")
    n_pairs = weighted.shape[0] // 2
    if config.normalization == "weighted_mean":  # reference code
        reward = weighted / weight_sums
    else:  # paper: divide by |y| (beta of w_t = beta (1 + alpha m_t) is applied below)
        reward = weighted / tokens
    chosen, rejected = reward[:n_pairs], reward[n_pairs:]  # (P,), (P,)
    z = config.beta * (chosen - rejected - config.gamma_beta_ratio)
    ls = config.label_smoothing
    simpo = (-(1.0 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)).mean()
    sft = -plain[:n_pairs].sum() / (n_pairs * tokens)  # mean token NLL of the chosen rows
    with torch.no_grad():
        chosen_reward = config.beta * chosen.mean()
        rejected_reward = config.beta * rejected.mean()
        margin = config.beta * (chosen - rejected).mean()
        accuracy = (chosen > rejected).float().mean()
    return PreferenceLossOutput(loss=simpo + config.sft_weight * sft, simpo_loss=simpo, sft_loss=sft,
                                chosen_reward=chosen_reward, rejected_reward=rejected_reward, margin=margin,
                                accuracy=accuracy)


def obj_simpo_loss_ref(logits: torch.Tensor, targets: torch.Tensor, mask_weights: torch.Tensor,
                       config: LossConfig) -> PreferenceLossOutput:
    """Reference: materialise the float32 log-softmax of logits (2P, T, V), gather, combine."""
    _check_batch(logits.shape[:2], targets, mask_weights, config)
    return preference_loss_from_logprobs(token_logprobs_ref(logits, targets), mask_weights, config)


def obj_simpo_loss(logits: torch.Tensor, targets: torch.Tensor, mask_weights: torch.Tensor, config: LossConfig,
                   backend: str = "auto", check_values: bool = True) -> PreferenceLossOutput:
    """L_ObjSimPO + sft_weight * L_SFT from logits (2P, T, V) any float dtype, targets (2P, T) long in [0, V),
    mask_weights (2P, T) float in [0, 1]; rows 0..P-1 chosen, P..2P-1 rejected (same prompt order).

    ``backend``: this argument unless "auto", else ``config.backend``; "auto" picks per device.
    ``check_values``: check the ranges of targets and mask_weights (host syncs; off where data was validated)."""
    _check_batch(logits.shape[:2], targets, mask_weights, config, check_values)
    logp = token_logprobs(logits, targets, _backend_choice(backend, config), check_values)  # (2P, T)
    return preference_loss_from_logprobs(logp, mask_weights, config)


def fused_obj_simpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, mask_weights: torch.Tensor,
                             config: LossConfig) -> PreferenceLossOutput:
    """Reference of the fused path: materialise logits = hidden @ weight^T + bias (2P, T, V), then the loss."""
    return obj_simpo_loss_ref(F.linear(hidden, weight, bias), targets, mask_weights, config)


def fused_obj_simpo_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, mask_weights: torch.Tensor, config: LossConfig,
                         backend: str = "auto", chunk_tokens: int | None = None,
                         check_values: bool = True) -> PreferenceLossOutput:
    """The loss of ``obj_simpo_loss`` with the head's last Linear fused in: hidden (2P, T, D) (the input of
    Linear(d' -> V)), weight (V, D), bias (V,) | None, same dtype (or mixed under ``torch.autocast``: computed in
    the autocast dtype); targets (2P, T); mask_weights (2P, T).

    Never materialises the (2P*T, V) logits: ``chunk_tokens`` x V at a time (None: ``default_chunk_tokens``).
    Gradients flow to whichever of hidden, weight and bias require them (dW and db accumulate in float32).
    ``check_values``: as in ``obj_simpo_loss``."""
    _check_batch(hidden.shape[:2], targets, mask_weights, config, check_values)
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    _check_head(hidden, weight, bias, targets, chunk_tokens, check_values)
    resolved = _resolve_backend(_backend_choice(backend, config), hidden.device)
    chunk = _chunk_tokens(chunk_tokens, hidden.device, weight.shape[0], weight.shape[1], weight.dtype)
    w = token_weights(mask_weights, config)  # (2P, T)
    weighted, plain, _ = _row_sums_op(hidden, weight, bias, targets, w, chunk, resolved)  # (2P,), (2P,)
    return preference_loss_from_row_sums(weighted, plain, w.sum(-1), targets.shape[-1], config)


# ---------------------------------------------------------------------------------------------------------------
# Input checks (value checks are skipped while torch.compile traces)
# ---------------------------------------------------------------------------------------------------------------

@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    """``pick_backend`` on a device; evaluated once while torch.compile traces (its result is a constant)."""
    return pick_backend(backend, torch.empty(0, device=device))


def _backend_choice(backend: str, config: LossConfig) -> str:
    return config.backend if backend == "auto" else backend


def _check_targets(logits: torch.Tensor, targets: torch.Tensor, check_values: bool = True) -> None:
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 (torch.long), got {targets.dtype}; use targets.long()")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"logits {tuple(logits.shape)} must be targets' shape {tuple(targets.shape)} plus a "
                         f"vocabulary axis")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if check_values:
        _check_target_range(targets, logits.shape[-1])


def _check_target_range(targets: torch.Tensor, vocab: int) -> None:
    if targets.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"targets must lie in [0, V={vocab}), got min {lo} max {hi}; pass image-codebook ids "
                         f"(no ignore index: every image token is scored)")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_tokens: int | None, check_values: bool) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:1]):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(f"hidden, weight and bias must share one dtype, got {sorted(map(str, dtypes))}; cast "
                         f"hidden to the head's dtype or call inside torch.autocast")
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets' shape {tuple(targets.shape)} plus D")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 (torch.long), got {targets.dtype}; use targets.long()")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None (the device's default), got {chunk_tokens!r}")
    if check_values:
        _check_target_range(targets, weight.shape[0])


def _check_batch(lead_shape: torch.Size, targets: torch.Tensor, mask_weights: torch.Tensor,
                 config: LossConfig, check_values: bool = True) -> None:
    if len(lead_shape) != 2 or lead_shape[0] < 2 or lead_shape[0] % 2:
        raise ValueError(f"expected (2P, T, ...) with P >= 1 pairs (chosen rows first, then rejected), got "
                         f"leading shape {tuple(lead_shape)}")
    if tuple(targets.shape) != tuple(lead_shape) or tuple(mask_weights.shape) != tuple(lead_shape):
        raise ValueError(f"targets {tuple(targets.shape)} and mask_weights {tuple(mask_weights.shape)} must both "
                         f"be (2P, T) = {tuple(lead_shape)}")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise ValueError(f"LossConfig.label_smoothing={config.label_smoothing} must be in [0, 0.5)")
    if config.normalization not in ("weighted_mean", "length"):
        raise ValueError(f"LossConfig.normalization={config.normalization!r}: use 'weighted_mean' or 'length'")
    if check_values:
        check_mask_weights(mask_weights, config.mask_smoothing)


def check_mask_weights(mask_weights: torch.Tensor, mask_smoothing: str) -> None:
    """Raise unless mask_weights lie in [0, 1] (and are 0/1 for ``mask_smoothing='binary'``). Reads the tensor
    back to the host: call once per data set (``ospo_fast.train.data`` does), not per step."""
    if mask_weights.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = float(mask_weights.min()), float(mask_weights.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"mask_weights must lie in [0, 1], got min {lo:.4g} max {hi:.4g}; min-max normalise the "
                         f"smoothed mask per image")
    if mask_smoothing == "binary" and not bool(((mask_weights == 0) | (mask_weights == 1)).all()):
        raise ValueError("mask_smoothing='binary' but mask_weights has values other than 0 and 1; pass the "
                         "thresholded mask or set mask_smoothing='gaussian'")
