"""The ``ospo-fast`` command. Subcommands stay thin: they parse arguments and call library functions.

  ospo-fast env                          which backends are live
  ospo-fast make-model KIND OUT          save a random-initialised offline Janus model
  ospo-fast run --out DIR [--preset P] [k=v..]     all five stages, summary (the main job)
  ospo-fast synth --out DIR [--preset P] [k=v..]   stages 1-4 (resumable, torchrun-aware)
  ospo-fast report DIR                   static HTML report of a run
  ospo-fast export DIR                   Parquet dataset of the pairs
  ospo-fast eval-gen --format F --prompts P --out DIR   benchmark images in the evaluator's layout
  ospo-fast train --pairs F --out DIR [--preset P] [k=v..]   stage 5: Obj-SimPO + SFT (torchrun-aware)
  ospo-fast merge-lora ADAPTER OUT [--base PATH]   fold a LoRA checkpoint into a standalone model
  ospo-fast config [--preset P] [k=v..]  print the resolved config
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml


def _cmd_env(args: argparse.Namespace) -> int:
    from ospo_fast._backend import backend_report

    report = backend_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_make_model(args: argparse.Namespace) -> int:
    from ospo_fast.models.factory import build_offline_model

    out = build_offline_model(args.kind, args.out, grid=args.grid, seed=args.seed)
    print(f"saved {args.kind} (grid {args.grid}) to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from ospo_fast.config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.preset, args.overrides)), sort_keys=False))
    return 0


def _load(args: argparse.Namespace):
    from ospo_fast.config import load_config

    return load_config(args.preset, args.overrides)


def _cmd_synth(args: argparse.Namespace) -> int:
    from ospo_fast.pipeline import run_synthesis
    from ospo_fast.report import write_report

    pairs = run_synthesis(_load(args), args.out, redo=args.redo)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{len(pairs)} pairs in {args.out}/pairs.jsonl; report: {write_report(args.out)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ospo_fast.run import format_summary, run_ospo

    summary = run_ospo(_load(args), args.out, redo=args.redo)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"\nsummary: {args.out}/summary.json; reports: {args.out}/iter*/synth/report.html")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ospo_fast.report import write_report

    print(write_report(args.run_dir))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ospo_fast.export import export_parquet

    for path in export_parquet(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_eval_gen(args: argparse.Namespace) -> int:
    from ospo_fast.evalgen import check_out, generate, model_identity, plan, where_to_point
    from ospo_fast.models import load_janus

    config = _load(args)
    path = args.model or config.model.path
    todo = plan(args.format, args.prompts, args.out, samples=args.samples, seed=config.seed, images=config.images,
                model=model_identity(path))
    check_out(todo)  # inputs first: a bad prompt file or a mismatched --out never waits for a model to load
    bundle = load_janus(path, dtype=config.model.dtype, device=config.model.device,
                        attn_implementation=config.model.attn_implementation)
    made = generate(bundle, todo, config.images)
    print(f"{made} images written under {args.out} ({len(todo.jobs) - made} were there already); "
          f"{where_to_point(todo)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ospo_fast.train import CheckpointError, PairsFileError, TrainingDivergedError, train

    try:
        result = train(_load(args), args.pairs, args.out, resume=not args.no_resume)
    except (PairsFileError, TrainingDivergedError, CheckpointError) as err:
        print(f"ospo-fast: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.steps} steps ({result.skipped_nonfinite} skipped); checkpoint {result.checkpoint_dir}; "
              f"merged {result.merged_dir}; metrics {result.metrics_path}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ospo-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print versions and live backends")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("make-model", help="save a random-initialised offline Janus model")
    p.add_argument("kind", choices=["tiny", "janus-pro-1b-shape", "janus-pro-7b-shape"])
    p.add_argument("out")
    p.add_argument("--grid", type=int, default=8, help="image-token grid side (tiny only; 8 or 24)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_model)

    p = sub.add_parser("run", help="all five stages (and iterations), then a closing summary")
    p.add_argument("--out", required=True, help="run directory (re-running resumes)")
    p.add_argument("--redo", default=None, help="recompute this synthesis stage and every later one")
    _add_config_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("synth", help="stages 1-4: prompts, perturbations, images + masks, Self-VQA, selection")
    p.add_argument("--out", required=True, help="run directory (re-running resumes)")
    p.add_argument("--redo", default=None, help="recompute this stage and every later one")
    _add_config_args(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("report", help="write the static HTML report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="export the pairs of a run as Parquet (TRL-style columns)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval-gen", help="generate benchmark images (GenEval, T2I-CompBench++, DPG-Bench layouts)")
    p.add_argument("--format", required=True, choices=["geneval", "t2i-compbench", "dpg-bench"])
    p.add_argument("--prompts", required=True, help="GenEval metadata .jsonl, a prompt-per-line .txt, or a DPG dir")
    p.add_argument("--out", required=True)
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

    p = sub.add_parser("merge-lora", help="merge a LoRA checkpoint into a standalone model directory")
    p.add_argument("adapter", help="a checkpoint directory holding adapter_model.safetensors")
    p.add_argument("out")
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_cmd_merge_lora)

    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("--preset", default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ospo_fast.config import ConfigError
    from ospo_fast.evalgen import PromptFileError
    from ospo_fast.models.loader import ModelLoadError
    from ospo_fast.run import NoPairsError
    from ospo_fast.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, PromptFileError, NoPairsError, StoreError) as err:
        print(f"ospo-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
