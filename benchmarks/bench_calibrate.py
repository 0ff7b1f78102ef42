"""Calibrate ``ospo_fast.plan``'s cost model on this CPU, then compare its prediction with a measured image
generation (stage 3's engine, CFG, KV cache, VQ decode) on the tiny (8x8) and tiny-24 (24x24 = 576 tokens) shapes.

Calibration (seconds): memory bandwidth = weight bytes / time of a GEMV (what a decode step does), matmul
throughput = 2 n^3 / time of an n^3 GEMM, convolution throughput from a 3x3 convolution (the VQ decoder's op), op
overhead = time per aten op of KV-cached decode steps of a 2-layer, 16-wide transformers LlamaModel with a
StaticCache and a padding mask (the host cost every op of transformers' decoder code pays, with no arithmetic to
speak of). Host ops per piece (prefill, one
decode step, VQ decode) are counted once by a TorchDispatchMode on the same call, so the prediction is roofline +
ops x overhead with nothing fitted to the generation being predicted. Every time is the fastest of its repeats.

  .venv/bin/python benchmarks/bench_calibrate.py                       # tiny and tiny-24, 2 images, float32
  .venv/bin/python benchmarks/bench_calibrate.py --models tiny --images 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import append_rows  # noqa: E402
from ospo_fast import plan  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fastest_seconds(fn, repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls after one warm-up: on a shared, loaded CPU the least disturbed run is the
    estimate of what the hardware does, for the calibration and the measured generation alike."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _op_overhead(dtype: torch.dtype, steps: int = 16) -> float:
    """Seconds per aten op of KV-cached one-token decode steps of a 2-layer, 16-wide transformers LlamaModel with a
    StaticCache, a padding mask and position ids (the mechanisms of a Janus decode step, no arithmetic)."""
    from transformers import LlamaConfig, LlamaModel, StaticCache

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32)
    model = LlamaModel(config).to(dtype).eval()
    cache = StaticCache(config=config, max_cache_len=8 + steps + 1)
    mask = torch.ones(2, 8 + steps + 1, dtype=torch.long)
    ids = torch.zeros(2, 1, dtype=torch.long)

    def decode():
        cache.reset()
        model(input_ids=torch.zeros(2, 8, dtype=torch.long), attention_mask=mask[:, :8],
              position_ids=torch.arange(8).expand(2, -1), past_key_values=cache, use_cache=True)
        for t in range(8, 8 + steps):
            model(input_ids=ids, attention_mask=mask[:, :t + 1], position_ids=torch.full((2, 1), t),
                  past_key_values=cache, use_cache=True)

    with torch.no_grad():
        return fastest_seconds(decode) / count_ops(decode)


def _conv_flops(dtype: torch.dtype, channels: int = 64, side: int = 64) -> float:
    """FLOP/s of a 3x3, ``channels`` -> ``channels`` convolution on a (1, channels, side, side) map."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype).eval()
    x = torch.randn(1, channels, side, side, dtype=dtype)
    with torch.no_grad():
        seconds = fastest_seconds(lambda: conv(x))
    return 2 * 9 * channels * channels * side * side / seconds


def calibrate_cpu(dtype: str = "float32", gemv_mib: int = 64, gemm_n: int = 512) -> plan.Device:
    """A ``plan.Device`` for this CPU as measured now: bandwidth from a (rows, 8192) x (8192, 2) GEMV over
    ``gemv_mib`` MiB of weights, peak from an n^3 GEMM, convolution efficiency = 3x3 convolution FLOP/s / peak,
    op overhead per aten op of tiny module forwards; matmul and bandwidth efficiencies 1 (the measured rates are
    the achieved ones). Memory: psutil's available bytes."""
    torch_dtype = DTYPES[dtype]
    cols = 8192
    weight = torch.randn(gemv_mib * 2**20 // (cols * torch_dtype.itemsize), cols, dtype=torch_dtype)
    x = torch.randn(cols, 2, dtype=torch_dtype)
    bandwidth = weight.nbytes / fastest_seconds(lambda: weight @ x)
    a, b = (torch.randn(gemm_n, gemm_n, dtype=torch_dtype) for _ in range(2))
    peak = 2 * gemm_n ** 3 / fastest_seconds(lambda: a @ b)
    return plan.Device(f"this CPU ({torch.get_num_threads()} threads, {dtype})", memory=plan.device_budget("cpu"),
                       bandwidth=bandwidth, peak_flops=peak, source="measured by benchmarks/bench_calibrate.py",
                       bandwidth_efficiency=1.0, matmul_efficiency=1.0,
                       conv_efficiency=_conv_flops(torch_dtype) / peak, op_overhead=_op_overhead(torch_dtype))


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched inside the ``with`` block (``.count``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    with OpCounter() as counter, torch.no_grad():
        fn()
    return counter.count


def image_host_ops(bundle, prompts: list[str], seeds: list[int], config) -> tuple[plan.HostOps, int]:
    """Ops of one ``generate_images`` call split into prefill (+ tokenising, sampling setup), one decode step and
    the VQ decode, counted on this call; also the prompt length the engine padded to (its StaticCache's)."""
    from ospo_fast.engine import image_gen

    total = count_ops(lambda: image_gen.generate_images(bundle, prompts, seeds, config))
    decoder = next(d for d in reversed(list(image_gen._POOL._pool.values())) if d.model is bundle.model)
    step = count_ops(decoder.step)  # writes the discarded column N: safe after a finished batch
    tokens = torch.zeros(len(prompts), bundle.num_image_tokens, dtype=torch.long)
    vq = count_ops(lambda: image_gen.decode_pixels(bundle, tokens, config.batch_size))
    n = bundle.num_image_tokens
    return plan.HostOps(prefill=total - (n - 1) * step - vq, step=step, vq_decode=vq), decoder.shape.prompt_len


def compare_images(model: str, images: int, dtype: str, device: plan.Device, repeats: int = 3) -> list[dict]:
    """Predicted vs measured seconds of generate_images (``images`` images, CFG 5, no masks) and of its VQ decode."""
    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import decode_pixels, generate_images
    from ospo_fast.models import load_janus

    bundle = load_janus(f"builtin:{model}", dtype=dtype, device="cpu")
    shape = plan.model_shape(bundle.model.config)
    prompts = [f"a photo of {i + 1} red cubes on a wooden table" for i in range(images)]
    seeds = list(range(images))
    config = ImageConfig(batch_size=images, compile=False)
    ops, prompt_len = image_host_ops(bundle, prompts, seeds, config)
    generate = fastest_seconds(lambda: generate_images(bundle, prompts, seeds, config), repeats)
    tokens = torch.zeros(images, bundle.num_image_tokens, dtype=torch.long)
    vq = fastest_seconds(lambda: decode_pixels(bundle, tokens, images), repeats)
    pieces = plan.image_batch_seconds(shape, images, device, dtype, prompt_len=prompt_len, mask_pass=False, ops=ops)
    rows = []
    for case, predicted, measured in (("generate_images", sum(pieces.values()), generate),
                                      ("vq_decode", pieces["vq_decode"], vq)):
        rows.append({"model": model, "case": case, "images": images, "dtype": dtype, "predicted_s": predicted,
                     "measured_s": measured, "ratio": predicted / measured, "prompt_len": prompt_len,
                     "ops": vars(ops), "pieces_s": pieces})
    return rows


def describe(device: plan.Device) -> str:
    return (f"calibrated {device.name}: bandwidth {device.bandwidth / 1e9:.2f} GB/s, matmul "
            f"{device.peak_flops / 1e9:.1f} GFLOP/s, convolution {device.conv_efficiency * device.peak_flops / 1e9:.1f}"
            f" GFLOP/s, op overhead {device.op_overhead * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-24"], help="builtin models: tiny, tiny-24")
    parser.add_argument("--images", type=int, default=2, help="images per batch (2 rows each under CFG)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = calibrate_cpu(args.dtype)
    print(describe(device))
    rows = []
    for model in args.models:
        rows += compare_images(model, args.images, args.dtype, device, args.repeats)
    lines = [f"   {'model':<9}{'case':<17}{'predicted s':>12}{'measured s':>12}{'pred/meas':>10}   pieces (s)"]
    for r in rows:
        pieces = ", ".join(f"{k} {v:.3f}" for k, v in r["pieces_s"].items()) if r["case"] == "generate_images" else ""
        lines.append(f"   {r['model']:<9}{r['case']:<17}{r['predicted_s']:>12.3f}{r['measured_s']:>12.3f}"
                     f"{r['ratio']:>10.2f}   {pieces}")
    lines.append("   host ops: " + "; ".join(f"{r['model']} {r['ops']}" for r in rows if r["case"] == "vq_decode"))
    append_rows("calibrate", rows, "\n".join(lines), config=calibration_config(device) | {
        "images": args.images, "dtype": args.dtype})


def calibration_config(device: plan.Device) -> dict:
    return {"bandwidth_Bps": device.bandwidth, "matmul_flops": device.peak_flops,
            "conv_flops": device.conv_efficiency * device.peak_flops, "op_overhead_s": device.op_overhead,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
