"""Stages 1-4 on the tiny random model: a valid dataset, resume after SIGKILL, two gloo processes = one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ospo_fast.config import load_config
from ospo_fast.pipeline import Pipeline
from ospo_fast.store import read_jsonl

# 4 prompts x 2 perturbations; no filtering (a random model answers nothing with confidence). CPU explicitly: the
# runs compared here must sample on the same device (two ranks on a one-GPU host run on the CPU, ospo_fast.distributed)
OVERRIDES = ["prompts.num_prompts=4", "prompts.chunk_size=2", "perturb.num_perturbations=2",
             "images.batch_size=2", "filter.enabled=false", "filter.vqa_batch_size=4", "model.device=cpu"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ospo_fast.cli", "synth", "--preset", "tiny", "--out", str(out), *OVERRIDES, *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _rounded(value, digits: int = 4):
    """Floats rounded, for comparing runs whose batches differ (scores agree to float32 noise)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(_cli(out), env=_env(), check=True, capture_output=True)
    return out, read_jsonl(out / "pairs.jsonl")


def test_pipeline_in_process_matches_the_cli(reference_run, tmp_path):
    pairs = Pipeline(load_config("tiny", OVERRIDES), tmp_path, progress=False).run()
    assert _rounded(pairs) == _rounded(reference_run[1])


def test_dataset_is_valid(reference_run):
    out, pairs = reference_run
    assert len(pairs) == 4  # one pair per base prompt once filtering is off
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["prompts"]["records"] == 4
    assert manifest["stages"]["images"]["records"] == 8
    assert (out / "config.yaml").is_file()
    for pair in pairs:
        assert pair["grid"] == 8 and pair["prompt"]
        for side in ("chosen", "rejected"):
            assert len(pair[side]["tokens"]) == 64 and len(pair[side]["mask"]) == 64
            assert set(pair[side]["mask"]) <= {0, 1}
            assert not Path(pair[side]["image"]).is_absolute() and (out / pair[side]["image"]).is_file()
            assert len(pair[side]["vqa"]) == len(pair["questions"]) > 0
        assert set(pair["mask_objects"]) == set(pair["structure"]["objects"])
    assert manifest["outputs"]["pairs.jsonl"]["records"] == 4


def test_report_and_export(reference_run):
    from ospo_fast.export import export_parquet
    from ospo_fast.report import write_report

    out, pairs = reference_run
    report = write_report(out)
    html = (report.parent / "report" / "pairs-all-1.html").read_text()  # pairs are on pages beside report.html
    assert html.count('class="pair') == 8 and "<svg" in html
    [parquet] = export_parquet(out)  # one file per synth directory
    table = pq.read_table(parquet)
    assert table.num_rows == 4
    assert {"prompt", "chosen", "rejected", "chosen_mask", "chosen_tokens"} <= set(table.column_names)
    assert table.column("chosen")[0].as_py()["bytes"][:4] == b"\x89PNG"


def test_sigkill_mid_stage_then_resume_gives_the_same_dataset(reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_chunk = out / "images" / "rank000-of-001" / "chunk-00000.jsonl"
    deadline = time.time() + 240
    while not first_chunk.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_chunk.exists(), "the run did not reach the images stage"
    assert not (out / "pairs.jsonl").exists(), "the run finished before it could be killed"
    subprocess.run(_cli(out), env=_env(), check=True, capture_output=True)
    assert read_jsonl(out / "pairs.jsonl") == reference_run[1]


def test_two_gloo_processes_equal_one(reference_run, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "ospo_fast.cli", *_cli(out)[3:]]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "images" / "rank001-of-002").is_dir()
    assert _rounded(read_jsonl(out / "pairs.jsonl")) == _rounded(reference_run[1])


def test_redo_select_reselects_from_the_scored_candidates(reference_run, tmp_path):
    """``redo="select"`` keeps stages 1-vqa and recomputes the pairs under the new filter settings; a setting that
    changes the VQA verdicts (tau) is refused until the vqa stage is redone."""
    import shutil

    from ospo_fast.store import FingerprintMismatch

    out, pairs = reference_run
    shutil.copytree(out, tmp_path / "run")
    with pytest.raises(FingerprintMismatch, match=r"stage 'vqa' .*filter\.tau: 0\.6 -> 1\.0.*--redo vqa"):
        Pipeline(load_config("tiny", [*OVERRIDES, "filter.tau=1.0"]), tmp_path / "run", redo="select")
    filtered = load_config("tiny", [*OVERRIDES, "filter.enabled=true"])  # a random model's S is near 0 < tau
    assert Pipeline(filtered, tmp_path / "run", redo="select", progress=False).run() == []
    assert read_jsonl(tmp_path / "run" / "pairs.jsonl") == []
    images_before = json.loads((out / "manifest.json").read_text())["stages"]["images"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["images"] == images_before
    again = Pipeline(load_config("tiny", OVERRIDES), tmp_path / "run", redo="select", progress=False).run()
    assert _rounded(again) == _rounded(pairs)


def test_jacobi_decoding_gives_the_same_dataset(reference_run, tmp_path):
    """images.decoding=jacobi: the same pairs, image tokens, masks and PNG checksums as sequential decoding."""
    config = load_config("tiny", OVERRIDES + ["images.decoding=jacobi", "images.jacobi_window=4"])
    pairs = Pipeline(config, tmp_path, progress=False).run()
    assert _rounded(pairs) == _rounded(reference_run[1])
