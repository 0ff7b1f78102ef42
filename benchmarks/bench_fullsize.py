"""Full-size rehearsal (issue 15): the published Janus-Pro shapes, with what ``ospo_fast.plan`` predicts beside
what is measured.

1. Memory plan (always; seconds, no weights): the exact Janus-Pro-7B-shape configuration of
   ``models.factory`` (and the rehearsed shape) built on the meta device: parameters per part; weights, KV cache,
   activations and optimizer state of stage 3 (images), stage 4 (Self-VQA) and LoRA training, at the presets'
   batches and at the batch ``auto`` picks on each GPU.
2. CPU rehearsal (``--shape tiny | tiny-24 | 1b``): a random-initialised model of that shape (1b: the exact
   Janus-Pro-1B shape: 24 layers, hidden 2048, vocab 102,400, SigLIP-L tower, VQ decoder, 384 px, 24x24 grid,
   codebook 16,384) in ``--dtype`` (default bfloat16, the reference dtype; this CPU has avx512_bf16), then per
   stage, for ``--prompts`` pairs: images with CFG and masks captured during decoding (generation context), images
   then the teacher-forced mask pass (base context), Self-VQA (4 questions per image), and ``--steps`` LoRA
   training steps (r 64, gradient checkpointing, fused loss, bf16 autocast). Per stage: wall time, peak RSS
   (sampled every 5 ms) and its growth over the stage, and the plan's time (calibrated on this CPU by
   bench_calibrate) and memory (KV + activations, the growth it predicts) for the same work. Host ops per piece are
   counted on a narrow model of the same structure (same layers, grid and blocks, widths 64), so the 1B run is
   not repeated for counting.

3. ``--overlap``: stage 3 through the pipeline (``Pipeline.run`` on the tiny preset with ``builtin:tiny-24``,
   384 px PNGs) with the chunk writes (PNG encoding, hashing, files) on a worker thread vs in series, same
   process, alternating; reports the images stage's seconds (from the manifest) and the write time itself.

  .venv/bin/python benchmarks/bench_fullsize.py --shape 7b             # memory plan only (seconds)
  .venv/bin/python benchmarks/bench_fullsize.py --overlap --prompts 2  # stage 3 with and without overlapped writes
  .venv/bin/python benchmarks/bench_fullsize.py --shape tiny           # the rehearsal's logic on the tiny shape
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_fullsize.py --shape 1b --prompts 1 --steps 1   # tens of min
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_calibrate import calibrate_cpu, calibration_config, count_ops, describe  # noqa: E402
from benchmarks.harness import append_rows  # noqa: E402
from ospo_fast import plan  # noqa: E402
from ospo_fast.config import LORA_TARGETS  # noqa: E402
from ospo_fast.models import factory  # noqa: E402

SHAPES = {"tiny": ("tiny", 8), "tiny-24": ("tiny", 24), "1b": ("janus-pro-1b-shape", 24),
          "7b": ("janus-pro-7b-shape", 24)}
QUESTIONS = ["Is there a red cube?", "Is there a blue ball?", "Is the cube left of the ball?", "Is it indoors?"]
GiB = plan.GiB


# ------------------------------------------------------------------------------------------------ memory plan

def memory_plan(kind: str, grid: int, dtype: str = "bfloat16") -> str:
    """Parameters per part and the memory of stages 3, 4 and LoRA training (meta device, no weights)."""
    shape = plan.model_shape(plan.kind_config(kind, grid))
    lines = [f"{kind} (grid {grid}, {dtype}): {shape.total_params / 1e9:.3f}B parameters "
             f"({shape.params['total']:,}); {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
             f"KV {shape.kv_bytes_per_token * plan.DTYPE_BYTES[dtype] / 2**20:.2f} MiB per token"]
    parts = [k for k in shape.params if k not in ("total",)]
    lines.append("   parameters: " + ", ".join(f"{k} {shape.params[k] / 1e6:.1f}M" for k in parts)
                 + f"; LoRA r64 on q,k,v,o,gate,up,down: {shape.lora_params(64, LORA_TARGETS) / 1e6:.1f}M")
    lines.append(f"   {'stage':<28}{'batch':>6}{'weights':>9}{'KV':>9}{'activ.':>9}{'optim.':>9}{'total GiB':>11}")
    cases = [("stage 3 images", "images", 16, {}), ("stage 4 Self-VQA (8 q)", "vqa", 16, {"questions": 8}),
             ("LoRA training (ckpt)", "train", 16, {}), ("LoRA training (no ckpt)", "train", 16,
                                                          {"checkpointing": False})]
    for name, stage, batch, kwargs in cases:
        m = plan.MEMORY_FNS[stage](shape, batch, dtype=dtype, **kwargs)
        lines.append(f"   {name:<28}{batch:>6}{m.weights / GiB:>9.2f}{m.kv / GiB:>9.2f}{m.peak_activation / GiB:>9.2f}"
                     f"{m.optimizer / GiB:>9.2f}{m.total / GiB:>11.2f}")
    lines.append("   auto batch (10% margin): " + "; ".join(
        f"{name}: " + ", ".join(f"{stage} {_auto(shape, stage, device, dtype, kwargs)}"
                                for stage, kwargs in (("images", {}), ("vqa", {"questions": 8}), ("train", {})))
        for name, device in plan.GPUS.items()))
    return "\n".join(lines)


def _auto(shape, stage: str, device: plan.Device, dtype: str, kwargs: dict) -> str:
    try:
        return str(plan.auto_batch(shape, stage, device.memory, dtype=dtype, **kwargs).batch)
    except ValueError:
        return "does not fit"


# ------------------------------------------------------------------------------------------------ rehearsal

def build_bundle(sizes: factory.ModelSizes, dtype: torch.dtype, seed: int = 0):
    """A random-initialised Janus of ``sizes`` in memory (no files), initialised directly in ``dtype``."""
    from transformers import JanusForConditionalGeneration

    from ospo_fast.models.loader import JanusBundle
    from ospo_fast.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=min(sizes.vocab, 1024))
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
               "image": tokenizer.convert_tokens_to_ids(tokenizer.image_token)}
    config = factory.janus_config(sizes, special)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = JanusForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config = factory.image_generation_config(tokenizer)
    return JanusBundle(model=model, processor=factory.build_processor(tokenizer, sizes.grid), source="rehearsal")


def narrow_sizes(sizes: factory.ModelSizes) -> factory.ModelSizes:
    """The same structure (layers, vision layers, VQ blocks, grid) at widths 64: the same host ops per piece."""
    return dataclasses.replace(sizes, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=1024,
                               vision_hidden=64, vision_intermediate=128, vision_heads=4, codebook=256,
                               vq_base_channels=32, vq_latent_channels=32)  # GroupNorm: 32 groups


class RssPeak:
    """Peak resident set size (bytes) while the block runs, sampled every ``interval`` s by a thread it joins."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclasses.dataclass
class Work:
    """What one rehearsal runs: P pairs -> 2P images (chosen + rejected rows), their prompts, seeds, objects."""

    prompts: list[str]
    base_prompts: list[str]
    seeds: list[int]
    objects: list[list[str]]

    @classmethod
    def make(cls, pairs: int) -> Work:
        dense = [f"a photo of a red cube and a blue ball on a wooden table, scene {i}" for i in range(pairs)]
        rejected = [f"a photo of a blue cube and a red ball on a wooden table, scene {i}" for i in range(pairs)]
        base = [f"a red cube and a blue ball, scene {i}" for i in range(pairs)]
        return cls(dense + rejected, base * 2, list(range(2 * pairs)), [["cube", "ball"]] * (2 * pairs))


def run_stages(bundle, work: Work, steps: int, pairs: int, tmp: Path) -> dict:
    """Run every rehearsed stage once on ``bundle``; returns {stage: (seconds, rss start, rss peak)} and outputs."""
    from ospo_fast.config import ImageConfig, MaskConfig
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.engine.object_attention import teacher_forced_object_maps
    from ospo_fast.engine.vqa import score_yes_no
    from ospo_fast.ops.object_masks import object_masks, select_layers

    images = len(work.prompts)
    config = ImageConfig(batch_size=images, compile=False)
    layers = select_layers(bundle.num_layers, 5)
    out: dict = {}

    def timed(name, fn):
        with RssPeak() as rss:
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
        out[name] = (seconds, rss.start, rss.peak)
        return result

    gen = timed("images+masks (generation context)", lambda: generate_images(
        bundle, work.prompts, work.seeds, config, objects=work.objects, mask_layers=layers))
    object_masks(gen.object_maps.float(), MaskConfig())

    def base_context():
        result = generate_images(bundle, work.prompts, work.seeds, config)
        maps = teacher_forced_object_maps(bundle, work.base_prompts, result.tokens, work.objects, skip_layers=5)
        return result, maps

    result, _ = timed("images+masks (base context)", base_context)
    pixels = [p.numpy() for p in result.pixels]
    timed("Self-VQA (4 questions)", lambda: score_yes_no(bundle, pixels, [QUESTIONS] * images, batch_size=images))
    trainer = make_trainer(bundle, result.tokens, pairs, tmp)
    timed(f"LoRA training ({steps} steps)", lambda: [trainer.train_step() for _ in range(steps)])
    return out


def make_trainer(bundle, tokens: torch.Tensor, pairs: int, tmp: Path):
    """A Trainer on ``bundle`` (LoRA r 64 on all seven targets, gradient checkpointing, fused loss, bf16 autocast,
    ``pairs`` pairs per step) over a pairs file of the generated tokens with random masks."""
    import json

    from ospo_fast.config import OSPOConfig
    from ospo_fast.train.trainer import Trainer

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "pairs.jsonl"
    grid = bundle.grid
    generator = torch.Generator().manual_seed(0)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(pairs):
            record = {"pair_id": f"r{i}", "prompt": "a red cube and a blue ball", "category": "color", "grid": grid}
            for side, row in (("chosen", i), ("rejected", i + pairs)):
                record[side] = {"tokens": tokens[row].tolist(), "image": f"images/{i}_{side}.png", "score": 0.0,
                                "mask": (torch.rand(grid * grid, generator=generator) < 0.3).int().tolist()}
            handle.write(json.dumps(record) + "\n")
    config = OSPOConfig()
    config.model.device = "cpu"
    config.model.dtype = "bfloat16" if bundle.model.dtype == torch.bfloat16 else "float32"
    tc = config.train
    tc.per_device_batch, tc.grad_accum, tc.max_steps = pairs, 1, 10**6
    tc.gradient_checkpointing = True
    return Trainer(config, path, tmp / "train", bundle=bundle)


def count_host_ops(sizes: factory.ModelSizes, dtype: torch.dtype, work: Work, pairs: int, tmp: Path) -> dict:
    """HostOps per rehearsed stage, counted on ``narrow_sizes(sizes)`` running the same calls."""
    from benchmarks.bench_calibrate import OpCounter, image_host_ops
    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.engine.object_attention import teacher_forced_object_maps
    from ospo_fast.engine.vqa import score_yes_no
    from ospo_fast.ops.object_masks import select_layers

    bundle = build_bundle(narrow_sizes(sizes), dtype)
    images = len(work.prompts)
    config = ImageConfig(batch_size=images, compile=False)
    layers = select_layers(bundle.num_layers, 5)
    plain, _ = image_host_ops(bundle, work.prompts, work.seeds, config)
    captured = count_ops(lambda: generate_images(bundle, work.prompts, work.seeds, config, objects=work.objects,
                                                 mask_layers=layers))
    n = bundle.num_image_tokens
    tokens = torch.zeros(images, n, dtype=torch.long)
    mask = count_ops(lambda: teacher_forced_object_maps(bundle, work.base_prompts, tokens, work.objects, 5))
    pixels = [torch.zeros(bundle.grid * 16, bundle.grid * 16, 3, dtype=torch.uint8).numpy()] * images
    vqa = count_ops(lambda: score_yes_no(bundle, pixels, [QUESTIONS] * images, batch_size=images))
    trainer = make_trainer(bundle, tokens, pairs, tmp / "narrow")
    with OpCounter() as counter:
        trainer.train_step()
    # generation context: its decode steps (N of them, the last one captures) carry the capture ops
    step_captured = (captured - plain.prefill - plain.vq_decode) / n
    return {"generation": dataclasses.replace(plain, step=round(step_captured)),
            "base": dataclasses.replace(plain, mask_pass=mask), "vqa": plan.HostOps(vqa=vqa),
            "train": plan.HostOps(train=counter.count)}


def predictions(shape: plan.ModelShape, device: plan.Device, dtype: str, ops: dict, images: int, prompt_len: int,
                pairs: int, steps: int) -> dict:
    """{stage: (predicted seconds, predicted growth in bytes over the stage: KV + activations [+ optimizer])}."""
    gen = plan.image_batch_seconds(shape, images, device, dtype, prompt_len, mask_pass=False, ops=ops["generation"])
    gen["decode"] += plan.image_batch_seconds(shape, images, device, dtype, prompt_len, mask_pass=False)[
        "decode"] / (shape.image_tokens - 1)  # one more step: the query that reads the last image token
    base = plan.image_batch_seconds(shape, images, device, dtype, prompt_len, mask_pass=True, ops=ops["base"])
    m3 = plan.images_memory(shape, images, dtype, prompt_len=prompt_len)
    m4 = plan.vqa_memory(shape, images, dtype, questions=len(QUESTIONS))
    m5 = plan.train_memory(shape, pairs, dtype, lora_rank=64)
    return {
        "images+masks (generation context)": (sum(gen.values()), m3.kv + m3.peak_activation),
        "images+masks (base context)": (sum(base.values()), m3.kv + m3.peak_activation),
        "Self-VQA (4 questions)": (plan.vqa_batch_seconds(shape, images, len(QUESTIONS), device, ops["vqa"]),
                                   m4.kv + m4.peak_activation),
        f"LoRA training ({steps} steps)": (steps * plan.train_step_seconds(shape, pairs, device, ops=ops["train"]),
                                           m5.peak_activation + m5.optimizer),
    }


def rehearse(name: str, pairs: int, steps: int, dtype: str) -> tuple[str, list[dict]]:
    from ospo_fast.engine import image_gen

    kind, grid = SHAPES[name]
    sizes = factory.sizes_for(kind, grid)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    work = Work.make(pairs)
    device = calibrate_cpu(dtype)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ops = count_host_ops(sizes, torch_dtype, work, pairs, tmp)
        with RssPeak() as build_rss:
            start = time.perf_counter()
            bundle = build_bundle(sizes, torch_dtype)
            build_s = time.perf_counter() - start
        shape = plan.model_shape(bundle.model.config)
        prompt_len = image_gen._tokenise(bundle, work.prompts, None)[0].shape[1]
        measured = run_stages(bundle, work, steps, pairs, tmp)
    predicted = predictions(shape, device, dtype, ops, len(work.prompts), prompt_len, pairs, steps)
    rows = [{"shape": name, "stage": "build (weights)", "measured_s": build_s, "predicted_s": None,
             "rss_growth_bytes": build_rss.peak - build_rss.start,
             "predicted_bytes": shape.total_params * plan.DTYPE_BYTES[dtype], "rss_peak_bytes": build_rss.peak}]
    for stage, (seconds, rss_start, rss_peak) in measured.items():
        p_s, p_bytes = predicted[stage]
        rows.append({"shape": name, "stage": stage, "measured_s": seconds, "predicted_s": p_s,
                     "rss_growth_bytes": rss_peak - rss_start, "predicted_bytes": p_bytes, "rss_peak_bytes": rss_peak})
    for row in rows:
        row.update(pairs=pairs, images=len(work.prompts), dtype=dtype, prompt_len=prompt_len)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    lines = [describe(device), f"   {name}: {pairs} pair(s) = {len(work.prompts)} images (CFG: 2 rows each), "
             f"prompt {prompt_len} tokens, {dtype}; peak RSS of the process {max_rss:.2f} GiB",
             f"   {'stage':<36}{'time s':>9}{'plan s':>9}{'ratio':>7}{'RSS +GiB':>10}{'plan GiB':>10}{'ratio':>7}"
             f"{'peak GiB':>10}"]
    for r in rows:
        t_ratio = f"{r['predicted_s'] / r['measured_s']:.2f}" if r["predicted_s"] else "-"
        p_s = f"{r['predicted_s']:.2f}" if r["predicted_s"] is not None else "-"
        m_ratio = f"{r['predicted_bytes'] / r['rss_growth_bytes']:.2f}" if r["rss_growth_bytes"] > 0 else "-"
        lines.append(f"   {r['stage']:<36}{r['measured_s']:>9.2f}{p_s:>9}{t_ratio:>7}"
                     f"{r['rss_growth_bytes'] / GiB:>10.3f}{r['predicted_bytes'] / GiB:>10.3f}{m_ratio:>7}"
                     f"{r['rss_peak_bytes'] / GiB:>10.2f}")
    for row in rows:
        row.update(calibration_config(device))
    return "\n".join(lines), rows


def overlap_run(prompts: int, overlap: bool, batch: int) -> dict:
    """One pipeline run (tiny preset, builtin:tiny-24); the images stage's seconds and the seconds spent writing."""
    import json

    from ospo_fast.config import load_config
    from ospo_fast.pipeline import Pipeline

    config = load_config("tiny", [f"prompts.num_prompts={prompts}", "model.path=builtin:tiny-24", "model.device=cpu",
                                  f"images.batch_size={batch}", "filter.enabled=false"])
    with tempfile.TemporaryDirectory() as out:
        pipeline = Pipeline(config, out, progress=False)
        pipeline.overlap_writes = overlap
        spent = [0.0]
        write = pipeline.store.write_chunk

        def timed_write(*args):
            start = time.perf_counter()
            write(*args)
            spent[0] += time.perf_counter() - start

        pipeline.store.write_chunk = timed_write
        pipeline.run()
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    stage = manifest["stages"]["images"]
    return {"overlap": overlap, "images_stage_s": stage["seconds"], "write_s": spent[0], "prompts": prompts,
            "images": prompts * config.perturb.num_perturbations * 2, "batch": batch}


def overlap_check(prompts: int, repeats: int, batch: int) -> tuple[str, list[dict]]:
    rows = [overlap_run(prompts, overlap, batch) for _ in range(repeats) for overlap in (False, True)]
    lines = [f"   stage 3, {rows[0]['images']} images of 384 px, {batch} per batch (tiny-24), {repeats} runs each",
             f"   {'writes':<22}{'images stage s':>16}{'of which writing s':>20}"]
    for r in rows:
        lines.append(f"   {'worker thread' if r['overlap'] else 'in series':<22}{r['images_stage_s']:>16.2f}"
                     f"{r['write_s']:>20.2f}")
    best = {o: min(r["images_stage_s"] for r in rows if r["overlap"] == o) for o in (False, True)}
    lines.append(f"   fastest: in series {best[False]:.2f} s, overlapped {best[True]:.2f} s "
                 f"(ratio {best[False] / best[True]:.3f})")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES), help="7b: the memory plan only")
    parser.add_argument("--prompts", type=int, default=1, help="pairs rehearsed (2 images each)")
    parser.add_argument("--steps", type=int, default=1, help="LoRA training steps")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--overlap", action="store_true", help="stage 3 with and without overlapped writes only")
    parser.add_argument("--repeats", type=int, default=2, help="--overlap: alternating runs of each mode")
    parser.add_argument("--batch", type=int, default=4, help="--overlap: images.batch_size")
    args = parser.parse_args(argv)
    if args.overlap:
        text, rows = overlap_check(args.prompts, args.repeats, args.batch)
        append_rows("fullsize_overlap", rows, text, config={"prompts": args.prompts, "batch": args.batch})
        return 0
    kind, grid = SHAPES[args.shape]
    table = memory_plan("janus-pro-7b-shape", 24, "bfloat16")
    if args.shape != "7b":
        table += "\n" + memory_plan(kind, grid, args.dtype)
    append_rows("fullsize_memory_plan", [{"shape": "7b"}] + ([{"shape": args.shape}] if args.shape != "7b" else []),
                table)
    if args.shape == "7b":
        return 0
    text, rows = rehearse(args.shape, args.prompts, args.steps, args.dtype)
    append_rows("fullsize_rehearsal", rows, text, config={"shape": args.shape, "pairs": args.prompts,
                                                          "steps": args.steps, "dtype": args.dtype})
    return 0


if __name__ == "__main__":
    sys.exit(main())
