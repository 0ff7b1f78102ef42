"""Stages 1-4 on a small model: seconds per stage and per record, and the cost of the two mask contexts.

The baseline is the default ``masks.context=base`` (one teacher-forced prefill per image batch, as the reference
code conditions masks on x); ``generation`` captures the masks inside the decode steps. Both runs use the same
prompts and seeds in this process.

    python benchmarks/bench_pipeline.py [--preset tiny] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from ospo_fast.config import load_config  # noqa: E402
from ospo_fast.pipeline import Pipeline  # noqa: E402


def run_once(preset: str, prompts: int, context: str, extra: list[str]) -> tuple[float, dict]:
    overrides = [f"prompts.num_prompts={prompts}", f"masks.context={context}", "filter.enabled=false", *extra]
    config = load_config(preset, overrides)
    with tempfile.TemporaryDirectory() as out:
        pipeline = Pipeline(config, out, progress=False)
        pipeline.ctx.bundle  # load the model outside the timed region
        start = time.perf_counter()
        pipeline.run()
        total = time.perf_counter() - start
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    return total, manifest["stages"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results, per_stage = [], {}
    for context in ("base", "generation"):
        total, stages = run_once(args.preset, args.prompts, context, args.overrides)
        images = stages["images"]["records"] * 2
        results.append(harness.Measurement(name=f"stages 1-4, masks.context={context}", median_s=total,
                                           peak_mib=None, repeats=1,
                                           extra={"images_per_s": images / stages["images"]["seconds"]}))
        per_stage[context] = stages
    harness.report("pipeline", results, baseline="stages 1-4, masks.context=base",
                   config={"preset": args.preset, "prompts": args.prompts})
    print(f"\n   {'stage':<11}{'records':>9}{'s (base)':>11}{'ms/record':>11}{'s (gen.)':>11}")
    for name, entry in per_stage["base"].items():
        gen = per_stage["generation"][name]
        per_record = 1e3 * entry["seconds"] / max(1, entry["records"])
        print(f"   {name:<11}{entry['records']:>9}{entry['seconds']:>11.2f}{per_record:>11.1f}{gen['seconds']:>11.2f}")


if __name__ == "__main__":
    main()
