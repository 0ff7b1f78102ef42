"""Where the toy model's object attention looks, layer by layer (issue #16's mask target: precision >= 2x chance).

For held-out two-object captions, image tokens come from two sources: the VQ tokens of a true render of the caption
(where the objects are is known exactly) and the model's own CFG-5 samples (what the pipeline masks). Each image
gets one teacher-forced forward per layer with the caption as context (the pipeline's ``base`` mask context,
``teacher_forced_object_maps(..., layers=[i])``), then the pipeline's masks (min-max, Otsu x 0.8, union over
objects: ``object_masks`` with the toy preset's MaskConfig), scored by ``mask_localisation`` against the cells the
objects cover. Printed per layer and for the layers the preset's ``masks.skip_layers`` keeps: precision / chance.
Object words are the structure's (the shapes); colour words are shown beside them as a diagnostic.

    python recipes/toy_janus/probes/toy_mask_probe.py [--model builtin:toy] [--n 64] [--skip 1 2]

A row per (source, words) is appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (benchmarks.harness)

from benchmarks.harness import append_rows  # noqa: E402
from ospo_fast.config import load_config  # noqa: E402
from ospo_fast.engine.image_gen import generate_images  # noqa: E402
from ospo_fast.engine.object_attention import encode_pixels_to_tokens, objects_valid, teacher_forced_object_maps  # noqa: E402,E501
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.ops.object_masks import object_masks, select_layers  # noqa: E402
from ospo_fast.toy import world  # noqa: E402
from ospo_fast.toy.evaluate import mask_localisation  # noqa: E402

MASKS = load_config("toy").masks  # the toy preset's mask settings (Otsu scale, smoothing), read once


def localisation(bundle, captions: list[str], tokens: torch.Tensor, images: np.ndarray, words: list[list[str]],
                 layers: list[int]) -> float:
    """Mask precision / chance of the pipeline's union masks from the mean attention of ``layers``."""
    maps = teacher_forced_object_maps(bundle, captions, tokens, words, layers=layers)  # (B, O, G, G)
    masks = object_masks(maps, MASKS, object_valid=objects_valid(words))
    result = mask_localisation(list(images), list(masks.union.cpu().numpy()))
    return result["precision"] / result["chance"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--n", type=int, default=64, help="held-out two-object captions (with repeats)")
    parser.add_argument("--skip", type=int, nargs="+", default=[1, 2], help="masks.skip_layers values to show")
    args = parser.parse_args()
    bundle = load_janus(args.model, device="cpu")
    rng = np.random.default_rng(11)
    specs = [s for s in world.split_specs("heldout") if s.relation]
    specs = [specs[i] for i in rng.integers(len(specs), size=args.n)]
    captions = [world.caption_of_spec(s) for s in specs]
    renders = np.stack([world.render(world.scene_from_spec(s, rng)) for s in specs])  # (n, 64, 64, 3) uint8
    render_tokens = encode_pixels_to_tokens(bundle, torch.from_numpy(renders))
    generated = generate_images(bundle, captions, list(range(args.n)), load_config("toy").images)
    sources = {"render": (render_tokens, renders), "cfg5": (generated.tokens, np.stack(generated.pixels))}
    words = {"shape": [list(s.shapes) for s in specs], "colour": [list(s.colors) for s in specs]}
    num_layers = bundle.num_layers
    kept = {k: select_layers(num_layers, k) for k in args.skip}
    header = " ".join(f"L{i:<4d}" for i in range(num_layers)) + "  " + " ".join(
        f"skip{k}({kept[k][0]}-{kept[k][-1]})" for k in args.skip)
    print(f"{args.model}: {num_layers} layers, n={args.n}; mask precision / chance per layer, then the kept layers")
    print(f"{'source':7s}{'words':8s}{header}")
    rows = []
    for source, (tokens, images) in sources.items():
        for kind, object_words in words.items():
            per_layer = [localisation(bundle, captions, tokens, images, object_words, [i]) for i in range(num_layers)]
            per_skip = {k: localisation(bundle, captions, tokens, images, object_words, kept[k]) for k in args.skip}
            print(f"{source:7s}{kind:8s}" + " ".join(f"{x:<5.2f}" for x in per_layer) + "  " +
                  " ".join(f"{per_skip[k]:<{len(f'skip{k}({kept[k][0]}-{kept[k][-1]})')}.2f}" for k in args.skip),
                  flush=True)
            rows.append({"source": source, "words": kind, "per_layer": per_layer,
                         "skip_layers": {str(k): v for k, v in per_skip.items()}})
    append_rows("toy_mask_probe", rows, table="", config={"model": args.model, "n": args.n})


if __name__ == "__main__":
    main()
