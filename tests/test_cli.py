"""The command line: intermixed overrides, one-line errors for user mistakes (exit 2), Ctrl-C (exit 130), argument
checks before any model loads, real paths in the closing summary, no absolute paths in a run's files."""

import json
import os

import pytest
import torch
import yaml

from ospo_fast import _backend
from ospo_fast.cli import main
from ospo_fast.pipeline import STAGES

TINY = ["model.path=builtin:tiny-4", "prompts.num_prompts=2", "densify.enabled=false", "perturb.num_perturbations=1",
        "images.batch_size=4", "filter.enabled=false", "train.max_steps=1", "train.per_device_batch=2",
        "train.save_every=1", "eval.toy_heldout_prompts=0"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ospo-fast: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_env_lists_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "cpp_ops", "triton", "cuda", "flash_attn"):
        assert key in out


@pytest.mark.skipif(not _backend.cpp_available(), reason="the C++ extension is not built")
def test_env_lists_the_registered_cpp_ops(capsys):
    registered = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                        if n.startswith("ospo_fast_C::"))
    assert "object_masks_otsu" in registered
    assert main(["env"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpp_op_names"))
    assert line.split(None, 1)[1] == str(registered)


def test_config_error_exit_code(capsys):
    assert main(["config", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err


def test_overrides_before_and_after_options_mix(capsys):
    assert main(["config", "seed=3", "--preset", "tiny", "images.batch_size=2"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 3 and resolved["images"]["batch_size"] == 2


def test_redo_is_checked_at_once_and_help_lists_the_stages(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--out", str(tmp_path / "r"), "--redo", "foo"])
    assert exit_.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    for command in ("run", "synth"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert ", ".join(STAGES) in text


@pytest.mark.parametrize("command", [["run"], ["synth"]])
def test_hub_presets_need_an_explicit_model_path(tmp_path, capsys, command):
    out = tmp_path / "r"
    assert main([*command, "--preset", "janus-pro-1b", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "model.path=" in err and "janus-pro-1b" in err
    assert not out.exists()


def test_hub_preset_eval_gen_needs_a_model(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["eval-gen", "--format", "t2i-compbench", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--preset", "janus-pro-7b"]) == 2
    assert "Janus-Pro-7B" in _one_line_error(capsys)


def test_report_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"), ("", "holds no prompts"), ("not json\n", ":1 is not JSON"),
    ("[1, 2]\n", ":1 is a list"),
])
def test_prompt_file_errors_are_one_line_before_the_model_loads(tmp_path, capsys, content, match):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    code = main(["synth", "--preset", "tiny", "--out", str(tmp_path / "r"), "prompts.source=file",
                 f"prompts.file={path}", f"model.path={tmp_path / 'no-model'}"])
    err = _one_line_error(capsys)
    assert code == 2 and match in err and str(path) in err and "no-model" not in err


def test_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["eval-gen", "--format", "t2i-compbench", "--prompts", str(prompts), "--out", str(blocker / "o"),
                 "--preset", "tiny", "model.path=builtin:tiny-4", "--samples", "1"])
    assert code == 2 and "a-file" in _one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["eval-gen", "--format", "t2i-compbench", "--prompts", str(prompts), "--out", str(ro / "o"),
                 "--preset", "tiny", "model.path=builtin:tiny-4", "--samples", "1"])
    assert code == 2 and "writable --out" in _one_line_error(capsys)


def test_ctrl_c_says_what_is_kept_and_how_to_resume(tmp_path, capsys, monkeypatch):
    import ospo_fast.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ospo_fast.pipeline, "run_synthesis", interrupted)
    assert main(["synth", "--preset", "tiny", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "kept" in err and str(tmp_path / "r") in err and "again" in err


def test_run_prints_real_paths_writes_no_absolute_ones_and_a_rerun_returns_at_once(tmp_path, capsys, monkeypatch):
    """Two iterations from a relative --out: the printed report paths exist; no file of the run names this
    machine's directories (tmp dir, model cache); running the finished run again recomputes nothing."""
    import ospo_fast.run
    from ospo_fast.models.loader import resolve_model_path

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--preset", "tiny", "--out", "demo", "iterations=2", *TINY]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    reports = last.split("reports: ")[1].split(", ")
    assert reports == ["demo/iter1/synth/report.html", "demo/iter2/synth/report.html"]
    assert all(os.path.isfile(r) for r in reports)
    assert "model after: demo/iter1/train/merged" in printed and "densify off (passed through)" in printed
    assert main(["report", "demo"]) == 0  # the run directory `run` printed: one report per iteration
    assert capsys.readouterr().out.split() == reports

    cache = os.path.dirname(resolve_model_path("builtin:tiny-4"))
    names = ["summary.json", "iter2/synth/config.yaml", "iter1/train/merged/ospo_merge.json",
             "iter2/train/merged/ospo_merge.json"]
    names += [os.path.relpath(os.path.join(d, f), "demo") for d, _, files in os.walk("demo/iter2/train/checkpoints")
              for f in files if f in ("adapter_config.json", "README.md")]
    assert any(n.endswith("README.md") for n in names) and any(n.endswith("adapter_config.json") for n in names)
    for name in names:
        text = (tmp_path / "demo" / name).read_text()
        assert str(tmp_path) not in text and cache not in text, name
    merge = json.loads((tmp_path / "demo" / "iter2" / "train" / "merged" / "ospo_merge.json").read_text())
    assert merge["base"] == "demo/iter1/train/merged" and not os.path.isabs(merge["adapter"])
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [it["model"] for it in summary["iterations"]] == ["iter1/train/merged", "iter2/train/merged"]

    step = sorted(os.listdir("demo/iter2/train/checkpoints"))[-1]
    monkeypatch.chdir(tmp_path / "demo")  # the recorded base is relative to where the run started
    assert main(["merge-lora", f"iter2/train/checkpoints/{step}", "m"]) == 2
    assert "demo/iter1/train/merged" in (err := _one_line_error(capsys)) and "--base" in err
    monkeypatch.chdir(tmp_path)

    def recompute(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(ospo_fast.run, "Pipeline", recompute)
    monkeypatch.setattr(ospo_fast.run, "_evaluate", recompute)
    assert main(["run", "--preset", "tiny", "--out", "demo", *TINY, "iterations=2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == last

    # the summary is printed only while what it stands for is there: not once a trained model it names is gone,
    # nor over a training recorded with other settings (a resume bug once left such a summary over stale weights)
    os.rename("demo/iter2/train/merged", "moved")
    with pytest.raises(AssertionError, match="recomputed"):
        main(["run", "--preset", "tiny", "--out", "demo", *TINY, "iterations=2"])
    os.rename("moved", "demo/iter2/train/merged")
    recorded = tmp_path / "demo" / "iter1" / "train" / "fingerprint.json"
    original = recorded.read_text()
    recorded.write_text(json.dumps({**json.loads(original), "loss.uncond_anchor": 10.0}))
    with pytest.raises(AssertionError, match="recomputed"):
        main(["run", "--preset", "tiny", "--out", "demo", *TINY, "iterations=2"])
    recorded.write_text(original)
    assert main(["run", "--preset", "tiny", "--out", "demo", *TINY, "iterations=2"]) == 0  # whole again: at once
    capsys.readouterr()

    # Was: a finished run printed its saved summary without checking anything. Now everything the summary was made
    # from is re-checked first: a changed file is one line naming it (exit 2), never a summary over other data.
    pairs = json.loads(open("demo/iter1/synth/pairs.jsonl").readline())
    damaged = {"a PNG of the pairs": "demo/iter1/synth/" + pairs["chosen"]["image"],
               "the trained weights": "demo/iter2/train/merged/model.safetensors",
               "a metrics line": "demo/iter1/train/metrics.jsonl",
               "the synthesis manifest": "demo/iter2/synth/manifest.json"}
    for what, name in damaged.items():
        data = open(name, "rb").read()
        middle = len(data) // 2
        open(name, "wb").write(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
        assert main(["run", "--preset", "tiny", "--out", "demo", *TINY, "iterations=2"]) == 2, what
        assert os.path.basename(name) in _one_line_error(capsys), what
        open(name, "wb").write(data)
    assert main(["run", "--preset", "tiny", "--out", "demo", *TINY, "iterations=2"]) == 0


def test_summary_defines_strict_and_loose():
    from ospo_fast.run import JUDGE_TERMS, format_summary

    judged = {"n": 4, "strict": 0.25, "loose": 0.5, "per_category": {"color": {"n": 4, "strict": 0.25, "loose": 0.5}}}
    text = format_summary({"random_init": False, "model": "builtin:toy", "iterations": [],
                           "alignment": {"before": judged}})
    assert JUDGE_TERMS in text and text.index(JUDGE_TERMS) < text.index("strict 25.0%")


def test_synth_with_no_surviving_pair_says_why(tmp_path, capsys):
    code = main(["synth", "--preset", "tiny", "--out", str(tmp_path / "s"), "model.path=builtin:tiny-4",
                 "prompts.num_prompts=1", "perturb.num_perturbations=1", "densify.enabled=false",
                 "filter.tau=1.0"])  # a random model's S is near 0 < 1: nothing passes
    out = capsys.readouterr().out
    assert code == 0 and "0 pairs" in out and "filter.enabled=false" in out


def test_help_and_version_import_neither_torch_nor_transformers():
    """``--help`` of the command and of every subcommand, and ``--version``, answer before any heavy import (they
    took 10-19 s when transformers was imported first); the version names the commit."""
    import subprocess
    import sys

    from ospo_fast.cli import build_parser

    commands = [[]] + [[name] for name in build_parser()._subparsers._group_actions[0].choices]
    probe = ("import sys\nfrom ospo_fast.cli import main\nfor argv in {argvs!r}:\n    try:\n        main(argv)\n"
             "    except SystemExit:\n        pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers') "
             "if m in sys.modules))\n")
    argvs = [c + ["--help"] for c in commands] + [["--version"]]
    out = subprocess.run([sys.executable, "-c", probe.format(argvs=argvs)], capture_output=True, text=True,
                         check=True).stdout
    assert "HEAVY []" in out, out[-2000:]
    assert "ospo-fast 0." in out and "(commit " in out


def test_every_argument_has_help():
    from ospo_fast.cli import build_parser

    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"ospo-fast {name}: {action.dest} has no help text"


def test_env_says_what_runs_where(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "what runs where on this machine:" in out and "ospo_fast " in out
    assert ("Triton kernels run on the GPU" in out) == torch.cuda.is_available()


def test_a_mistyped_model_path_stops_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), f"model.path={tmp_path / 'Janus-Pro-1b-typo'}"]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert not out.exists() and not out.parent.exists()
    assert main(["synth", "--preset", "tiny", "--out", str(out), "model.path=builtin:tiny-x"]) == 2
    assert "unknown built-in model" in _one_line_error(capsys)
    assert not out.parent.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_janus_pro_preset_without_a_gpu_stops_at_once_unless_asked_for_the_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "janus-pro-7b", "--out", str(out), f"model.path={tmp_path / 'Janus-Pro-7B'}"]) == 2
    err = _one_line_error(capsys)
    assert "torch sees none" in err and "model.device=cpu" in err
    assert main(["run", "--preset", "janus-pro-7b", "--out", str(out), f"model.path={tmp_path / 'Janus-Pro-7B'}",
                 "model.device=cpu"]) == 2  # asked for the CPU: it goes on, to the (missing) model
    assert "does not exist" in _one_line_error(capsys)
    assert not out.exists()


def test_a_second_writer_of_a_run_directory_stops_at_once(tmp_path, capsys):
    """Two `train` (or `run`, `synth`) processes on one --out: the second stops with one line naming the holder;
    the holder's lock goes with its process. A refused start leaves a directory it created empty of its files."""
    import fcntl
    import socket

    from ospo_fast.store import LOCK_FILE, directory_lock

    out = tmp_path / "run"
    with directory_lock(out):
        assert main(["run", "--preset", "tiny", "--out", str(out)]) == 2
        err = _one_line_error(capsys)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "choose another --out" in err
    with open(out / LOCK_FILE) as handle:  # released: anyone can take it now
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="model failed"), directory_lock(fresh):
        raise RuntimeError("model failed to load")
    assert not fresh.exists()
