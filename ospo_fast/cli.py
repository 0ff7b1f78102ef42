"""The ``ospo-fast`` command. Subcommands stay thin: they parse arguments and call library functions.

  ospo-fast env                          which backends are live
  ospo-fast make-model KIND OUT          save a random-initialised offline Janus model
  ospo-fast run --out DIR [--preset P] [k=v..]     all five stages, summary (the main job)
  ospo-fast synth --out DIR [--preset P] [k=v..]   stages 1-4 (resumable, torchrun-aware)
  ospo-fast report DIR                   static HTML report of a run
  ospo-fast export DIR                   Parquet dataset of the pairs
  ospo-fast eval-gen --format F --prompts P --out DIR   benchmark images in the evaluator's layout
  ospo-fast train --pairs F --out DIR [--preset P] [k=v..]   stage 5: Obj-SimPO + SFT (torchrun-aware)
  ospo-fast import --data F --images DIR --out DIR [--masks DIR]   the OSPO authors' pairs as a run directory
  ospo-fast merge-lora ADAPTER OUT [--base PATH]   fold a LoRA checkpoint into a standalone model
  ospo-fast config [--preset P] [k=v..]  print the resolved config
  ospo-fast plan --preset P --gpus N --gpu G [k=v..]   per-stage work, batches, memory and hours (no model loads)
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

import yaml


def _cmd_env(args: argparse.Namespace) -> int:
    from ospo_fast._backend import backend_report

    report = {"ospo_fast": version_text().removeprefix("ospo-fast ")} | backend_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print("\nwhat runs where on this machine:")
    for line in backend_meaning(report):
        print(f"  {line}")
    return 0


def backend_meaning(report: dict) -> list[str]:
    """What the live backends mean here: which kernels ``backend="auto"`` runs, and where Triton's go."""
    cuda, triton, interpret, cpp = (report.get(k) for k in ("cuda", "triton", "triton_interpret", "cpp_ops"))
    if cuda and triton:
        kernels = "Triton kernels run on the GPU (auto picks them for CUDA tensors)"
    elif triton and interpret:
        kernels = "Triton kernels run through the interpreter on CPU tensors (TRITON_INTERPRET=1: tests only, slow)"
    elif triton:
        kernels = ("Triton is installed but has no GPU here: its kernels do not run (TRITON_INTERPRET=1 runs them on "
                   "the CPU, slowly, as CI does)")
    else:
        kernels = "no Triton: the GPU kernels are unavailable; the PyTorch references run instead"
    cpu = ("CPU ops use the C++ extension (ospo_fast._C)" if cpp else
           "CPU ops use the PyTorch references (the C++ extension is not built: make install builds it)")
    device = "models run on the GPU (model.device=auto)" if cuda else "models run on the CPU (no CUDA device)"
    return [device, kernels, cpu]


def _cmd_make_model(args: argparse.Namespace) -> int:
    from ospo_fast.models.factory import build_offline_model

    out = build_offline_model(args.kind, args.out, grid=args.grid, seed=args.seed)
    print(f"saved {args.kind} (grid {args.grid}) to {out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from ospo_fast.plan import plan_report

    try:
        print(plan_report(args.preset, args.overrides, gpus=args.gpus, gpu_name=args.gpu))
    except ValueError as err:  # an unknown GPU (the valid names listed), gpus < 1, a config problem
        print(f"ospo-fast: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from ospo_fast.config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.preset, args.overrides)), sort_keys=False))
    return 0


HUB_PRESETS = ("janus-pro-1b", "janus-pro-7b")  # presets whose model.path must be given: weights are never fetched


def _load(args: argparse.Namespace):
    """The resolved config; a janus-pro preset without an explicit model path stops here, before anything loads
    or is created."""
    from ospo_fast.config import ConfigError, load_config

    explicit = getattr(args, "model", None) or any(o.startswith("model.path=") for o in args.overrides)
    if args.preset in HUB_PRESETS and not explicit:
        size = args.preset.rsplit("-", 1)[1].upper()
        raise ConfigError(f"preset {args.preset} needs model.path: add model.path=/path/to/Janus-Pro-{size} (a local "
                          f"checkpoint directory), or model.path=deepseek-community/Janus-Pro-{size} to download it "
                          "from the hub")
    config = load_config(args.preset, args.overrides)
    if args.preset in HUB_PRESETS and config.model.device == "auto":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"preset {args.preset} is sized for a GPU and torch sees none (a Janus-Pro image takes "
                              "minutes on a CPU); run it on a CUDA machine, or add model.device=cpu to run here anyway")
    return config


def _check_inputs(config, out: str) -> None:
    """Before any model loads or anything is written: read the user's prompt file (when prompts.source=file), check
    model.path (a mistyped one stops here, not at stage 3) and make sure ``out`` is a directory this process can
    write (OSError otherwise, reported in one line by ``main``)."""
    if config.prompts.source == "file":
        from ospo_fast.stages.prompts import read_prompt_file

        read_prompt_file(config.prompts.file)
    _check_model(config.model.path)
    writable_dir(out)


def _check_model(path: str) -> None:
    from ospo_fast.models.loader import check_model_path

    check_model_path(path)


def _write_lock(out: str):
    """The write lock of ``out`` (``store.directory_lock``), held by rank 0 of a torchrun job (its other ranks
    write into the same directory under it) or by a lone process."""
    import contextlib

    from ospo_fast.store import directory_lock

    return directory_lock(out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


def writable_dir(path: str) -> None:
    """``path`` is a directory this process could create or write into, checked without creating it (a command
    that stops before its first write leaves nothing behind); an OSError otherwise."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), existing)


def _cmd_synth(args: argparse.Namespace) -> int:
    from ospo_fast.pipeline import run_synthesis
    from ospo_fast.report import write_report

    config = _load(args)
    _check_inputs(config, args.out)
    with _write_lock(args.out):
        pairs = run_synthesis(config, args.out, redo=args.redo)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{len(pairs)} pairs in {args.out}/pairs.jsonl; report: {write_report(args.out)}")
        if not pairs:
            print("no pair survived the filter (see the report's reasons); a random-initialised model's answers "
                  "rarely pass it: set filter.enabled=false to exercise the machinery, or lower filter.tau")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ospo_fast.run import format_summary, run_ospo

    config = _load(args)
    _check_inputs(config, args.out)
    with _write_lock(args.out):
        summary = run_ospo(config, args.out, redo=args.redo)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary, args.out))
        reports = [os.path.join(args.out, f"iter{it['iteration']}", "synth", "report.html")
                   for it in summary["iterations"]]
        print(f"\nsummary: {os.path.join(args.out, 'summary.json')}; reports: {', '.join(reports)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ospo_fast.export import synth_dirs
    from ospo_fast.report import write_report

    for synth_dir in synth_dirs(args.run_dir):  # refuses a missing directory or one that holds no run
        print(write_report(synth_dir))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ospo_fast.export import export_parquet

    for path in export_parquet(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_eval_gen(args: argparse.Namespace) -> int:
    from ospo_fast.evalgen import check_out, generate, plan, where_to_point
    from ospo_fast.models import load_janus
    from ospo_fast.models.loader import model_identity

    config = _load(args)
    path = args.model or config.model.path
    settings = dict(samples=args.samples, seed=config.seed, images=config.images)
    plan(args.format, args.prompts, args.out, **settings)  # the prompt file first: its mistakes are named first
    _check_model(path)
    writable_dir(args.out)
    # the model's identity (its content: hashing it, building a builtin or fetching a hub id) only now
    todo = plan(args.format, args.prompts, args.out, **settings, model=model_identity(path))
    check_out(todo)  # a mismatched --out is refused before the model loads
    from ospo_fast.models.loader import pick_device
    from ospo_fast.plan import resolve_auto_batches

    # images.batch_size=auto -> a number (printed), from the memory free before the weights load
    config = resolve_auto_batches(config, pick_device(config.model.device))
    bundle = load_janus(path, dtype=config.model.dtype, device=config.model.device,
                        attn_implementation=config.model.attn_implementation)
    made = generate(bundle, todo, config.images)
    print(f"{made} images written under {args.out} ({len(todo.jobs) - made} were there already); "
          f"{where_to_point(todo)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ospo_fast.train import CheckpointError, PairsFileError, TrainingDivergedError, read_pairs, train

    try:
        config = _load(args)
        read_pairs(args.pairs)  # a bad pairs file, model path or --out is reported before the model loads
        _check_model(config.model.path)
        writable_dir(args.out)
        with _write_lock(args.out):
            result = train(config, args.pairs, args.out, resume=not args.no_resume)
    except (PairsFileError, TrainingDivergedError, CheckpointError) as err:
        print(f"ospo-fast: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.steps} steps ({result.skipped_nonfinite} skipped); checkpoint {result.checkpoint_dir}; "
              f"merged {result.merged_dir}; metrics {result.metrics_path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ospo_fast.importer import ImportSettings, import_pairs

    config = _load(args)
    settings = ImportSettings(data=Path(args.data), images=Path(args.images),
                              masks=None if args.masks is None else Path(args.masks), strip_prefix=args.strip_prefix,
                              objects_field=args.objects_field, chunk_size=args.chunk_size, batch_size=args.batch_size)
    _check_model(config.model.path)
    writable_dir(args.out)
    with _write_lock(args.out):
        summary = import_pairs(config, settings, args.out, redo=args.redo)
    print(summary.format())
    if not summary.already_done:
        print(f"train on them: ospo-fast train --pairs {Path(args.out) / 'pairs.jsonl'} --out TRAIN_DIR "
              f"--preset {args.preset} model.path={config.model.path}")
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from ospo_fast.train import merge_lora

    try:
        print(merge_lora(args.adapter, args.out, base_path=args.base, dtype=args.dtype))
    except (FileNotFoundError, ValueError) as err:
        print(f"ospo-fast: error: {err}", file=sys.stderr)
        return 2
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="a preset name (toy, tiny, janus-pro-1b, janus-pro-7b) or a .yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. prompts.num_prompts=100")


def version_text() -> str:
    """``ospo-fast --version``: the package version and, in a git checkout, its commit."""
    import subprocess
    from pathlib import Path

    from ospo_fast import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"ospo-fast {__version__} (commit {commit})"


def build_parser() -> argparse.ArgumentParser:
    from ospo_fast.stages import STAGES  # light: the parser imports nothing heavy, so --help answers at once

    parser = argparse.ArgumentParser(prog="ospo-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print versions and live backends")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("make-model", help="save a random-initialised offline Janus model")
    p.add_argument("kind", choices=["tiny", "janus-pro-1b-shape", "janus-pro-7b-shape"],
                   help="model size: tiny (CPU tests), or Janus-Pro-1B/7B layer shapes with random weights")
    p.add_argument("out", help="directory to save the model, processor and generation config into")
    p.add_argument("--grid", type=int, default=8, help="image-token grid side (tiny only; 8 or 24)")
    p.add_argument("--seed", type=int, default=0, help="random-initialisation seed")
    p.set_defaults(func=_cmd_make_model)

    p = sub.add_parser("run", help="all five stages (and iterations), then a closing summary")
    p.add_argument("--out", required=True, help="run directory (re-running resumes)")
    p.add_argument("--redo", default=None, choices=STAGES, metavar="STAGE",
                   help=f"recompute this synthesis stage and every later one: {', '.join(STAGES)}")
    _add_config_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("synth", help="stages 1-4: prompts, perturbations, images + masks, Self-VQA, selection")
    p.add_argument("--out", required=True, help="run directory (re-running resumes)")
    p.add_argument("--redo", default=None, choices=STAGES, metavar="STAGE",
                   help=f"recompute this stage and every later one: {', '.join(STAGES)}")
    _add_config_args(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("report", help="write the static HTML report of a run directory")
    p.add_argument("run_dir", help="a run directory (every iteration) or one synth directory")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="export the pairs of a run as Parquet (TRL-style columns)")
    p.add_argument("run_dir", help="a run or synth directory holding pairs.jsonl")
    p.add_argument("--out", default=None, help="Parquet file to write (default: <run_dir>/pairs.parquet)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval-gen", help="generate benchmark images (GenEval, T2I-CompBench++, DPG-Bench layouts)")
    p.add_argument("--format", required=True, choices=["geneval", "t2i-compbench", "dpg-bench"],
                   help="which evaluator's folder layout to write")
    p.add_argument("--prompts", required=True, help="GenEval metadata .jsonl, a prompt-per-line .txt, or a DPG dir")
    p.add_argument("--out", required=True, help="output directory (a rerun with other inputs is refused)")
    p.add_argument("--model", default=None, help="checkpoint to use instead of model.path (e.g. a merged one)")
    p.add_argument("--samples", type=int, default=None,
                   help="images per prompt (default: the official script's, GenEval 4, T2I-CompBench 10, DPG 4)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval_gen)

    p = sub.add_parser("train", help="stage 5: Obj-SimPO + SFT training on a pairs.jsonl (resumes from --out)")
    p.add_argument("--pairs", required=True, help="pairs file written by synth (<run_dir>/pairs.jsonl)")
    p.add_argument("--out", required=True, help="training directory: checkpoints, metrics.jsonl, merged/")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("import", help="turn the OSPO authors' released pairs (their JSON, images and masks) into a "
                       "run directory that train reads")
    p.add_argument("--data", required=True,
                   help="the authors' train JSON: a list of {item_id, prompt, chosen, rejected, t2i_category, ...}")
    p.add_argument("--images", required=True,
                   help="folder the JSON's chosen/rejected image paths are read under (nothing outside it is read)")
    p.add_argument("--out", required=True,
                   help="run directory to write (pairs.jsonl, images/, import/rejects.jsonl); a rerun resumes")
    p.add_argument("--masks", default=None,
                   help="the authors' mask_dir (base/ and negative/<t2i_category>/<item_id>/<name>_mask.pt); "
                   "without it the masks are computed with the model's own attention")
    p.add_argument("--strip-prefix", default=None,
                   help="leading part of the JSON's image paths to remove before reading them under --images "
                   "(the authors' files hold absolute paths of their machines)")
    p.add_argument("--objects-field", default="nouns",
                   help="item field listing the object words for computed masks (default: nouns, as the authors' "
                   "extract_object_v2.py writes it); items without it take the objects from the prompt's phrases")
    p.add_argument("--redo", action="store_true", help="import again into --out, replacing the import there")
    p.add_argument("--chunk-size", type=int, default=64, help="items per committed chunk (the unit a rerun resumes)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward of the model (VQ encoder, masks)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("merge-lora", help="merge a LoRA checkpoint into a standalone model directory")
    p.add_argument("adapter", help="a checkpoint directory holding adapter_model.safetensors")
    p.add_argument("out", help="directory for the merged, standalone model")
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights")
    p.set_defaults(func=_cmd_merge_lora)

    p = sub.add_parser("plan", help="predict per-stage work, batch sizes, memory per GPU and hours for a preset")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel)")
    p.add_argument("--gpu", default="h100", help="a100-40gb, a100-80gb, h100 or h200")
    _add_config_args(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)  # the same default preset (toy) as every other command
    p.set_defaults(func=_cmd_config)
    return parser


KEPT = {"run": "finished stages, chunks and checkpoints", "synth": "finished stages and chunks",
        "train": "saved checkpoints", "eval-gen": "the images written so far", "import": "finished chunks"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; overrides may come before and after options (``run k=v --out X k2=v2``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in subparsers.choices:
        args = subparsers.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, a missing or unknown command: argparse's own message


def _os_error(err: OSError) -> str:
    where = err.filename or "a file"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable --out or fix its permissions"
    elif err.errno == errno.ENOSPC:
        fix = "free some disk space, then re-run the same command to resume"
    else:
        fix = "check the path"
    return f"cannot use {where} ({err.strerror}); {fix}"


def main(argv: list[str] | None = None) -> int:
    from ospo_fast.threads import configure_cpu_threads

    configure_cpu_threads()  # before torch loads OpenMP: passive wait, threads from affinity and load
    from ospo_fast.quiet import quiet_libraries

    quiet_libraries()  # other libraries' known warnings, by exact message (ospo_fast/quiet.py says why)
    args = parse_args(argv)  # --help and --version end here, before torch or transformers is imported
    from ospo_fast.config import ConfigError
    from ospo_fast.evalgen import PromptFileError
    from ospo_fast.models.loader import ModelLoadError
    from ospo_fast.run import NoPairsError
    from ospo_fast.store import StoreError
    from ospo_fast.train import CheckpointError, PairsFileError, TrainingDivergedError

    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, PromptFileError, NoPairsError, StoreError, PairsFileError,
            CheckpointError, TrainingDivergedError) as err:  # e.g. a 2-process training resumed by 1 process
        print(f"ospo-fast: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"ospo-fast: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        if args.command in KEPT and out:
            print(f"\nospo-fast: interrupted; {KEPT[args.command]} in {out} are kept: run the same command again "
                  "to resume", file=sys.stderr)
        else:
            print("\nospo-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
