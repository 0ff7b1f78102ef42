"""Masks from localisation heads on the toy world (issue 37): precision and recall of the pipeline's object masks
against the exact object cells, for every head of the mask layers (the SPEC's and the reference code's mean) and
for the k localisation heads chosen without labels (``ospo_fast/engine/localization_heads.py``), k = 1, 3, 5,
on the same pairs.

    .venv/bin/python recipes/toy_janus/probes/toy_head_probe.py --prompts 96 --out /tmp/head_probe

One synthesis (stages 1-3 of the toy preset: prompts, perturbations, images with base-context masks) draws the
pairs once; each head set then recomputes every image's union mask from the same tokens (the teacher-forced pass,
``masks.context=base``, as stage 3 does) and ``ospo_fast.toy.evaluate.mask_localisation`` scores it against the
cells the judge's renderer says hold an object. Per image row: the share of masked cells and of object cells.
The heads are chosen from 32 images of other prompts (a salted seed), never from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ospo_fast.config import load_config  # noqa: E402
from ospo_fast.toy.evaluate import mask_localisation, object_cells  # noqa: E402


def synthesise(prompts: int, out: Path, seed: int):
    """Stages 1-3 of the toy preset (base-context masks, every head); returns the config, store and records."""
    from ospo_fast.pipeline import Pipeline
    from ospo_fast.runstore import RunStore

    config = load_config("toy", [f"prompts.num_prompts={prompts}", f"seed={seed}", "filter.enabled=false"])
    pipeline = Pipeline(config, out, progress=False)
    pipeline.run()
    store = RunStore(out)
    return config, store, store.read_stage("images")


def union_masks(ctx, records: list[dict], heads: dict | None, batch: int = 16) -> list[np.ndarray]:
    """Each image's union mask (G, G) bool from a teacher-forced pass over its stored tokens with ``heads``."""
    from ospo_fast.engine.object_attention import teacher_forced_object_scores
    from ospo_fast.stages.steps import _union_masks, mask_objects

    items = [(r, side) for r in records for side in ("chosen", "rejected")]
    masks = []
    for start in range(0, len(items), batch):
        part = items[start:start + batch]
        tokens = torch.tensor([r[side]["tokens"] for r, side in part])
        objects = [mask_objects(r, side, "base") for r, side in part]
        scores = teacher_forced_object_scores(ctx.bundle, [r["base_prompt"] for r, _ in part], tokens, objects,
                                              skip_layers=ctx.config.masks.skip_layers, heads=heads)
        masks += [np.asarray(u, dtype=bool) for u in _union_masks(ctx, scores, [len(o) for o in objects])]
    return masks


def per_row(images: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """Per image row: the share of masked cells and of object cells (the raster-position drift the issue saw)."""
    grid = masks[0].shape[0]
    cells = [object_cells(image, grid) for image in images]
    return {"masked": [round(float(np.mean([m[row].mean() for m in masks])), 3) for row in range(grid)],
            "objects": [round(float(np.mean([c[row].mean() for c in cells])), 3) for row in range(grid)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="base prompts (3 pairs each, 6 images)")
    parser.add_argument("--out", type=Path, required=True, help="synthesis directory (reused when it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    args = parser.parse_args(argv)
    from ospo_fast.stages.context import StageContext

    config, store, records = synthesise(args.prompts, args.out, args.seed)
    images = [store.load_image(r[side]) for r in records for side in ("chosen", "rejected")]
    results = {}
    for k in [0, *args.k]:  # 0: every head of the mask layers
        cfg = config if k == 0 else dataclasses.replace(
            config, masks=dataclasses.replace(config.masks, heads="localization", localization_heads=k))
        ctx = StageContext(cfg, device="cpu")
        chosen = ctx.localization_heads()
        masks = union_masks(ctx, records, None if chosen is None else chosen.heads)
        score = mask_localisation(images, masks)
        name = "all heads" if k == 0 else f"localization k={k}"
        results[name] = {**score, "ratio": score["precision"] / score["chance"],
                         "heads": None if chosen is None else chosen.summary()["heads"], "rows": per_row(images, masks)}
        print(f"{name:<18} n={score['n']:>4}  precision {score['precision']:.3f}  chance {score['chance']:.3f}  "
              f"({results[name]['ratio']:.2f}x)  recall {score['recall']:.3f}  heads {results[name]['heads']}")
        print(f"{'':<18} masked by row {results[name]['rows']['masked']}")
    print(f"{'':<18} objects by row {results['all heads']['rows']['objects']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
