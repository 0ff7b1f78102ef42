"""Forward + backward of the object-weighted SimPO + SFT loss over Janus's image head: fused (chunked, no full
logits) vs naive (materialise the (2P*T, V) logits and their float32 log-softmax), and Liger-Kernel's fused SimPO
where it imports; and the fused head with the token reduction inside (one op each way) against the split it
replaced (the fused per-token log-prob op, then the weighted sums as PyTorch ops on the (2P, T) log-probs), with
the number of ops each dispatches per batch (forward + backward; profiler events: aten ops and custom ops).

    .venv/bin/python benchmarks/bench_simpo_loss.py            # --small: 2 pairs x 576 tokens, d 2048, V 16,384 (CPU)
    .venv/bin/python benchmarks/bench_simpo_loss.py --full --device cuda --dtype bfloat16   # 16 pairs (Janus-Pro-1B)
    .venv/bin/python benchmarks/bench_simpo_loss.py --full --dim 64 --no-naive   # 16 x 576, V 16,384: fused vs split

Every case computes the loss from the hidden states that enter the head's last Linear(d' -> V) and back-propagates to
hidden, weight and bias. Results are appended to benchmarks/results.jsonl by the shared harness.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Measurement, measure, report  # noqa: E402
from ospo_fast._backend import pick_backend  # noqa: E402
from ospo_fast.config import LossConfig  # noqa: E402
from ospo_fast.ops.simpo_loss import (  # noqa: E402
    fused_obj_simpo_loss,
    fused_obj_simpo_loss_ref,
    fused_token_logprobs,
    obj_simpo_loss,
    preference_loss_from_logprobs,
)

JANUS_PRO_1B = dict(pairs=16, tokens=576, dim=2048, vocab=16384)


def cpu_peak_mib(fn) -> float:
    """Peak CPU tensor memory of one call of ``fn`` above what was alive when it started, from the profiler's
    memory timeline (allocations and frees in time order, each counted once)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return (max(totals) - totals[0]) / 2**20 if totals else 0.0


def _measure(name: str, fn, device: torch.device, repeats: int, warmup: int, reset) -> Measurement:
    """The harness's timing; on CPU the peak comes from ``cpu_peak_mib`` (memory above what was alive at the start,
    from the profiler's timeline), after ``reset`` dropped the old grads."""
    if device.type != "cpu":
        return measure(name, lambda: (reset(), fn()), device=device, warmup=warmup, repeats=repeats)
    result = measure(name, lambda: (reset(), fn()), device=device, warmup=warmup, repeats=repeats, memory=False)
    reset()
    result.peak_mib = cpu_peak_mib(fn)
    return result


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="2 pairs (the default; a couple of minutes on a CPU)")
    size.add_argument("--full", action="store_true", help="Janus-Pro-1B batch: 16 pairs x 576 tokens (for a GPU)")
    parser.add_argument("--pairs", type=int, help="override the number of pairs")
    parser.add_argument("--tokens", type=int, default=JANUS_PRO_1B["tokens"])
    parser.add_argument("--dim", type=int, default=JANUS_PRO_1B["dim"])
    parser.add_argument("--vocab", type=int, default=JANUS_PRO_1B["vocab"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="fused chunk (default: the library's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-naive", action="store_true",
                        help="skip the cases that materialise the logits (e.g. 16 pairs on a small CPU)")
    parser.add_argument("--once", action="store_true",
                        help="no warm-up, one timed call (e.g. the --full shape on a CPU, for its memory)")
    return parser.parse_args()


def _liger_case(config: LossConfig):
    """Liger-Kernel's fused linear SimPO (+NLL) loss, or None where it does not import. It has no per-token
    weights (alpha = 0 semantics), so it times the same matmuls and reductions, not the same loss. Liger's gamma
    is our beta * gamma_beta_ratio."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except ImportError:
        print("liger_kernel not importable: Liger case skipped")
        return None
    loss_fn = LigerFusedLinearSimPOLoss(beta=config.beta, gamma=config.beta * config.gamma_beta_ratio,
                                        compute_nll_loss=True)

    def run(hidden, weight, bias, targets, masks):
        out = loss_fn(weight, hidden, targets, bias)  # (lin_weight, _input (2P, T, D), target (2P, T), bias)
        return out[0] if isinstance(out, tuple) else out

    return run


def op_count(fn) -> int:
    """Ops one call of ``fn`` dispatches (profiler events named aten::* or ospo_fast*, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith(("aten::", "ospo_fast")))


def main() -> None:
    args = _args()
    pairs = args.pairs or (JANUS_PRO_1B["pairs"] if args.full else 2)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    config = LossConfig()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, args.tokens, args.dim, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=gen) / args.dim**0.5).to(device, dtype).requires_grad_()
    bias = torch.zeros(args.vocab).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (2 * pairs, args.tokens), generator=gen).to(device)
    masks = torch.rand(2 * pairs, args.tokens, generator=gen).to(device)
    leaves = (hidden, weight, bias)
    kernel = pick_backend("auto", hidden)
    fused_kwargs = {"chunk_tokens": args.chunk_tokens} if args.chunk_tokens else {}

    def reset():
        for leaf in leaves:
            leaf.grad = None

    def step(loss_of):
        def run():
            loss = loss_of()
            (loss.loss if hasattr(loss, "loss") else loss).backward()
        return run

    split_name = f"fused split: per-token op + torch sums ({kernel})"
    cases = {
        "naive (logits + log_softmax)": lambda: fused_obj_simpo_loss_ref(hidden, weight, bias, targets, masks, config),
        f"naive logits + {kernel} kernel": lambda: obj_simpo_loss(F.linear(hidden, weight, bias), targets, masks,
                                                                    config, backend=kernel),
        split_name: lambda: preference_loss_from_logprobs(
            fused_token_logprobs(hidden, weight, bias, targets, kernel, args.chunk_tokens, check_values=False),
            masks, config),
        f"fused chunked, sums in the op ({kernel})": lambda: fused_obj_simpo_loss(
            hidden, weight, bias, targets, masks, config, backend=kernel, check_values=False, **fused_kwargs),
    }
    if args.no_naive:
        cases = {k: v for k, v in cases.items() if not k.startswith("naive")}
    liger = _liger_case(config)
    if liger is not None and not args.no_naive:
        cases["liger fused SimPO (alpha=0)"] = lambda: liger(hidden, weight, bias, targets, masks)

    warmup, repeats = (0, 1) if args.once else (1, repeats)
    results = [_measure(name, step(fn), device, repeats, warmup, reset) for name, fn in cases.items()]
    for result, fn in zip(results, cases.values()):
        reset()
        result.extra["ops_per_batch"] = op_count(step(fn))
        print(f"   {result.name:<48} {result.extra['ops_per_batch']:>6} ops per batch (forward + backward)")
    baseline = split_name if args.no_naive else "naive (logits + log_softmax)"
    report("simpo_loss", results, baseline=baseline, device=device,
           config=dict(pairs=pairs, tokens=args.tokens, dim=args.dim, vocab=args.vocab, dtype=args.dtype,
                       repeats=repeats, threads=torch.get_num_threads(), chunk_tokens=args.chunk_tokens or "default",
                       triton_interpret=os.environ.get("TRITON_INTERPRET", "0")))


if __name__ == "__main__":
    main()
