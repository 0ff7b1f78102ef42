"""Build the toy Janus (``builtin:toy``): a small ``JanusForConditionalGeneration`` trained on the toy world, on a
CPU, in resumable phases.

  python recipes/toy_janus/build_model.py --out ospo_fast/assets/toy_janus --seed 0

A training recipe, kept beside the library (as torchtune keeps its recipes): the library needs only what it ships
(``ospo_fast/assets/toy_janus``, ``ospo_fast.toy``'s world and judge), never this recipe. This file is its command
line and sequences the phases; beside it: ``model`` (sizes, ``BuildConfig``, the architecture, warm starts),
``data`` (scenes, grid cells, questions), ``vq`` (phases vq, vqdec), ``vision`` (phase vis), ``losses`` and
``multitask`` (phases mm, t2i, und), ``evaluate`` (the figures), ``report`` (BUILD.md); ``probes/`` measures
the built model.

Phases (each saves its result under ``--work``; a rerun skips finished phases):
1. ``vq``: the VQ-VAE (64x64 px -> 8x8 grid, 512 codes) on rendered scenes. Janus decodes through
   L2-normalised codebook entries, so training quantises L2-normalised latents against a normalised codebook
   (stored normalised, so ``encode``'s Euclidean argmin equals the cosine argmin). Against collapse to the plain
   background: codebook initialised from encoder outputs, dead codes restarted from recent encoder outputs, and
   foreground pixels weighted ``fg_weight`` times in the reconstruction loss.
   ``vqdec``: then the decoder side alone on the frozen tokens (sharper shapes; tokens do not change, so it can
   run beside phase mm, as it did for the shipped build). ``vqdec_more``: a warm restart of it on the saved decoder
   for ``--vqdec-minutes`` more.
1c. ``--vq-local-weight W`` (phase vq): the toy VQ's encoder sees the whole image (GroupNorm statistics, attention
   at the 8x8 level), so a cell of plain background gets a code that depends on the objects elsewhere: in the v2.1
   VQ, 1.4% of background cells keep the code they have in an empty image, and 80% of what the caption tells the
   generator goes into predicting background tokens (BUILD.md, "Why two targets stay unmet"). This adds ``W`` x
   the squared distance between each background cell's (normalised) latent and the same cell's latent in the
   empty image, so that background codes say "background here" and the objects' words matter where the objects
   are. Tokenizer pretraining; the decoder's attention is not touched. With ``--init``, a retrained VQ resets the
   generation embeddings to the new codebook (as phase mm does), since the old ones name the old codes. Weight 1
   (12 min) made 28% of background codes local and did not move the masks; weight 10 (25 min) made 58% local, and
   the continuation on it grounds (masks 1.4-1.7x chance against 1.1x) and draws better (BUILD.md, "A local enough
   VQ"; that model ships as ``builtin:toy`` v2.2).
1b. ``vis`` (optional, ``--vis-minutes``): the SigLIP tower alone, with a linear read-out of its last hidden states
   trained on dense per-patch targets (``patch_labels``: the colour and shape of the object covering each patch,
   and the patch's row and column), so that the understanding path tells shapes apart and keeps positions before
   the decoder learns to read it. Pretraining of the understanding path only; the decoder's attention maps (the
   object masks) are not supervised. Saves ``work/vis.pt``, which later runs in that ``--work`` load.
2. ``mm``: one multitask model, like Janus: text-to-image (generation head on the image tokens after the
   chat-templated caption + ``<begin_of_image>``, the layout of transformers' Janus ``generate``; captions are
   replaced by pads with probability ``p_uncond`` so that classifier-free guidance has an unconditional branch)
   and yes/no understanding (the SigLIP tower reads the image into the placeholders; the LM head predicts the
   answer token ``"yes"`` / ``"no"`` after the understanding chat, answers balanced).
2b. ``und`` (optional, ``--und-minutes``): continues from phase mm's weights with an understanding-focused recipe:
   balanced yes/no VQA (``und_questions`` per image, as suffixes on one shared prefix, the way Self-VQA reads)
   + captioning (a suffix on the same prefix) every step, T2I every ``und_t2i_every`` steps; generation head, generation
   embeddings and generation aligner frozen; the SigLIP tower + aligner at a higher LR than the decoder.
   Resumable from ``work/und.pt``. Questions: ``UND_QUESTION_KINDS`` (shape and relation questions twice as often).
   ``--init DIR`` starts the later phases from a saved toy model instead of ``work``'s checkpoints (e.g.
   ``--init ospo_fast/assets/toy_janus --work build/und2 --out build/toy_und2 --phases und,save,eval``; BUILD.md
   records what such a continuation reached).
2c. ``--attn-weight W`` (phases mm and t2i; a diagnostic, never for the shipped model): adds ``W`` x the
   object-attention loss (``object_attention_loss``): in the mask layers the toy preset reads
   (``masks.skip_layers``), the attention of image-token queries to an object's word, normalised over the image,
   should spread over the cells the object covers. Issue #16 rules this out for ``builtin:toy`` (grounding must
   emerge, as in Janus-Pro); it exists to answer a different question: given a model whose attention does ground
   the objects, do stage 3's masks find them, and does the object weighting of the loss then pay? BUILD.md records
   both answers ("Diagnostic: a model taught to ground").
2d. ``--t2i-fg-weight W`` (phases mm and t2i): the T2I loss weights the image tokens of the cells an object covers
   ``W`` times the background's (``object_cell_weights``), as the VQ's ``fg_weight`` does for pixels: about 80% of
   the cells are plain background, which the model learns first. A property of the training images; no loss is
   put on the attention. Weight 3 for 20 min on v2.1 did no better than the same continuation without it (T2I
   12.2% / 11.6% strict, masks 1.16x / 1.09x; BUILD.md, "A local enough VQ").
3. ``eval`` + ``save``: measure the figures (codes used, judge accuracy of reconstructions, T2I strict/loose on
   held-out prompts with CFG 5, VQA accuracy on held-out captions), save fp16 weights, processor, generation
   config, ``metrics.json`` and ``BUILD.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run by path: the repository root, for ``recipes.toy_janus``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ospo_fast.models.tokenizer import build_tokenizer  # noqa: E402
from recipes.toy_janus.evaluate import TEST_N, TEST_SEED, eval_t2i, eval_vq, eval_vqa, eval_vqa_per_kind  # noqa: E402
from recipes.toy_janus.model import (  # noqa: E402
    BuildConfig,
    build_toy_processor,
    grow_decoder,
    init_decoder_from,
    init_from_saved,
    new_model,
)
from recipes.toy_janus.multitask import train_mm, train_t2i, train_und  # noqa: E402
from recipes.toy_janus.report import write_build_md  # noqa: E402
from recipes.toy_janus.vision import train_vis  # noqa: E402
from recipes.toy_janus.vq import train_vq, train_vq_decoder  # noqa: E402


def _logger(path: Path):
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ospo_fast/assets/toy_janus")
    parser.add_argument("--work", default="build/toy_janus_work", help="phase checkpoints and the log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vq-minutes", type=float, default=BuildConfig.vq_minutes)
    parser.add_argument("--mm-minutes", type=float, default=BuildConfig.mm_minutes)
    parser.add_argument("--mm-vision-lr", type=float, default=BuildConfig.mm_vision_lr,
                        help="LR of the SigLIP tower in phase mm (0: frozen; needs the tower of phase vis)")
    parser.add_argument("--mm-questions", type=int, default=BuildConfig.mm_questions,
                        help="yes/no questions per image in phase mm (1: one, as the first v2 build)")
    parser.add_argument("--vqdec-minutes", type=float, default=BuildConfig.vqdec_minutes)
    parser.add_argument("--und-minutes", type=float, default=BuildConfig.und_minutes)
    parser.add_argument("--t2i-minutes", type=float, default=BuildConfig.t2i_minutes,
                        help="phase t2i: generation-focused continuation (T2I every step), usually after --init")
    parser.add_argument("--t2i-lr", type=float, default=BuildConfig.t2i_lr)
    parser.add_argument("--t2i-vqa-every", type=int, default=BuildConfig.t2i_vqa_every,
                        help="phase t2i: one understanding batch every this many T2I steps")
    parser.add_argument("--attn-weight", type=float, default=BuildConfig.attn_weight,
                        help="phases mm/t2i, diagnostic builds only: weight of the object-attention loss (image-token "
                             "queries of the mask layers attend to an object's word where the object is drawn); "
                             "0: off, as builtin:toy must be (issue #16: grounding must emerge)")
    parser.add_argument("--vq-local-weight", type=float, default=BuildConfig.vq_local_weight,
                        help="phase vq: weight of the locality loss (background cells' latents = the empty image's)")
    parser.add_argument("--t2i-fg-weight", type=float, default=BuildConfig.t2i_fg_weight,
                        help="phases mm/t2i: weight of the T2I loss on image tokens in object cells (background 1)")
    parser.add_argument("--vis-minutes", type=float, default=BuildConfig.vis_minutes,
                        help="phase vis: per-patch pretraining of the SigLIP tower (run it with --phases vis,...)")
    parser.add_argument("--phases", default="vq,vqdec,mm,save,eval")
    parser.add_argument("--grow-after", default=None,
                        help="with --init: insert a new, identity-initialised decoder layer after each of these "
                             "comma-separated layer indices (e.g. 1,2,3: 6 -> 9 layers)")
    parser.add_argument("--init-decoder", default=None,
                        help="phase mm starts its language model, LM head and aligner from this saved toy model "
                             "(e.g. the v1 ospo_fast/assets/toy_janus); a resumed phase mm ignores it")
    parser.add_argument("--init", default=None,
                        help="start the later phases from a saved toy model (e.g. the shipped "
                             "ospo_fast/assets/toy_janus) instead of the phase checkpoints in --work")
    args = parser.parse_args(argv)
    cfg = BuildConfig(seed=args.seed, vq_minutes=args.vq_minutes, vqdec_minutes=args.vqdec_minutes,
                      mm_minutes=args.mm_minutes, mm_vision_lr=args.mm_vision_lr, mm_questions=args.mm_questions,
                      und_minutes=args.und_minutes, t2i_minutes=args.t2i_minutes, t2i_lr=args.t2i_lr,
                      t2i_vqa_every=args.t2i_vqa_every, attn_weight=args.attn_weight,
                      t2i_fg_weight=args.t2i_fg_weight, vq_local_weight=args.vq_local_weight,
                      vis_minutes=args.vis_minutes)
    torch.set_num_threads(cfg.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = _logger(work / "build.log")
    tokenizer = build_tokenizer()
    model = new_model(cfg, tokenizer)
    stats: dict = {"build": asdict(cfg)}
    phases = args.phases.split(",")
    if args.init:
        init_from_saved(model, Path(args.init), work, log)
    if args.grow_after:
        if not args.init:
            raise SystemExit("--grow-after grows a built model: give it --init DIR")
        model = grow_decoder(model, cfg, tokenizer, [int(i) for i in args.grow_after.split(",")])
        log(f"decoder grown to {cfg.layers} layers (new layers after {args.grow_after})")
        recorded = json.loads((work / "vq_stats.json").read_text())
        (work / "vq_stats.json").write_text(json.dumps({**recorded, "grow_after": args.grow_after}))
    vq_file = work / "vq.pt"
    if vq_file.is_file():
        model.model.vqmodel.load_state_dict(torch.load(vq_file))
        log(f"loaded {vq_file}")
    elif "vq" in phases:
        stats.update(train_vq(model, cfg, log))
        torch.save(model.model.vqmodel.state_dict(), vq_file)
        recorded = json.loads((work / "vq_stats.json").read_text()) if args.init else {}
        (work / "vq_stats.json").write_text(json.dumps({**recorded, **stats}))
        log(f"saved {vq_file}")
    if args.init and vq_file.is_file() and not any((work / f"{name}.pt").is_file() for name in ("t2i", "und")):
        with torch.no_grad():  # the init model's generation embeddings name its old codes (docstring 1c)
            model.model.generation_embeddings.weight.copy_(model.model.vqmodel.quantize.embedding.weight)
        log("generation embeddings reset to the retrained VQ's codebook")
    vqdec_file = work / "vq_decoder.pt"
    if vqdec_file.is_file():
        model.model.vqmodel.load_state_dict(torch.load(vqdec_file))
        log(f"loaded {vqdec_file}")
    elif "vqdec" in phases:
        stats = {**json.loads((work / "vq_stats.json").read_text()), **train_vq_decoder(model, cfg, log)}
        torch.save(model.model.vqmodel.state_dict(), vqdec_file)
        (work / "vq_stats.json").write_text(json.dumps(stats))
        log(f"saved {vqdec_file}")
    if "vqdec_more" in phases:  # a warm restart of phase vqdec on its saved decoder, for --vqdec-minutes more
        if not vqdec_file.is_file():
            raise SystemExit(f"phase vqdec_more continues {vqdec_file}, which does not exist: run phase vqdec first")
        stats = json.loads((work / "vq_stats.json").read_text())
        restart = stats.get("vqdec_restarts", 0) + 1
        more = train_vq_decoder(model, cfg, log, restart)
        stats.update(vqdec_steps=stats["vqdec_steps"] + more["vqdec_steps"], vqdec_restarts=restart)
        torch.save(model.model.vqmodel.state_dict(), vqdec_file.with_suffix(".tmp"))
        vqdec_file.with_suffix(".tmp").replace(vqdec_file)
        (work / "vq_stats.json").write_text(json.dumps(stats))
        log(f"saved {vqdec_file} after restart {restart} ({more['vqdec_steps']} more steps)")
    vis_file = work / "vis.pt"
    if vis_file.is_file():
        model.model.vision_model.load_state_dict(torch.load(vis_file)["tower"])
        log(f"loaded {vis_file}")
    elif "vis" in phases:
        vis = train_vis(model, cfg, work, log)
        (work / "vis_stats.json").write_text(json.dumps(vis))
        log(f"saved {vis_file}: {vis}")
    if "mm" in phases and cfg.mm_vision_lr == 0 and not vis_file.is_file() and not args.init:
        raise SystemExit(f"--mm-vision-lr 0 freezes the SigLIP tower, but {vis_file} does not exist: run phase vis "
                         "first (--phases vis,... --vis-minutes 10) or give the tower an LR (--mm-vision-lr 1e-3)")
    if args.init_decoder and "mm" in phases and not (work / "mm.pt").is_file():
        init_decoder_from(model, Path(args.init_decoder), log)
        recorded = json.loads((work / "vq_stats.json").read_text()) if (work / "vq_stats.json").is_file() else {}
        (work / "vq_stats.json").write_text(json.dumps({**recorded, "init_decoder": args.init_decoder}))
    run_later_phases(model, tokenizer, cfg, work, Path(args.out), phases, log)


def run_later_phases(model, tokenizer, cfg: BuildConfig, work: Path, out: Path, phases: list[str], log) -> None:
    """Phases mm, t2i and und (train, or load a finished phase's checkpoint from ``work``), save (fp16 safetensors
    + processor + generation config) and eval (through ``load_janus``, writing ``metrics.json`` and ``BUILD.md``
    into ``out``)."""
    processor = build_toy_processor(tokenizer)
    stats = json.loads((work / "vq_stats.json").read_text()) if (work / "vq_stats.json").is_file() else {}
    if (work / "vis_stats.json").is_file():
        stats.update(json.loads((work / "vis_stats.json").read_text()))
    for name, train in (("mm", train_mm), ("t2i", train_t2i), ("und", train_und)):  # in this order
        if name in phases:
            trained = train(model, processor, cfg, work, log)
            for key in (f"{name}_steps", f"{name}_minutes_trained"):  # --init: a continuation adds to the figures
                trained[key] += stats.get(key, 0)                        # of the model it starts from
            stats.update(trained)
            (work / f"{name}_stats.json").write_text(json.dumps(stats))
        elif (work / f"{name}.pt").is_file():
            model.load_state_dict(torch.load(work / f"{name}.pt", weights_only=False)["model"], strict=False)
            stats.update(json.loads((work / f"{name}_stats.json").read_text()))
    stats["build"] = asdict(cfg)  # this run's budgets (a resumed phase may have been given a longer one)
    if "save" in phases:
        if (work / "vq_decoder.pt").is_file():  # phase vqdec may have finished beside phase mm
            model.model.vqmodel.load_state_dict(torch.load(work / "vq_decoder.pt"))
        out.mkdir(parents=True, exist_ok=True)
        model.eval().to(torch.float16).save_pretrained(out)
        processor.save_pretrained(out)
        model.to(torch.float32)
        log(f"saved model to {out}")
    if "report" in phases:  # rewrite BUILD.md from metrics.json
        write_build_md(out, json.loads((out / "metrics.json").read_text()))
    if "eval" in phases:
        from ospo_fast.models import load_janus

        bundle = load_janus(str(out), dtype="float32", device="cpu")
        metrics = {"seed": cfg.seed, "answer_tokens": {"yes": " yes", "no": " no"}, **stats}
        metrics["vq"] = eval_vq(bundle.model, cfg.seed, 256)
        log(f"vq {metrics['vq']}")
        metrics["vqa_heldout"] = eval_vqa(bundle.model, bundle.processor, "heldout", cfg.seed, 512)
        log(f"vqa {metrics['vqa_heldout']}")
        metrics["vqa_per_kind_heldout"] = eval_vqa_per_kind(bundle.model, bundle.processor, "heldout", cfg.seed, 256)
        log(f"vqa per kind {metrics['vqa_per_kind_heldout']}")
        for split, n in (("heldout", 160), ("train", 160)):
            metrics[f"t2i_{split}_cfg5"] = eval_t2i(bundle.model, bundle.processor, split, cfg.seed, n)
            log(f"t2i {split} {metrics[f't2i_{split}_cfg5']}")
        metrics["test_t2i_heldout_cfg5"] = eval_t2i(bundle.model, bundle.processor, "heldout", TEST_SEED, TEST_N)
        metrics["test_vqa_heldout"] = eval_vqa(bundle.model, bundle.processor, "heldout", TEST_SEED, TEST_N * 2)
        log(f"test-sized {metrics['test_t2i_heldout_cfg5']} {metrics['test_vqa_heldout']}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        write_build_md(out, metrics)


if __name__ == "__main__":
    main()
