"""One command, all five stages: ``ospo-fast run --preset toy --out runs/demo``.

For each OSPO iteration: stages 1-4 into ``<out>/iter<i>/synth`` (pairs, images, masks, report), stage 5 into
``<out>/iter<i>/train`` (checkpoints, metrics, merged model); iteration i+1 starts from iteration i's trained
model. The evaluation step (``ospo_fast.evaluate``, the kind the config selects: on the toy world, the exact
judge's alignment on held-out prompts) judges the starting model and every iteration's trained model and pairs.
The closing summary (``<out>/summary.json`` and printed) has records per stage, filter reasons, pass rates per
category, the loss curve, time per stage and images/s; it says plainly when the model is random-initialised.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from pathlib import Path

from ospo_fast.config import OSPOConfig, save_config
from ospo_fast.distributed import init_distributed
from ospo_fast.evaluate import Evaluation, evaluation_for
from ospo_fast.models.loader import is_random_init
from ospo_fast.pipeline import Pipeline, check_resumable
from ospo_fast.report import write_report
from ospo_fast.runstore import RunStore
from ospo_fast.store import atomic_write_json, read_jsonl
from ospo_fast.toy.evaluate import pair_mask_localisation as toy_mask_localisation  # noqa: F401 (old name, tests)


class NoPairsError(RuntimeError):
    """Stages 1-4 kept no pair, so there is nothing to train on."""


def _evaluate(evaluation: Evaluation, model_path: str, name: str) -> dict[str, dict]:
    """The evaluation step (rank 0): the figures of the model at ``model_path`` as the summary's "alignment"
    entries, keyed ``name`` ("before" or "after_iter<i>") + the setting's suffix."""
    return {name + key: figures for key, figures in evaluation.judge_model(model_path, name).items()}


def stage_summary(synth_dir: Path) -> dict:
    """Counts, reasons, timings and per-category pass rates of one synthesis run, read from its files."""
    store = RunStore(synth_dir)  # every file read is checked against the sha256 its manifest committed
    store.verify()
    stages = store.manifest()["stages"]
    scored = store.read_stage("vqa")
    pairs = store.read_final("pairs.jsonl", images=False)
    base = store.read_stage("prompts")
    prompts_per_cat = Counter(r["category"] for r in base)
    kept_per_cat = Counter(p["category"] for p in pairs)
    reasons: dict[str, int] = Counter(r["verdict"]["reason"] for r in scored)
    images = stages["images"]["records"] * 2
    return {
        "records": {name: e["records"] for name, e in stages.items()},
        "rejects": {name: e["reject_reasons"] for name, e in stages.items() if e["rejects"]},
        "filter_reasons": dict(sorted(reasons.items())),
        "pass_rate_per_category": {c: round(kept_per_cat[c] / n, 4) for c, n in sorted(prompts_per_cat.items())},
        "seconds": {name: e["seconds"] for name, e in stages.items()},
        "images_per_second": round(images / max(stages["images"]["seconds"], 1e-9), 3),
        "pairs": len(pairs),
    } | ({"mask_heads": stages["images"]["mask_heads"]} if "mask_heads" in stages["images"] else {})


def loss_summary(metrics_path: Path, points: int = 8) -> dict:
    from ospo_fast.train.checkpoint import read_vouched_metrics

    rows = [r for r in read_vouched_metrics(metrics_path.parent) if "loss" in r]  # as the checkpoint recorded them
    if not rows:
        return {"steps": 0}
    picks = sorted({round(i * (len(rows) - 1) / max(1, points - 1)) for i in range(points)})
    return {"steps": len(rows), "curve": [[rows[i]["step"], round(rows[i]["loss"], 4)] for i in picks],
            "first": {k: rows[0].get(k) for k in ("loss", "margin", "accuracy")},
            "last": {k: rows[-1].get(k) for k in ("loss", "margin", "accuracy")},
            "skipped_nonfinite": sum(1 for r in rows if r.get("skipped"))}


def run_fingerprint(config: OSPOConfig) -> dict:
    """What a finished run's summary stands for: the whole resolved config and the starting model's identity."""
    from ospo_fast.config import config_to_dict
    from ospo_fast.models.loader import model_identity
    from ospo_fast.store import config_fingerprint

    return config_fingerprint({"config": config_to_dict(config), "model_identity": model_identity(config.model.path)})


def finished_summary(config: OSPOConfig, out: Path) -> dict | None:
    """The saved summary when ``out`` holds a finished run of this very config (every iteration), re-checked
    (``check_evidence``: a StoreError when something it was made from changed since), else None."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a damaged summary is simply rewritten by the run
    done = len(summary.get("iterations", [])) == config.iterations
    if not done or summary.get("fingerprint") != run_fingerprint(config) or "evidence" not in summary:
        return None
    if not _trained_as_summarised(config, out, summary):
        return None
    check_evidence(out, summary)
    return summary


def evidence(out: Path, summary: dict) -> dict[str, str]:
    """{path relative to ``out``: sha256} of the files that stand behind the summary's figures, each the root of
    its own chain: every iteration's synthesis ``manifest.json`` (stages, pairs, images), its trained model's and
    newest checkpoint's ``checksums.json`` (weights, training state, fingerprint, metrics), and the held-out
    judgements (``heldout/*.judged.json``)."""
    from ospo_fast.store import CHECKSUM_FILE, sha256_file
    from ospo_fast.train.checkpoint import latest_checkpoint

    files = []
    for entry in summary["iterations"]:
        it_dir = out / f"iter{entry['iteration']}"
        files.append(it_dir / "synth" / "manifest.json")
        for directory in (out / entry["model"], latest_checkpoint(it_dir / "train")):
            if directory is not None and (directory / CHECKSUM_FILE).is_file():
                files.append(directory / CHECKSUM_FILE)
    files += sorted((out / "heldout").glob("*.judged.json"))
    return {path.relative_to(out).as_posix(): sha256_file(path) for path in files}


def check_evidence(out: Path, summary: dict) -> None:
    """Before a finished run's summary is printed again: every file its ``evidence`` names still has that sha256,
    and what each vouches for is still whole (the synthesis chain down to every PNG of the pairs, every file of
    the trained model, the metrics lines). A StoreError naming the first file that is not, otherwise."""
    from ospo_fast.store import StoreError, directory_damage, sha256_file
    from ospo_fast.train.checkpoint import read_vouched_metrics

    fix = f"restore it, or pass --redo prompts to recompute the run in {out}"
    for rel, sha in summary["evidence"].items():
        path = out / rel
        if not path.is_file() or sha256_file(path) != sha:
            state = "is missing" if not path.is_file() else "does not match its sha256 in"
            raise StoreError(f"{path} {state} {out / 'summary.json'} (changed since the run finished); {fix}")
    for entry in summary["iterations"]:
        it_dir = out / f"iter{entry['iteration']}"
        store = RunStore.reader(it_dir / "synth")
        store.verify()
        store.read_final("pairs.jsonl", fix=fix)  # and every PNG it names
        problem = directory_damage(out / entry["model"])
        if problem is not None:
            raise StoreError(f"trained model {out / entry['model']} is damaged: {problem}; {fix}")
        read_vouched_metrics(it_dir / "train", say=False)


def _trained_as_summarised(config: OSPOConfig, out: Path, summary: dict) -> bool:
    """Whether every iteration's trained model the summary names is still in ``out`` and its training recorded
    (``fingerprint.json``) the settings, starting model and pairs this config gives it. A summary that outlived
    its outputs, or one over a training made with other settings, is then recomputed, not printed."""
    from ospo_fast.store import fingerprint_diff
    from ospo_fast.train.trainer import FINGERPRINT_FILE, training_fingerprint

    model_path = config.model.path
    for entry in summary["iterations"]:
        it_dir, trained = out / f"iter{entry['iteration']}", out / entry["model"]
        recorded_path = it_dir / "train" / FINGERPRINT_FILE
        if not trained.is_dir() or not recorded_path.is_file():
            return False
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        cfg = copy.deepcopy(config)
        cfg.model.path = model_path
        if fingerprint_diff(recorded, training_fingerprint(cfg, it_dir / "synth" / "pairs.jsonl")):
            return False
        model_path = _relative(trained)
    return True


def _relative(path: Path | str) -> str:
    """``path`` relative to the working directory (no absolute paths in the files a run writes)."""
    return os.path.relpath(path)


def _no_pairs_message(config: OSPOConfig, synth_dir: Path, iteration: int) -> str:
    """Why stages 1-4 kept no pair (the filter's reasons; a random model's answers are noise) and what to do; writes
    the synthesis report it names."""
    write_report(synth_dir)
    reasons = Counter(r["verdict"]["reason"] for r in RunStore(synth_dir).read_stage("vqa"))
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "no pair was scored"
    model = (f"{config.model.path} is random-initialised, so its yes/no answers are noise and S(chosen) stays near 0 "
             f"< filter.tau={config.filter.tau:g}; " if is_random_init(config.model.path) else "")
    return (f"iteration {iteration}: stages 1-4 kept no pair (filter: {why}); {model}set filter.enabled=false to "
            "exercise the machinery, or lower filter.tau "
            f"or raise prompts.num_prompts; report: {synth_dir / 'report.html'}")


def run_ospo(config: OSPOConfig, out_dir: str | Path, redo: str | None = None) -> dict:
    """Run ``config.iterations`` OSPO iterations into ``out_dir``; returns the summary (also saved). A run that
    finished with this config already returns its saved summary at once (pass ``redo`` to recompute).

    Paths in the summary are relative to ``out_dir``; iteration i+1 loads iteration i's model by a path relative
    to the working directory, so config.yaml, adapter_config.json and ospo_merge.json hold no absolute paths."""
    from ospo_fast.train import train

    out = Path(out_dir)
    if redo is None:
        done = finished_summary(config, out)
        if done is not None:
            return done
    dist = init_distributed(config.model.device)
    summary: dict = {"random_init": is_random_init(config.model.path), "model": config.model.path,
                     "iterations": [], "alignment": {}, "alignment_change": {},
                     "fingerprint": run_fingerprint(config),
                     "stages_off": [] if config.densify.enabled else ["densify"]}
    evaluation = evaluation_for(config, out / "heldout")
    if dist.rank == 0:
        check_resumable(config, out / "iter1" / "synth", dist.device, redo)  # before config.yaml is rewritten
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        summary["alignment"].update(_evaluate(evaluation, config.model.path, "before"))
    model_path = config.model.path
    for iteration in range(1, config.iterations + 1):
        cfg = copy.deepcopy(config)
        cfg.model.path = model_path
        it_dir = out / f"iter{iteration}"
        start = time.perf_counter()
        Pipeline(cfg, it_dir / "synth", dist, redo=redo if iteration == 1 else None).run()
        synth_seconds = time.perf_counter() - start
        pairs_path = it_dir / "synth" / "pairs.jsonl"
        if not read_jsonl(pairs_path):
            raise NoPairsError(_no_pairs_message(cfg, it_dir / "synth", iteration) if dist.rank == 0 else
                               f"iteration {iteration}: stages 1-4 kept no pair")
        start = time.perf_counter()
        result = train(cfg, pairs_path, it_dir / "train")
        train_seconds = time.perf_counter() - start
        trained = Path(result.merged_dir or result.checkpoint_dir)
        model_path = _relative(trained)
        if dist.rank == 0:
            entry = {"iteration": iteration, "synth": stage_summary(it_dir / "synth"),
                     "train": loss_summary(result.metrics_path), "model": os.path.relpath(trained, out),
                     "seconds": {"synthesis": round(synth_seconds, 2), "training": round(train_seconds, 2)}}
            name = f"after_iter{iteration}"
            summary["alignment"].update(_evaluate(evaluation, model_path, name))
            change = evaluation.compare("before", name)
            summary["alignment_change"].update({f"iter{iteration}{key}": c for key, c in change.items()})
            entry.update(evaluation.judge_pairs(it_dir / "synth"))
            summary["iterations"].append(entry)
            write_report(it_dir / "synth")  # after the held-out judging: the report shows its before/after gallery
            summary["evidence"] = evidence(out, summary)  # last: the summary vouches for what it was made from
            atomic_write_json(out / "summary.json", summary)
    return summary


JUDGE_TERMS = ("strict = every object found with the right colour and shape, no extra object, relation right; "
               "loose = every colour found and relation right, shapes and extra objects ignored")


def _cfg(alignment: dict) -> str:
    return f"CFG {alignment['guidance_scale']:g}  " if "guidance_scale" in alignment else ""


def _rate(alignment: dict, key: str) -> str:
    """e.g. "12.5% +- 2.6" (the standard error, in points); summaries written before it was kept show the rate only."""
    se = alignment.get(f"{key}_se")
    return f"{alignment[key]:.1%}" + ("" if se is None else f" +- {100 * se:.1f}")


def _points(change: dict, key: str) -> str:
    return f"{100 * change[key]:+.1f} +- {100 * change[key + '_se']:.1f} points"


def format_summary(summary: dict, out_dir: str | Path = "") -> str:
    """The closing summary as text; ``out_dir`` (the run directory) prefixes the paths it names."""
    lines = ["", "=" * 72, "OSPO run summary", "=" * 72]
    if summary["random_init"]:
        lines.append(f"NOTE: {summary['model']} is RANDOM-INITIALISED: these numbers exercise the machinery and say "
                     "nothing about image quality or alignment.")
    for it in summary["iterations"]:
        s, t = it["synth"], it["train"]
        lines.append(f"-- iteration {it['iteration']} (model after: {os.path.join(out_dir, it['model'])})")
        off = set(summary.get("stages_off", []))
        lines.append("   records per stage: " + ", ".join(f"{k} off (passed through)" if k in off else f"{k} {v}"
                                                         for k, v in s["records"].items()))
        if s["rejects"]:
            lines.append("   rejects: " + "; ".join(f"{k}: {v}" for k, v in s["rejects"].items()))
        lines.append("   filter: " + ", ".join(f"{k} {v}" for k, v in s["filter_reasons"].items()))
        lines.append("   prompt pass rate per category: " +
                     ", ".join(f"{k} {v:.0%}" for k, v in s["pass_rate_per_category"].items()))
        lines.append("   seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()) +
                     f"; training {it['seconds']['training']:.1f}")
        lines.append(f"   images/s: {s['images_per_second']:.2f}; pairs kept: {s['pairs']}")
        if "mask_localisation" in it:
            m = it["mask_localisation"]
            lines.append(f"   object masks vs drawn objects: precision {m['precision']:.1%} (chance {m['chance']:.1%}),"
                         f" recall {m['recall']:.1%} over {m['n']} images")
        if "pair_judgement" in it:
            for name, p in it["pair_judgement"].items():
                if not p["n"]:
                    continue
                label = "candidate" if name == "candidates" else name
                lines.append(f"   judge on {label} pairs (n={p['n']}): chosen strict {p['chosen_strict']:.1%} loose "
                             f"{p['chosen_loose']:.1%}, rejected strict {p['rejected_strict']:.1%} loose "
                             f"{p['rejected_loose']:.1%}; loosely right on one side only: chosen "
                             f"{p['chosen_better']:.1%}, rejected {p['rejected_better']:.1%}")
        for name, p in it.get("pair_self_vqa", {}).items():
            if p["n"]:
                label = "candidate" if name == "candidates" else name
                lines.append(f"   Self-VQA answers on {label} pairs right by the judge (n={p['n']}): " + ", ".join(
                    f"{kind} {p[kind]['accuracy']:.1%} (true {p[kind]['true_rate']:.0%})"
                    for kind in ("object", "relation", "all") if p[kind]["n"]))
        if t.get("steps"):
            lines.append(f"   loss curve (step, loss): {t['curve']}")
            lines.append(f"   first -> last: loss {t['first']['loss']:.4f} -> {t['last']['loss']:.4f}, margin "
                         f"{t['first']['margin']:.4f} -> {t['last']['margin']:.4f}, accuracy "
                         f"{t['first']['accuracy']:.2f} -> {t['last']['accuracy']:.2f}")
    alignment = summary.get("alignment", {})
    if alignment or any("pair_judgement" in it for it in summary["iterations"]):
        lines.append(f"-- exact toy judge: {JUDGE_TERMS}")
    if alignment:
        lines.append("-- judged alignment on held-out toy prompts (exact judge)")
        for name, a in alignment.items():
            cats = ", ".join(f"{c} {v['strict']:.1%}" for c, v in a["per_category"].items())
            lines.append(f"   {name:<18} {_cfg(a)}strict {_rate(a, 'strict')}  loose {_rate(a, 'loose')}  "
                         f"(n={a['n']}; strict per category: {cats})")
        for name, c in summary.get("alignment_change", {}).items():
            weight = alignment.get(f"after_{name}", {})
            lines.append(f"   change {name:<11} {_cfg(weight)}strict {_points(c, 'strict')}  loose "
                         f"{_points(c, 'loose')}  (paired: same prompts and seeds, n={c['n']})")
    return "\n".join(lines)

