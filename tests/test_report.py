"""The report of a toy run made by the CLI: legend, loss curve, every pair on pages, the before/after gallery read
from the held-out images the run kept (checked against the exact judge), rendered by headless Chromium (images
load, both sides of the gallery are there); and the run's stderr: progress bars, no library warnings."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ospo_fast import report
from ospo_fast.config import load_config
from ospo_fast.store import read_jsonl
from ospo_fast.toy import world
from ospo_fast.toy.judge import judge

OVERRIDES = ["prompts.num_prompts=3", "perturb.num_perturbations=2", "filter.enabled=false", "train.max_steps=3",
             "train.per_device_batch=2", "train.save_every=3", "eval.toy_heldout_prompts=4"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """(run dir, stderr) of ``ospo-fast run --preset toy`` at a few prompts, as a user runs it (own process)."""
    out = tmp_path_factory.mktemp("toy") / "run"
    proc = subprocess.run([sys.executable, "-m", "ospo_fast.cli", "run", "--preset", "toy", "--out", str(out),
                           *OVERRIDES], capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def _page_images(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text())


def test_stderr_shows_progress_of_the_heldout_judging_and_no_library_warning(toy_run):
    _, err = toy_run
    assert "judge before: 100%" in err and "judge after_iter1@cfg1: 100%" in err  # tqdm bars, finished
    assert "Warning" not in err, [line for line in err.splitlines() if "Warning" in line]
    assert "Could not find a config file" not in err


def test_heldout_images_are_kept_with_the_judges_verdicts(toy_run):
    """The kept images are the judged ones: judging the saved PNGs again gives the saved verdicts and the summary's
    rates; before and after hold the same prompts and seeds."""
    out, _ = toy_run
    summary = json.loads((out / "summary.json").read_text())
    config = load_config(str(out / "config.yaml"))
    prompts = world.sample_prompts(4, split="heldout", seed=config.seed + 1)
    for key in ("before", "before@cfg1", "after_iter1", "after_iter1@cfg1"):
        rows = read_jsonl(out / "heldout" / key / "verdicts.jsonl")
        expected = [(p["prompt"], config.seed + i) for i, p in enumerate(prompts)]  # same prompts, same seeds
        assert [(r["prompt"], r["seed"]) for r in rows] == expected
        for row, prompt in zip(rows, prompts):
            image = np.asarray(Image.open(out / "heldout" / key / row["image"]).convert("RGB"))
            again = judge(image, prompt["structure"])
            assert (again.strict, again.loose) == (row["strict"], row["loose"])
        assert summary["alignment"][key]["strict"] == pytest.approx(np.mean([r["strict"] for r in rows]))
        assert summary["alignment"][key]["loose"] == pytest.approx(np.mean([r["loose"] for r in rows]))


def test_report_has_legend_loss_curve_pages_and_gallery(toy_run, monkeypatch):
    out, _ = toy_run
    synth = out / "iter1" / "synth"
    monkeypatch.setattr(report, "PAGE_SIZE", 4)  # 6 pairs -> 2 pages
    index = report.write_report(synth).read_text()
    for words in ("Mask cells", "S(y) = mean over the questions", "chosen_below_tau", "rejected_satisfies_prompt"):
        assert words in index
    steps = [r for r in read_jsonl(out / "iter1" / "train" / "metrics.jsonl") if "loss" in r]
    loss_line = re.search(r'<polyline fill="none" stroke="#000" stroke-width="1.5" points="([^"]+)"', index)
    assert len(loss_line.group(1).split()) == len(steps) == 3

    scored = read_jsonl(synth / "vqa" / "records.jsonl")
    pages = sorted((synth / "report").glob("pairs-all-*.html"))
    assert [p.name for p in pages] == ["pairs-all-1.html", "pairs-all-2.html"]
    shown = [i for p in pages for i in re.findall(r'<div class="pair \w+"><b>([^<]+)</b>', p.read_text())]
    assert sorted(shown) == sorted(r["id"] for r in scored)  # every pair once
    for record in scored:  # each pair is also on the page of its category and filter reason, linked from the index
        name = report._pages_name(record["category"], record["verdict"]["reason"], 1)
        assert f'href="report/{name}"' in index and record["id"] in (synth / "report" / name).read_text()

    gallery = (synth / "report" / "gallery.html").read_text()
    assert gallery.count("<tr>") == 1 + 4 and len(_page_images(synth / "report" / "gallery.html")) == 2 * 4
    for page in [synth / "report.html", *(synth / "report").glob("*.html")]:
        for src in _page_images(page):  # relative paths that resolve from the page
            assert not os.path.isabs(src) and (page.parent / src).is_file(), (page, src)

    monkeypatch.setattr(report, "PAGE_SIZE", 100)
    report.write_report(synth)
    assert not (synth / "report" / "pairs-all-2.html").exists()  # a page the new report lacks is removed


def _chromium_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after its load event, rendered by headless Chromium."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    proc = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _loaded(dom: str) -> tuple[int, int]:
    body = re.search(r'<body data-images="(\d+)" data-images-failed="(\d+)"', dom)
    assert body, "the page's load check did not run"
    return int(body.group(1)), int(body.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")
def test_chromium_loads_every_image_and_the_gallery_shows_both_sides(toy_run, tmp_path):
    out, _ = toy_run
    synth = out / "iter1" / "synth"
    report.write_report(synth)
    index, gallery = synth / "report.html", synth / "report" / "gallery.html"
    assert _loaded(_chromium_dom(index, tmp_path / "p1")) == (len(_page_images(index)), 0)
    dom = _chromium_dom(gallery, tmp_path / "p2")
    assert _loaded(dom) == (8, 0)
    rows = re.findall(r"<tr>(.*?)</tr>", dom, flags=re.S)[1:]
    assert len(rows) == 4 and all(row.count("<img") == 2 and row.count("strict") == 2 for row in rows)
    pairs = synth / "report" / "pairs-all-1.html"
    assert _loaded(_chromium_dom(pairs, tmp_path / "p3")) == (12, 0)  # 6 pairs, both sides

    moved = out / "heldout" / "after_iter1" / "images" / "0000.png"
    moved.rename(moved.with_suffix(".away"))  # the check sees a missing image
    try:
        assert _loaded(_chromium_dom(gallery, tmp_path / "p4")) == (8, 1)
    finally:
        moved.with_suffix(".away").rename(moved)


def test_loss_curves_are_separate_panels_with_their_labels_inside():
    """SimPO can be a hundred times smaller than SFT: each metric has its own panel and scale, and every label is
    drawn inside its panel (the old shared axis cut "1.37e-05" to ".37e-05" at the left edge)."""
    from ospo_fast.report import _loss_svg

    rows = [{"step": s, "loss": 2.0 - 0.1 * s, "simpo": 1.37e-05 * (1 + s), "sft": 1.0 - 0.05 * s} for s in range(5)]
    svg = _loss_svg(rows)
    panels = re.findall(r"<svg width=\"(\d+)\".*?</svg>", svg)
    assert len(panels) == 3
    assert "simpo: max 6.85e-05, min 1.37e-05" in svg
    for x in re.findall(r'<text x="([-\d.]+)"', svg):
        assert 0 <= float(x) <= 560
    simpo = re.search(r'stroke="#26c" stroke-width="1.5" points="([^"]+)"', svg).group(1)
    ys = [float(p.split(",")[1]) for p in simpo.split()]
    assert max(ys) - min(ys) > 100  # the tiny SimPO values fill their own panel's height


def test_a_damaged_synth_config_is_one_line(tmp_path, capsys):
    from ospo_fast.cli import main
    from ospo_fast.runstore import RunStore

    RunStore(tmp_path).commit_file("config.yaml", b"images:\n  guidance_scale: 5.0\n")
    (tmp_path / "config.yaml").write_bytes(b"images: [\n\xff")  # damaged after the run committed it
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ospo-fast: error: ") and err.count("\n") == 1
    assert "config.yaml does not match its sha256 in" in err
    (tmp_path / "config.yaml").unlink()  # gone: named as missing, not read as "no settings"
    assert main(["report", str(tmp_path)]) == 2
    assert "config.yaml is missing although" in capsys.readouterr().err
