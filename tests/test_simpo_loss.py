"""Object-weighted SimPO + SFT loss (ospo_fast.ops.simpo_loss): against TRL's own SimPO code, a hand-worked
example, and every backend (plain and fused with the head) against the materialising reference in fp32 and bf16."""

import math
import os
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from ospo_fast._backend import cpp_available
from ospo_fast.config import LossConfig
from ospo_fast.ops.simpo_loss import (
    fused_obj_simpo_loss,
    fused_obj_simpo_loss_ref,
    obj_simpo_loss,
    obj_simpo_loss_ref,
    token_logprobs,
    token_logprobs_ref,
)
from tests.gpu import TRITON, TRITON_ON_CPU, backend_device, requires_cuda

FIELDS = ("loss", "simpo_loss", "sft_loss", "chosen_reward", "rejected_reward", "margin")


BACKENDS = [
    "ref",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="ospo_fast._C not built")),
    TRITON,  # CUDA tensors on a GPU, CPU tensors under TRITON_INTERPRET=1 (tests.gpu.backend_device)
]
CPU_BACKENDS = [*BACKENDS[:2], TRITON_ON_CPU]  # tests of CPU behaviour (CPU autocast, CPU profiler op counts)
# (pairs, tokens, hidden, vocab): odd shapes; vocab 131 is not a multiple of any block, 8200 spans 3 Triton blocks
SHAPES = [(3, 47, 24, 131), (1, 5, 16, 8200)]


def _inputs(pairs, tokens, dim, vocab, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, tokens, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) / math.sqrt(dim) * 3
    bias = torch.randn(vocab, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (2 * pairs, tokens), generator=gen)
    masks = torch.rand(2 * pairs, tokens, generator=gen)
    return tuple(t.to(device) for t in (hidden, weight, bias, targets, masks))


def _run(fn, leaves):
    """Call fn(*leaves) with fresh grad-requiring copies; return (output, grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (out.loss + 0.3 * out.sft_loss).backward()
    return out, [t.grad for t in leaves]


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# --- against TRL --------------------------------------------------------------------------------------------------

def _trl_cpo_trainer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.cpo import CPOTrainer
    return CPOTrainer


@pytest.mark.parametrize("beta,gamma_beta_ratio,label_smoothing", [(5.0, 0.5, 0.0), (0.5, 1.6, 0.0), (2.0, 0.5, 0.1)])
@pytest.mark.parametrize("normalization", ["length", "weighted_mean"])
def test_simpo_part_equals_trl(beta, gamma_beta_ratio, label_smoothing, normalization):
    """alpha = 0 (w = 1): our SimPO term and rewards equal TRL's CPOTrainer.cpo_loss with loss_type='simpo'.

    Mapping: TRL beta = beta, TRL simpo_gamma = beta * gamma_beta_ratio (TRL subtracts simpo_gamma / beta inside the
    beta-scaled margin), TRL label_smoothing = label_smoothing, TRL alpha (AlphaPO) = 0; TRL's chosen/rejected logps
    are its average per-token log-probs (get_batch_logps(average_log_prob=True), as CPOTrainer uses for simpo)."""
    trainer = _trl_cpo_trainer()
    pairs, tokens, vocab = 4, 9, 37
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2 * pairs, tokens, vocab, generator=gen, dtype=torch.float64).float() * 2
    targets = torch.randint(0, vocab, (2 * pairs, tokens), generator=gen)
    masks = torch.rand(2 * pairs, tokens, generator=gen)  # ignored at alpha = 0
    config = LossConfig(beta=beta, gamma_beta_ratio=gamma_beta_ratio, alpha=0.0, normalization=normalization,
                        label_smoothing=label_smoothing)
    ours = obj_simpo_loss_ref(logits, targets, masks, config)

    avg_logps = trainer.get_batch_logps(logits, targets, average_log_prob=True, is_encoder_decoder=True)  # (2P,)
    stand_in = types.SimpleNamespace(beta=beta, simpo_gamma=beta * gamma_beta_ratio, loss_type="simpo",
                                     label_smoothing=label_smoothing, alpha=0.0,
                                     accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(stand_in, avg_logps[:pairs], avg_logps[pairs:])
    assert ours.simpo_loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert ours.chosen_reward.item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert ours.rejected_reward.item() == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)
    assert ours.margin.item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-6)
    assert ours.accuracy.item() == pytest.approx((chosen_rewards > rejected_rewards).float().mean().item())
    assert ours.sft_loss.item() == pytest.approx(-avg_logps[:pairs].mean().item(), abs=1e-6)  # equal lengths


# --- a hand-worked example ------------------------------------------------------------------------------------------

def _hand_batch():
    """One pair, two tokens, V = 4 with probabilities (1/2, 1/4, 1/8, 1/8): log-probs are exact multiples of ln 2.

    chosen   targets (0, 1) -> logp (-ln2, -2 ln2),  mask (1, 0) -> w (2, 1)
    rejected targets (2, 0) -> logp (-3 ln2, -ln2),  mask (0, 1) -> w (1, 2)"""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])).expand(2, 2, 4).contiguous()
    targets = torch.tensor([[0, 1], [2, 0]])
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return logits, targets, masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_weighted_mean(backend):
    logits, targets, masks = (t.to(backend_device(backend)) for t in _hand_batch())
    ln2 = math.log(2)
    r_w = (2 * -ln2 + 1 * -2 * ln2) / 3  # = -4 ln2 / 3 = -0.924196
    r_l = (1 * -3 * ln2 + 2 * -ln2) / 3  # = -5 ln2 / 3 = -1.155245
    z = 5.0 * (r_w - r_l - 0.5)  # beta 5, gamma/beta 0.5: 5 * (0.231049 - 0.5) = -1.344755
    simpo = math.log1p(math.exp(-z))  # -log sigmoid(z) = 1.576345
    sft = (ln2 + 2 * ln2) / 2  # mean NLL of the chosen tokens = 1.039721
    out = obj_simpo_loss(logits, targets, masks, LossConfig(), backend=backend)
    assert out.simpo_loss.item() == pytest.approx(simpo, abs=1e-6)
    assert out.sft_loss.item() == pytest.approx(sft, abs=1e-6)
    assert out.loss.item() == pytest.approx(simpo + 2.0 * sft, abs=1e-6)  # = 3.655787
    assert out.chosen_reward.item() == pytest.approx(5.0 * r_w, abs=1e-6)
    assert out.rejected_reward.item() == pytest.approx(5.0 * r_l, abs=1e-6)
    assert out.margin.item() == pytest.approx(5.0 * (r_w - r_l), abs=1e-6)
    assert out.accuracy.item() == 1.0


def test_hand_worked_length_and_label_smoothing():
    """Paper form: w_t = beta (1 + alpha m_t) with beta 0.5, divided by |y| = 2; gamma = beta * gamma_beta_ratio."""
    logits, targets, masks = _hand_batch()
    ln2 = math.log(2)
    beta, ls = 0.5, 0.1
    paper_r_w = (beta * 2 * -ln2 + beta * 1 * -2 * ln2) / 2  # = 0.5 * -4 ln2 / 2 = -ln2 = -0.693147
    paper_r_l = (beta * 1 * -3 * ln2 + beta * 2 * -ln2) / 2  # = 0.5 * -5 ln2 / 2 = -1.25 ln2 = -0.866434
    z = paper_r_w - paper_r_l - beta * 0.5  # paper: r_w - r_l - gamma
    simpo = -(1 - ls) * math.log(1 / (1 + math.exp(-z))) - ls * math.log(1 / (1 + math.exp(z)))
    config = LossConfig(beta=beta, normalization="length", label_smoothing=ls)
    out = obj_simpo_loss_ref(logits, targets, masks, config)
    assert out.simpo_loss.item() == pytest.approx(simpo, abs=1e-6)
    assert out.chosen_reward.item() == pytest.approx(paper_r_w, abs=1e-6)
    assert out.rejected_reward.item() == pytest.approx(paper_r_l, abs=1e-6)


# --- backends against the reference ---------------------------------------------------------------------------------

def _compare(ours, ref, gold, grads, ref_grads, gold_grads, dtype):
    """fp32: tight. bf16: each error against the fp32 gold within 2x the reference's own bf16 error (plus the fp32
    tolerance, for quantities the bf16 reference gets exactly)."""
    tol = 2e-5
    for name in FIELDS:
        a, r, g = getattr(ours, name), getattr(ref, name), getattr(gold, name)
        if dtype == torch.float32:
            assert _max_err(a, r) <= tol * (1 + r.abs().item()), name
        else:
            assert _max_err(a, g) <= 2 * _max_err(r, g) + tol * (1 + g.abs().item()), name
    if dtype == torch.float32:
        assert ours.accuracy.item() == ref.accuracy.item()
    for i, (a, r, g) in enumerate(zip(grads, ref_grads, gold_grads)):
        scale = g.abs().max().item()
        assert a.dtype == r.dtype and a.shape == r.shape, i
        if dtype == torch.float32:
            assert _max_err(a, r) <= tol * scale, (i, _max_err(a, r), scale)
        else:
            assert _max_err(a, g) <= 2 * _max_err(r, g) + tol * scale, (i, _max_err(a, g), _max_err(r, g), scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_matches_reference(backend, shape, dtype):
    hidden, weight, bias, targets, masks = _inputs(*shape, device=backend_device(backend))
    logits = F.linear(hidden, weight, bias).to(dtype)  # (2P, T, V)
    config = LossConfig(label_smoothing=0.05)
    ours, grads = _run(lambda z: obj_simpo_loss(z, targets, masks, config, backend=backend), [logits])
    ref, ref_grads = _run(lambda z: obj_simpo_loss_ref(z, targets, masks, config), [logits])
    gold, gold_grads = _run(lambda z: obj_simpo_loss_ref(z, targets, masks, config), [logits.float()])
    _compare(ours, ref, gold, grads, ref_grads, gold_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_reference(backend, shape, dtype):
    hidden, weight, bias, targets, masks = (t.to(dtype) if t.is_floating_point() and i < 3 else t
                                            for i, t in enumerate(_inputs(*shape, device=backend_device(backend))))
    config = LossConfig(normalization="length", beta=0.5)
    chunk = 40  # several chunks, the last one ragged

    def fused(h, w, b):
        return fused_obj_simpo_loss(h, w, b, targets, masks, config, backend=backend, chunk_tokens=chunk)

    def ref_fn(h, w, b):
        return fused_obj_simpo_loss_ref(h, w, b, targets, masks, config)

    ours, grads = _run(fused, [hidden, weight, bias])
    ref, ref_grads = _run(ref_fn, [hidden, weight, bias])
    gold, gold_grads = _run(ref_fn, [hidden.float(), weight.float(), bias.float()])
    _compare(ours, ref, gold, grads, ref_grads, gold_grads, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_without_bias(backend):
    hidden, weight, _, targets, masks = _inputs(2, 13, 8, 50, device=backend_device(backend))
    config = LossConfig()
    ours, grads = _run(lambda h, w: fused_obj_simpo_loss(h, w, None, targets, masks, config, backend=backend,
                                                           chunk_tokens=7), [hidden, weight])
    ref, ref_grads = _run(lambda h, w: fused_obj_simpo_loss_ref(h, w, None, targets, masks, config),
                          [hidden, weight])
    _compare(ours, ref, ref, grads, ref_grads, ref_grads, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_any_leading_shape(backend):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 29, generator=gen).to(backend_device(backend))
    targets = torch.randint(0, 29, (2, 3, 5), generator=gen).to(logits.device)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, targets, backend).double(), expected, atol=1e-6)
    assert torch.allclose(token_logprobs_ref(logits, targets).double(), expected, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_triton_cuda_janus_head(dtype, tol):
    """Janus-Pro-1B head width on the GPU: V = 16,384, D = 2048, two pairs of 576 tokens."""
    hidden, weight, bias, targets, masks = _inputs(2, 576, 2048, 16384)
    args = [t.cuda().to(dtype) for t in (hidden, weight, bias)]
    targets, masks = targets.cuda(), masks.cuda()
    ours, grads = _run(lambda h, w, b: fused_obj_simpo_loss(h, w, b, targets, masks, LossConfig(),
                                                            backend="triton"), args)
    ref, ref_grads = _run(lambda h, w, b: fused_obj_simpo_loss_ref(h, w, b, targets, masks, LossConfig()), args)
    for name in FIELDS:
        assert _max_err(getattr(ours, name), getattr(ref, name)) <= tol * (1 + getattr(ref, name).abs().item())
    for a, r in zip(grads, ref_grads):
        assert _max_err(a, r) <= tol * r.abs().max().item()


# --- torch.library registration ------------------------------------------------------------------------------------

def test_opcheck_custom_ops():
    backend = "cpp" if cpp_available() else "ref"
    hidden, weight, bias, targets, _ = _inputs(1, 6, 8, 19)
    logits = F.linear(hidden, weight, bias).reshape(-1, 19).requires_grad_()
    flat_h = hidden.reshape(-1, 8).requires_grad_()
    torch.library.opcheck(torch.ops.ospo_fast.simpo_token_logprobs.default, (logits, targets.reshape(-1), backend))
    torch.library.opcheck(torch.ops.ospo_fast.simpo_fused_token_logprobs.default,
                          (flat_h, weight.requires_grad_(), bias.requires_grad_(), targets.reshape(-1), 5, backend))


def test_torch_compile_matches_eager():
    backend = "cpp" if cpp_available() else "ref"
    hidden, weight, bias, targets, masks = _inputs(2, 11, 8, 23)
    config = LossConfig()

    def step(h, w, b):
        return fused_obj_simpo_loss(h, w, b, targets, masks, config, backend=backend, chunk_tokens=9)

    compiled = torch.compile(step, fullgraph=True)  # inductor: fake impls, registered autograd, no graph break
    eager, eager_grads = _run(step, [hidden, weight, bias])
    traced, traced_grads = _run(compiled, [hidden, weight, bias])
    _compare(traced, eager, eager, traced_grads, eager_grads, eager_grads, torch.float32)


# --- bad input -----------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    logits, targets, masks = _hand_batch()
    config = LossConfig()
    with pytest.raises(ValueError, match="targets must lie in"):
        obj_simpo_loss(logits, targets + 4, masks, config)
    with pytest.raises(ValueError, match="mask_weights must lie in"):
        obj_simpo_loss(logits, targets, masks * 2, config)
    with pytest.raises(ValueError, match="P >= 1 pairs"):
        obj_simpo_loss(logits[:1], targets[:1], masks[:1], config)
    with pytest.raises(ValueError, match="mask_smoothing='binary'"):
        obj_simpo_loss(logits, targets, masks * 0.5, LossConfig(mask_smoothing="binary"))
    with pytest.raises(ValueError, match="int64"):
        obj_simpo_loss(logits, targets.int(), masks, config)
    with pytest.raises(ValueError, match="share one dtype"):
        fused_obj_simpo_loss(torch.zeros(2, 2, 3), torch.zeros(4, 3, dtype=torch.bfloat16), None, targets, masks,
                             config)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_obj_simpo_loss(torch.zeros(2, 2, 3), torch.zeros(4, 3), None, targets, masks, config, chunk_tokens=0)
    with pytest.raises(ValueError, match="backend"):
        obj_simpo_loss(logits, targets, masks, config, backend="cuda")


# --- autocast: bf16 activations, float32 head (train.bf16 with float32 weights) -------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_under_autocast_with_fp32_weights(backend, shape):
    """A training step's head under torch.autocast("cpu", bf16), the branch CUDA autocast takes: float32 weights,
    a Linear + GELU before the fused loss hands it bf16 activations and the float32 head weight and bias. Loss and
    every float32 leaf's gradient are within 2x the materialising reference's own error under the same autocast,
    both measured against float32 without autocast."""
    hidden, weight, bias, targets, masks = _inputs(*shape)
    proj = torch.randn(shape[2], shape[2], generator=torch.Generator().manual_seed(7)) / math.sqrt(shape[2])
    config = LossConfig(label_smoothing=0.05)

    def step(loss_fn, autocast):
        def run(x, p, w, b):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                projected = F.gelu(F.linear(x, p))  # (2P, T, D): bf16 under autocast, as the head's proj_out + GELU
                assert projected.dtype == (torch.bfloat16 if autocast else torch.float32)
                return loss_fn(projected, w, b)
        return run

    def fused(h, w, b):
        return fused_obj_simpo_loss(h, w, b, targets, masks, config, backend=backend, chunk_tokens=40)

    def ref_fn(h, w, b):
        return fused_obj_simpo_loss_ref(h, w, b, targets, masks, config)

    leaves = [hidden, proj, weight, bias]
    ours, grads = _run(step(fused, True), leaves)
    ref, ref_grads = _run(step(ref_fn, True), leaves)
    gold, gold_grads = _run(step(ref_fn, False), leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    assert _max_err(ref.loss, gold.loss) > 0  # the reference really ran in bf16
    _compare(ours, ref, gold, grads, ref_grads, gold_grads, torch.bfloat16)


# --- the backward computes only what autograd asks for -----------------------------------------------------------

def _op_counts(fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_head_skips_weight_and_bias_gradients(backend):
    """A frozen head (the LoRA default): the backward runs no dW GEMM (addmm_) and no db reduction, returns
    empty tensors for them, and still gives the reference's d(hidden). A trainable head runs one addmm_ per chunk."""
    hidden, weight, bias, targets, masks = _inputs(2, 13, 8, 50)
    config = LossConfig()
    chunk, n_chunks = 7, math.ceil(2 * 2 * 13 / 7)

    def backward(w_grad: bool):
        h = hidden.clone().requires_grad_()
        w, b = weight.clone().requires_grad_(w_grad), bias.clone().requires_grad_(w_grad)
        out = fused_obj_simpo_loss(h, w, b, targets, masks, config, backend=backend, chunk_tokens=chunk)
        counts = _op_counts(lambda: (out.loss + 0.3 * out.sft_loss).backward())  # _run's objective
        return h.grad, w.grad, counts

    d_hidden, d_weight, frozen = backward(False)
    assert d_weight is None and frozen.get("aten::addmm_", 0) == 0
    assert frozen.get("aten::mm", 0) == n_chunks  # d(hidden) only
    _, _, trainable = backward(True)
    assert trainable.get("aten::addmm_", 0) == n_chunks
    ref, ref_grads = _run(lambda h: fused_obj_simpo_loss_ref(h, weight, bias, targets, masks, config), [hidden])
    assert _max_err(d_hidden, ref_grads[0]) <= 2e-5 * ref_grads[0].abs().max().item()

    flat, lse = hidden.reshape(-1, 8), torch.zeros(52)
    d_h, d_w, d_b = torch.ops.ospo_fast.simpo_fused_token_logprobs_backward(
        torch.ones(52), flat, weight, bias, targets.reshape(-1), lse, chunk, "ref", [True, False, False])
    assert d_h.shape == flat.shape and d_w.numel() == 0 and d_b.numel() == 0


def test_low_precision_weight_gradient_accumulates_in_float32():
    """bf16 head, many chunks: dW is the float32 sum of exact bf16 products, rounded to bf16 once, so it is as close
    to the float64 gradient of the same bf16 d(logits) as one bf16 rounding allows (a per-chunk bf16 product would
    round once per chunk)."""
    hidden, weight, bias, targets, masks = (t.to(torch.bfloat16) if t.is_floating_point() and i < 3 else t
                                            for i, t in enumerate(_inputs(3, 47, 24, 131)))
    flat, flat_targets = hidden.reshape(-1, 24), targets.reshape(-1)
    grad = torch.randn(flat.shape[0], generator=torch.Generator().manual_seed(2))
    logits = F.linear(flat, weight, bias)
    _, lse = torch.ops.ospo_fast.simpo_token_logprobs(logits, flat_targets, "ref")
    dlogits = torch.ops.ospo_fast.simpo_token_logprobs_backward(grad, logits, flat_targets, lse, "ref")  # (N, V)
    exact = dlogits.double().t() @ flat.double()  # (V, D)
    _, d_w, _ = torch.ops.ospo_fast.simpo_fused_token_logprobs_backward(
        grad, flat, weight, bias, flat_targets, lse, 5, "ref", [False, True, False])
    assert d_w.dtype == torch.bfloat16
    one_rounding = (exact.to(torch.bfloat16).double() - exact).abs().max().item()
    assert (d_w.double() - exact).abs().max().item() <= one_rounding * 1.01 + 1e-6


def test_gpu_weight_gradient_rounds_once_per_chunk():
    """The CUDA branch of dW (bf16 inputs on a GPU: tensor-core products in bf16, float32 accumulation across
    chunks), run here on CPU tensors: within one bf16 rounding per chunk of the float64 product, while the CPU (and
    any float32 input) keeps the exact float32 product."""
    from ospo_fast.ops.simpo_loss import _add_weight_grad, _chunks, _exact_weight_grad

    gen = torch.Generator().manual_seed(3)
    dlogits, h = torch.randn(60, 131, generator=gen).bfloat16(), torch.randn(60, 24, generator=gen).bfloat16()
    exact = dlogits.double().t() @ h.double()  # (V, D)
    acc = torch.zeros(131, 24)
    chunks = _chunks(60, 16)
    for s, e in chunks:
        _add_weight_grad(acc, dlogits[s:e], h[s:e], exact=False)
    per_chunk = max((dlogits[s:e].double().t() @ h[s:e].double()).abs().max().item() for s, e in chunks)
    assert (acc.double() - exact).abs().max().item() <= len(chunks) * per_chunk * 2**-8
    assert not _exact_weight_grad(h.to("meta")) and _exact_weight_grad(h) and _exact_weight_grad(h.float().to("meta"))


# --- chunk size per device ----------------------------------------------------------------------------------------

def test_chunk_tokens_per_device():
    """CPU: 512 tokens. CUDA: a power of two in [1024, 8192] whose (C, V) chunk fits 1/32 of the device memory, so
    the 16 x 576 x 2 tokens of a Janus-Pro batch take few chunks on an 80 GB GPU and more on a small one."""
    from ospo_fast.ops.simpo_loss import chunk_tokens_for, default_chunk_tokens

    assert default_chunk_tokens(torch.device("cpu"), 16384, 2048, torch.float32) == 512
    assert chunk_tokens_for("cpu", 16384, 2048, 2, 0) == 512
    gib = 2**30
    sizes = [chunk_tokens_for("cuda", 16384, 2048, 2, m * gib) for m in (2, 8, 24, 80)]
    assert all(s & (s - 1) == 0 and 1024 <= s <= 8192 for s in sizes) and sizes == sorted(sizes)
    assert sizes[0] == 1024 and sizes[-1] == 8192
    for size, mem in zip(sizes, (2, 8, 24, 80)):
        assert size == 1024 or size * (16384 + 2 * 2048) * 2 <= mem * gib / 32


# --- no host synchronisation in a training step's loss --------------------------------------------------------------

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_loss_step_has_no_host_sync(backend, monkeypatch):
    """Forward + backward of the fused loss with check_values=False (as the trainer calls it) reads nothing back to
    the host: no .item()/bool()/int() (aten::_local_scalar_dense) and no .tolist(). With the checks on (the
    default for direct callers) the range checks do read back, which shows the probe sees syncs."""
    hidden, weight, bias, targets, masks = _inputs(2, 13, 8, 50)
    config = LossConfig()
    tolist_calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(t.shape) or original(t))

    def step(check_values):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fused_obj_simpo_loss(*leaves, targets, masks, config, backend=backend, chunk_tokens=7,
                                   check_values=check_values)
        out.loss.backward()

    counts = _op_counts(lambda: step(False))
    assert {k: counts[k] for k in SYNC_OPS if k in counts} == {} and tolist_calls == []
    checked = _op_counts(lambda: step(True))
    assert checked.get("aten::_local_scalar_dense", 0) >= 4  # targets min/max, mask min/max


# --- the token reduction inside the fused head (issue 19 b) --------------------------------------------------------

@pytest.mark.parametrize("normalization", ["length", "weighted_mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_row_sums_equal_trl_at_alpha_zero(backend, normalization):
    """The fused head with the reduction inside, at alpha = 0, equals TRL's CPOTrainer SimPO (loss, rewards,
    margin, SFT = mean NLL) on the logits the head would produce; the mapping is test_simpo_part_equals_trl's."""
    trainer = _trl_cpo_trainer()
    pairs, tokens, dim, vocab = 4, 9, 12, 37
    hidden, weight, bias, targets, masks = _inputs(pairs, tokens, dim, vocab, seed=4, device=backend_device(backend))
    beta, ratio = 5.0, 0.5
    config = LossConfig(beta=beta, gamma_beta_ratio=ratio, alpha=0.0, normalization=normalization)
    ours = fused_obj_simpo_loss(hidden, weight, bias, targets, masks, config, backend=backend, chunk_tokens=20)
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    avg = trainer.get_batch_logps(logits, targets, average_log_prob=True, is_encoder_decoder=True).float()
    stand_in = types.SimpleNamespace(beta=beta, simpo_gamma=beta * ratio, loss_type="simpo", label_smoothing=0.0,
                                     alpha=0.0, accelerator=types.SimpleNamespace(device=hidden.device))
    losses, chosen, rejected = trainer.cpo_loss(stand_in, avg[:pairs], avg[pairs:])
    assert ours.simpo_loss.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    assert ours.chosen_reward.item() == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert ours.rejected_reward.item() == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert ours.margin.item() == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert ours.sft_loss.item() == pytest.approx(-avg[:pairs].mean().item(), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_row_sums_chunks_across_rows(backend, dtype):
    """Chunks that cut rows (6 rows of 7 tokens, 10 tokens per chunk, the last one ragged): loss and gradients
    equal the reference within its own bf16 error."""
    hidden, weight, bias, targets, masks = (t.to(dtype) if t.is_floating_point() and i < 3 else t
                                            for i, t in enumerate(_inputs(3, 7, 8, 50, device=backend_device(backend))))
    config = LossConfig(label_smoothing=0.05)

    def fused(h, w, b):
        return fused_obj_simpo_loss(h, w, b, targets, masks, config, backend=backend, chunk_tokens=10)

    def ref_fn(h, w, b):
        return fused_obj_simpo_loss_ref(h, w, b, targets, masks, config)

    ours, grads = _run(fused, [hidden, weight, bias])
    ref, ref_grads = _run(ref_fn, [hidden, weight, bias])
    gold, gold_grads = _run(ref_fn, [hidden.float(), weight.float(), bias.float()])
    _compare(ours, ref, gold, grads, ref_grads, gold_grads, dtype)


def test_fused_loss_runs_one_reducing_op_each_way():
    """The fused loss is one custom op forward and one backward, whose outputs are O(rows) scalars (plus the
    saved log-sum-exps): no per-token log-prob op, no (2P, T) autograd round trip."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, bias, targets, masks = _inputs(2, 13, 8, 50)
    seen: list[tuple[str, list[tuple[int, ...]]]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "ospo_fast":
                seen.append((func.__name__.split(".")[0], [tuple(o.shape) for o in out]))
            return out

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with Record():
        out = fused_obj_simpo_loss(*leaves, targets, masks, LossConfig(), backend="ref", chunk_tokens=26)
        out.loss.backward()
    assert seen == [("simpo_fused_row_sums", [(4,), (4,), (4, 13)]),
                    ("simpo_fused_row_sums_backward", [(4, 13, 8), (50, 8), (50,)])]


def test_opcheck_row_sums_op():
    backend = "cpp" if cpp_available() else "ref"
    hidden, weight, bias, targets, masks = _inputs(1, 6, 8, 19)
    torch.library.opcheck(torch.ops.ospo_fast.simpo_fused_row_sums.default,
                          (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), targets,
                           1.0 + masks, 7, backend))


def test_triton_autotune_configs(monkeypatch):
    """Both kernels tune (BLOCK_V, warps), one block of 16,384 included (Janus's V, as Liger-Kernel takes it);
    blocks wider than V are pruned; the interpreter runs only the first, 4,096 wide (several blocks of V = 8,200)."""
    triton = pytest.importorskip("triton")
    from ospo_fast.kernels import simpo_loss as k

    for kernel in (k._logp_fwd_kernel, k._logp_bwd_kernel):
        blocks = [(c.kwargs["BLOCK_V"], c.num_warps) for c in kernel.configs]
        assert blocks == list(k.CONFIGS) and (16384, 16) in blocks
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    configs = k._logp_fwd_kernel.configs
    assert len(k._prune(configs, {"n_vocab": 16384})) == len(configs)
    assert {c.kwargs["BLOCK_V"] for c in k._prune(configs, {}, n_vocab=131)} == {1024}
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert [c.kwargs["BLOCK_V"] for c in k._prune(configs, {"n_vocab": 8200})] == [4096]
