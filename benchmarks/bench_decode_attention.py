"""Benchmark of the image engine's decode attention (issue 33): reading only each row's filled cache slots
against SDPA over the whole static cache (the engine's attention before, the baseline), at several decode steps.

    .venv/bin/python benchmarks/bench_decode_attention.py                       # CPU: 4 images at 1B width
    .venv/bin/python benchmarks/bench_decode_attention.py --device cuda --images 16 64 256   # + the Triton kernel
    .venv/bin/python benchmarks/bench_decode_attention.py --engine             # + the whole engine, builtin:tiny-24

1. One layer's attention of one decode step: CFG rows = 2 x images, Janus-Pro-1B width (16 heads x 128; ``--7b``:
   32 x 128), a 64-token prompt bucket + 577 image slots, at steps 0, 144, 288, 432 and 575. The full-cache SDPA
   costs the same at every step; the filled-slot attention should grow with the step (the memory-bound floor
   assumes it). Per step: the speed-up against the full cache, and the KV bytes each reads per second.
2. ``--engine``: ``generate_images`` of whole images (576 tokens each) with ``attention="full"`` against the
   default, same prompts and seeds in this process (identical tokens are checked), eager.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import measure, report  # noqa: E402
from ospo_fast.ops.decode_attention import decode_attention  # noqa: E402

PROMPT_BUCKET, IMAGE_SLOTS, HEAD_DIM = 64, 577, 128
STEPS = (0, 144, 288, 432, 575)


def full_cache_sdpa(q, k, v, mask, scale):
    """What the engine did before: SDPA over every slot with the boolean mask (B, 1, 1, L)."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)


def step_cases(args, device: torch.device, dtype: torch.dtype) -> None:
    heads = 32 if args.seven else 16
    length = PROMPT_BUCKET + IMAGE_SLOTS
    for images in args.images:
        rows = 2 * images
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(rows, heads, HEAD_DIM, generator=g).to(device, dtype)
        k = torch.randn(rows, heads, length, HEAD_DIM, generator=g).to(device, dtype)
        v = torch.randn(rows, heads, length, HEAD_DIM, generator=g).to(device, dtype)
        start = torch.randint(0, 16, (rows,), generator=g).to(device, torch.int32)  # left padding
        scale = HEAD_DIM ** -0.5
        backends = ["auto"] + (["ref"] if device.type == "cpu" and args.ref else [])
        for step in STEPS:
            end = torch.full((rows,), PROMPT_BUCKET + step + 1, dtype=torch.int32, device=device)
            j = torch.arange(length, device=device)
            mask = ((j >= start[:, None]) & (j < end[:, None]))[:, None, None, :]  # (B, 1, 1, L)
            filled_bytes = 2 * float((end - start).sum()) * heads * HEAD_DIM * q.element_size()
            full_bytes = 2 * rows * length * heads * HEAD_DIM * q.element_size()
            results = [measure("full cache (SDPA, masked)", lambda: full_cache_sdpa(q, k, v, mask, scale),
                               device=device, repeats=args.repeats, memory=False)]
            results[0].extra["GB/s"] = round(full_bytes / results[0].median_s / 1e9, 1)
            for backend in backends:
                r = measure(f"filled slots ({backend})",
                            lambda b=backend: decode_attention(q, k, v, start, end, scale, backend=b),
                            device=device, repeats=args.repeats, memory=False)
                r.extra["GB/s"] = round(filled_bytes / r.median_s / 1e9, 1)
                results.append(r)
            for r in results:
                print(f"   {r.name:<34} reads at {r.extra['GB/s']} GB/s")
            report("decode attention, one layer", results, "full cache (SDPA, masked)", device,
                   dict(images=images, heads=heads, head_dim=HEAD_DIM, slots=length, step=step,
                        dtype=str(dtype).removeprefix("torch.")))


def engine_case(args, device: torch.device) -> None:
    from benchmarks.bench_image_gen import make_prompts
    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.models import load_janus

    bundle = load_janus(args.model, device=str(device))
    prompts, _ = make_prompts(args.engine_images)
    seeds = list(range(len(prompts)))
    config = ImageConfig(batch_size=len(prompts), compile=False)
    tokens = {}

    def run(attention: str):
        tokens[attention] = generate_images(bundle, prompts, seeds, config, attention=attention).tokens

    results = [measure("engine, full cache", lambda: run("full"), device=device, warmup=1,
                       repeats=args.engine_repeats, memory=False),
               measure("engine, filled slots", lambda: run("auto"), device=device, warmup=1,
                       repeats=args.engine_repeats, memory=False)]
    same = torch.equal(tokens["full"], tokens["auto"])
    print(f"   identical tokens: {same}")
    report("image engine, whole images", results, "engine, full cache", device,
           dict(model=args.model, images=len(prompts), tokens=bundle.num_image_tokens, identical_tokens=same))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, nargs="+", default=[4], help="images per batch (2 rows each)")
    parser.add_argument("--7b", dest="seven", action="store_true", help="7B width (32 heads) instead of 1B (16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ref", action="store_true", help="also the float32 reference (CPU)")
    parser.add_argument("--engine", action="store_true", help="also whole images through generate_images")
    parser.add_argument("--model", default="builtin:tiny-24", help="model of --engine")
    parser.add_argument("--engine-images", type=int, default=4)
    parser.add_argument("--engine-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step_cases(args, device, dtype)
    if args.engine:
        engine_case(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
