"""Why the toy model's images fail the strict judge (issue #16's T2I target: strict 10-40% at CFG 5).

Samples held-out prompts with the library's engine and the toy preset's image settings (CFG 5 unless told), judges
each image with the exact judge, and sorts every image into its first failing check: a colour missing, the
relation wrong, then (loose right) a shape wrong, an extra blob, or both, else strict right. Prints the counts per
prompt category and the shape confusions (asked -> drawn) among loose-right images.

    python recipes/toy_janus/probes/toy_t2i_breakdown.py [--model builtin:toy] [--n 320] [--guidance 5]
                                                         [--temperature 1]

One row is appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (benchmarks.harness)

from benchmarks.harness import append_rows  # noqa: E402
from ospo_fast.config import load_config  # noqa: E402
from ospo_fast.engine.image_gen import generate_images  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.toy import world  # noqa: E402
from ospo_fast.toy.judge import JudgeResult, judge  # noqa: E402

CAUSES = ("colour missing", "relation wrong", "shape wrong", "extra blob", "shape wrong + extra blob", "strict right")


def failure_cause(result: JudgeResult) -> str:
    """The first check an image fails, in the judge's order (``CAUSES``)."""
    details = result.details
    if not details["colours"]:
        return "colour missing"
    if not details["relations"]:
        return "relation wrong"
    bad_shape, extra = not details["shapes"], details["extra_blobs"] > 0
    return {(False, False): "strict right", (True, False): "shape wrong", (False, True): "extra blob",
            (True, True): "shape wrong + extra blob"}[(bad_shape, extra)]


def shape_confusions(result: JudgeResult) -> list[str]:
    """``asked->drawn`` for each asked shape the judge found drawn as another shape."""
    return [f"{asked}->{found['shape']}" for asked, found in result.details["found"].items()
            if asked in world.SHAPES and found is not None and found["shape"] != asked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--n", type=int, default=320, help="held-out prompts (world.sample_prompts, seed 1)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    bundle = load_janus(args.model, device="cpu")
    images_config = load_config("toy").images
    images_config.guidance_scale, images_config.temperature = args.guidance, args.temperature
    records = world.sample_prompts(args.n, split="heldout", seed=1)
    causes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    confusions: collections.Counter = collections.Counter()
    for start in range(0, args.n, args.batch):
        batch = records[start:start + args.batch]
        seeds = list(range(start, start + len(batch)))
        pixels = generate_images(bundle, [r["prompt"] for r in batch], seeds, images_config).pixels
        for image, record in zip(np.asarray(pixels.cpu()), batch):
            result = judge(image, record["structure"])
            cause = failure_cause(result)
            for category in (record["category"], "all"):
                causes[category][cause] += 1
            if result.loose:
                confusions.update(shape_confusions(result))
        print(f"{start + len(batch)}/{args.n} judged", flush=True)
    print(f"{args.model}: held-out prompts, CFG {args.guidance}, temperature {args.temperature}; first failing check")
    print(f"{'category':12s}{'n':>5s} " + " ".join(f"{c:>14.14s}" for c in CAUSES) + "  strict  loose")
    for category, counts in sorted(causes.items()):
        n = sum(counts.values())
        loose = sum(counts[c] for c in CAUSES[2:])
        print(f"{category:12s}{n:5d} " + " ".join(f"{counts[c]:14d}" for c in CAUSES) +
              f"  {counts['strict right'] / n:6.1%}  {loose / n:5.1%}")
    print("shape confusions among loose-right images (asked->drawn): " +
          ", ".join(f"{k} {v}" for k, v in confusions.most_common()))
    append_rows("toy_t2i_breakdown", [{"causes": {k: dict(v) for k, v in causes.items()},
                                       "shape_confusions": dict(confusions)}], table="",
                config={"model": args.model, "n": args.n, "guidance": args.guidance,
                        "temperature": args.temperature})


if __name__ == "__main__":
    main()
