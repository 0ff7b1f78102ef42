"""BUILD.md: the report generated from ``metrics.json``, followed by the hand-written build history."""

from __future__ import annotations

from pathlib import Path

from ospo_fast.toy import world
from recipes.toy_janus.evaluate import TEST_SEED


def _pair(result: dict) -> str:
    return f"{result['strict']:.3f} / {result['loose']:.3f} (n={result['n']})"


HISTORY_HEADING = "## Build history"


def write_build_md(out: Path, metrics: dict) -> None:
    """BUILD.md = the generated report + the hand-written history of an existing BUILD.md (from
    ``HISTORY_HEADING`` on), which records what a rerun cannot: interrupted phases, recipe changes, continuations."""
    path = out / "BUILD.md"
    old = path.read_text() if path.is_file() else ""
    history = old[old.index(HISTORY_HEADING):] if HISTORY_HEADING in old else ""
    path.write_text(build_report(metrics) + ("\n" + history if history else ""))


def build_report(m: dict) -> str:
    """BUILD.md text from the metrics dict."""
    b, vq = m.get("init_build", m["build"]), m["vq"]  # a continuation (--init): the first build's settings
    rows = [
        (f"VQ steps (batch {b['vq_batch']})", m.get("vq_steps", "?")),
        *([(f"SigLIP tower per-patch steps (phase vis, batch {b['vis_batch']})", m["vis_steps"])]
          if "vis_steps" in m else []),
        (f"VQ codes used on {vq['n']} scenes", f"{vq['codes_used']} / 512"),
        ("judge on VQ reconstructions, strict / loose", f"{vq['recon_strict']:.3f} / {vq['recon_loose']:.3f}"),
        ("VQ decoder-only steps" + (f" (phase vqdec + {m['vqdec_restarts']} warm restart(s), vqdec_more)"
                                    if m.get("vqdec_restarts") else ""), m.get("vqdec_steps", "?")),
        (f"multitask steps (T2I batch {b['mm_batch']}, VQA batch {b['mm_batch']} every {b['vqa_every']})",
         m.get("mm_steps", "?")),
        *([(f"generation-focused steps (phase t2i: T2I batch {m['build']['mm_batch']}, understanding every "
            f"{m['build']['t2i_vqa_every']})", m["t2i_steps"])] if "t2i_steps" in m else []),
        *([(f"understanding steps (phase und: VQA + caption batch {b['und_batch']}, T2I every "
            f"{b['und_t2i_every']})", m["und_steps"])] if "und_steps" in m else []),
        ("T2I held-out captions, CFG 5, strict / loose", _pair(m["t2i_heldout_cfg5"])),
        ("T2I training captions, CFG 5, strict / loose", _pair(m["t2i_train_cfg5"])),
        ("VQA accuracy, held-out captions, balanced", f"{m['vqa_heldout']['accuracy']:.3f} "
                                                      f"(n={m['vqa_heldout']['n']})"),
        *[(f"VQA accuracy, held-out two-object captions, {kind} questions", f"{r['accuracy']:.3f} (n={r['n']})")
          for kind, r in m.get("vqa_per_kind_heldout", {}).items()],
        (f"test-sized T2I held-out, seed {TEST_SEED}, strict / loose", _pair(m["test_t2i_heldout_cfg5"])),
        (f"test-sized VQA held-out, seed {TEST_SEED}", f"{m['test_vqa_heldout']['accuracy']:.3f} "
                                                       f"(n={m['test_vqa_heldout']['n']})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    und_cmd = f" --und-minutes {b['und_minutes']}" if b.get("und_minutes") else ""
    und_cmd += f" --init-decoder {m['init_decoder']}" if m.get("init_decoder") else ""
    then = m["build"]
    continued = (f"\nThen continued from that model (DIR: {m.get('init', '?')}; the figures below are the continued "
                 f"model's): `python "
                 f"recipes/toy_janus/build_model.py --init DIR --work build/continued --out ospo_fast/assets/toy_janus "
                 f"--phases t2i,save,eval --t2i-minutes {then['t2i_minutes']} --t2i-lr {then['t2i_lr']:g} "
                 f"--t2i-vqa-every {then['t2i_vqa_every']}" + (f" --grow-after {m['grow_after']}" if m.get("grow_after")
                                                               else "") + "`."
                 if "init_build" in m and then.get("t2i_minutes") else "")
    vis_cmd = (f" --vis-minutes {b['vis_minutes']} --mm-vision-lr {b['mm_vision_lr']:g} --mm-questions "
               f"{b.get('mm_questions', 1)}" if b.get("vis_minutes") else "")
    return f"""# builtin:toy: how it was built

Command (CPU, 1 thread each, wall-clock budgets): `python recipes/toy_janus/build_model.py --out
ospo_fast/assets/toy_janus --seed {m['seed']} --vq-minutes {b['vq_minutes']} --vqdec-minutes {b['vqdec_minutes']}
--mm-minutes {b['mm_minutes']}{vis_cmd}{und_cmd}` (phase checkpoints and the log in `build/toy_janus_work/`; a rerun
resumes).{continued}
Phases:
VQ-VAE, then the VQ decoder alone on frozen tokens beside the multitask phase (T2I + yes/no VQA), then save (fp16)
and eval through `load_janus`. Budgets are wall clock and the machine was shared (load 6-11 on 2 cores), so a
rerun reaches a different number of steps: the figures are this build's.

Model: JanusForConditionalGeneration, LLaMA decoder {b['layers']} layers x hidden {b['hidden']} (heads {b['heads']},
MLP {b['intermediate']}), vocab 1024 (project tokenizer); SigLIP tower {b['vision_layers']} layers x
{b['vision_hidden']}, image 64 px, patch 8 -> 64 image tokens; VQ-VAE base {b['vq_base_channels']} channels,
multipliers [1,1,2,2] (downsample 8 -> 8x8 grid), 512 codes of dim 8; weights fp16 safetensors. Masks: the decoder
has only {b['layers']} layers, so `presets/toy.yaml` sets `masks.skip_layers: 1` (layers 1..{b['layers'] - 2}).

| figure | value |
|---|---|
{table}

Answers: the model is trained to put the answer on the first token of `" yes"` / `" no"` (with the space the chat
template writes after `<|Assistant|>:`), as `ospo_fast.engine.vqa.answer_token_ids` reads it.
Questions it was trained on: `make_question` in `recipes/toy_janus/data.py`.
Held-out captions: `ospo_fast.toy.world.is_heldout` (crc32 % 8 == 0, {len(world.split_specs('heldout'))} of
{len(world.all_specs())} captions), never seen in training, neither for T2I nor for VQA.
"""
