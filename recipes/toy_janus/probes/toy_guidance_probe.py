"""Why OSPO on the toy model helps sampling without guidance but not with CFG 5: the log-probability of the
preference pairs' image tokens under the conditional model (base prompt), the unconditional one (pads, as Janus's
CFG row) and the CFG-5 mixture ``u + 5 (c - u)``, before and after training.

    python recipes/toy_janus/probes/toy_guidance_probe.py runs/ablation/seed0 [--pairs 64]

Reads an ablation seed directory (``toy_ablation.py`` beside this file): the OSPO pairs in ``synth_ospo/pairs.jsonl``,
the base model the seed started from (as its ``results.json`` names it, or ``--model``) and the merged models in
``train_*/merged``. Prints mean log-prob per image token for chosen and rejected images, then the same split by
cell: cells whose VQ code is the empty image's (plain background, for a tokenizer with local codes) and the others
(objects, and background whose code depends on them). Training that lowers the guided log-prob of the empty code
draws blobs where the prompt asks for none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (benchmarks.harness)

from ospo_fast.config import LossConfig, load_config  # noqa: E402
from ospo_fast.engine.image_gen import special_ids, unconditional_ids  # noqa: E402
from ospo_fast.engine.object_attention import encode_pixels_to_tokens  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.store import read_jsonl  # noqa: E402
from ospo_fast.toy import world  # noqa: E402
from ospo_fast.train.data import prompt_token_ids  # noqa: E402
from ospo_fast.train.trainer import PreferenceModel  # noqa: E402

MODELS = {"base": None, "ospo_plain_simpo": "train_plain_simpo/merged",
          "ospo_object_simpo_sft": "train_object_simpo_sft/merged",
          "ospo_guided_rewards": "train_guided_rewards/merged", "ospo_iteration2": "train_iter2/merged"}


BRANCHES = ("cond", "uncond", "cfg")
CELLS = ("all", "empty_code", "other")


@torch.no_grad()
def token_logprobs(model_path: str, pairs: list[dict], guidance: float) -> dict[str, dict[str, dict[str, float]]]:
    """{side: {cells: {"cond", "uncond", "cfg"}}}: mean log-prob per image token of the pairs' chosen/rejected
    tokens, over all cells, the cells holding the empty image's code and the others (``CELLS``)."""
    bundle = load_janus(model_path, device="cpu")
    scorer = PreferenceModel(bundle.model, LossConfig()).eval()
    pad_id, bos_id, boi_id = special_ids(bundle)
    empty_tokens = encode_pixels_to_tokens(bundle, torch.from_numpy(world.empty_render()[None]))[0]  # (T,)
    result = {}
    for side in ("chosen", "rejected"):
        values: dict[str, dict[str, list[torch.Tensor]]] = {cells: {b: [] for b in BRANCHES} for cells in CELLS}
        for pair in pairs:
            cond = torch.tensor([prompt_token_ids(bundle.processor, pair["prompt"])])  # (1, L)
            uncond = unconditional_ids(cond, bos_id, boi_id, pad_id)  # the generator's unconditional CFG row
            tokens = torch.tensor([pair[side]["tokens"]])  # (1, T)
            empty = tokens[0] == empty_tokens  # (T,)
            c = scorer.image_logits(cond, torch.ones_like(cond), tokens).float()  # (1, T, V)
            u = scorer.image_logits(uncond, torch.ones_like(uncond), tokens).float()
            for branch, logits in zip(BRANCHES, (c, u, u + guidance * (c - u))):
                logp = logits.log_softmax(-1).gather(-1, tokens[..., None])[0, :, 0]  # (T,)
                for cells, where in (("all", torch.ones_like(empty)), ("empty_code", empty), ("other", ~empty)):
                    values[cells][branch].append(logp[where])
        result[side] = {cells: {b: torch.cat(v).mean().item() if sum(map(len, v)) else float("nan")
                                for b, v in by_branch.items()} for cells, by_branch in values.items()}
        result[side]["empty_code_share"] = torch.cat(values["empty_code"]["cond"]).numel() / sum(
            len(t["tokens"]) for t in (p[side] for p in pairs))
    return result


def base_model(seed_dir: Path) -> str:
    """The model a finished ablation seed started from, as its ``results.json`` records it (else ``builtin:toy``)."""
    saved = seed_dir / "results.json"
    return json.loads(saved.read_text()).get("model", "builtin:toy") if saved.is_file() else "builtin:toy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed_dir", type=Path)
    parser.add_argument("--pairs", type=int, default=64, help="the first N OSPO pairs")
    parser.add_argument("--model", help="the base model (default: the one the seed's saved figures name)")
    args = parser.parse_args()
    pairs = read_jsonl(args.seed_dir / "synth_ospo" / "pairs.jsonl")[:args.pairs]
    guidance = load_config("toy").images.guidance_scale
    print(f"== log-prob per image token of {len(pairs)} OSPO pairs ({args.seed_dir}); CFG weight {guidance:g}")
    rows = {}
    for name, rel in MODELS.items():
        path = (args.model or base_model(args.seed_dir)) if rel is None else str(args.seed_dir / rel)
        if rel is not None and not Path(path).is_dir():
            print(f"   {name:<24}(missing: {path})")
            continue
        rows[name] = token_logprobs(path, pairs, guidance)
    for cells in CELLS:
        shares = ", ".join(f"{side} {rows[next(iter(rows))][side]['empty_code_share']:.0%}" for side in
                           ("chosen", "rejected")) if rows and cells != "all" else ""
        print(f"\n   cells: {cells}" + (f" (empty-code share of cells: {shares})" if shares else ""))
        print(f"   {'model':<24}{'chosen c':>10}{'chosen u':>10}{'chosen cfg':>12}{'rejected c':>12}"
              f"{'rejected u':>12}{'rejected cfg':>14}")
        for name, r in rows.items():
            chosen, rejected = r["chosen"][cells], r["rejected"][cells]
            print(f"   {name:<24}{chosen['cond']:>10.3f}{chosen['uncond']:>10.3f}{chosen['cfg']:>12.3f}"
                  f"{rejected['cond']:>12.3f}{rejected['uncond']:>12.3f}{rejected['cfg']:>14.3f}")
    (args.seed_dir / "guidance_probe.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
