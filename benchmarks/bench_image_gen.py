"""Benchmark of stage 3 image generation. Run alone: ``.venv/bin/python benchmarks/bench_image_gen.py``.

Cases (same prompts, same model, same run):
1. reference loop: in the style of the Janus reference script: interleaved cond/uncond rows, a growing
   DynamicCache, one language-model forward per token, ``torch.multinomial`` (the baseline);
2. transformers ``generate(generation_mode="image")`` + VQ decode;
3. ``ospo_fast.engine.generate_images`` eager (``images.compile=false``) + VQ decode;
4. the engine with its decode step compiled (``images.compile=true``: inductor on CPU, CUDA graphs on CUDA);
5. the eager engine with in-flight object-attention capture (mask capture overhead).
Images/s, ms per decode step, peak memory and ratios; compile time is excluded (warm-up). Each case's images/s is
also printed as a fraction of the memory-bandwidth floor (``ospo_fast.plan.synthesis_floor``: per image the KV the
two CFG rows' attention reads at the prompts' mean length, plus the weights once per step shared by the batch)
on the device it runs on, whose bandwidth is measured in the same process: ``dst.copy_(src)`` of a
``--bandwidth-mib`` float32 tensor, read + write bytes per second, median of 5 (on the CPU, with the threads torch
uses; on CUDA a device-to-device copy).
Then a synthesis study: ``--synthesis-prompts`` (64) prompts of mixed lengths, ``--synthesis-batch`` (16) per
batch with a ragged last batch, both mask contexts, compiled: how many graphs ``torch._dynamo`` compiled
(``counters["stats"]["unique_graphs"]``; the engine promises one per context) and the graph breaks (none).
CPU default: ``builtin:tiny`` (8x8 grid), 4 prompts (``--threads 1`` gives stable figures on a shared machine).
On a GPU: ``--model janus-pro-1b-shape --device cuda --prompts 16 --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Measurement, append_rows, measure, report  # noqa: E402
from ospo_fast.config import ImageConfig  # noqa: E402
from ospo_fast.engine.image_gen import (  # noqa: E402
    generate_images,
    image_prompt_inputs,
    pixels_from_decoded,
    unconditional_ids,
)
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.plan import (  # noqa: E402
    Device,
    SynthesisFloor,
    SynthesisShape,
    model_shape,
    synthesis_floor,
)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
THINGS = ["car", "bench", "dog", "cat", "apple", "chair", "table", "book", "lamp", "tree", "boat", "clock"]


def make_prompts(n: int, max_objects: int = 3) -> tuple[list[str], list[list[str]]]:
    """n prompts of mixed lengths (1..max_objects distinct objects) and their object words."""
    prompts, objects = [], []
    for i in range(n):
        words = [THINGS[(i + j) % len(THINGS)] for j in range(1 + i % max_objects)]
        parts = [f"a {COLORS[(i + j) % len(COLORS)]} {w}" for j, w in enumerate(words)]
        prompts.append(" and ".join(parts) + (" on a table" if i % 2 else ""))
        objects.append(words)
    return prompts, objects


def synthesis_graphs(bundle, n: int, batch_size: int) -> list[dict]:
    """Compiled synthesis of n mixed-length prompts in both mask contexts: graphs compiled, breaks, seconds."""
    from torch._dynamo.utils import counters

    prompts, objects = make_prompts(n, max_objects=6)
    lengths = [len(bundle.tokenizer(p)["input_ids"]) for p in prompts]
    config = ImageConfig(compile=True, batch_size=batch_size)
    rows = []
    for context, objs in (("no masks", None), ("in-flight masks", objects)):
        torch._dynamo.reset()
        counters.clear()
        start = time.perf_counter()
        generate_images(bundle, prompts, list(range(n)), config, objects=objs)
        rows.append({"case": f"{n}-prompt synthesis, {context}", "prompts": n, "batch_size": batch_size,
                     "batches": -(-n // batch_size), "prompt_tokens": f"{min(lengths)}-{max(lengths)}",
                     "graphs": counters["stats"]["unique_graphs"],
                     "graph_breaks": sum(counters["graph_break"].values()),
                     "seconds_with_compile": round(time.perf_counter() - start, 2)})
    return rows


def _to_uint8(bundle, decoded: torch.Tensor) -> torch.Tensor:
    ip = bundle.processor.image_processor
    return pixels_from_decoded(decoded, ip.image_mean, ip.image_std)


@torch.no_grad()
def reference_loop(bundle, prompts: list[str], config: ImageConfig) -> torch.Tensor:
    """Janus reference-script style: rows [c0, u0, c1, u1, ...], DynamicCache grown per token, multinomial."""
    model, tok = bundle.model, bundle.tokenizer
    ids, mask = image_prompt_inputs(bundle.processor, prompts)
    boi = tok.convert_tokens_to_ids(bundle.processor.image_start_token)
    uncond = unconditional_ids(ids, tok.bos_token_id, boi, tok.pad_token_id)
    rows = torch.stack([ids, uncond], dim=1).flatten(0, 1).to(bundle.device)  # (2B, T) interleaved
    attn = mask.repeat_interleave(2, dim=0).to(bundle.device)
    embeds = model.get_input_embeddings()(rows)
    lm = model.model.language_model
    past = None
    out = []
    for _ in range(bundle.num_image_tokens):
        res = lm(inputs_embeds=embeds, attention_mask=attn, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = model.model.generation_head(res.last_hidden_state[:, -1])
        cond, unc = logits[0::2], logits[1::2]
        logits = unc + config.guidance_scale * (cond - unc)
        token = torch.multinomial(torch.softmax(logits / config.temperature, dim=-1), 1)  # (B, 1)
        out.append(token)
        embeds = model.prepare_embeddings_for_image_generation(token.repeat_interleave(2, dim=0))  # (2B, 1, H)
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
    tokens = torch.cat(out, dim=1)
    return _to_uint8(bundle, model.decode_image_tokens(tokens))


@torch.no_grad()
def transformers_generate(bundle, prompts: list[str], config: ImageConfig) -> torch.Tensor:
    ids, mask = image_prompt_inputs(bundle.processor, prompts)
    tokens = bundle.model.generate(ids.to(bundle.device), attention_mask=mask.to(bundle.device),
                                   generation_mode="image", do_sample=True, temperature=config.temperature,
                                   guidance_scale=config.guidance_scale)
    return _to_uint8(bundle, bundle.model.decode_image_tokens(tokens))


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth of ``device`` in bytes/s: ``dst.copy_(src)`` of a ``mib`` MiB float32 tensor (read + write:
    2 x its bytes per copy), median of ``repeats`` after one warm-up copy."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = measure("copy", lambda: dst.copy_(src), device=device, warmup=1, repeats=repeats, memory=False).median_s
    return 2 * src.nbytes / seconds


def image_floor(bundle, prompts: list[str], dtype: str,
                bandwidth: float) -> tuple[SynthesisFloor, SynthesisShape]:
    """The floor of these prompts drawn in one batch on a device of ``bandwidth`` bytes/s (``synthesis_floor``
    at the prompts' mean token count) and the ``SynthesisShape`` it used."""
    _, mask = image_prompt_inputs(bundle.processor, prompts)
    model = SynthesisShape.of(model_shape(bundle.model.config, count_flops=False),
                              prompt_len=round(mask.sum(1).float().mean().item()), dtype=dtype)
    device = Device("measured", memory=0.0, bandwidth=bandwidth, peak_flops=0.0, source="copy in this process")
    return synthesis_floor(model, len(prompts), device), model


def interleaved(cases, device: torch.device, rounds: int) -> list[Measurement]:
    """Median over ``rounds`` rounds that each time every case once, in turn (a shared, busy machine slows whole
    stretches of time: interleaving spreads that over all cases), plus one peak-memory run per case."""
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for name, fn in cases:
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in cases:
            times[name].append(measure(name, fn, device=device, warmup=0, repeats=1, memory=False).median_s)
    results = []
    for name, fn in cases:
        peak = measure(name, fn, device=device, warmup=0, repeats=1).peak_mib
        results.append(Measurement(name=name, median_s=statistics.median(times[name]), peak_mib=peak,
                                   repeats=rounds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | tiny-24 | janus-pro-1b-shape | a checkpoint path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--synthesis-prompts", type=int, default=64, help="prompts of the graph study (0: skip)")
    parser.add_argument("--synthesis-batch", type=int, default=16)
    parser.add_argument("--bandwidth-mib", type=int, default=256, help="tensor copied to measure the bandwidth")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = args.model if "/" in args.model or args.model.startswith("builtin:") else f"builtin:{args.model}"
    bundle = load_janus(path, dtype=args.dtype, device=args.device)
    prompts, objects = make_prompts(args.prompts)
    seeds = list(range(len(prompts)))
    eager = ImageConfig(compile=False, batch_size=len(prompts))
    compiled = ImageConfig(compile=True, batch_size=len(prompts))
    n, steps = len(prompts), bundle.num_image_tokens
    cases = [
        ("reference loop (DynamicCache)", lambda: reference_loop(bundle, prompts, eager)),
        ("transformers generate", lambda: transformers_generate(bundle, prompts, eager)),
        ("engine eager", lambda: generate_images(bundle, prompts, seeds, eager)),
        ("engine compiled", lambda: generate_images(bundle, prompts, seeds, compiled)),
        ("engine eager + in-flight masks", lambda: generate_images(bundle, prompts, seeds, eager, objects=objects)),
    ]
    bandwidth = copy_bandwidth(device, args.bandwidth_mib)
    floor, floor_shape = image_floor(bundle, prompts, args.dtype, bandwidth)
    results = interleaved(cases, device, args.repeats)
    for m in results:
        m.extra["images_per_s"] = n / m.median_s
        m.extra["ms_per_step"] = 1e3 * m.median_s / steps  # prefill and VQ decode included
        m.extra["floor_fraction"] = m.extra["images_per_s"] / floor.images_per_s
    report("image_gen", results, baseline="reference loop (DynamicCache)", device=device,
           config={"model": path, "dtype": args.dtype, "prompts": n, "tokens": steps,
                   "bandwidth_gb_per_s": round(bandwidth / 1e9, 2), "floor_images_per_s": round(floor.images_per_s, 3),
                   "floor_mb_per_image": round(floor.bytes_per_image / 1e6, 1),
                   "floor_prompt_tokens": floor_shape.prompt_len})
    print(f"   floor: {floor.bytes_per_image / 1e6:.1f} MB per image (KV {floor.kv_bytes / 1e6:.1f}: 2 rows, a "
          f"{floor_shape.prompt_len}-token prompt, {steps} image tokens; weights {floor.weight_bytes / 1e6:.1f}: "
          f"one read per step at batch {n}) at {bandwidth / 1e9:.1f} GB/s (copy of {args.bandwidth_mib} MiB, "
          f"read + write, this process) = {floor.images_per_s:.2f} images/s")
    by = {r.name: r for r in results}
    for r in results:
        print(f"   {r.name:<34}{r.extra['images_per_s']:>10.3f} images/s{r.extra['ms_per_step']:>10.2f} ms/step"
              f"{r.extra['floor_fraction']:>9.1%} of the floor")
    engine, hf = by["engine eager"], by["transformers generate"]
    print(f"   engine (eager) vs transformers generate: {hf.median_s / engine.median_s:.2f}x faster")
    print(f"   compiled vs eager decode: {engine.median_s / by['engine compiled'].median_s:.2f}x faster")
    overhead = by["engine eager + in-flight masks"].median_s / engine.median_s - 1
    print(f"   in-flight mask capture overhead (eager): {100 * overhead:+.1f}%")
    if args.synthesis_prompts:
        rows = synthesis_graphs(bundle, args.synthesis_prompts, args.synthesis_batch)
        table = "\n".join(f"   {r['case']:<36} prompt tokens {r['prompt_tokens']:>7}, {r['batches']} batches: "
                          f"{r['graphs']} graph(s), {r['graph_breaks']} breaks, {r['seconds_with_compile']} s"
                          for r in rows)
        append_rows("image_gen_graphs", rows, table, device=device, config={"model": path, "dtype": args.dtype})


if __name__ == "__main__":
    main()
