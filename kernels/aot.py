"""Ahead-of-time compilation of every Triton kernel in ``kernels/`` for real GPUs, on a machine without one.

``triton.compile`` with a ``GPUTarget("cuda", 80 | 90, 32)`` lowers a kernel to PTX and runs the ptxas shipped in
the Triton wheel, so a CPU machine gets the very cubin a GPU would load. Each kernel is compiled the way its
launcher launches it at Janus-Pro shapes (Janus-Pro-1B and 7B share them: V = 16,384 image codes, a 24x24 token
grid): argument types, integer specialisation (divisibility by 16, as the JIT does it), heuristics and every
autotune configuration. Registers, stack, local memory (spills) and shared memory are read from the cubin with
the wheel's ``cuobjdump --dump-resource-usage``.

    python -m ospo_fast.kernels.aot            # table for sm_80 and sm_90
    python -m ospo_fast.kernels.aot --json     # one JSON object per compiled kernel

Triton's interpreter (``TRITON_INTERPRET=1``, how CI runs kernels) replaces ``@triton.jit`` functions by
interpreted ones that cannot be compiled, so ``compile_in_subprocess`` runs this module in a fresh Python without
that variable. Kernels are found by introspection (``kernel_objects``); ``LAUNCHES`` says how each is launched, and
a kernel without an entry is an error (tests/test_kernels_aot.py), so a new kernel cannot be left uncompiled.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

V_JANUS = 16_384  # Janus-Pro-1B/7B image vocabulary (the SimPO loss's V)
P_JANUS = 24 * 24  # Janus-Pro-1B/7B image-token grid at 384 px (the object maps' P)
ARCHS = (80, 90)  # A100, H100
MODULES = ("ospo_fast.kernels.decode_attention", "ospo_fast.kernels.object_masks", "ospo_fast.kernels.simpo_loss")
JANUS_HEADS = {"1B": 16, "7B": 32}  # query heads (= kv heads: MHA) of Janus-Pro-1B and 7B; head dim 128 for both
H100_SMS = 132


@dataclass(frozen=True)
class Launch:
    """How a launcher calls ``kernel`` (an attribute of ``module``): ``args`` by name, a ``torch.dtype`` standing
    for a tensor of that dtype and a number for a scalar; ``meta`` the constexprs and options it passes."""

    module: str
    kernel: str
    case: str
    args: dict
    meta: dict = field(default_factory=dict)


def _simpo_launches() -> list[Launch]:
    from ospo_fast.kernels import simpo_loss as k

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        block = {}  # BLOCK_V and num_warps come from each autotune configuration
        out.append(Launch(k.__name__, "_logp_fwd_kernel", f"{name} V={V_JANUS}", dict(
            logits_ptr=dtype, targets_ptr=torch.int64, logp_ptr=torch.float32, lse_ptr=torch.float32,
            stride_row=V_JANUS, n_vocab=V_JANUS), block))
        out.append(Launch(k.__name__, "_logp_bwd_kernel", f"{name} V={V_JANUS}", dict(
            grad_ptr=torch.float32, logits_ptr=dtype, targets_ptr=torch.int64, lse_ptr=torch.float32,
            out_ptr=dtype, stride_row=V_JANUS, stride_out=V_JANUS, n_vocab=V_JANUS),
            dict(block, ROUND_BF16=dtype == torch.bfloat16)))
    return out


def _object_masks_launches() -> list[Launch]:
    from ospo_fast.kernels import object_masks as k

    # the launcher hands the kernel float32 maps (bf16 maps are cast first) or float64 maps as they are
    return [Launch(k.__name__, "_object_masks_otsu_kernel", f"{str(dtype).removeprefix('torch.')} P={P_JANUS}", dict(
        x_ptr=dtype, norm_ptr=torch.float32, thr_ptr=torch.float32, mask_ptr=torch.int8, P=P_JANUS,
        otsu_scale=0.8), dict(NBINS=k.NBINS)) for dtype in (torch.float32, torch.float64)] + [
        # the fused op (issue 19a): the capture's float32 sums, 4 objects x 4 sub-tokens (the engine's buckets),
        # 16 heads (Janus-Pro-1B), a 5x5 Gaussian
        Launch(k.__name__, "_object_masks_from_scores_kernel", f"float32 P={P_JANUS} O=4 S=4", dict(
            sums_ptr=torch.float32, counts_ptr=torch.float32, tvalid_ptr=torch.bool, ovalid_ptr=torch.bool,
            taps_ptr=torch.float64, norm_ptr=torch.float32, thr_ptr=torch.float32, mask_ptr=torch.int8,
            union_ptr=torch.int8, soft_ptr=torch.float32, counts_stride=0, n_obj=4, n_tok=4, G2=24, P=P_JANUS,
            heads=16,
            otsu_scale=0.8), dict(NBINS=k.NBINS, KERNEL=5))]


def _decode_attention_launches() -> list[Launch]:
    """The image engine's decode step in bf16 at the 1B and 7B shapes, 16 and 256 images (2 rows each under CFG),
    a 64-token prompt bucket + 577 slots; SPLITS as the launcher picks it for an H100; the combine kernel with and
    without the capture (4 objects x 4 sub-tokens, the engine's buckets)."""
    from ospo_fast.kernels import decode_attention as k

    from ospo_fast.ops.decode_attention import BLOCK_N, num_splits

    out, d, slots_len = [], 128, 64 + 577
    for model, heads in JANUS_HEADS.items():
        for images in (16, 256):
            rows = 2 * images
            splits = num_splits(rows * heads, slots_len, H100_SMS)
            kv = dict(stride_kb=heads * slots_len * d, stride_kh=slots_len * d, stride_kn=d)
            case = f"bfloat16 {model} batch={images} splits={splits}"
            out.append(Launch(k.__name__, "_decode_partial_kernel", case, dict(
                q_ptr=torch.bfloat16, k_ptr=torch.bfloat16, v_ptr=torch.bfloat16, start_ptr=torch.int32,
                end_ptr=torch.int32, part_out_ptr=torch.float32, part_lse_ptr=torch.float32, stride_qb=heads * d,
                stride_qh=d, **kv, stride_vb=kv["stride_kb"], stride_vh=kv["stride_kh"], stride_vn=d,
                n_heads=heads, groups=1, scale=d ** -0.5),
                dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_N=BLOCK_N, SPLITS=splits, num_warps=4)))
            for capture in (False, True):
                out.append(Launch(k.__name__, "_decode_combine_kernel", f"{case} capture={capture}", dict(
                    part_out_ptr=torch.float32, part_lse_ptr=torch.float32, out_ptr=torch.bfloat16,
                    lse_ptr=torch.float32, q_ptr=torch.bfloat16, k_ptr=torch.bfloat16, start_ptr=torch.int32,
                    end_ptr=torch.int32, slots_ptr=torch.int32, probs_ptr=torch.float32, stride_ob=heads * d,
                    stride_oh=d, stride_qb=heads * d, stride_qh=d, **kv, n_heads=heads, groups=1,
                    scale=d ** -0.5, capture_rows=images if capture else 0, n_slots=16),
                    dict(HEAD_DIM=d, BLOCK_D=d, SPLITS=splits, BLOCK_S=16, CAPTURE=capture, num_warps=4)))
    return out


LAUNCHES = {"ospo_fast.kernels.decode_attention": _decode_attention_launches,
            "ospo_fast.kernels.object_masks": _object_masks_launches,
            "ospo_fast.kernels.simpo_loss": _simpo_launches}


def launch_tensors(launch: Launch, device: torch.device | str) -> dict:
    """The launch's arguments with a zero tensor of each pointer's dtype, long enough for row 0 (grid (1,))."""
    size = max(V_JANUS, P_JANUS)
    return {name: torch.zeros(size, dtype=value, device=device) if isinstance(value, torch.dtype) else value
            for name, value in launch.args.items()}


def run_launch(launch: Launch, device: torch.device | str):
    """Launch ``launch`` for real on one program (CUDA, or CPU tensors under the interpreter); returns what the
    kernel call returns (the ``CompiledKernel`` on a GPU)."""
    kernel = kernel_objects(importlib.import_module(launch.module))[launch.kernel]
    return kernel[(1,)](**launch_tensors(launch, device), **launch.meta)


def kernel_objects(module) -> dict:
    """Every Triton kernel object of ``module`` (jit, interpreted, autotuned or heuristics-wrapped) by name."""
    from triton.runtime.jit import KernelInterface

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and base_function(obj).__module__ == module.__name__}


def base_function(obj):
    """The Python function under a Triton kernel object (jit, interpreted, autotune, heuristics wrappers)."""
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def _variants(obj, args: dict, meta: dict) -> list[tuple[object, dict]]:
    """Unwrap autotune and heuristics down to the ``JITFunction``: one (jit_fn, meta) per configuration."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    if isinstance(obj, Autotuner):
        configs = obj.configs
        if obj.early_config_prune:
            configs = obj.early_config_prune(configs, args, **meta)
        return [v for cfg in configs for v in _variants(obj.fn, args, {**meta, **cfg.all_kwargs()})]
    if isinstance(obj, Heuristics):
        meta = dict(meta)
        for name, rule in obj.values.items():
            meta[name] = rule({**args, **meta})
        return _variants(obj.fn, args, meta)
    return [(obj, meta)]


def _compile(fn, args: dict, meta: dict, arch: int):
    """Compile ``fn`` as the JIT would for this call: its own argument binder gives signature, constexprs and
    divisibility attributes; the backend parses the options (num_warps, num_stages, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    call = {name: MockTensor.wrap_dtype(value) for name, value in args.items()}
    bound, specialization, options = binder(**call, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL, ... of the one function in ``cubin``, from ``cuobjdump --dump-resource-usage``."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", handle.name],
                              capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in text.splitlines() if "REG:" in ln), None)
    if line is None:
        raise RuntimeError(f"cuobjdump printed no resource line for the cubin:\n{text}")
    return {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}


@dataclass
class Compiled:
    """One compiled kernel variant: resources per thread (registers, stack and local bytes) and per block
    (``shared``: the dynamic shared memory Triton requests at launch; ``static_shared`` from the cubin)."""

    module: str
    kernel: str
    case: str
    arch: int
    num_warps: int
    meta: dict
    cubin_bytes: int
    registers: int
    stack: int
    local: int
    shared: int
    static_shared: int
    compile_s: float


def compile_all(archs: tuple[int, ...] = ARCHS, modules: tuple[str, ...] = MODULES) -> list[Compiled]:
    """Compile every registered launch of every kernel for each arch. Needs the real JIT (no interpreter)."""
    import triton

    if triton.knobs.runtime.interpret:
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled); "
                           "call compile_in_subprocess instead")
    out = []
    for module in modules:
        for launch in LAUNCHES[module]():
            obj = kernel_objects(importlib.import_module(module))[launch.kernel]
            for fn, meta in _variants(obj, launch.args, launch.meta):
                for arch in archs:
                    start = time.perf_counter()
                    compiled = _compile(fn, launch.args, meta, arch)
                    seconds = time.perf_counter() - start
                    usage = resource_usage(compiled.asm["cubin"])
                    out.append(Compiled(
                        module=module, kernel=launch.kernel, case=launch.case, arch=arch,
                        num_warps=compiled.metadata.num_warps,
                        meta={k: v for k, v in meta.items() if isinstance(v, (int, bool, str))},
                        cubin_bytes=len(compiled.asm["cubin"]), registers=usage["REG"], stack=usage["STACK"],
                        local=usage["LOCAL"], shared=compiled.metadata.shared, static_shared=usage["SHARED"],
                        compile_s=round(seconds, 3)))
    return out


def compile_in_subprocess(archs: tuple[int, ...] = ARCHS, timeout: float = 600) -> list[dict]:
    """``compile_all`` in a fresh Python without ``TRITON_INTERPRET`` (works from an interpreted session)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ospo_fast.kernels.aot", "--json", "--arch", *map(str, archs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one row per kernel, case and configuration, resources for each arch side by side."""
    archs = sorted({r["arch"] for r in rows})
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["case"], r["num_warps"]), {})[r["arch"]] = r
    head = ["kernel", "case", "warps"] + [f"sm_{a} {x}" for a in archs for x in ("regs", "spill B", "shared B")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, case, warps), by_arch in groups.items():
        cells = [kernel, case, str(warps)]
        for a in archs:
            r = by_arch.get(a)
            cells += [str(r["registers"]), str(r["local"] + r["stack"]), str(r["shared"])] if r else ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--json", action="store_true", help="one JSON object per compiled kernel on stdout")
    args = parser.parse_args()
    rows = [asdict(c) for c in compile_all(tuple(args.arch))]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
