"""Benchmark of stage 4 self-VQA. Run alone: ``.venv/bin/python benchmarks/bench_vqa.py``.

N images x K=4 yes/no questions each:
1. per-question forward: one full transformers forward (vision tower + whole prompt) per (image, question), the
   reference code's way (the baseline);
2. batched full forwards: all N*K prompts in one padded batch, no prefix sharing;
3. ``ospo_fast.engine.score_yes_no``: each image encoded once, the (system + image) prefix KV computed once and
   copied to its K question rows.
CPU default: ``builtin:tiny`` (64 image tokens), 8 images. On a GPU: ``--model janus-pro-1b-shape --device cuda
--images 16 --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_image_gen import interleaved  # noqa: E402
from benchmarks.harness import report  # noqa: E402
from ospo_fast.engine.vqa import answer_token_ids, score_yes_no, vqa_prompt  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402

QUESTIONS = ["Is there a red car?", "Is there a blue bench?", "Is the car to the left of the bench?",
             "Are there two green apples on the wooden table?"]


def _yes_no(probs: torch.Tensor, ids: dict[str, int]) -> list[tuple[float, float]]:
    p_yes = torch.maximum(probs[:, ids["yes"]], probs[:, ids["Yes"]])
    p_no = torch.maximum(probs[:, ids["no"]], probs[:, ids["No"]])
    return list(zip(p_yes.tolist(), p_no.tolist()))


@torch.no_grad()
def per_question(bundle, images, ids) -> list[tuple[float, float]]:
    out = []
    for image in images:
        for q in QUESTIONS:
            inputs = bundle.processor(text=[vqa_prompt(bundle.processor, q)], images=[image], return_tensors="pt")
            inputs = inputs.to(bundle.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(bundle.model.dtype)
            out += _yes_no(bundle.model(**inputs).logits[:, -1].float().softmax(-1), ids)
    return out


@torch.no_grad()
def batched_full(bundle, images, ids) -> list[tuple[float, float]]:
    texts = [vqa_prompt(bundle.processor, q) for _ in images for q in QUESTIONS]
    repeated = [image for image in images for _ in QUESTIONS]
    inputs = bundle.processor(text=texts, images=repeated, padding=True, return_tensors="pt").to(bundle.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(bundle.model.dtype)
    return _yes_no(bundle.model(**inputs).logits[:, -1].float().softmax(-1), ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | tiny-24 | janus-pro-1b-shape | a checkpoint path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = args.model if "/" in args.model or args.model.startswith("builtin:") else f"builtin:{args.model}"
    bundle = load_janus(path, dtype=args.dtype, device=args.device)
    side = bundle.grid * 16
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(args.images)]
    questions = [list(QUESTIONS) for _ in images]
    ids = answer_token_ids(bundle)
    engine = [p for row in score_yes_no(bundle, images, questions, batch_size=len(images)) for p in row]
    gap = np.abs(np.array(engine) - np.array(batched_full(bundle, images, ids))).max()
    print(f"max |engine - batched full forward| = {gap:.2e}")
    cases = [
        ("per-question forward", lambda: per_question(bundle, images, ids)),
        ("batched full forwards", lambda: batched_full(bundle, images, ids)),
        ("engine score_yes_no (prefix cache)", lambda: score_yes_no(bundle, images, questions, len(images))),
    ]
    results = interleaved(cases, device, args.repeats)
    for r in results:
        r.extra["questions_per_s"] = len(images) * len(QUESTIONS) / r.median_s
    report("self_vqa", results, baseline="per-question forward", device=device,
           config={"model": path, "dtype": args.dtype, "images": len(images), "questions_per_image": len(QUESTIONS)})
    for r in results:
        print(f"   {r.name:<34}{r.extra['questions_per_s']:>10.1f} questions/s")


if __name__ == "__main__":
    main()
