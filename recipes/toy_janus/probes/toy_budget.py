"""A toy experiment with power: does training on the pairs OSPO builds move the toy model's judged alignment, and
how does that compare with a control that trains on the right answer? Paired, on enough images to see a change.

Methods, each trained from the shipped ``builtin:toy`` model with the toy preset's settings but the ``--steps`` and
``--lrs`` of the budget curve (one training per method x steps x lr, each with its own cosine schedule, as a user
would run that budget):
- ``paper``     : OSPO's pairs and the paper's loss (object SimPO + 2 x SFT, ``loss.guided_rewards=false``)
- ``guided``    : the same pairs and loss under the CFG distribution (``loss.guided_rewards=true``, the toy preset)
- ``best_of_n`` : SILMM-style pairs (best vs worst Self-VQA score among 2N images of one prompt), the paper's loss
- ``oracle``    : the control. The prompts OSPO kept, each paired with the exact render of its caption
  (``toy.world.render``, VQ-encoded by the model's own encoder; object masks from the drawn shapes), trained with
  the same loss, steps and lr. Chosen and rejected are that same render, so the SimPO term's gradient is exactly
  zero and the step is 2 x SFT on the right image: what training on these prompts can give when the images are
  right, the ceiling OSPO's self-made pairs are measured against.

Evaluation: ``--eval-n`` images per condition (default 640: the 80 held-out captions, 8 sampling seeds each), the
same (caption, seed) for every model, so each change against the base model is paired. Conditions: held-out
captions at CFG 5 (the paper's sampling) and at CFG 1 (the conditional model alone). Held-out captions are never
among the training prompts (``toy.world.is_heldout``: the synthesis samples the train split), a property this script
checks and prints. Standard errors of a change are over captions (a cluster of 8 images shares its caption: the
images are not independent), computed from the paired per-image differences, so they include the evaluation's
own noise (which images the seeds draw); they do not include training-seed noise (one training per cell).
A change smaller than two standard errors is printed as "no change".

    python recipes/toy_janus/probes/toy_budget.py --out runs/budget                     # everything, one process
    python recipes/toy_janus/probes/toy_budget.py --out runs/budget --worker 0 --workers 2 &   # split over cores
    python recipes/toy_janus/probes/toy_budget.py --out runs/budget --worker 1 --workers 2
    python recipes/toy_janus/probes/toy_budget.py --out runs/budget --table             # tabulate what is done

Every synthesis, training and evaluation is saved as it finishes and reused by a later call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (benchmarks.harness)

from benchmarks.harness import RESULTS, device_name, git_commit  # noqa: E402
from ospo_fast.config import load_config  # noqa: E402
from ospo_fast.pipeline import Pipeline  # noqa: E402
from ospo_fast.runstore import RunStore  # noqa: E402
from ospo_fast.store import atomic_write_json  # noqa: E402
from ospo_fast.toy import world  # noqa: E402

PAPER_LOSS = ["loss.alpha=1", "loss.sft_weight=2", "loss.guided_rewards=false", "loss.uncond_anchor=0"]
METHODS = {  # name -> (pairs, loss overrides)
    "paper": ("ospo", PAPER_LOSS),
    "guided": ("ospo", [*PAPER_LOSS[:2], "loss.guided_rewards=true", "loss.uncond_anchor=0"]),
    "best_of_n": ("best_of_n", PAPER_LOSS),
    "oracle": ("oracle", PAPER_LOSS),
}
CONDITIONS = {"heldout_cfg5": 5.0, "heldout_cfg1": 1.0}
RELATION_WORDS = {"to the left of": "left of", "to the right of": "right of"}  # prompt wording -> world.RELATIONS
EVAL_SEED = 1000  # sampling seeds of the evaluation images: EVAL_SEED + index


# ---------------------------------------------------------------- pairs

def synth(out: Path, prompts: int, extra: list[str]) -> Path:
    """A synthesis run of the toy preset (seed 0) into ``out``; returns its pairs file (resumes if cut). A worker
    that finds another making it waits for it (a blocking lock beside the directory), then finds it done."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config = load_config("toy", ["seed=0", f"prompts.num_prompts={prompts}", *extra])
        Pipeline(config, out, progress=False).run()
    return out / "pairs.jsonl"


def oracle_pairs(ospo_dir: Path, out: Path) -> Path:
    """The control's pairs in their own run directory: every prompt OSPO kept, with the exact render of its caption
    (one scene per pair, seeded by its position) as both chosen and rejected, tokens from the model's VQ encoder and
    masks from the drawn shapes on the token grid."""
    from ospo_fast.models import load_janus
    from ospo_fast.train.data import encode_rgb

    if (out / "pairs.jsonl").is_file():
        return out / "pairs.jsonl"
    source = RunStore(ospo_dir)
    structures = {r["id"]: r["structure"] for r in source.read_stage("prompts")}
    kept = source.read_final("pairs.jsonl")
    bundle = load_janus("builtin:toy", device="cpu")
    grid, patch = bundle.grid, world.SIZE // bundle.grid
    rng = np.random.default_rng(20261207)
    renders, masks = [], []
    for pair in kept:
        structure = dict(structures[pair["base_id"]])
        structure["relations"] = [[a, RELATION_WORDS.get(rel, rel), b] for a, rel, b in structure["relations"]]
        scene = world.scene_from_spec(world.spec_from_structure(structure), rng)
        renders.append(world.render(scene))
        drawn = np.zeros((world.SIZE, world.SIZE), dtype=bool)
        for obj in scene.objects:
            drawn |= world.object_mask(obj)
        masks.append(drawn.reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1).astype(int).tolist())
    tokens = encode_rgb(bundle.model, renders).tolist()
    records = []
    for pair, pixels, mask, toks in zip(kept, renders, masks, tokens):
        side = {"image": pixels, "tokens": toks, "mask": mask, "score": 1.0}
        records.append({"id": pair["pair_id"], "chosen": dict(side), "rejected": dict(side)})
    store = RunStore(out)
    store.write_chunk("oracle", 0, records, [])  # the PNGs under images/, checksummed by the store
    written = store.read_chunk("oracle", 0)
    pairs = [dict(pair, chosen=dict(pair["chosen"], **w["chosen"]), rejected=dict(pair["rejected"], **w["rejected"]))
             for pair, w in zip(kept, written)]
    store.write_final("pairs.jsonl", pairs)
    return out / "pairs.jsonl"


def all_pairs(root: Path, prompts: int, worker: int) -> dict[str, Path]:
    """The three pair sets; worker 0 starts with OSPO's synthesis, the others with best-of-N's (in parallel)."""
    runs = {"ospo": (root / "synth_ospo", []), "best_of_n": (root / "synth_bon", ["perturb.source=best_of_n"])}
    order = ["ospo", "best_of_n"] if worker == 0 else ["best_of_n", "ospo"]
    pairs = {name: synth(runs[name][0], prompts, runs[name][1]) for name in order}
    with open(root / "oracle.lock", "a") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        pairs["oracle"] = oracle_pairs(root / "synth_ospo", root / "oracle")
    return pairs


# ---------------------------------------------------------------- training and evaluation

def cell_name(method: str, steps: int, lr: float) -> str:
    return f"{method}_s{steps}_lr{lr:g}"


def train_cell(root: Path, pairs: Path, method: str, steps: int, lr: float) -> str:
    """Train one cell of the budget curve (resumes a cut training); returns its merged model."""
    from ospo_fast.train import train

    loss = METHODS[method][1]
    config = load_config("toy", ["seed=0", f"train.max_steps={steps}", f"train.lr={lr}",
                                 f"train.save_every={max(20, steps // 4)}", *loss])
    return str(train(config, pairs, root / "train" / cell_name(method, steps, lr)).merged_dir)


def eval_prompts(n: int) -> list[dict]:
    """``n`` held-out prompts: the held-out captions in order, repeated (each repetition its own seeds)."""
    captions = world.sample_prompts(len(world.split_specs("heldout")), split="heldout", seed=0)
    return [captions[i % len(captions)] for i in range(n)]


def seen_prompts(root: Path, n: int) -> list[dict]:
    """``n`` prompts the trainings saw: the base prompts of OSPO's kept pairs (with their structures), in order,
    repeated. A diagnostic, labelled as such: whether a method learns its training captions at all."""
    store = RunStore(root / "synth_ospo")
    structures = {r["id"]: r for r in store.read_stage("prompts")}
    kept = sorted({p["base_id"] for p in store.read_final("pairs.jsonl", images=False)})
    captions = [{"prompt": structures[i]["prompt"], "structure": structures[i]["structure"]} for i in kept]
    return [captions[i % len(captions)] for i in range(n)]


def judge_model(model_path: str, n: int, records: list[dict] | None = None,
                conditions: dict[str, float] | None = None) -> dict:
    """Per condition: the exact judge's strict and loose verdict of each of the ``n`` evaluation images (0/1 lists,
    in ``records`` order (default ``eval_prompts``), seeds EVAL_SEED + index)."""
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.models import load_janus
    from ospo_fast.toy.judge import judge

    bundle = load_janus(model_path, device="cpu")
    images = load_config("toy").images
    records = records or eval_prompts(n)
    out = {}
    for condition, weight in (conditions or CONDITIONS).items():
        config = dataclasses.replace(images, guidance_scale=weight, batch_size=32)
        strict, loose = [], []
        for start in range(0, n, 32):
            batch = records[start:start + 32]
            pixels = generate_images(bundle, [r["prompt"] for r in batch],
                                     [EVAL_SEED + start + i for i in range(len(batch))], config).pixels.numpy()
            for image, record in zip(pixels, batch):
                verdict = judge(image, record["structure"])
                strict.append(int(verdict.strict))
                loose.append(int(verdict.loose))
        out[condition] = {"strict": strict, "loose": loose}
    return out


def cached(path: Path, compute):
    if not path.is_file():
        atomic_write_json(path, compute())
    return json.loads(path.read_text())


def work_list(args) -> list[tuple[str, int, float]]:
    """Every (method, steps, lr) cell, the shortest trainings first (a cut run has the most cells done), the larger
    learning rate first within a budget."""
    return [(m, s, lr) for s in sorted(args.steps) for lr in sorted(args.lrs, reverse=True) for m in args.methods]


SEEN = {"seen_cfg1": 1.0}  # the diagnostic condition: training captions, no guidance


def run_seen(args, root: Path) -> None:
    """The diagnostic condition for the base model and the cells named in ``--seen`` (trained already)."""
    records = seen_prompts(root, args.eval_n)
    cached(root / "eval" / "base.seen.json", lambda: judge_model("builtin:toy", args.eval_n, records, SEEN))
    for index, name in enumerate(args.seen):
        if index % args.workers == args.worker:
            model = root / "train" / name / "merged"
            cached(root / "eval" / f"{name}.seen.json", lambda: judge_model(str(model), args.eval_n, records, SEEN))
            print(f"done {name} (seen captions)", flush=True)


def run_worker(args, root: Path) -> None:
    pairs = all_pairs(root, args.prompts, args.worker)
    if args.worker == 0:
        cached(root / "eval" / "base.json", lambda: judge_model("builtin:toy", args.eval_n))
    for index, (method, steps, lr) in enumerate(work_list(args)):
        if index % args.workers != args.worker:
            continue
        name = cell_name(method, steps, lr)
        cached(root / "eval" / f"{name}.json",
               lambda: judge_model(train_cell(root, pairs[METHODS[method][0]], method, steps, lr), args.eval_n))
        print(f"done {name}", flush=True)


# ---------------------------------------------------------------- statistics

def paired_change(after: list[int], before: list[int], clusters: list[str]) -> tuple[float, float]:
    """(mean change, its standard error) of paired 0/1 verdicts, clustered by caption: the per-caption sums of the
    differences are the independent units (CR0 sandwich with the small-sample factor C / (C - 1))."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    n = len(d)
    sums: dict[str, float] = {}
    for value, cluster in zip(d - d.mean(), clusters):
        sums[cluster] = sums.get(cluster, 0.0) + value
    c = len(sums)
    variance = c / max(1, c - 1) * sum(s * s for s in sums.values()) / n ** 2
    return float(d.mean()), float(np.sqrt(variance))


def disjointness(root: Path) -> dict:
    """How many evaluation captions are among the synthesis's prompts (must be 0) and how many distinct each has."""
    trained = {r["prompt"] for r in RunStore(root / "synth_ospo").read_stage("prompts")}
    evaluated = {r["prompt"] for r in eval_prompts(80)}
    return {"training_prompts": len(trained), "evaluation_captions": len(evaluated),
            "overlap": len(trained & evaluated)}


def table(args, root: Path) -> list[dict]:
    base = json.loads((root / "eval" / "base.json").read_text())
    clusters = [r["prompt"] for r in eval_prompts(args.eval_n)]
    split = disjointness(root)
    print(f"\n== toy budget curve on {device_name()}: {args.eval_n} paired images per condition "
          f"({split['evaluation_captions']} held-out captions), {split['training_prompts']} distinct training "
          f"prompts, overlap {split['overlap']}")
    rows = []
    if (root / "eval" / "base.seen.json").is_file():
        base = base | json.loads((root / "eval" / "base.seen.json").read_text())
    for condition in [*CONDITIONS, *SEEN]:
        if condition not in base:
            continue
        if condition in SEEN:
            print("\n   DIAGNOSTIC, training captions (the kept pairs' prompts: seen in training), no guidance:")
            clusters = [r["prompt"] for r in seen_prompts(root, args.eval_n)]
        b = base[condition]
        print(f"\n   {condition}: base strict {np.mean(b['strict']):.1%}, loose {np.mean(b['loose']):.1%}; change in "
              "points +- standard error (clustered by caption); |change| < 2 SE: no change")
        print(f"   {'method':<11}{'steps':>6}{'lr':>8}{'strict':>22}{'loose':>22}")
        for method in args.methods:
            for steps in sorted(args.steps):
                for lr in args.lrs:
                    suffix = ".seen.json" if condition in SEEN else ".json"
                    path = root / "eval" / f"{cell_name(method, steps, lr)}{suffix}"
                    if not path.is_file():
                        if condition not in SEEN:
                            print(f"   {method:<11}{steps:>6}{lr:>8g}{'(not run)':>22}")
                        continue
                    after = json.loads(path.read_text())[condition]
                    cells = []
                    row = {"condition": condition, "method": method, "steps": steps, "lr": lr, "n": args.eval_n}
                    for key in ("strict", "loose"):
                        change, se = paired_change(after[key], b[key], clusters)
                        row[key] = float(np.mean(after[key]))
                        row[f"{key}_change"], row[f"{key}_se"] = change, se
                        verdict = "" if abs(change) >= 2 * se else " (none)"
                        cells.append(f"{100 * change:+.1f} +- {100 * se:.1f}{verdict}")
                    print(f"   {method:<11}{steps:>6}{lr:>8g}{cells[0]:>22}{cells[1]:>22}")
                    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/budget")
    parser.add_argument("--prompts", type=int, default=384, help="base prompts per synthesis (the toy preset's)")
    parser.add_argument("--eval-n", type=int, default=640, help="evaluation images per condition")
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 160, 640])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--worker", type=int, default=0, help="this process's share of the cells (with --workers)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only tabulate the cells already done")
    parser.add_argument("--seen", nargs="*", default=[],
                        help="cells (e.g. oracle_s640_lr0.001) to judge on training captions too (a diagnostic)")
    args = parser.parse_args()
    root = Path(args.out)
    if args.seen:
        run_seen(args, root)
    elif not args.table:
        run_worker(args, root)
    if args.worker == 0:
        rows = table(args, root)
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"bench": "toy_budget", "device": device_name(), "commit": git_commit(),
                                     "eval_n": args.eval_n, "rows": rows, "split": disjointness(root)}) + "\n")


if __name__ == "__main__":
    main()
