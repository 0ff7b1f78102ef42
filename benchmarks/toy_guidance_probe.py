"""Why OSPO on the toy model helps sampling without guidance but not with CFG 5: the log-probability of the
preference pairs' image tokens under the conditional model (base prompt), the unconditional one (pads, as Janus's
CFG row) and the CFG-5 mixture ``u + 5 (c - u)``, before and after training.

    python benchmarks/toy_guidance_probe.py runs/ablation/seed0 [--pairs 64]

Reads an ablation seed directory (``benchmarks/toy_ablation.py``): the OSPO pairs in ``synth_ospo/pairs.jsonl``
and the merged models in ``train_*/merged``. Prints mean log-prob per image token for chosen and rejected images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ospo_fast.config import LossConfig, load_config  # noqa: E402
from ospo_fast.engine.image_gen import special_ids, unconditional_ids  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.store import read_jsonl  # noqa: E402
from ospo_fast.train.data import prompt_token_ids  # noqa: E402
from ospo_fast.train.trainer import PreferenceModel  # noqa: E402

MODELS = {"base": "builtin:toy", "ospo_plain_simpo": "train_plain_simpo/merged",
          "ospo_object_simpo_sft": "train_object_simpo_sft/merged", "ospo_iteration2": "train_iter2/merged"}


@torch.no_grad()
def token_logprobs(model_path: str, pairs: list[dict], guidance: float) -> dict[str, dict[str, float]]:
    """{side: {"cond", "uncond", "cfg"}} mean log-prob per image token of the pairs' chosen/rejected tokens."""
    bundle = load_janus(model_path, device="cpu")
    scorer = PreferenceModel(bundle.model, LossConfig()).eval()
    pad_id, bos_id, boi_id = special_ids(bundle)
    result = {}
    for side in ("chosen", "rejected"):
        sums = {"cond": 0.0, "uncond": 0.0, "cfg": 0.0}
        for pair in pairs:
            cond = torch.tensor([prompt_token_ids(bundle.processor, pair["prompt"])])  # (1, L)
            uncond = unconditional_ids(cond, bos_id, boi_id, pad_id)  # the generator's unconditional CFG row
            tokens = torch.tensor([pair[side]["tokens"]])  # (1, T)
            c = scorer.image_logits(cond, torch.ones_like(cond), tokens).float()  # (1, T, V)
            u = scorer.image_logits(uncond, torch.ones_like(uncond), tokens).float()
            for name, logits in (("cond", c), ("uncond", u), ("cfg", u + guidance * (c - u))):
                sums[name] += logits.log_softmax(-1).gather(-1, tokens[..., None]).mean().item()
        result[side] = {name: total / len(pairs) for name, total in sums.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed_dir", type=Path)
    parser.add_argument("--pairs", type=int, default=64, help="the first N OSPO pairs")
    args = parser.parse_args()
    pairs = read_jsonl(args.seed_dir / "synth_ospo" / "pairs.jsonl")[:args.pairs]
    guidance = load_config("toy").images.guidance_scale
    print(f"== log-prob per image token of {len(pairs)} OSPO pairs ({args.seed_dir}); CFG weight {guidance:g}")
    print(f"   {'model':<24}{'chosen c':>10}{'chosen u':>10}{'chosen cfg':>12}{'rejected c':>12}{'rejected u':>12}"
          f"{'rejected cfg':>14}")
    rows = {}
    for name, rel in MODELS.items():
        path = rel if rel.startswith("builtin:") else str(args.seed_dir / rel)
        if not rel.startswith("builtin:") and not Path(path).is_dir():
            print(f"   {name:<24}(missing: {path})")
            continue
        r = rows[name] = token_logprobs(path, pairs, guidance)
        print(f"   {name:<24}{r['chosen']['cond']:>10.3f}{r['chosen']['uncond']:>10.3f}{r['chosen']['cfg']:>12.3f}"
              f"{r['rejected']['cond']:>12.3f}{r['rejected']['uncond']:>12.3f}{r['rejected']['cfg']:>14.3f}")
    (args.seed_dir / "guidance_probe.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
