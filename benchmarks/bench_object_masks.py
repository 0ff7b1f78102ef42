"""Benchmark of stage 3 (object masks). Run alone: ``.venv/bin/python benchmarks/bench_object_masks.py``.

1. Batched Otsu + union for 4,096 maps of 24x24 (1,024 images x 4 objects): C++, torch reference and Triton (on
   CUDA) against a loop of ``skimage.filters.threshold_otsu`` over the maps (the reference code's method).
2. Teacher-forced object maps for 16 images: the capturing attention (one batched forward, no attention matrix)
   against transformers' eager ``output_attentions=True`` forward, one image at a time (the reference code's
   method) and batched. CPU default: ``builtin:tiny`` (8x8) and ``builtin:tiny-24`` (24x24); on a GPU:
   ``--model builtin:janus-pro-1b-shape --device cuda``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import measure, report  # noqa: E402
from ospo_fast._backend import cpp_available, triton_available  # noqa: E402
from ospo_fast.ops.object_masks import object_masks, select_layers  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
THINGS = ["car", "bench", "dog", "cat", "apple", "chair", "table", "book", "lamp", "tree", "boat", "clock"]


def timed(name: str, fn, device: torch.device, repeats: int):
    return measure(name, fn, device=device, repeats=repeats)


def skimage_loop(maps: np.ndarray, scale: float = 0.8) -> np.ndarray:
    """The reference code's per-map method: min-max, threshold_otsu * scale, OR over objects. (B, O, G, G)."""
    from skimage.filters import threshold_otsu

    union = np.zeros((maps.shape[0],) + maps.shape[2:], dtype=bool)
    for b in range(maps.shape[0]):
        for o in range(maps.shape[1]):
            m = maps[b, o]
            m = (m - m.min()) / (m.max() - m.min())
            union[b] |= m > threshold_otsu(m, nbins=256) * scale
    return union


def bench_otsu(device: torch.device, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.softmax(3 * torch.randn(1024, 4, 576, generator=g), -1).view(1024, 4, 24, 24)
    maps_np = maps.numpy()
    expected = skimage_loop(maps_np)
    results = [measure("skimage loop (reference)", lambda: skimage_loop(maps_np), repeats=repeats, memory=False)]
    backends = ["ref"] + (["cpp"] if cpp_available() else [])
    for backend in backends:
        assert np.array_equal(object_masks(maps, backend=backend).union.numpy(), expected), backend
        results.append(timed(f"object_masks {backend} (cpu)", lambda b=backend: object_masks(maps, backend=b),
                             torch.device("cpu"), repeats))
    if device.type == "cuda" and triton_available():
        dev_maps = maps.to(device)
        assert np.array_equal(object_masks(dev_maps, backend="triton").union.cpu().numpy(), expected)
        results.append(measure("object_masks triton (cuda)", lambda: object_masks(dev_maps, backend="triton"),
                               device=device, repeats=repeats))
    report("object_masks_otsu_union", results, baseline="skimage loop (reference)", device=device,
           config={"maps": 4096, "grid": 24, "threads": torch.get_num_threads()})


def _prompts(n: int) -> tuple[list[str], list[list[str]]]:
    prompts, objects = [], []
    for i in range(n):
        a, b = THINGS[i % len(THINGS)], THINGS[(i + 5) % len(THINGS)]
        prompts.append(f"a {COLORS[i % 8]} {a} and a {COLORS[(i + 3) % 8]} {b}")
        objects.append([a, b])
    return prompts, objects


def eager_maps(bundle, prompts, tokens, objects, skip: int = 5) -> torch.Tensor:
    """The reference method: eager attention, output_attentions=True, average heads, layers and sub-tokens."""
    from ospo_fast.engine.object_attention import object_token_positions, teacher_forced_inputs

    lm = bundle.model.model.language_model
    batch = teacher_forced_inputs(bundle, prompts, tokens)
    positions = object_token_positions(bundle.tokenizer, batch["input_ids"], objects)
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = lm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], output_attentions=True, use_cache=False)
    layers = select_layers(bundle.num_layers, skip)
    attn = torch.stack([out.attentions[i][:, :, t:].float() for i in layers]).mean(2).mean(0)  # (B, N, Tk)
    b, o, s = positions.shape
    keys = positions.clamp(min=0).to(attn.device).view(b, 1, o * s).expand(-1, attn.shape[1], -1)
    cols = attn.gather(-1, keys).view(b, -1, o, s)  # (B, N, O, S)
    w = (positions >= 0).float().to(attn.device)
    maps = (cols * (w / w.sum(-1, keepdim=True).clamp(min=1))[:, None]).sum(-1)  # (B, N, O)
    return maps.transpose(1, 2).reshape(b, o, bundle.grid, bundle.grid)


def bench_teacher_forced(model: str, device: torch.device, n_images: int, repeats: int, batched_eager: bool) -> None:
    from ospo_fast.engine.object_attention import teacher_forced_object_maps
    from ospo_fast.models import load_janus

    if not model.startswith("builtin:") and not Path(model).exists():
        model = f"builtin:{model}"  # janus-pro-1b-shape -> builtin:janus-pro-1b-shape
    bundle = load_janus(model, dtype="float32" if device.type == "cpu" else "bfloat16", device=str(device))
    lm = bundle.model.model.language_model
    prompts, objects = _prompts(n_images)
    tokens = torch.randint(0, bundle.model.config.vq_config.num_embeddings, (n_images, bundle.grid ** 2),
                           generator=torch.Generator().manual_seed(0)).to(device)
    fast = teacher_forced_object_maps(bundle, prompts, tokens, objects)

    def run_eager(per_image: bool):
        lm.set_attn_implementation("eager")
        try:
            if per_image:
                return torch.cat([eager_maps(bundle, prompts[i:i + 1], tokens[i:i + 1], objects[i:i + 1])
                                  for i in range(n_images)])
            return eager_maps(bundle, prompts, tokens, objects)
        finally:
            lm.set_attn_implementation("sdpa")

    ref = run_eager(per_image=True)
    err = float((fast.float() - ref.float()).abs().max())
    results = [timed("eager output_attentions, per image", lambda: run_eager(True), device, repeats)]
    if batched_eager:
        results.append(timed("eager output_attentions, batched", lambda: run_eager(False), device, repeats))
    results.append(timed("capture (sdpa + streamed lse)", lambda: teacher_forced_object_maps(
        bundle, prompts, tokens, objects), device, repeats))
    report("object_masks_teacher_forced", results, baseline="eager output_attentions, per image", device=device,
           config={"model": model, "images": n_images, "grid": bundle.grid, "layers": bundle.num_layers,
                   "max_abs_err_vs_eager": f"{err:.2e}", "threads": torch.get_num_threads()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", action="append", help="model(s) for the teacher-forced case "
                        "(default: builtin:tiny and builtin:tiny-24; builtin:janus-pro-1b-shape on a GPU)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-otsu", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.skip_otsu:
        bench_otsu(device, args.repeats)
    for model in args.model or ["builtin:tiny", "builtin:tiny-24"]:
        bench_teacher_forced(model, device, args.images, args.repeats, batched_eager=model.endswith("tiny"))


if __name__ == "__main__":
    main()
