"""Benchmark of exact Jacobi decoding (issue 36) against sequential decoding, same prompts, seeds and process:
language-model forwards per batch (after the prefill) and wall time, for several windows W, with identical tokens
checked and near-tie flips counted.

    .venv/bin/python benchmarks/bench_jacobi.py                      # builtin:toy, CFG 5 and 1, batch 16 and 4
    .venv/bin/python benchmarks/bench_jacobi.py --shape janus-pro-1b-shape --layers 2 --images 2   # 576 tokens
    .venv/bin/python benchmarks/bench_jacobi.py --device cuda --shape janus-pro-1b-shape --images 16

The toy model (builtin:toy, 64 tokens per image) is trained: its token sequences are predictable, which is what
Jacobi iteration feeds on. A ``--shape`` model is random-initialised: its draws are near-uniform over 16,384 codes,
so a draft almost never matches and the pass count stays close to sequential: a pessimistic bound on what a trained
Janus-Pro gives, not an estimate of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import measure, report  # noqa: E402
from ospo_fast.config import ImageConfig  # noqa: E402
from ospo_fast.engine.image_gen import generate_images  # noqa: E402

TOY_PROMPTS = ["a red circle to the left of a blue square", "a green triangle above a yellow circle",
               "a cyan square", "a blue circle below a red triangle", "a yellow square to the right of a red circle",
               "a blue triangle", "a green circle above a cyan triangle", "a red square below a yellow triangle"]


def load(args):
    from ospo_fast.models import load_janus
    from ospo_fast.models.factory import build_random_bundle

    if args.shape:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        return build_random_bundle(args.shape, 24, args.device, dtype, layers=args.layers)
    return load_janus(args.model, device=args.device)


def one_setting(bundle, args, guidance: float, batch: int) -> None:
    prompts = (TOY_PROMPTS * (args.images // len(TOY_PROMPTS) + 1))[:args.images]
    seeds = list(range(len(prompts)))
    base = ImageConfig(guidance_scale=guidance, batch_size=batch, compile=args.compile)
    out = {}

    def run(name: str, config: ImageConfig):
        out[name] = generate_images(bundle, prompts, seeds, config)

    configs = {"sequential": base} | {f"jacobi W={w}": dataclasses.replace(base, decoding="jacobi", jacobi_window=w)
                                      for w in args.windows}
    results = []
    for name, config in configs.items():
        r = measure(name, lambda n=name, c=config: run(n, c), device=args.device, warmup=1, repeats=args.repeats,
                    memory=False)
        batch_out = out[name]
        r.extra.update(forward_passes=batch_out.forward_passes, near_tie_flips=batch_out.near_tie_flips,
                       identical_tokens=torch.equal(batch_out.tokens, out["sequential"].tokens))
        results.append(r)
    report("jacobi decoding", results, "sequential", args.device,
           dict(model=bundle.source, images=len(prompts), batch=batch, cfg=guidance, tokens=bundle.num_image_tokens,
                compile=args.compile))
    sequential = out["sequential"].forward_passes
    for r in results:  # below the table they belong to
        print(f"   {r.name:<16} forwards {r.extra['forward_passes']:>5} ({sequential / r.extra['forward_passes']:.2f}x "
              f"fewer), identical tokens {r.extra['identical_tokens']}, near-tie flips {r.extra['near_tie_flips']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--shape", help="a random-initialised factory kind instead, e.g. janus-pro-1b-shape")
    parser.add_argument("--layers", type=int, help="decoder layers of --shape (default: the kind's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0, 1.0])
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile the step (CUDA: CUDA graphs)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load(args)
    for guidance in args.guidance:
        for batch in args.batch:
            one_setting(bundle, args, guidance, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
