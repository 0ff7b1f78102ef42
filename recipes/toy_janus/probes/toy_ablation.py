"""The paper's ablations in miniature on the toy world (several seeds, mean +- standard error over seeds).

Variants, each trained from the shipped ``builtin:toy`` model with the toy preset's training settings and the
paper's loss (``loss.guided_rewards=false`` unless a variant says otherwise, whatever the preset sets):
- base                 : no training
- best-of-N + full loss: SILMM-style pairs (2N images of the same prompt, best vs worst Self-VQA score)
- OSPO, plain SimPO    : perturbed-prompt pairs, alpha = 0, no SFT
- OSPO, object SimPO   : alpha = 1, no SFT
- OSPO, + SFT          : alpha = 1, sft_weight = 2 (the full method)
- OSPO, no filter      : the full loss on unfiltered pairs (same images and scores, reselected without the filter)
- OSPO, iteration 2    : the full method run again from its own trained model
- guidance-aware options (beyond the paper), each the full method plus one switch: ``loss.guided_rewards`` (the
  loss under the CFG distribution), ``loss.uncond_anchor=10`` (the unconditional branch held where it was), and
  the full method's model with its CFG weight re-tuned over ``RETUNE`` on training captions (``*_retuned_cfg``:
  the held-out CFG 5 condition is judged at the re-tuned weight instead; the base model gets the same treatment)
Judged alignment (strict: colour + shape + relation; loose: colour + position) by the exact judge, on the same
prompts and sampling seeds for every variant, under three conditions: held-out captions with CFG 5 (the SPEC's
sampling), held-out captions without guidance (CFG 1: the conditional model alone) and training-split captions
without guidance. Each synthesis run also reports what its pairs hold by the judge (``pair_judgement``), how well
its object masks cover the drawn objects (``pair_mask_localisation``) and how often the model's own Self-VQA answers on
its pairs are right (``pair_self_vqa``).

    python recipes/toy_janus/probes/toy_ablation.py --seeds 0 1 2 [--prompts 384] [--eval-prompts 160]
                                                    [--out runs/ablation] [--confirm-prompts 640]

Each seed's results are saved in ``<out>/seed<s>/results.json`` and reused by a later call, so seeds can run in
separate processes (``OMP_NUM_THREADS=1 ... --seeds 0`` beside ``... --seeds 1``) and one more call tabulates them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (benchmarks.harness)

from benchmarks.harness import RESULTS, device_name, git_commit  # noqa: E402
from ospo_fast.config import load_config  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.pipeline import Pipeline  # noqa: E402
from ospo_fast.store import atomic_write_json, read_jsonl  # noqa: E402
from ospo_fast.toy.evaluate import (  # noqa: E402
    judged_alignment,
    pair_judgement,
    pair_mask_localisation,
    pair_self_vqa,
    retuned_guidance,
)
from ospo_fast.train import train  # noqa: E402

PAPER_LOSS = ["loss.guided_rewards=false", "loss.uncond_anchor=0"]  # under every variant's own switches
FULL = ["loss.alpha=1", "loss.sft_weight=2"]
LOSSES = {"plain_simpo": ["loss.alpha=0", "loss.sft_weight=0"], "object_simpo": ["loss.alpha=1", "loss.sft_weight=0"],
          "object_simpo_sft": FULL,
          # the guidance-aware options (LossConfig): (a) the loss under the CFG distribution, (b) the anchor
          "guided_rewards": [*FULL, "loss.guided_rewards=true"], "uncond_anchor": [*FULL, "loss.uncond_anchor=10"]}
RETUNE = [1.0, 2.0, 3.0, 5.0]  # option (c): the CFG weight re-tuned on training captions after training
VARIANTS = ("base", "base_retuned_cfg", "best_of_n", "ospo_plain_simpo", "ospo_object_simpo", "ospo_object_simpo_sft",
            "ospo_no_filter", "ospo_iteration2", "ospo_guided_rewards", "ospo_uncond_anchor",
            "ospo_retuned_cfg")  # table order
MODEL_DIRS = {"ospo_object_simpo_sft": "train_object_simpo_sft/merged", "ospo_iteration2": "train_iter2/merged"}
CONDITIONS = {"heldout_cfg5": ("heldout", 5.0), "heldout_cfg1": ("heldout", 1.0), "train_cfg1": ("train", 1.0)}


def evaluate(model_path: str, n: int) -> dict:
    """Judged alignment of one model under every condition of ``CONDITIONS``."""
    bundle = load_janus(model_path, device="cpu")
    images = load_config("toy").images
    results = {}
    for name, (split, weight) in CONDITIONS.items():
        config = dataclasses.replace(images, guidance_scale=weight)
        result = judged_alignment(bundle, n, seed=0, config=config, batch_size=32, split=split)
        results[name] = {k: result[k] for k in ("n", "strict", "loose")}
    return results


def evaluate_retuned(model_path: str, n: int, unguided: dict) -> dict:
    """Option (c): the CFG weight of ``RETUNE`` best on ``n // 2`` training captions
    (``ospo_fast.toy.evaluate.retuned_guidance``), then held-out at it in place of CFG 5; the guidance-free conditions
    are ``unguided``'s."""
    bundle = load_janus(model_path, device="cpu")
    config = load_config("toy", [f"eval.toy_retune_guidance={RETUNE}", f"eval.toy_retune_prompts={n // 2}"])
    weight, tuning = retuned_guidance(bundle, config)
    result = judged_alignment(bundle, n, seed=0, config=dataclasses.replace(config.images, guidance_scale=weight),
                              batch_size=32, split="heldout")
    return {**unguided, "heldout_cfg5": {k: result[k] for k in ("n", "strict", "loose")}, "retuned_weight": weight,
            "retuned_on": tuning}


def synth(seed: int, out: Path, prompts: int, model: str, extra: list[str]) -> Path:
    config = load_config("toy", [f"seed={seed}", f"prompts.num_prompts={prompts}", f"model.path={model}", *extra])
    Pipeline(config, out, progress=False).run()
    return out / "pairs.jsonl"


def reselect_unfiltered(seed: int, ospo_dir: Path, out: Path, prompts: int, model: str) -> Path:
    """The OSPO run's images and Self-VQA scores, selected again with the filter off (no second generation)."""
    if not (out / "pairs.jsonl").is_file():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ospo_dir, out)
        config = load_config("toy", [f"seed={seed}", f"prompts.num_prompts={prompts}", f"model.path={model}",
                                     "filter.enabled=false"])
        Pipeline(config, out, redo="select", progress=False).run()
    return out / "pairs.jsonl"


def fit(seed: int, pairs: Path, out: Path, model: str, loss: list[str]) -> str:
    if not read_jsonl(pairs):
        raise RuntimeError(f"{pairs} holds no pairs; cannot train this variant")
    config = load_config("toy", [f"seed={seed}", f"model.path={model}", *PAPER_LOSS, *loss])
    return str(train(config, pairs, out).merged_dir)


def cached(saved: Path, compute) -> dict:
    """``compute()``'s result, saved to ``saved`` the first time (a killed seed keeps its finished variants)."""
    if not saved.is_file():
        atomic_write_json(saved, compute())
    return json.loads(saved.read_text())


def cached_evaluate(saved: Path, model_path: str, n: int) -> dict:
    return cached(saved, lambda: evaluate(model_path, n))


SYNTH_DIRS = {"ospo": "synth_ospo", "best_of_n": "synth_bon", "ospo_iteration2": "synth_iter2"}


def pair_vqa(root: Path) -> dict:
    """``pair_self_vqa`` of each synthesis run of a seed (``SYNTH_DIRS``)."""
    return {name: pair_self_vqa(root / d) for name, d in SYNTH_DIRS.items()}


def one_seed(seed: int, root: Path, prompts: int, eval_n: int, model: str) -> dict:
    """Every variant for one seed, from ``model``; resumable: each variant's figures are saved when measured
    (``<root>/eval_<variant>.json``) and a finished seed's ``results.json`` is read back (given the Self-VQA
    accuracy of its pairs if it was saved before that was measured)."""
    saved = root / "results.json"
    if saved.is_file():
        results = json.loads(saved.read_text())
        if results["prompts"] == prompts and results["eval_n"] == eval_n and results.get("model") == model:
            if "pair_vqa" not in results:
                results["pair_vqa"] = pair_vqa(root)
                atomic_write_json(saved, results)
            return results
    root.mkdir(parents=True, exist_ok=True)
    variants: dict = {"base": cached_evaluate(root / "eval_base.json", model, eval_n)}
    variants["base_retuned_cfg"] = cached(root / "eval_base_retuned_cfg.json",
                                          lambda: evaluate_retuned(model, eval_n, variants["base"]))
    ospo = synth(seed, root / "synth_ospo", prompts, model, [])
    unfiltered = reselect_unfiltered(seed, root / "synth_ospo", root / "synth_nofilter", prompts, model)
    bon = synth(seed, root / "synth_bon", prompts, model, ["perturb.source=best_of_n"])

    def trained(name: str, pairs: Path, train_dir: str, start: str, loss: list[str]) -> dict:
        return cached(root / f"eval_{name}.json",
                      lambda: evaluate(fit(seed, pairs, root / train_dir, start, loss), eval_n))

    variants["best_of_n"] = trained("best_of_n", bon, "train_bon", model, FULL)
    for name, loss in LOSSES.items():
        variants[f"ospo_{name}"] = trained(f"ospo_{name}", ospo, f"train_{name}", model, loss)
    variants["ospo_no_filter"] = trained("ospo_no_filter", unfiltered, "train_nofilter", model, FULL)
    iter1 = str(root / "train_object_simpo_sft" / "merged")
    variants["ospo_retuned_cfg"] = cached(root / "eval_ospo_retuned_cfg.json", lambda: evaluate_retuned(
        iter1, eval_n, variants["ospo_object_simpo_sft"]))
    ospo2 = synth(seed, root / "synth_iter2", prompts, iter1, [])
    variants["ospo_iteration2"] = trained("ospo_iteration2", ospo2, "train_iter2", iter1, FULL)
    results = {"prompts": prompts, "eval_n": eval_n, "model": model, "variants": variants,
               "pairs": {name: pair_judgement(path.parent) for name, path in
                         (("ospo", ospo), ("no_filter", unfiltered), ("best_of_n", bon), ("ospo_iteration2", ospo2))},
               "masks": {name: pair_mask_localisation(path.parent) for name, path in
                         (("ospo", ospo), ("ospo_iteration2", ospo2))},
               "pair_vqa": pair_vqa(root)}
    atomic_write_json(saved, results)
    return results


def confirm(out: Path, seed: int, n: int, model: str) -> dict:
    """The base model, the full method and iteration 2 judged again on ``n`` prompts per condition (a tighter
    estimate of the comparison that matters); cached in ``<out>/confirm_base<n>.json`` (the base model does not
    depend on the seed) and ``<out>/seed<s>/confirm<n>_<variant>.json``."""
    seed_root = out / f"seed{seed}"
    results = {"base": cached_evaluate(out / f"confirm_base{n}.json", model, n)}
    for name, rel in MODEL_DIRS.items():
        results[name] = cached_evaluate(seed_root / f"confirm{n}_{name}.json", str(seed_root / rel), n)
    return results


def _mean_se(values: list[float]) -> str:
    """The mean over seeds +- its standard error (the seeds' standard deviation / sqrt(seeds); 0 for one seed)."""
    spread = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.1%} +- {spread:<5.1%}"


def print_alignment(per_seed: dict[int, dict], seeds: list[int], n: int, variants: list[str]) -> list[dict]:
    """One table per condition; ``per_seed[s][variant][condition]`` holds {"strict", "loose"}."""
    rows = []
    for condition in CONDITIONS:
        print(f"\n   {condition} ({n} prompts, mean +- standard error over seeds)")
        print(f"   {'variant':<22}{'strict':>17}{'loose':>17}{'loose vs base':>15}")
        base = statistics.mean(per_seed[s]["base"][condition]["loose"] for s in seeds)
        for name in variants:
            strict = [per_seed[s][name][condition]["strict"] for s in seeds]
            loose = [per_seed[s][name][condition]["loose"] for s in seeds]
            print(f"   {name:<22}{_mean_se(strict):>17}{_mean_se(loose):>17}"
                  f"{statistics.mean(loose) - base:>+14.1%}")
            rows.append({"condition": condition, "variant": name, "n": n, "strict": strict, "loose": loose})
    return rows


def print_tables(per_seed: dict[int, dict], seeds: list[int], eval_n: int) -> list[dict]:
    rows = print_alignment({s: per_seed[s]["variants"] for s in seeds}, seeds, eval_n, list(VARIANTS))
    for name in ("base_retuned_cfg", "ospo_retuned_cfg"):
        print(f"   {name}: CFG re-tuned on training captions over {RETUNE}, per seed: "
              f"{[per_seed[s]['variants'][name]['retuned_weight'] for s in seeds]} (its heldout_cfg5 row is at it)")
    print("\n   object masks of the pairs vs the drawn objects (mean over seeds)")
    for name in ("ospo", "ospo_iteration2"):
        m = [per_seed[s]["masks"][name] for s in seeds if "masks" in per_seed[s]]
        if m:
            mean = lambda key: statistics.mean(x[key] for x in m)
            print(f"   {name:<18} precision {mean('precision'):.1%} (chance {mean('chance'):.1%}), "
                  f"recall {mean('recall'):.1%}")
    print("\n   Self-VQA answers on the pairs right by the exact judge (mean over seeds; true: rate of true answers)")
    print(f"   {'pairs':<26}{'answers':>8}{'object':>9}{'(true)':>8}{'relation':>10}{'(true)':>8}{'all':>8}")
    for name in SYNTH_DIRS:
        for part in ("candidates", "kept"):
            stats = [per_seed[s]["pair_vqa"][name][part] for s in seeds if "pair_vqa" in per_seed[s]]
            if stats:
                mean = lambda kind, key: statistics.mean(x[kind][key] for x in stats)
                print(f"   {name + ' ' + part:<26}{statistics.mean(x['n'] for x in stats):>8.0f}"
                      f"{mean('object', 'accuracy'):>9.1%}{mean('object', 'true_rate'):>8.0%}"
                      f"{mean('relation', 'accuracy'):>10.1%}{mean('relation', 'true_rate'):>8.0%}"
                      f"{mean('all', 'accuracy'):>8.1%}")
    print("\n   what the pairs hold (exact judge vs the base prompt; mean over seeds)")
    print(f"   {'pairs':<26}{'n':>6}{'chosen strict':>15}{'chosen loose':>14}{'rejected loose':>16}"
          f"{'chosen-only right':>19}{'rejected-only right':>21}")
    for name in ("ospo", "no_filter", "best_of_n", "ospo_iteration2"):
        for part in ("candidates", "kept"):
            stats = [per_seed[s]["pairs"][name][part] for s in seeds]
            mean = lambda key: statistics.mean(x[key] for x in stats)
            print(f"   {name + ' ' + part:<26}{mean('n'):>6.0f}{mean('chosen_strict'):>15.1%}"
                  f"{mean('chosen_loose'):>14.1%}{mean('rejected_loose'):>16.1%}{mean('chosen_better'):>19.1%}"
                  f"{mean('rejected_better'):>21.1%}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompts", type=int, default=384)
    parser.add_argument("--eval-prompts", type=int, default=160)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--model", default="builtin:toy", help="the model every variant starts from")
    parser.add_argument("--confirm-prompts", type=int, default=0,
                        help="also judge base, the full method and iteration 2 on this many prompts per condition")
    args = parser.parse_args()
    per_seed = {seed: one_seed(seed, Path(args.out) / f"seed{seed}", args.prompts, args.eval_prompts, args.model)
                for seed in args.seeds}
    print(f"\n== toy ablation on {device_name()} ({len(args.seeds)} seeds, {args.prompts} prompts per synthesis)")
    rows = print_tables(per_seed, args.seeds, args.eval_prompts)
    if args.confirm_prompts:
        confirmed = {s: confirm(Path(args.out), s, args.confirm_prompts, args.model) for s in args.seeds}
        print(f"\n== confirmation: base vs the full method and iteration 2 on {args.confirm_prompts} prompts")
        rows += print_alignment(confirmed, args.seeds, args.confirm_prompts, ["base", *MODEL_DIRS])
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"bench": "toy_ablation", "device": device_name(), "commit": git_commit(),
                                 "model": args.model, "seeds": args.seeds, "prompts": args.prompts,
                                 "rows": rows}) + "\n")
    (Path(args.out) / "ablation.json").write_text(json.dumps(per_seed, indent=2))


if __name__ == "__main__":
    main()
