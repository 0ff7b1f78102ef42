"""Re-judge a finished toy run with the current exact judge, on the images the run kept (no model, no generation):
when the judge changes, which of the run's printed figures move, and by how much.

    python recipes/toy_janus/probes/toy_rejudge.py runs/demo

1. Every held-out judging the run kept (``<run>/heldout/<name>/verdicts.jsonl`` and its PNGs): strict and loose as
   saved and as judged now, and the images whose verdict changed.
2. The paired change after - before (``ospo_fast.toy.evaluate.paired_change``) of every ``before<key>`` /
   ``after_iter<i><key>`` pair, saved and now.
3. Each iteration's pair judgement and Self-VQA accuracy by the judge (``<run>/iter<i>/synth``), as the run's
   ``summary.json`` holds them and as judged now.

The run directory is only read; the re-judged verdicts go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from ospo_fast.store import atomic_write_jsonl, read_jsonl  # noqa: E402
from ospo_fast.toy import world  # noqa: E402
from ospo_fast.toy.evaluate import pair_judgement, pair_self_vqa, paired_change  # noqa: E402
from ospo_fast.toy.judge import judge  # noqa: E402

STRUCTURE_OF_CAPTION = {world.caption_of_spec(s): world.structure_of_spec(s) for s in world.all_specs()}


def rejudge_dir(judged_dir: Path) -> tuple[list[dict], list[dict]]:
    """(saved rows, re-judged rows) of one ``judged_alignment`` directory: each re-judged row is the saved one with
    "strict", "loose" and "details" from the current judge on the same PNG."""
    saved = read_jsonl(judged_dir / "verdicts.jsonl")
    now = []
    for row in saved:
        image = np.asarray(Image.open(judged_dir / row["image"]).convert("RGB"))  # (64, 64, 3) uint8
        result = judge(image, STRUCTURE_OF_CAPTION[row["prompt"]])
        now.append({**row, "strict": result.strict, "loose": result.loose, "details": result.details})
    return saved, now


def _rate(rows: list[dict], key: str) -> str:
    hits = sum(bool(r[key]) for r in rows)
    return f"{hits}/{len(rows)} ({hits / len(rows):.1%})"


def report_heldout(run: Path, scratch: Path) -> None:
    """Parts 1 and 2 of the module docstring, printed; the re-judged verdicts are written under ``scratch``."""
    names = sorted(d.name for d in (run / "heldout").iterdir() if (d / "verdicts.jsonl").is_file())
    if not names:
        raise SystemExit(f"{run}/heldout holds no judged directory (verdicts.jsonl); give a finished toy run")
    for name in names:
        saved, now = rejudge_dir(run / "heldout" / name)
        atomic_write_jsonl(scratch / name / "verdicts.jsonl", now)
        changed = [f"{b['index']:04d} {b['strict']:d}->{a['strict']:d} ({b['prompt']})"
                   for b, a in zip(saved, now) if (b["strict"], b["loose"]) != (a["strict"], a["loose"])]
        print(f"{name}: strict {_rate(saved, 'strict')} -> {_rate(now, 'strict')}, loose {_rate(saved, 'loose')} -> "
              f"{_rate(now, 'loose')}; {len(changed)} verdicts changed")
        for line in changed:
            print(f"    {line}")
    for after in names:
        match = re.fullmatch(r"after_iter\d+(.*)", after)
        if match is None or f"before{match.group(1)}" not in names:
            continue
        before = f"before{match.group(1)}"
        was = paired_change(run / "heldout" / before, run / "heldout" / after)
        is_now = paired_change(scratch / before, scratch / after)
        print(f"{after} - {before}: strict {was['strict']:+.3f} +- {was['strict_se']:.3f} -> "
              f"{is_now['strict']:+.3f} +- {is_now['strict_se']:.3f}; loose {was['loose']:+.3f} -> "
              f"{is_now['loose']:+.3f}")


def report_pairs(run: Path) -> None:
    """Part 3 of the module docstring, printed: one line per figure that the current judge changes."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    for saved in summary.get("iterations", []):
        synth = run / f"iter{saved['iteration']}" / "synth"
        now = {"pair_judgement": pair_judgement(synth)}
        if "pair_self_vqa" in saved:
            now["pair_self_vqa"] = pair_self_vqa(synth)
        for figure, parts in now.items():
            for part, values in parts.items():
                for key, value in _flat(values).items():
                    was = _flat(saved[figure][part]).get(key)
                    if was != value:
                        print(f"iter{saved['iteration']} {figure} {part} {key}: {was:.4f} -> {value:.4f}")


def _flat(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished toy run directory (e.g. runs/demo)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        report_heldout(args.run, Path(scratch))
    report_pairs(args.run)


if __name__ == "__main__":
    main()
