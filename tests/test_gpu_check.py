"""``make gpu-check`` (benchmarks/gpu_check.py) rehearsed on the CPU: the dry run goes through every part at tiny
shapes (so an import error, a wrong path or a wrong argument never reaches a GPU), rows reach the disk as they are
measured, a part past its cap is stopped and recorded while the next one runs, the watchdog ends a stuck run after a
row, it refuses without CUDA, selects exactly the tests that tests/gpu.py gates on CUDA, and computes the
synthesis bandwidth floor."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402
from ospo_fast.plan import GPUS, kind_config  # noqa: E402

TOY_TESTS = '''
import pytest
from tests.gpu import requires_cuda, requires_two_gpus

def test_pass():
    pass

def test_fail():
    assert False

@requires_cuda
def test_gpu():
    pass

@requires_two_gpus
def test_two_gpus():
    pass
'''


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(ROOT)}


def test_dry_run_measures_every_part_on_the_cpu(tmp_path):
    """``--dry-run``: the same parts on the CPU at tiny shapes, a row per part (and per figure) in the given files,
    the section written under the earlier text, every part ok, nothing written to the repository's files."""
    md, results = tmp_path / "B.md", tmp_path / "r.jsonl"
    md.write_text("# Benchmarks\n\nearlier figures\n")
    before = (ROOT / "BENCHMARKS.md").stat().st_mtime_ns
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                          "--benchmarks-file", str(md), "--results-file", str(results)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    parts = {row["part"] for row in rows}
    assert parts == {"setup", "total", *(p.name for p in gpu_check.PARTS)}, parts
    assert not [r for r in rows if r["case"].startswith(("error", "not run", "stopped", "watchdog"))]
    assert rows[-1]["case"] == f"{len(gpu_check.PARTS)} of {len(gpu_check.PARTS)} parts ok"
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nearlier figures\n\n## GPU check: cpu (")
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| part |")]
    assert len(table) == len(rows)
    for line, row in zip(table, rows):  # part | case | ms | vs | peak | result | device | date | commit | command
        cells = [c.strip() for c in line.strip("| \n").split(" | ")]
        assert cells[0] == row["part"] and cells[6].startswith("cpu (") and cells[8] == row["commit"]
        assert cells[9] == f"`python benchmarks/gpu_check.py --dry-run --benchmarks-file {md} --results-file {results}`"
    synthesis = [r for r in rows if r.get("images_per_s")]
    assert len(synthesis) >= 4 and all("floor unknown" in r["result"] for r in synthesis)
    tests = next(r for r in rows if r["part"] == "gpu-tests")
    assert "exit 0" in tests["case"] and not tests["failed"]
    if not torch.cuda.is_available():
        assert tests["counts"] == {"skipped": 5}  # the engine's CUDA tests, collected and skipped
    assert (ROOT / "BENCHMARKS.md").stat().st_mtime_ns == before
    print(f"dry run: {seconds:.1f} s")


def _context(tmp_path, budget: float = 30.0, **caps) -> gpu_check.Context:
    rows = gpu_check.Rows(tmp_path / "B.md", tmp_path / "r.jsonl", "Toy GPU", "gpu_check.py", "intro")
    settings = gpu_check.dataclasses.replace(gpu_check.DRY, caps={**gpu_check.DRY.caps, **caps})
    return gpu_check.Context(settings=settings, device=torch.device("cpu"), rows=rows,
                             run_deadline=time.monotonic() + budget)


def test_each_row_is_on_disk_when_add_returns(tmp_path):
    ctx = _context(tmp_path)
    ctx.part = "smoke"
    ctx.add("first", seconds=0.25, baseline="x", ratio=2.0, peak_mib=12.0, result="ok")
    text = (tmp_path / "B.md").read_text()  # another reader, while the writer is still open for more rows
    assert text.startswith("## GPU check: Toy GPU, ") and "\nintro\n\n| part | case | ms |" in text
    assert text.splitlines()[-1].startswith("| smoke | first | 250.0 | 2.00x vs x | 12 | ok | Toy GPU | ")
    assert json.loads((tmp_path / "r.jsonl").read_text())["median_s"] == 0.25


def test_a_part_past_its_cap_is_stopped_and_the_next_one_runs(tmp_path):
    ran = []

    def stuck(ctx):
        ctx.add("measured before the cap")
        time.sleep(30)

    def broken(ctx):
        raise ValueError("bad argument\nsecond line")

    parts = [gpu_check.Part("smoke", stuck), gpu_check.Part("loss", broken),
             gpu_check.Part("vqa", lambda ctx: ran.append(ctx.part))]
    ctx = _context(tmp_path, smoke=0.5)
    start = time.monotonic()
    outcome = gpu_check.run_parts(ctx, parts)
    assert time.monotonic() - start < 10
    assert outcome == {"smoke": "stopped at its cap of 0.5 s", "loss": "error: ValueError: bad argument", "vqa": "ok"}
    assert ran == ["vqa"]
    cases = [(r["part"], r["case"]) for r in ctx.rows.written]
    assert cases == [("smoke", "measured before the cap"),
                     ("smoke", "stopped at its cap of 0.5 s (rows above were measured)"),
                     ("loss", "error: ValueError: bad argument")]


def test_parts_the_budget_cannot_hold_are_recorded_as_not_run(tmp_path):
    ran = []
    run = lambda ctx: ran.append(ctx.part)  # noqa: E731
    ctx = _context(tmp_path, budget=100.0, **{"synthesis-7b-planned": 90})
    parts = [gpu_check.Part("synthesis-7b-planned", run, optional=True), gpu_check.Part("masks", run)]
    outcome = gpu_check.run_parts(ctx, parts)  # 90 s cap + the masks' 60 s reserve > 100 s left
    assert outcome["synthesis-7b-planned"].startswith("not run: 100 s left, it needs its cap of 90 s plus 60 s")
    assert ran == ["masks"]
    ctx.run_deadline = time.monotonic() + 1
    assert gpu_check.run_parts(ctx, parts[1:]) == {"masks": "not run: 1 s left of the budget"}


def test_the_watchdog_ends_a_stuck_run_after_a_row(tmp_path):
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from benchmarks import gpu_check
        rows = gpu_check.Rows(Path({str(tmp_path)!r}) / "B.md", Path({str(tmp_path)!r}) / "r.jsonl", "Toy GPU",
                              "cmd", "intro")
        ctx = gpu_check.Context(gpu_check.DRY, torch.device("cpu"), rows, time.monotonic() + 1, part="masks")
        gpu_check.start_watchdog(rows, ctx, 1.0)
        time.sleep(60)  # stuck where no alarm reaches
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env(),
                         cwd=ROOT)
    assert out.returncode == 3, out.stderr
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["part"] == "masks" and row["case"].startswith("watchdog: the whole run passed its budget")


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    md = tmp_path / "BENCHMARKS.md"
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--benchmarks-file", str(md)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA device" in err and "--dry-run" in err
    assert not md.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_command_refuses_on_this_machine(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--benchmarks-file",
                          str(tmp_path / "B.md")], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr and not (tmp_path / "B.md").exists()


def test_unknown_parts_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(["--parts", "smoke,bogus"])
    assert exit_.value.code == 2 and "['bogus'] unknown" in capsys.readouterr().err


def test_gpu_only_selects_the_cuda_gated_tests_and_counts_results(tmp_path):
    (tmp_path / "test_toy.py").write_text(TOY_TESTS)
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p",
                          "benchmarks.gpu_check", "--gpu-only", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "2 deselected" in out.stdout, out.stdout + out.stderr
    counts, failed = gpu_check.parse_pytest(out.stdout)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    passed = (gpus >= 1) + (gpus >= 2)
    assert counts == {k: v for k, v in {"passed": passed, "skipped": 2 - passed}.items() if v} and failed == []


def test_pytest_lines_give_counts_and_failures_also_from_a_killed_run():
    output = ("tests/test_a.py::test_x PASSED                    [ 10%]\n"
              "tests/test_a.py::test_y[cuda-bfloat16] FAILED     [ 20%]\n"
              "tests/test_b.py::test_z SKIPPED (needs a CUDA device) [ 30%]\n"
              "tests/test_b.py::test_w ")  # killed while it ran
    assert gpu_check.parse_pytest(output) == ({"passed": 1, "failed": 1, "skipped": 1},
                                              ["tests/test_a.py::test_y[cuda-bfloat16]"])


def test_synthesis_rows_give_their_fraction_of_the_planners_floor():
    """The floor of ``ospo_fast.plan.synthesis_floor`` at the batch and the prompts' mean length, on the datasheet
    bandwidth of the GPU named; at a 64-token prompt the 1B shape reads 79.6 GB of KV per image."""
    from ospo_fast.engine.prompts import image_prompt_inputs
    from ospo_fast.plan import SynthesisShape, model_shape, synthesis_floor

    bundle = gpu_check.build_bundle(gpu_check.Shape("tiny", 8), "cpu")
    prompts = ["a red car", "a blue bench and a green apple on a wooden table"]
    text = gpu_check.floor_text(bundle, prompts, "NVIDIA H100 80GB HBM3", 3.0)
    lengths = image_prompt_inputs(bundle.processor, prompts)[1].sum(1).tolist()
    shape = SynthesisShape.of(model_shape(bundle.model.config, count_flops=False), prompt_len=round(sum(lengths) / 2))
    floor = synthesis_floor(shape, 2, GPUS["h100"])
    assert min(lengths) < shape.prompt_len < max(lengths)
    assert text.startswith(f"3.00 images/s; {3.0 / floor.images_per_s:.1%} of the bandwidth floor "
                           f"{floor.images_per_s:.1f} images/s") and text.endswith("3.35 TB/s)")
    one = SynthesisShape.of(model_shape(kind_config("janus-pro-1b-shape", 24), count_flops=False), prompt_len=64)
    assert one.kv_bytes_per_image == pytest.approx(79.6e9, rel=1e-3)
    assert gpu_check.floor_text(bundle, prompts, "NVIDIA GeForce RTX 4090", 5.0) == \
        "5.00 images/s; floor unknown (NVIDIA GeForce RTX 4090)"


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                      ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
                                      ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
                                      ("NVIDIA A100 80GB PCIe", None), ("NVIDIA L40S", None)])
def test_gpu_names_map_to_the_planners_bandwidths(name, key):
    assert gpu_check.gpu_spec(name) is (GPUS[key] if key else None)


def test_a_model_is_built_in_bf16_on_the_device_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OSPO_FAST_CACHE", str(tmp_path))
    bundle = gpu_check.build_bundle(gpu_check.Shape("tiny", 4), "cpu")
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    assert bundle.device.type == "cpu" and bundle.grid == 4 and not bundle.model.training
    assert bundle.source == "builtin:tiny-4" and bundle.random_init and not any(tmp_path.iterdir())
