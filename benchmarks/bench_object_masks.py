"""Benchmark of stage 3 (object masks). Run alone: ``.venv/bin/python benchmarks/bench_object_masks.py``.

1. Batched Otsu + union for 4,096 maps of 24x24 (1,024 images x 4 objects): C++, torch reference and Triton (on
   CUDA) against a loop of ``skimage.filters.threshold_otsu`` over the maps (the reference code's method).
2. The fused op (issue 19a) against today's split, per batch of 16 images x 4 objects x 4 sub-tokens, 24x24, 16
   heads, 14 layers (Janus-Pro-1B's selection): from the capture's sums over heads and layers, ``object_masks_from_
   scores`` (one op: maps, Otsu, union, soft mask) vs the split (the capture's averaging as torch ops, then the Otsu
   op, the union and the Gaussian as separate torch ops). Time per batch and compute ops dispatched (torch.profiler:
   leaf ops that compute, views/allocations/no-op casts not counted; a Triton or C++ kernel is one op), C++ and the
   torch reference on the CPU; with ``--triton-ops`` under TRITON_INTERPRET=1 also the Triton path's torch ops and
   kernel launches (counted at the launcher), on CUDA its time.
3. Teacher-forced object maps for 16 images: the capturing attention (one batched forward up to the last selected
   layer, the selected layers' SDPA lse reused, no attention matrix) against transformers' eager
   ``output_attentions=True`` forward, one image at a time (the reference code's method) and batched, with the
   bare forward of the same batch (no capture, every layer) beside it. CPU default: ``builtin:tiny`` (8x8) and
   ``builtin:tiny-24`` (24x24); on a GPU:
   ``--model builtin:janus-pro-1b-shape --device cuda``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import measure, report  # noqa: E402
from ospo_fast._backend import cpp_available, triton_available  # noqa: E402
from ospo_fast.ops.object_masks import (  # noqa: E402
    CapturedScores,
    object_masks,
    object_masks_from_scores,
    select_layers,
)

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


NON_COMPUTE = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::reshape",
               "aten::expand", "aten::as_strided", "aten::t", "aten::transpose", "aten::slice", "aten::select",
               "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::detach", "aten::alias", "aten::_unsafe_view",
               "aten::lift_fresh", "aten::to", "aten::contiguous", "aten::resolve_conj", "aten::resolve_neg",
               "aten::view_as", "aten::permute", "aten::_reshape_alias", "aten::result_type", "aten::is_nonzero",
               "aten::item", "aten::_local_scalar_dense", "aten::numpy_T", "aten::unbind", "aten::split"}


LAUNCH = "triton kernel launch"


def compute_ops(fn) -> int:
    """Leaf ops of one call of ``fn`` that compute (a kernel each on a GPU): profiler events with no computing child,
    views, allocations and no-op casts left out; ``aten::item`` (a host read) is left out too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def count(event) -> int:
        if event.name == LAUNCH:  # a Triton launch is one op (under the interpreter its body runs torch ops)
            return 1
        inner = sum(count(c) for c in event.cpu_children)
        return inner if inner else int(event.name not in NON_COMPUTE)

    return sum(count(e) for e in prof.events() if e.cpu_parent is None)


def captured_batch(images: int = 16, objects: int = 4, subtokens: int = 4, grid: int = 24, heads: int = 16,
                   layers: int = 14) -> tuple[CapturedScores, torch.Tensor]:
    """What the capture holds after one batch: softmax-like probabilities summed over heads and layers, ragged
    sub-tokens (1..subtokens real), every cell recorded by every layer; and object_valid (B, O), one padded object
    in every other image."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(images, objects, subtokens, grid * grid, generator=g), -1)
    sums = (probs * heads * layers).view(images, objects, subtokens, grid, grid)  # (B, O, S, G, G) float32
    n_real = torch.randint(1, subtokens + 1, (images, objects), generator=g)
    token_valid = torch.arange(subtokens)[None, None] < n_real[..., None]
    valid = torch.ones(images, objects, dtype=torch.bool)
    valid[::2, -1] = False
    token_valid &= valid[..., None]
    counts = torch.full((images, grid, grid), float(layers))
    return CapturedScores(sums, counts, heads, token_valid), valid


def split_masks(scores: CapturedScores, valid: torch.Tensor, backend: str):
    """Today's split: the capture's averaging (heads and sub-token weights per layer in the decode step, then the
    layer mean in ``maps()``), then ``object_masks`` (the Otsu op, then the union and the Gaussian as torch ops)."""
    tv = scores.token_valid
    weights = tv.float() / tv.sum(-1, keepdim=True).clamp(min=1)  # (B, O, S) sub-token mean
    maps = (scores.sums * weights[..., None, None]).sum(2) / scores.heads  # (B, O, G, G) head and sub-token mean
    counts = scores.counts[:, None]
    maps = torch.where(counts > 0, maps / counts.clamp(min=1), float("nan"))  # layer mean, capture.maps()
    return object_masks(maps, backend=backend, object_valid=valid)


class _LaunchCounter:
    """Counts launches of the fused and split Triton kernels (wraps their ``run``)."""

    def __init__(self):
        from ospo_fast.kernels import object_masks as k

        self.kernels = [k._object_masks_from_scores_kernel, k._object_masks_otsu_kernel]
        self.count = 0

    def __enter__(self):
        self.saved = [kernel.run for kernel in self.kernels]
        for kernel, run in zip(self.kernels, self.saved):
            kernel.run = self._wrap(run)
        return self

    def _wrap(self, run):
        def counted(*args, **kwargs):
            self.count += 1
            with torch.profiler.record_function(LAUNCH):
                return run(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for kernel, run in zip(self.kernels, self.saved):
            kernel.run = run


def bench_fused(device: torch.device, repeats: int, triton_ops: bool) -> None:
    scores, valid = captured_batch()
    want = object_masks_from_scores(scores, backend="ref", object_valid=valid)
    backends = ["ref"] + (["cpp"] if cpp_available() else [])
    results, ops = [], {}
    for backend in backends:
        fused = object_masks_from_scores(scores, backend=backend, object_valid=valid)
        assert torch.equal(fused.union, want.union) and torch.equal(fused.masks, want.masks), backend
        split = split_masks(scores, valid, backend)
        ops[f"split {backend}"] = compute_ops(lambda b=backend: split_masks(scores, valid, b))
        ops[f"fused {backend}"] = compute_ops(lambda b=backend: object_masks_from_scores(scores, backend=b,
                                                                                         object_valid=valid))
        ops[f"union cells differing split vs fused {backend}"] = int((split.union != fused.union).sum())
        results.append(timed(f"split (today) {backend} (cpu)", lambda b=backend: split_masks(scores, valid, b),
                             torch.device("cpu"), repeats))
        results.append(timed(f"fused {backend} (cpu)", lambda b=backend: object_masks_from_scores(
            scores, backend=b, object_valid=valid), torch.device("cpu"), repeats))
    if triton_ops and triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        for name, fn in [("split triton", lambda: split_masks(scores, valid, "triton")),
                         ("fused triton", lambda: object_masks_from_scores(scores, backend="triton",
                                                                           object_valid=valid))]:
            with _LaunchCounter() as counter:
                ops[f"{name} torch ops"] = compute_ops(fn)
            ops[f"{name} kernel launches"] = counter.count
    if device.type == "cuda" and triton_available():
        dev = CapturedScores(scores.sums.to(device), scores.counts.to(device), scores.heads,
                             scores.token_valid.to(device))
        dev_valid = valid.to(device)
        for name, fn in [("split (today) triton (cuda)", lambda: split_masks(dev, dev_valid, "triton")),
                         ("fused triton (cuda)", lambda: object_masks_from_scores(dev, backend="triton",
                                                                                 object_valid=dev_valid))]:
            results.append(measure(name, fn, device=device, repeats=repeats))
    baseline = "split (today) cpp (cpu)" if cpp_available() else "split (today) ref (cpu)"
    report("object_masks_fused", results, baseline=baseline, device=device,
           config={"images": 16, "objects": 4, "subtokens": 4, "grid": 24, "heads": 16, "layers": 14,
                   "threads": torch.get_num_threads(), **{f"ops: {k}": v for k, v in ops.items()}})


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


@torch.no_grad()
def bare_forward(bundle, prompts, tokens) -> None:
    """The language model's forward of the same teacher-forced batch, no capture: what the mask pass costs at least
    (it stops after its last selected layer, so it can cost less)."""
    from ospo_fast.engine.object_attention import teacher_forced_inputs

    inputs = teacher_forced_inputs(bundle, prompts, tokens)
    bundle.model.model.language_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                      position_ids=inputs["position_ids"], use_cache=False)


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
    results.append(timed("capture (the SDPA kernel's lse)", lambda: teacher_forced_object_maps(
        bundle, prompts, tokens, objects), device, repeats))
    results.append(timed("bare forward, same batch", lambda: bare_forward(bundle, prompts, tokens), device, repeats))
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
    parser.add_argument("--skip-teacher-forced", action="store_true")
    parser.add_argument("--triton-ops", action="store_true", help="count the Triton path's ops and launches under "
                        "TRITON_INTERPRET=1 (slow: the interpreter)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.skip_otsu:
        bench_otsu(device, args.repeats)
    bench_fused(device, args.repeats, args.triton_ops)
    for model in [] if args.skip_teacher_forced else args.model or ["builtin:tiny", "builtin:tiny-24"]:
        bench_teacher_forced(model, device, args.images, args.repeats, batched_eager=model.endswith("tiny"))


if __name__ == "__main__":
    main()
