"""The paper's ablations in miniature on the toy world (held-out prompts, several seeds, mean +- std).

Variants, each trained from the shipped ``builtin:toy`` model with the toy preset's training settings:
- base                 : no training
- best-of-N + full loss: SILMM-style pairs (2N images of the same prompt, best vs worst Self-VQA score)
- OSPO, plain SimPO    : perturbed-prompt pairs, alpha = 0, no SFT
- OSPO, object SimPO   : alpha = 1, no SFT
- OSPO, + SFT          : alpha = 1, sft_weight = 2 (the full method)
- OSPO, no filter      : the full loss on unfiltered pairs
- OSPO, iteration 2    : the full method run again from its own trained model
Judged alignment (strict: colour + shape + relation; loose: colour + position) by the exact judge on the same
held-out prompts and sampling seeds for every variant.

    python benchmarks/toy_ablation.py --seeds 0 1 [--prompts 48] [--eval-prompts 96] [--out runs/ablation]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import RESULTS, device_name, git_commit  # noqa: E402
from ospo_fast.config import OSPOConfig, load_config  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.pipeline import Pipeline  # noqa: E402
from ospo_fast.store import read_jsonl  # noqa: E402
from ospo_fast.toy.evaluate import judged_alignment  # noqa: E402
from ospo_fast.train import train  # noqa: E402

LOSSES = {"plain_simpo": ["loss.alpha=0", "loss.sft_weight=0"], "object_simpo": ["loss.alpha=1", "loss.sft_weight=0"],
          "object_simpo_sft": ["loss.alpha=1", "loss.sft_weight=2"]}


def evaluate(config: OSPOConfig, model_path: str, n: int) -> dict:
    bundle = load_janus(model_path, device="cpu")
    return judged_alignment(bundle, n, seed=0, config=config.images, batch_size=32)


def synth(seed: int, out: Path, prompts: int, model: str, extra: list[str]) -> Path:
    config = load_config("toy", [f"seed={seed}", f"prompts.num_prompts={prompts}", f"model.path={model}", *extra])
    Pipeline(config, out, progress=False).run()
    return out / "pairs.jsonl"


def fit(seed: int, pairs: Path, out: Path, model: str, loss: list[str]) -> str:
    if not read_jsonl(pairs):
        raise RuntimeError(f"{pairs} holds no pairs; cannot train this variant")
    config = load_config("toy", [f"seed={seed}", f"model.path={model}", *loss])
    return str(train(config, pairs, out).merged_dir)


def one_seed(seed: int, root: Path, prompts: int, eval_n: int) -> dict[str, dict]:
    root.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config("toy")
    results = {"base": evaluate(base_cfg, "builtin:toy", eval_n)}
    ospo = synth(seed, root / "synth_ospo", prompts, "builtin:toy", [])
    unfiltered = synth(seed, root / "synth_nofilter", prompts, "builtin:toy", ["filter.enabled=false"])
    bon = synth(seed, root / "synth_bon", prompts, "builtin:toy", ["perturb.source=best_of_n"])
    results["pairs"] = {"ospo": len(read_jsonl(ospo)), "no_filter": len(read_jsonl(unfiltered)),
                        "best_of_n": len(read_jsonl(bon))}
    full = LOSSES["object_simpo_sft"]
    results["best_of_n"] = evaluate(base_cfg, fit(seed, bon, root / "train_bon", "builtin:toy", full), eval_n)
    for name, loss in LOSSES.items():
        results[f"ospo_{name}"] = evaluate(base_cfg, fit(seed, ospo, root / f"train_{name}", "builtin:toy", loss),
                                           eval_n)
    results["ospo_no_filter"] = evaluate(
        base_cfg, fit(seed, unfiltered, root / "train_nofilter", "builtin:toy", full), eval_n)
    iter1 = str(root / "train_object_simpo_sft" / "merged")
    ospo2 = synth(seed, root / "synth_iter2", prompts, iter1, [])
    results["ospo_iteration2"] = evaluate(base_cfg, fit(seed, ospo2, root / "train_iter2", iter1, full), eval_n)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--eval-prompts", type=int, default=96)
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()
    per_seed = {seed: one_seed(seed, Path(args.out) / f"seed{seed}", args.prompts, args.eval_prompts)
                for seed in args.seeds}
    variants = [k for k in per_seed[args.seeds[0]] if k != "pairs"]
    print(f"\n== toy ablation on {device_name()} ({len(args.seeds)} seeds, {args.eval_prompts} held-out prompts)")
    print(f"   {'variant':<26}{'strict mean +- std':>22}{'loose mean +- std':>22}{'vs base (strict)':>18}")
    rows = []
    for name in variants:
        strict = [per_seed[s][name]["strict"] for s in args.seeds]
        loose = [per_seed[s][name]["loose"] for s in args.seeds]
        base = statistics.mean(per_seed[s]["base"]["strict"] for s in args.seeds)
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"   {name:<26}{statistics.mean(strict):>13.1%} +- {spread(strict):<5.1%}"
              f"{statistics.mean(loose):>13.1%} +- {spread(loose):<5.1%}{statistics.mean(strict) - base:>+17.1%}")
        rows.append({"variant": name, "strict": strict, "loose": loose})
    print("   pairs kept per seed: " + "; ".join(f"seed {s}: {per_seed[s]['pairs']}" for s in args.seeds))
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"bench": "toy_ablation", "device": device_name(), "commit": git_commit(),
                                 "seeds": args.seeds, "rows": rows,
                                 "pairs": {str(s): per_seed[s]["pairs"] for s in args.seeds}}) + "\n")
    (Path(args.out) / "ablation.json").write_text(json.dumps(per_seed, indent=2))


if __name__ == "__main__":
    main()
