"""A static HTML report of a run: counts per stage, reason and category; per scored pair both prompts, both images
with their object masks drawn over them, the questions with p(yes)/p(no), the scores and the verdict."""

from __future__ import annotations

import base64
import html
from collections import Counter, defaultdict
from pathlib import Path

from ospo_fast.runstore import RunStore
from ospo_fast.store import atomic_write_text

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}.pair{border:1px solid #bbb;
margin:1em 0;padding:.6em}.kept{border-left:6px solid #2a2}.dropped{border-left:6px solid #c33}
.img{display:inline-block;margin-right:1em;text-align:center;font-size:12px}svg{image-rendering:pixelated}
.small{color:#666;font-size:12px}"""


def _image_with_mask(root: Path, rel: str, mask: list[int], size: int = 192) -> str:
    data = base64.b64encode((root / rel).read_bytes()).decode()
    grid = int(round(len(mask) ** 0.5))
    cell = size / grid
    rects = "".join(f'<rect x="{(j % grid) * cell:.2f}" y="{(j // grid) * cell:.2f}" width="{cell:.2f}" '
                    f'height="{cell:.2f}"/>' for j, m in enumerate(mask) if m)
    return (f'<svg width="{size}" height="{size}"><image href="data:image/png;base64,{data}" width="{size}" '
            f'height="{size}"/><g fill="#ff0" fill-opacity="0.35" stroke="#f80" stroke-width="0.5">{rects}</g></svg>')


def _table(rows: list[list[object]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pair_html(root: Path, record: dict, selected: set[str]) -> str:
    verdict = record["verdict"]
    status = "selected" if record["id"] in selected else ("passed filter" if verdict["keep"] else verdict["reason"])
    sides = []
    for side, prompt in (("chosen", record["dense_base"]), ("rejected", record["dense_prompt"])):
        sides.append(f'<div class="img">{_image_with_mask(root, record[side]["image"], record[side]["mask"])}'
                     f"<br><b>{side}</b> S={verdict['score_' + side]:.3f}<br>{html.escape(prompt)}</div>")
    qa = [[q, f"{w[0]:.3f} / {w[1]:.3f}", f"{r[0]:.3f} / {r[1]:.3f}"]
          for q, w, r in zip(record["questions"], record["chosen"]["vqa"], record["rejected"]["vqa"])]
    css = "kept" if verdict["keep"] else "dropped"
    return (f'<div class="pair {css}"><b>{html.escape(record["id"])}</b> [{record["category"]}, {record["kind"]}] '
            f"x: <i>{html.escape(record['base_prompt'])}</i> &rarr; x~: <i>{html.escape(record['prompt'])}</i> "
            f"&mdash; <b>{html.escape(status)}</b><br>{''.join(sides)}"
            f"{_table(qa, ['question', 'chosen p(yes) / p(no)', 'rejected p(yes) / p(no)'])}"
            f'<div class="small">mask objects: {", ".join(record["mask_objects"])}</div></div>')


def write_report(run_dir: str | Path, max_pairs: int = 200) -> Path:
    """Write ``report.html`` into the run directory and return its path."""
    store = RunStore(run_dir)
    root = store.root
    manifest = store.manifest()
    stage_rows = [[name, e["records"], e["rejects"], ", ".join(f"{k}: {v}" for k, v in e["reject_reasons"].items()),
                   f"{e['seconds']:.1f}"] for name, e in manifest.get("stages", {}).items()]
    parts = [f"<html><head><meta charset='utf-8'><title>OSPO run {html.escape(root.name)}</title>"
             f"<style>{STYLE}</style></head><body><h1>OSPO run: {html.escape(str(root.name))}</h1>",
             "<h2>Stages</h2>", _table(stage_rows, ["stage", "records", "rejects", "reasons", "seconds"])]
    scored = store.read_stage("vqa") if store.stage_done("vqa") else []
    selected = {p["pair_id"] for p in store.read_stage("select")} if store.stage_done("select") else set()
    per_cat: dict[str, Counter] = defaultdict(Counter)
    base_per_cat = Counter(r["category"] for r in store.read_stage("prompts")) if store.stage_done("prompts") else {}
    for record in scored:
        per_cat[record["category"]]["pairs"] += 1
        per_cat[record["category"]][record["verdict"]["reason"]] += 1
    for pair_id in selected:
        cat = next(r["category"] for r in scored if r["id"] == pair_id)
        per_cat[cat]["selected"] += 1
    reasons = sorted({k for c in per_cat.values() for k in c} - {"pairs", "selected"})
    cat_rows = [[cat, base_per_cat.get(cat, 0), c["pairs"], *[c[k] for k in reasons], c["selected"],
                 f"{c['selected'] / max(1, base_per_cat.get(cat, 0)):.2f}"] for cat, c in sorted(per_cat.items())]
    parts += ["<h2>Per category</h2>",
              _table(cat_rows, ["category", "base prompts", "scored pairs", *reasons, "selected", "prompt pass rate"])]
    parts.append(f"<h2>Pairs (first {min(max_pairs, len(scored))} of {len(scored)})</h2>")
    parts += [_pair_html(root, r, selected) for r in scored[:max_pairs]]
    parts.append("</body></html>")
    return atomic_write_text(root / "report.html", "\n".join(parts))
