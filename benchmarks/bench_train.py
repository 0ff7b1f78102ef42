"""Training throughput of stage 5: one optimizer step (forward, Obj-SimPO + SFT loss, backward, AdamW) with the
fused generation-head loss (logits never materialised) against the naive one (full (2P, T, V) logits), same run,
same pairs, same model. Reports pairs/s and peak memory. Both run under train.bf16's autocast on the benchmark's
device (the default, CPU included: float32 weights, bf16 activations into the fused head); --fp32 turns it off.

  .venv/bin/python benchmarks/bench_train.py                                   # builtin:tiny on CPU
  .venv/bin/python benchmarks/bench_train.py --model tiny-24                   # 576 image tokens
  .venv/bin/python benchmarks/bench_train.py --model tiny-24 --codebook 16384 --pairs 2   # + Janus-Pro's V
  python benchmarks/bench_train.py --model janus-pro-1b-shape --device cuda --pairs 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import measure, report  # noqa: E402
from ospo_fast.config import OSPOConfig  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402


def write_random_pairs(path: Path, num: int, grid: int, codebook: int, seed: int = 0) -> Path:
    """``num`` pairs of random image tokens with random object masks (the pair-file layout of the pipeline)."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(num):
            record = {"pair_id": f"b{i}", "prompt": "a red car and a blue bench", "category": "color", "grid": grid}
            for side in ("chosen", "rejected"):
                record[side] = {"tokens": torch.randint(0, codebook, (grid * grid,), generator=generator).tolist(),
                                "mask": (torch.rand(grid * grid, generator=generator) < 0.3).int().tolist(),
                                "image": f"images/{i}_{side}.png", "score": 0.0}
            handle.write(json.dumps(record) + "\n")
    return path


def build_tiny_with_codebook(out: Path, grid: int, codebook: int) -> str:
    """The tiny model with Janus-Pro's image vocabulary (e.g. 16,384), so the loss's logits have their real width."""
    import dataclasses

    from transformers import JanusForConditionalGeneration

    from ospo_fast.models import factory
    from ospo_fast.models.tokenizer import build_tokenizer

    sizes = dataclasses.replace(factory.sizes_for("tiny", grid), codebook=codebook)
    tokenizer = build_tokenizer(vocab_size=1024)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
               "image": tokenizer.convert_tokens_to_ids(tokenizer.image_token)}
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(factory.janus_config(sizes, special))
    model.generation_config = factory.image_generation_config(tokenizer)
    model.save_pretrained(out)
    factory.build_processor(tokenizer, grid).save_pretrained(out)
    return str(out)


def make_trainer(args: argparse.Namespace, fused: bool, pairs: Path, out: Path):
    from ospo_fast.train.trainer import Trainer

    config = OSPOConfig()
    config.model.path = args.model_path
    config.model.device = args.device
    config.model.dtype = "bfloat16" if args.device.startswith("cuda") and args.bf16_weights else "float32"
    config.loss.fused = fused
    tc = config.train
    tc.lora = not args.full
    tc.lora_r, tc.lora_alpha = args.lora_r, 2 * args.lora_r
    tc.per_device_batch, tc.grad_accum = args.pairs, 1
    tc.max_steps = 10**6
    tc.gradient_checkpointing = args.checkpointing
    tc.bf16 = not args.fp32
    return Trainer(config, pairs, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | tiny-24 | janus-pro-1b-shape | janus-pro-7b-shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (2x rows)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--bf16-weights", action="store_true", help="CUDA: load the weights in bf16")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (train.bf16=false)")
    parser.add_argument("--codebook", type=int, default=0,
                        help="tiny/tiny-24 only: rebuild the tiny model with this image codebook (16384 = Janus-Pro)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = f"builtin:{args.model}"
        if args.codebook:
            grid = 24 if args.model == "tiny-24" else 8
            args.model_path = build_tiny_with_codebook(Path(tmp) / "model", grid, args.codebook)
        bundle = load_janus(args.model_path, device="cpu")
        grid, codebook = bundle.grid, bundle.model.config.vq_config.num_embeddings
        del bundle
        pairs = write_random_pairs(Path(tmp) / "pairs.jsonl", max(8, args.pairs * 2), grid, codebook)
        results = []
        for name, fused in (("naive loss (full logits)", False), ("fused head + loss", True)):
            trainer = make_trainer(args, fused, pairs, Path(tmp) / name.split()[0])
            result = measure(name, trainer.train_step, device=device, warmup=1, repeats=args.repeats,
                             memory=True)
            result.extra["pairs_per_s"] = args.pairs / result.median_s
            results.append(result)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for r in results:
            print(f"   {r.name:<34} {r.extra['pairs_per_s']:.2f} pairs/s")
        report("train_step", results, baseline="naive loss (full logits)", device=device,
               config={"model": args.model, "pairs_per_step": args.pairs, "tokens_per_image": grid * grid,
                       "codebook": codebook, "lora": not args.full, "lora_r": args.lora_r,
                       "checkpointing": args.checkpointing, "bf16_autocast": not args.fp32,
                       "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
