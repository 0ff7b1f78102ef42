"""Judged text-image alignment of a model on the toy world's held-out prompts (generated with the engine, scored
by the exact judge). Seeds are fixed per prompt index, so two models are compared on the same noise."""

from __future__ import annotations

import numpy as np

from ospo_fast.config import ImageConfig
from ospo_fast.toy import world
from ospo_fast.toy.judge import judge


def judged_alignment(bundle, num_prompts: int, seed: int = 0, config: ImageConfig | None = None,
                     batch_size: int = 32) -> dict:
    """{"n", "strict", "loose", "per_category": {cat: {"n", "strict", "loose"}}} over ``num_prompts`` held-out
    prompts; strict = colour + shape + relation, loose = colour + position."""
    from ospo_fast.engine.image_gen import generate_images

    config = config or ImageConfig()
    records = world.sample_prompts(num_prompts, split="heldout", seed=seed + 1)
    results = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        images = generate_images(bundle, [r["prompt"] for r in batch], seeds, config).pixels.cpu().numpy()
        results += [judge(img, r["structure"]) for img, r in zip(images, batch)]
    summary: dict = {"n": len(results), "strict": float(np.mean([r.strict for r in results])),
                     "loose": float(np.mean([r.loose for r in results])), "per_category": {}}
    for category in sorted({r["category"] for r in records}):
        picked = [res for res, rec in zip(results, records) if rec["category"] == category]
        summary["per_category"][category] = {"n": len(picked), "strict": float(np.mean([r.strict for r in picked])),
                                             "loose": float(np.mean([r.loose for r in picked]))}
    return summary
