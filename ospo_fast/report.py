"""A static HTML report of one synthesis run (``<synth>/report.html`` plus pages in ``<synth>/report/``).

- report.html: a legend (mask cells, S, filter reasons), counts per stage, reason and category (each count links to
  the pairs it counts), the loss curve when the synthesis dir is part of a run (``iter<i>/synth`` beside
  ``iter<i>/train/metrics.jsonl``), and on the toy world a before/after gallery preview.
- report/pairs-<filter>-<page>.html: every scored pair, ``PAGE_SIZE`` a page, for all pairs and for each
  (category, filter reason): both prompts, both images with their object masks drawn over them, the questions with
  p(yes)/p(no), the scores and the verdict.
- report/gallery-<key>.html: the same held-out prompts and seeds drawn before and after OSPO side by side, each with
  the exact judge's verdict, read from the images the run kept in ``<run>/heldout/`` (nothing is recomputed).

Images are referenced by relative paths (the run directory can be moved or served as is). Every page counts its
images that failed to load and says so on the page (``data-images-failed`` on ``<body>``)."""

from __future__ import annotations

import html
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

from ospo_fast.runstore import RunStore
from ospo_fast.store import StoreError, atomic_write_text, check_no_symlink, read_jsonl

PAGE_SIZE = 100
GALLERY_PREVIEW = 8

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}table{border-collapse:collapse;
margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}.pair{border:1px solid
#bbb;margin:1em 0;padding:.6em}.kept{border-left:6px solid #2a2}.dropped{border-left:6px solid #c33}
.img{display:inline-block;margin-right:1em;text-align:center;font-size:12px;vertical-align:top;max-width:260px}
.frame{position:relative;display:inline-block;line-height:0}.frame img,.gallery img{image-rendering:pixelated}
.frame svg{position:absolute;left:0;top:0}.small{color:#666;font-size:12px}.ok{color:#161;font-weight:bold}
.bad{color:#b11;font-weight:bold}.legend dt{font-weight:bold;margin-top:.4em}.legend dd{margin-left:1.5em}
.gallery td{text-align:center}.nav a{margin-right:.6em}#load-failures{color:#b11;font-weight:bold}"""

# Counts images that failed to load (naturalWidth 0) once the page has loaded; a browser test reads the attributes.
CHECK_IMAGES = """<script>window.addEventListener('load',function(){var imgs=document.images,bad=0;
for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0)bad++;}
document.body.setAttribute('data-images',imgs.length);document.body.setAttribute('data-images-failed',bad);
if(bad){var p=document.getElementById('load-failures');p.textContent=bad+' of '+imgs.length+
' images failed to load: keep the run directory together (the report uses relative paths).';}});</script>"""

REASONS = {
    "kept": "passed the filter (S(chosen) >= tau, chosen has a yes, rejected fails a question)",
    "chosen_below_tau": "dropped: S(chosen) < tau",
    "chosen_no_yes": "dropped: the chosen image got no yes (no s_k > 0)",
    "rejected_satisfies_prompt": "dropped: the rejected image already satisfies the base prompt (every s_k > 0)",
}


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style>{CHECK_IMAGES}</head><body><p id='load-failures'></p>"
            + "\n".join(body) + "</body></html>")


def _table(rows: list[list[object]], header: list[str], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (cells already HTML)."""
    cell = (lambda c: str(c)) if raw else (lambda c: html.escape(str(c)))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image_with_mask(src: str, mask: list[int], size: int = 192) -> str:
    """The image at relative URL ``src`` with the mask's cells (G*G 0/1, row-major) drawn over it."""
    grid = int(round(len(mask) ** 0.5))
    cell = size / grid
    rects = "".join(f'<rect x="{(j % grid) * cell:.2f}" y="{(j // grid) * cell:.2f}" width="{cell:.2f}" '
                    f'height="{cell:.2f}"/>' for j, m in enumerate(mask) if m)
    return (f'<span class="frame"><img src="{html.escape(src)}" width="{size}" height="{size}" alt="">'
            f'<svg width="{size}" height="{size}"><g fill="#ff0" fill-opacity="0.35" stroke="#f80" '
            f'stroke-width="0.5">{rects}</g></svg></span>')


def _pair_html(record: dict, selected: set[str], up: str) -> str:
    """One scored pair; ``up`` prefixes the synth-relative image paths (``../`` from ``report/``)."""
    verdict = record["verdict"]
    status = "selected" if record["id"] in selected else ("passed filter" if verdict["keep"] else verdict["reason"])
    sides = []
    for side, prompt in (("chosen", record["dense_base"]), ("rejected", record["dense_prompt"])):
        sides.append(f'<div class="img">{_image_with_mask(up + record[side]["image"], record[side]["mask"])}'
                     f"<br><b>{side}</b> S={verdict['score_' + side]:.3f}<br>{html.escape(prompt)}</div>")
    qa = [[q, f"{w[0]:.3f} / {w[1]:.3f}", f"{w[0] - w[1]:+.3f}", f"{r[0]:.3f} / {r[1]:.3f}", f"{r[0] - r[1]:+.3f}"]
          for q, w, r in zip(record["questions"], record["chosen"]["vqa"], record["rejected"]["vqa"])]
    css = "kept" if verdict["keep"] else "dropped"
    return (f'<div class="pair {css}"><b>{html.escape(record["id"])}</b> [{html.escape(record["category"])}, '
            f'{html.escape(record["kind"])}] x: <i>{html.escape(record["base_prompt"])}</i> &rarr; x~: '
            f"<i>{html.escape(record['prompt'])}</i> &mdash; <b>{html.escape(status)}</b><br>{''.join(sides)}"
            + _table(qa, ["question", "chosen p(yes) / p(no)", "chosen s_k", "rejected p(yes) / p(no)",
                          "rejected s_k"])
            + f'<div class="small">mask objects: {html.escape(", ".join(record["mask_objects"]))}</div></div>')


def _order(names: tuple[str, ...], name: str) -> int:
    return names.index(name) if name in names else len(names)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


OUR_PAGE = re.compile(r"(pairs-[A-Za-z0-9_.-]+-\d+|gallery[A-Za-z0-9_.-]*)\.html")  # the names this module writes


def _pages_name(category: str | None, reason: str | None, page: int) -> str:
    """File name (in ``report/``) of page ``page`` (1-based) of the pairs of one category and reason (None: all)."""
    key = "all" if category is None else f"{_slug(category)}-{_slug(reason or '')}"
    return f"pairs-{key}-{page}.html"


def _write_pair_pages(out: Path, scored: list[dict], selected: set[str], category: str | None,
                      reason: str | None) -> list[str]:
    """Write the pages of one filter (``PAGE_SIZE`` pairs each) into ``out``; returns the file names."""
    picked = [r for r in scored if category is None or (r["category"] == category
                                                         and r["verdict"]["reason"] == reason)]
    count = max(1, -(-len(picked) // PAGE_SIZE))
    names = [_pages_name(category, reason, p) for p in range(1, count + 1)]
    what = "all pairs" if category is None else f"category {category}, filter reason {reason}"
    for index, name in enumerate(names):
        rows = picked[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
        nav = " ".join(f'<a href="{n}">{i + 1}</a>' if i != index else f"<b>{i + 1}</b>" for i, n in enumerate(names))
        first = index * PAGE_SIZE + 1 if rows else 0
        body = [f'<p><a href="../report.html">&larr; report</a></p><h1>{html.escape(what)}</h1>',
                f'<p class="nav">pairs {first}-{index * PAGE_SIZE + len(rows)} of {len(picked)}; page {nav}</p>',
                *[_pair_html(r, selected, "../") for r in rows], f'<p class="nav">page {nav}</p>']
        atomic_write_text(out / name, _page(what, body))
    return names


def _legend(tau: object, alpha: object) -> str:
    reasons = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in REASONS.items())
    return ("<h2>Legend</h2><dl class='legend'>"
            "<dt>Mask cells (yellow squares over an image)</dt><dd>The object mask: one cell per image token of the "
            "G x G token grid, set where the attention that the token's query pays to the base prompt's object words "
            "(mean over heads, the middle layers, sub-tokens; min-max normalised) is above 0.8 x Otsu's threshold, "
            f"union over objects. The loss weights these tokens w = 1 + alpha (alpha = {html.escape(str(alpha))}).</dd>"
            "<dt>p(yes) / p(no), s_k, S</dt><dd>For each yes/no question about the base prompt x: the model's "
            "probabilities of answering yes and no (max over cases) at the last position; s_k = p(yes) - p(no); "
            "S(y) = mean over the questions of s_k, in [-1, 1]. Chosen = image of x, rejected = image of the "
            "perturbed prompt x~.</dd>"
            f"<dt>Filter reasons (tau = {html.escape(str(tau))})</dt><dd><ul>{reasons}</ul>Of the pairs of one base "
            "prompt that pass, the one with the highest S(chosen) is <b>selected</b> for training; a prompt with "
            "no passing pair is dropped.</dd>"
            "<dt>Judge (toy world)</dt><dd><b>strict</b> = every object found with the right colour and shape, no "
            "extra object, relation right; <b>loose</b> = every colour found and relation right (shapes and extra "
            "objects ignored). The judge is code, not a model.</dd></dl>")


LOSS_PANELS = (("loss", "#000"), ("simpo", "#26c"), ("sft", "#c62"))


def _loss_svg(rows: list[dict], width: int = 560, height: int = 150) -> str:
    """One inline SVG panel per metric (loss, SimPO, SFT) against step, each on its own scale, since SimPO can be a
    hundred times smaller than SFT; every label sits inside its panel."""
    steps = [r["step"] for r in rows]
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    panels = [_metric_panel(rows, key, colour, s0, s1, width, height) for key, colour in LOSS_PANELS
              if any(isinstance(r.get(key), (int, float)) for r in rows)]
    return "<div>" + "".join(panels) + "</div>"


def _metric_panel(rows: list[dict], key: str, colour: str, s0: int, s1: int, width: int, height: int) -> str:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    hi = hi if hi > lo else lo + abs(lo) * 0.01 + 1e-12
    left, right, top, bottom = 8, width - 8, 22, height - 20  # the plot area; labels are drawn inside it

    def xy(step: float, value: float) -> str:
        x = left + (step - s0) / (s1 - s0) * (right - left)
        y = bottom - (value - lo) / (hi - lo) * (bottom - top)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(step, value) for step, value in points)
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{key} against step">'
            f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#ccc"/>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}"/>'
            f'<text x="{left + 4}" y="{top - 6}" font-size="12" fill="{colour}">{key}: max {hi:.4g}, '
            f'min {lo:.4g}</text>'
            f'<text x="{left + 4}" y="{height - 6}" font-size="11">step {s0}</text>'
            f'<text x="{right - 4}" y="{height - 6}" font-size="11" text-anchor="end">step {s1}</text></svg>')


def _loss_section(metrics_path: Path) -> list[str]:
    from ospo_fast.train.checkpoint import read_vouched_metrics

    rows = [r for r in read_vouched_metrics(metrics_path.parent, say=False)  # as the checkpoint recorded them
            if isinstance(r.get("loss"), (int, float)) and "step" in r]
    if not rows:
        return ["<h2>Training</h2><p>No training step is recorded yet.</p>"]
    first, last = rows[0], rows[-1]
    table = [[k, f"{first[k]:.4f}", f"{last[k]:.4f}"] for k in ("loss", "simpo", "sft", "margin", "accuracy")
             if isinstance(first.get(k), (int, float)) and isinstance(last.get(k), (int, float))]
    return [f"<h2>Training: loss curves ({len(rows)} steps, each on its own scale)</h2>", _loss_svg(rows),
            _table(table, ["metric", f"step {first['step']}", f"step {last['step']}"]),
            '<p class="small">loss = SimPO (object-weighted) + lambda x SFT, per optimizer step, from '
            "train/metrics.jsonl.</p>"]


def _verdict_html(row: dict) -> str:
    def mark(ok: bool, name: str) -> str:
        return f'<span class="{"ok" if ok else "bad"}">{name} {"&#10003;" if ok else "&#10007;"}</span>'

    d = row.get("details", {})
    parts = ", ".join(f"{k} {'ok' if d[k] else 'wrong'}" for k in ("colours", "shapes", "relations") if k in d)
    extra = f", {d['extra_blobs']} extra" if d.get("extra_blobs") else ""
    return f"{mark(row['strict'], 'strict')} {mark(row['loose'], 'loose')}<br><span class='small'>{parts}{extra}</span>"


def _gallery_pairs(synth_dir: Path) -> list[tuple[str, Path, Path]]:
    """(key, before dir, after dir) of the run's kept held-out judging for this iteration: ``<run>/heldout/before<key>``
    and ``<run>/heldout/after_iter<i><key>``, when the synthesis dir is ``<run>/iter<i>/synth``."""
    match = re.fullmatch(r"iter(\d+)", synth_dir.parent.name)
    heldout = synth_dir.parent.parent / "heldout"
    if synth_dir.name != "synth" or match is None or not heldout.is_dir():
        return []
    found = []
    for before in sorted(heldout.glob("before*")):
        key = before.name[len("before"):]
        after = heldout / f"after_iter{match.group(1)}{key}"
        if (before / "verdicts.jsonl").is_file() and (after / "verdicts.jsonl").is_file():
            found.append((key, before, after))
    return found


def _gallery_rows(before_dir: Path, after_dir: Path, page_dir: Path, size: int = 128) -> tuple[list, dict]:
    """Rows (HTML cells) of a before/after gallery, changed verdicts first; and the counts."""
    before, after = read_jsonl(before_dir / "verdicts.jsonl"), read_jsonl(after_dir / "verdicts.jsonl")
    if [(r["prompt"], r["seed"]) for r in before] != [(r["prompt"], r["seed"]) for r in after]:
        raise ValueError(f"{before_dir} and {after_dir} hold different prompts or seeds; re-run the evaluation")

    def img(directory: Path, row: dict) -> str:
        src = os.path.relpath(directory / row["image"], page_dir)
        return f'<img src="{html.escape(src)}" width="{size}" height="{size}" alt="">'

    def change(b: dict, a: dict) -> int:  # 1 better, -1 worse, 0 same (by loose, then strict)
        return (a["loose"] - b["loose"]) or (a["strict"] - b["strict"])

    deltas = [change(b, a) for b, a in zip(before, after)]
    order = sorted(range(len(before)), key=lambda i: (-abs(deltas[i]), -deltas[i], i))  # better, worse, same
    rows = []
    for i in order:
        b, a = before[i], after[i]
        delta = {1: '<span class="ok">better</span>', -1: '<span class="bad">worse</span>', 0: "same"}[deltas[i]]
        rows.append([f"{html.escape(b['prompt'])}<br><span class='small'>{html.escape(b['category'])}, seed "
                     f"{b['seed']}</span>", f"{img(before_dir, b)}<br>{_verdict_html(b)}",
                     f"{img(after_dir, a)}<br>{_verdict_html(a)}", delta])
    counts = {"n": len(before), "strict": (sum(r["strict"] for r in before), sum(r["strict"] for r in after)),
              "loose": (sum(r["loose"] for r in before), sum(r["loose"] for r in after)),
              "better": sum(d > 0 for d in deltas), "worse": sum(d < 0 for d in deltas)}
    return rows, counts


def _gallery_title(key: str, counts: dict, guidance: object) -> tuple[str, str]:
    """(heading, counts line) of one gallery; ``guidance``: the run's images.guidance_scale (key "")."""
    main = f"{guidance:g}" if isinstance(guidance, (int, float)) else str(guidance)
    weight = f", CFG {key[len('@cfg'):] if key.startswith('@cfg') else main}"
    n = counts["n"]
    return (f"Before / after OSPO on held-out prompts{weight}",
            f"<p>Judged by the exact judge: strict {counts['strict'][0]}/{n} &rarr; {counts['strict'][1]}/{n}, loose "
            f"{counts['loose'][0]}/{n} &rarr; {counts['loose'][1]}/{n}; {counts['better']} better, "
            f"{counts['worse']} worse.</p>")


GALLERY_HEADER = ["prompt", "before OSPO", "after OSPO", "change"]


def _gallery_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in GALLERY_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="gallery"><tr>{head}</tr>{body}</table>'


def _write_galleries(synth_dir: Path, pages: Path, guidance: object) -> tuple[list[str], list[str]]:
    """Write the gallery pages into ``pages``; returns the index's preview sections (HTML) and the pages' names."""
    preview, names = [], []
    for key, before, after in _gallery_pairs(synth_dir):
        rows, counts = _gallery_rows(before, after, pages)
        name = f"gallery{_slug(key)}.html"
        names.append(name)
        title, line = _gallery_title(key, counts, guidance)
        body = [f'<p><a href="../report.html">&larr; report</a></p><h1>{title}</h1>', line,
                '<p class="small">The same prompts and sampling seeds, drawn by the starting model and by the model '
                "after OSPO, judged by the exact judge; verdicts that changed come first.</p>", _gallery_table(rows)]
        atomic_write_text(pages / name, _page(f"gallery {key}", body))
        small, _ = _gallery_rows(before, after, synth_dir)
        preview += [f"<h2>{title}</h2>", line,
                    f'<p><a href="report/{name}">the whole gallery ({counts["n"]} prompts)</a>; the first '
                    f"{min(GALLERY_PREVIEW, len(small))} below</p>", _gallery_table(small[:GALLERY_PREVIEW])]
    return preview, names


def _run_settings(store: RunStore) -> dict:
    """The synthesis dir's config.yaml as a dict, checked against the manifest ({} when the run has none yet)."""
    import yaml

    path = store.root / "config.yaml"
    if "config.yaml" not in store.manifest()["outputs"] and not path.is_file():
        return {}
    text = store.read_committed("config.yaml", "the synthesis re-writes it when resumed with its settings: re-run "
                                "the synth or run command")
    try:
        saved = yaml.safe_load(text.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is damaged ({type(err).__name__}); the synthesis re-writes it when resumed with "
                         "its settings: re-run the synth or run command") from None
    return saved if isinstance(saved, dict) else {}


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and its pages (``report/``) into the synthesis directory; returns report.html's path."""
    store = RunStore(run_dir)
    store.verify()  # the manifest the report reads is the run's newest, not a deleted or older one
    root = store.root
    pages = check_no_symlink(root, root / "report")  # pages are written and stale ones deleted only in there
    pages.mkdir(exist_ok=True)
    manifest = store.manifest()
    from ospo_fast.pipeline import STAGES

    stages = manifest.get("stages", {})
    stage_rows = [[name, e["records"], e["rejects"], ", ".join(f"{k}: {v}" for k, v in e["reject_reasons"].items()),
                   f"{e['seconds']:.1f}"] for name, e in sorted(stages.items(), key=lambda x: _order(STAGES, x[0]))]
    name = f"{root.parent.name}/{root.name}"  # no absolute path in the page
    settings = _run_settings(store)
    parts = [f"<h1>OSPO run: {html.escape(name)}</h1>",
             _legend(settings.get("filter", {}).get("tau", "?"), settings.get("loss", {}).get("alpha", "?")),
             "<h2>Stages</h2>", _table(stage_rows, ["stage", "records", "rejects", "reasons", "seconds"])]
    scored = store.read_stage("vqa") if store.stage_done("vqa") else []
    selected = {p["pair_id"] for p in store.read_stage("select")} if store.stage_done("select") else set()
    written = _write_pair_pages(pages, scored, selected, None, None)
    per_cat: dict[str, Counter] = defaultdict(Counter)
    base_per_cat = Counter(r["category"] for r in store.read_stage("prompts")) if store.stage_done("prompts") else {}
    category_of = {r["id"]: r["category"] for r in scored}
    for record in scored:
        per_cat[record["category"]]["pairs"] += 1
        per_cat[record["category"]][record["verdict"]["reason"]] += 1
    for pair_id in selected:
        per_cat[category_of[pair_id]]["selected"] += 1
    reasons = sorted({k for c in per_cat.values() for k in c} - {"pairs", "selected"})
    cat_rows = []
    for cat, c in sorted(per_cat.items()):
        links = []
        for reason in reasons:
            if c[reason]:
                written += _write_pair_pages(pages, scored, selected, cat, reason)
                links.append(f'<a href="report/{_pages_name(cat, reason, 1)}">{c[reason]}</a>')
            else:
                links.append("0")
        cat_rows.append([html.escape(cat), base_per_cat.get(cat, 0), c["pairs"], *links, c["selected"],
                         f"{c['selected'] / max(1, base_per_cat.get(cat, 0)):.2f}"])
    parts += ["<h2>Per category</h2><p class='small'>Each count links to the pairs it counts.</p>",
              _table(cat_rows, ["category", "base prompts", "scored pairs", *reasons, "selected",
                                "prompt pass rate"], raw=True),
              f'<p><a href="report/{_pages_name(None, None, 1)}">all {len(scored)} scored pairs</a> '
              f"({PAGE_SIZE} a page)</p>"]
    metrics = root.parent / "train" / "metrics.jsonl"
    if root.name == "synth" and metrics.is_file():
        parts += _loss_section(metrics)
    galleries, names = _write_galleries(root, pages, settings.get("images", {}).get("guidance_scale", "?"))
    parts += galleries
    written += names
    for stale in pages.glob("*.html"):  # pages of an earlier report that this one no longer has (ours by name only)
        if stale.name not in written and OUR_PAGE.fullmatch(stale.name) and not stale.is_symlink():
            stale.unlink()
    return atomic_write_text(check_no_symlink(root, root / "report.html"), _page(f"OSPO run {name}", parts))
