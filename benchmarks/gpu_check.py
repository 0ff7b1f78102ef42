"""One command for a lent GPU: ``make gpu-check`` (or ``python benchmarks/gpu_check.py``).

One process builds each model once, random-initialised in bf16 directly on the GPU (no CPU copy, no disk), then runs
the parts in order of value, each with its own time cap:

1. ``smoke``: a tiny model through the engine (eager images, capture, Self-VQA, fused loss) and a Triton op;
2. ``build-1b``: the Janus-Pro-1B shape on the device;
3. ``synthesis-1b-b16``: full CFG synthesis images/s, compiled engine (``generate_images``), batch 16;
4. ``generate-1b-b16``: transformers' ``generate(generation_mode="image")`` on the same 16 prompts (the baseline);
5. ``synthesis-1b-planned``: the compiled engine at the batch ``ospo_fast.plan`` plans for this device;
6. ``synthesis-7b-planned``: the Janus-Pro-7B shape at its planned batch, only if the time left also holds the
   later parts;
7. ``masks``: in-flight capture during compiled synthesis and the teacher-forced capture, each against the same
   work without capture (the bare forward), and eager ``output_attentions`` per image;
8. ``loss``: the fused head + Obj-SimPO loss against the naive one (forward + backward, bf16);
9. ``vqa``: Self-VQA (prefix-cached engine) against batched full forwards and per-question forwards;
10. ``train``: one LoRA training step (bf16 autocast, checkpointing), fused loss and naive loss;
11. ``gpu-tests``: the tests that tests/gpu.py gates on CUDA, in a subprocess, with what is left.

Every row (device, date, commit, command) is appended to BENCHMARKS.md and ``benchmarks/results.jsonl`` the moment it
is measured (append, flush, fsync), so a kill keeps everything before it. Compile seconds are rows of their own;
synthesis rows give images/s and their fraction of that GPU's bandwidth floor (``ospo_fast.plan.synthesis_floor``).
A part that passes its cap is stopped (SIGALRM), recorded as such, and the next part runs; a watchdog thread ends
the whole run at ``--budget`` (default 480 s, one H100) plus a few seconds' grace, after writing a row.

``--dry-run`` runs the same code on the CPU at tiny shapes with small caps and writes its rows to temporary files
(or ``--benchmarks-file`` / ``--results-file``); tests/test_gpu_check.py runs it. Without ``--dry-run`` a machine
without CUDA is refused at once (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

WATCHDOG_GRACE_S = 10.0  # past --budget, for the part that is running to be stopped and its row written
TEST_LINE = re.compile(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class Shape:
    """A model the check builds: a kind of ``ospo_fast.models.factory`` and its image-token grid side."""

    kind: str
    grid: int

    @property
    def label(self) -> str:
        return {"janus-pro-1b-shape": "Janus-Pro-1B shape", "janus-pro-7b-shape": "Janus-Pro-7B shape"}.get(
            self.kind, f"{self.kind} {self.grid}x{self.grid}")


@dataclass(frozen=True)
class Settings:
    """What one run measures: the models, batch sizes and the caps (seconds) of the parts. ``GPU`` is the real check;
    ``DRY`` the same parts at tiny shapes on the CPU."""

    model_1b: Shape
    model_7b: Shape
    smoke: Shape
    budget: float
    caps: dict
    batch: int = 16  # synthesis and in-flight masks
    plan_cap: int = 1024  # the planner's cap on a batch (plan.MAX_AUTO_BATCH on a GPU)
    mask_images: int = 16
    loss_pairs: int = 16
    vqa_images: int = 8
    train_pairs: int = 16
    repeats: int = 5  # at most, per timed case (each case asks for its own number up to this)
    tests: tuple = ("tests",)


GPU_CAPS = {"smoke": 30, "build-1b": 60, "synthesis-1b-b16": 120, "generate-1b-b16": 50,
            "synthesis-1b-planned": 100, "synthesis-7b-planned": 150, "masks": 75, "loss": 20, "vqa": 25,
            "train": 40, "gpu-tests": 120}
# What a part needs to be worth running; an optional part runs only if the time left holds its cap and this much for
# every later part.
RESERVE = {"masks": 60, "loss": 10, "vqa": 15, "train": 20, "gpu-tests": 60}

GPU = Settings(model_1b=Shape("janus-pro-1b-shape", 24), model_7b=Shape("janus-pro-7b-shape", 24),
               smoke=Shape("tiny", 4), budget=480, caps=GPU_CAPS)
DRY = Settings(model_1b=Shape("tiny", 4), model_7b=Shape("tiny", 4), smoke=Shape("tiny", 4), budget=600,
               caps={name: 60 for name in GPU_CAPS}, batch=2, plan_cap=3, mask_images=2, loss_pairs=2,
               vqa_images=2, train_pairs=2, repeats=1, tests=("tests/test_gpu_engine.py",))


# ------------------------------------------------------------------------------------------------ rows

class Rows:
    """The section this run appends to BENCHMARKS.md and the JSON lines to results.jsonl: each row on disk (flushed,
    fsynced) before ``add`` returns; SIGALRM is held off while a row is written, so a stopped part never leaves half
    a line."""

    HEAD = ("| part | case | ms | vs baseline | peak MiB | result | device | date | commit | command |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")

    def __init__(self, markdown: Path, results: Path, device: str, command: str, intro: str):
        from benchmarks import harness

        self.markdown, self.results, self.device, self.command = markdown, results, device, command
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        self.commit = harness.git_commit()
        self.lock = threading.Lock()
        self.written: list[dict] = []
        earlier = markdown.read_text(encoding="utf-8") if markdown.exists() else ""
        lead = "" if not earlier else ("\n" if earlier.endswith("\n") else "\n\n")
        self._append(markdown, f"{lead}## GPU check: {device}, {self.date}, commit {self.commit}\n\n{intro}\n\n"
                               + self.HEAD)

    @staticmethod
    def _append(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, part: str, case: str, seconds: float | None = None, baseline: str = "", ratio: float | None = None,
            peak_mib: float | None = None, result: str = "", **extra) -> dict:
        """One measured row: ``seconds`` (median or wall), ``ratio`` = baseline time / this time."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        row = {"bench": "gpu_check", "device": self.device, "commit": self.commit, "date": now, "part": part,
               "case": case, "median_s": seconds, "baseline": baseline or None, "speedup_vs_baseline": ratio,
               "peak_mib": peak_mib, "result": result, "command": self.command, **extra}
        cells = [part, case, "-" if seconds is None else f"{seconds * 1e3:.1f}",
                 f"{ratio:.2f}x vs {baseline}" if ratio is not None else "-",
                 "-" if peak_mib is None else f"{peak_mib:.0f}", result or "-", self.device, self.date,
                 self.commit, f"`{self.command}`"]
        line = "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |\n"
        held = threading.current_thread() is threading.main_thread()
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            with self.lock:
                self._append(self.markdown, line)
                self._append(self.results, json.dumps(row, default=str) + "\n")
                self.written.append(row)
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        print(line.rstrip(), flush=True)
        return row


# ------------------------------------------------------------------------------------------------ run state

class PartOverrun(BaseException):
    """Raised in the main thread (SIGALRM) when a part passes its cap; a BaseException, so that no library's
    ``except Exception`` swallows it."""


@dataclass
class Context:
    """What the parts share: settings, device, the rows, the models built so far, and the running part's deadline
    (``time.monotonic()`` seconds)."""

    settings: Settings
    device: object  # torch.device
    rows: Rows
    run_deadline: float
    models: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # Measurements later parts compare with
    part: str = ""
    deadline: float = 0.0
    children: list = field(default_factory=list)  # subprocesses (Popen) to stop with the part or the run

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, case: str, **kwargs) -> dict:
        return self.rows.add(self.part, case, **kwargs)

    def need(self, name: str):
        if name not in self.models:
            raise RuntimeError(f"needs the {name} model, which an earlier part did not build (see its row)")
        return self.models[name]


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], None]
    optional: bool = False  # run only when the time left also holds every later part's RESERVE


def _alarm(signum, frame):
    raise PartOverrun()


def run_parts(ctx: Context, parts: list[Part]) -> dict[str, str]:
    """Each part in turn under its cap (``ctx.settings.caps``, never past the run's deadline); a part that raises or
    passes its cap gets a row saying so and the next part runs. Returns part -> "ok" | what stopped it."""
    outcome = {}
    signal.signal(signal.SIGALRM, _alarm)
    for i, part in enumerate(parts):
        ctx.part = part.name
        start = time.monotonic()
        cap = ctx.settings.caps[part.name]
        room = ctx.run_deadline - start
        later = sum(RESERVE.get(p.name, 0) for p in parts[i + 1:])
        if room < 5 or (part.optional and room < cap + later):
            why = (f"not run: {room:.0f} s left of the budget" if room < 5 else
                   f"not run: {room:.0f} s left, it needs its cap of {cap} s plus {later} s for the later parts")
            ctx.add(why)
            outcome[part.name] = why
            continue
        ctx.deadline = start + min(cap, room - 2)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, ctx.deadline - start))
        try:
            try:
                part.run(ctx)
                outcome[part.name] = "ok"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)  # an alarm after this point cannot interrupt a row
        except PartOverrun:
            outcome[part.name] = f"stopped at its cap of {round(ctx.deadline - start, 1):g} s"
            ctx.add(f"{outcome[part.name]} (rows above were measured)", seconds=time.monotonic() - start)
        except Exception as error:  # a part's failure is a row, and the next part runs
            traceback.print_exc()
            first_line = str(error).splitlines()[0][:300] if str(error) else ""
            outcome[part.name] = f"error: {type(error).__name__}: {first_line}"
            ctx.add(outcome[part.name], seconds=time.monotonic() - start)
        _free_memory()
    return outcome


def stop_children(ctx: Context) -> None:
    """Kill the process group of every subprocess a part started that is still running."""
    while ctx.children:
        child = ctx.children.pop()
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()


def start_watchdog(rows: Rows, ctx: Context, seconds: float) -> threading.Timer:
    """Ends the process (exit 3) ``seconds`` from now, after a row naming the part it stopped."""

    def fire():
        stop_children(ctx)
        rows.add(ctx.part or "-", f"watchdog: the whole run passed its budget ({seconds:.0f} s with grace); "
                                  "stopped here, rows above were measured")
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


# ------------------------------------------------------------------------------------------------ helpers

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_decoders() -> None:
    """Drop the decoders the image engine keeps between calls (each holds a whole KV cache: at a planned batch,
    most of the GPU), so that the next model's plan sees the memory free. The engine has no public call for this."""
    from ospo_fast.engine import image_gen

    pool = getattr(image_gen, "_POOL", None)
    if hasattr(pool, "clear"):
        pool.clear()
    _free_memory()


def timed(ctx: Context, name: str, fn: Callable[[], object], repeats: int = 3):
    """Median of up to ``repeats`` calls of ``fn`` (at most ``settings.repeats``; no warm-up here: callers warm
    up), stopping early when the next call would pass the part's deadline; peak memory of the calls (CUDA
    allocator, above what was allocated before; None on the CPU). A ``harness.Measurement``."""
    import torch

    from benchmarks.harness import Measurement, measure

    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    times = []
    for _ in range(max(1, min(repeats, ctx.settings.repeats))):
        times.append(measure(name, fn, ctx.device, warmup=0, repeats=1, memory=False).median_s)
        if ctx.left() < 1.2 * times[-1]:
            break
    peak = (torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20 if cuda else None
    return Measurement(name=name, median_s=statistics.median(times), peak_mib=peak, repeats=len(times), times=times)


def first_call(ctx: Context, fn: Callable[[], object]) -> tuple[float, int, int]:
    """Wall seconds of one call (where the compiled engine compiles and records its CUDA graph), and the graphs
    dynamo compiled and graph breaks it took during it."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    start = time.perf_counter()
    fn()
    _sync(ctx.device)
    return (time.perf_counter() - start, counters["stats"]["unique_graphs"] - graphs,
            sum(counters["graph_break"].values()) - breaks)


def build_bundle(shape: Shape, device, dtype=None, seed: int = 0, layers: int | None = None):
    """``ospo_fast.models.factory.build_random_bundle`` of ``shape``, bf16 unless ``dtype`` says otherwise."""
    import torch

    from ospo_fast.models.factory import build_random_bundle

    return build_random_bundle(shape.kind, shape.grid, device, dtype or torch.bfloat16, seed, layers)


def model_gib(bundle) -> float:
    return sum(p.numel() * p.element_size() for p in bundle.model.parameters()) / 2**30


# ------------------------------------------------------------------------------------------------ the floor

def gpu_spec(name: str):
    """``ospo_fast.plan.GPUS``' entry for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), or None where the name
    does not say which part it is (PCIe and NVL boards have other bandwidths; other GPUs are not on record)."""
    from ospo_fast.plan import GPUS

    n = name.upper()
    if "PCIE" in n or "NVL" in n:
        return None
    if "H200" in n:
        return GPUS["h200"]
    if "H100" in n:
        return GPUS["h100"]
    if "A100" in n and "80GB" in n.replace(" ", ""):
        return GPUS["a100-80gb"]
    if "A100" in n and "40GB" in n.replace(" ", ""):
        return GPUS["a100-40gb"]
    return None


def floor_text(bundle, prompts: list[str], device_name: str, images_per_s: float) -> str:
    """'x images/s; y% of the floor' for a synthesis row: ``ospo_fast.plan.synthesis_floor`` (the KV each image's
    two CFG rows read at these prompts' mean token count, plus the weights once per step shared by the batch) at
    this GPU's datasheet bandwidth; 'floor unknown' for a GPU without one on record."""
    from ospo_fast.engine.prompts import image_prompt_inputs
    from ospo_fast.plan import SynthesisShape, model_shape, synthesis_floor

    spec = gpu_spec(device_name)
    if spec is None:
        return f"{images_per_s:.2f} images/s; floor unknown ({device_name})"
    _, mask = image_prompt_inputs(bundle.processor, prompts)
    shape = SynthesisShape.of(model_shape(bundle.model.config, count_flops=False),
                              prompt_len=round(mask.sum(1).float().mean().item()), dtype="bfloat16")
    floor = synthesis_floor(shape, len(prompts), spec)
    return (f"{images_per_s:.2f} images/s; {images_per_s / floor.images_per_s:.1%} of the bandwidth floor "
            f"{floor.images_per_s:.1f} images/s ({floor.bytes_per_image / 1e9:.1f} GB/image: KV "
            f"{floor.kv_bytes / 1e9:.1f} + weights {floor.weight_bytes / 1e9:.1f}; {spec.bandwidth / 1e12:.2f} TB/s)")


# ------------------------------------------------------------------------------------------------ parts

def part_smoke(ctx: Context) -> None:
    """A tiny model through each public entry on the device, and a Triton op against its reference."""
    import numpy as np
    import torch

    from benchmarks.bench_image_gen import make_prompts
    from ospo_fast._backend import triton_available
    from ospo_fast.config import ImageConfig, LossConfig
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.engine.object_attention import teacher_forced_object_maps
    from ospo_fast.engine.vqa import score_yes_no
    from ospo_fast.ops.object_masks import object_masks
    from ospo_fast.ops.simpo_loss import fused_obj_simpo_loss

    start = time.perf_counter()
    bundle = build_bundle(ctx.settings.smoke, ctx.device)
    prompts, objects = make_prompts(2)
    images = generate_images(bundle, prompts, [0, 1], ImageConfig(batch_size=2, compile=False), objects=objects)
    maps = teacher_forced_object_maps(bundle, prompts, images.tokens, objects)
    side = bundle.grid * 16
    vqa = score_yes_no(bundle, [np.zeros((side, side, 3), np.uint8)], [["Is there a red car?"]])
    head = bundle.model.model.generation_head.vision_head
    hidden = torch.randn(4, images.tokens.shape[1], head.in_features, device=ctx.device,
                         dtype=head.weight.dtype, requires_grad=True)
    tokens = images.tokens.repeat(2, 1).to(ctx.device)
    loss = fused_obj_simpo_loss(hidden, head.weight, head.bias, tokens, torch.rand(tokens.shape, device=ctx.device),
                                LossConfig()).loss
    loss.backward()
    loss = loss.detach()
    checks = [f"images {tuple(images.tokens.shape)}", f"maps {tuple(maps.shape)}", f"p(yes) {vqa[0][0][0]:.3f}",
              f"loss {loss.item():.3f}"]
    if ctx.device.type == "cuda" and triton_available():
        scores = torch.rand(8, 2, 24, 24, device=ctx.device)
        same = torch.equal(object_masks(scores, backend="triton").union.cpu(),
                           object_masks(scores.cpu(), backend="ref").union)
        checks.append(f"Triton Otsu {'= ref' if same else 'DIFFERS from ref'}")
    if not torch.isfinite(loss) or not torch.isfinite(hidden.grad).all():
        raise RuntimeError(f"the smoke step's fused loss or its gradient is not finite ({', '.join(checks)})")
    ctx.add("tiny model: eager images + capture, teacher-forced maps, Self-VQA, fused loss fwd+bwd",
            seconds=time.perf_counter() - start, result="ok: " + ", ".join(checks))


def part_build_1b(ctx: Context) -> None:
    start = time.perf_counter()
    bundle = build_bundle(ctx.settings.model_1b, ctx.device)
    _sync(ctx.device)
    ctx.models["1b"] = bundle
    params = sum(p.numel() for p in bundle.model.parameters())
    ctx.add(f"build {ctx.settings.model_1b.label}, bf16, random init on the device",
            seconds=time.perf_counter() - start, result=f"{params / 1e9:.2f} B parameters, {model_gib(bundle):.2f} GiB")


def _synthesis(ctx: Context, bundle, batch: int, label: str):
    """The compiled engine (``images.compile=auto``) drawing ``batch`` images: a first call (compile + CUDA graph
    + one generation) as its own row, then the median of full ``generate_images`` calls."""
    from benchmarks.bench_image_gen import make_prompts
    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import compile_enabled, generate_images

    prompts, _ = make_prompts(batch)
    config = ImageConfig(batch_size=batch, compile="auto")
    run = lambda: generate_images(bundle, prompts, list(range(batch)), config)  # noqa: E731
    engine = "compiled engine" if compile_enabled("auto", ctx.device) else "engine (compile=auto: eager here)"
    first, graphs, breaks = first_call(ctx, run)
    m = timed(ctx, f"{engine}, {label}", run)
    compile_s = f"compile ~ {max(0.0, first - m.median_s):.1f} s" if graphs else "nothing compiled"
    ctx.add(f"{engine}, {label}: first call (compile + CUDA graph + one generation)", seconds=first,
            result=f"{compile_s}; {graphs} graph(s), {breaks} graph breaks", compile_s=first - m.median_s)
    images_per_s = batch / m.median_s
    ctx.add(f"{engine}, {label}, {bundle.num_image_tokens} tokens, CFG", seconds=m.median_s, peak_mib=m.peak_mib,
            result=floor_text(bundle, prompts, ctx.rows.device, images_per_s), images_per_s=images_per_s,
            repeats=m.repeats)
    return m


def part_synthesis_1b_b16(ctx: Context) -> None:
    bundle = ctx.need("1b")
    ctx.results["engine-b16"] = _synthesis(ctx, bundle, ctx.settings.batch, f"batch {ctx.settings.batch}")


def part_generate_1b_b16(ctx: Context) -> None:
    """transformers' generate on the engine's prompts: eager, one call per repeat (no warm-up: the engine's calls
    warmed the device); then the engine's batch-16 figure against it."""
    from benchmarks.bench_image_gen import make_prompts, transformers_generate
    from ospo_fast.config import ImageConfig

    bundle, batch = ctx.need("1b"), ctx.settings.batch
    prompts, _ = make_prompts(batch)
    m = timed(ctx, "transformers generate", lambda: transformers_generate(bundle, prompts, ImageConfig()), repeats=2)
    ctx.add(f"transformers generate(generation_mode='image'), batch {batch}, same prompts", seconds=m.median_s,
            peak_mib=m.peak_mib, result=floor_text(bundle, prompts, ctx.rows.device, batch / m.median_s),
            images_per_s=batch / m.median_s, repeats=m.repeats)
    engine = ctx.results.get("engine-b16")
    if engine is not None:
        ctx.add(f"engine (synthesis-1b-b16) against transformers generate, batch {batch}", seconds=engine.median_s,
                baseline="transformers generate", ratio=m.median_s / engine.median_s,
                result=f"engine {batch / engine.median_s:.2f} images/s, generate {batch / m.median_s:.2f} images/s")


def planned_batch(ctx: Context, config, resident_bytes: float = 0.0) -> tuple[int, str]:
    """The batch ``ospo_fast.plan`` plans for image synthesis of ``config`` (bf16) with this device's memory: what
    is free now plus ``resident_bytes`` (the model's own weights when it is already built; the plan counts them)."""
    import torch

    from ospo_fast import plan

    if ctx.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(ctx.device)
        budget = free + torch.cuda.memory_reserved(ctx.device) - torch.cuda.memory_allocated(ctx.device)
    else:
        budget = plan.device_budget(ctx.device)
    shape = plan.model_shape(config, count_flops=False)
    choice = plan.auto_batch(shape, "images", budget + resident_bytes, cap=ctx.settings.plan_cap, dtype="bfloat16")
    return plan.stable_batch(choice.batch), choice.line()


def part_synthesis_1b_planned(ctx: Context) -> None:
    bundle = ctx.need("1b")
    release_decoders()
    batch, line = planned_batch(ctx, bundle.model.config, resident_bytes=model_gib(bundle) * 2**30)
    ctx.add(f"planned batch ({ctx.settings.model_1b.label})", result=f"batch {batch}: {line}", batch=batch)
    _synthesis(ctx, bundle, batch, f"planned batch {batch}")
    release_decoders()


def part_synthesis_7b_planned(ctx: Context) -> None:
    from ospo_fast.plan import kind_config

    release_decoders()
    shape = ctx.settings.model_7b
    batch, line = planned_batch(ctx, kind_config(shape.kind, shape.grid))
    ctx.add(f"planned batch ({shape.label})", result=f"batch {batch}: {line}", batch=batch)
    start = time.perf_counter()
    bundle = build_bundle(shape, ctx.device)
    _sync(ctx.device)
    ctx.add(f"build {shape.label}, bf16, random init on the device", seconds=time.perf_counter() - start,
            result=f"{sum(p.numel() for p in bundle.model.parameters()) / 1e9:.2f} B parameters, "
                   f"{model_gib(bundle):.2f} GiB")
    try:
        _synthesis(ctx, bundle, batch, f"planned batch {batch}")
    finally:
        del bundle
        release_decoders()


def part_masks(ctx: Context) -> None:
    """In-flight capture: compiled synthesis with and without ``objects`` (batch 16); teacher-forced capture of 16
    images against the bare forward of the same inputs and eager ``output_attentions`` one image at a time."""
    import torch

    from benchmarks.bench_image_gen import make_prompts
    from benchmarks.bench_object_masks import eager_maps
    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import compile_enabled, generate_images
    from ospo_fast.engine.object_attention import teacher_forced_inputs, teacher_forced_object_maps

    bundle, batch, n = ctx.need("1b"), ctx.settings.batch, ctx.settings.mask_images
    engine = "compiled engine" if compile_enabled("auto", ctx.device) else "engine (eager here)"
    prompts, objects = make_prompts(batch)
    config = ImageConfig(batch_size=batch, compile="auto")
    plain = lambda: generate_images(bundle, prompts, list(range(batch)), config)  # noqa: E731
    capture = lambda: generate_images(bundle, prompts, list(range(batch)), config, objects=objects)  # noqa: E731
    first_call(ctx, plain)  # the graph of synthesis-1b-b16 (compiled there, or here if that part did not run)
    first, graphs, breaks = first_call(ctx, capture)
    ctx.add(f"{engine} + in-flight masks, batch {batch}: first call (compile + CUDA graph + one generation)",
            seconds=first, result=f"{graphs} graph(s), {breaks} graph breaks")
    bare = timed(ctx, "no capture", plain, repeats=2)
    captured = timed(ctx, "in-flight capture", capture, repeats=2)
    ctx.add(f"{engine}, batch {batch}, no capture", seconds=bare.median_s, peak_mib=bare.peak_mib)
    ctx.add(f"{engine}, batch {batch}, in-flight capture", seconds=captured.median_s, peak_mib=captured.peak_mib,
            baseline="no capture", ratio=bare.median_s / captured.median_s,
            result=f"capture costs {captured.median_s / bare.median_s - 1:+.1%}")
    release_decoders()

    tf_prompts, tf_objects = make_prompts(n)
    tokens = torch.randint(0, bundle.model.config.vq_config.num_embeddings, (n, bundle.num_image_tokens),
                           generator=torch.Generator().manual_seed(0)).to(ctx.device)
    lm = bundle.model.model.language_model

    @torch.no_grad()
    def forward():
        inputs = teacher_forced_inputs(bundle, tf_prompts, tokens)
        lm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
           position_ids=inputs["position_ids"], use_cache=False)

    maps = lambda: teacher_forced_object_maps(bundle, tf_prompts, tokens, tf_objects)  # noqa: E731
    forward()  # warm-up
    maps()
    bare = timed(ctx, "bare forward", forward)
    tf = timed(ctx, "teacher-forced capture", maps)
    ctx.add(f"teacher-forced bare forward (sdpa), {n} images", seconds=bare.median_s, peak_mib=bare.peak_mib)
    ctx.add(f"teacher-forced capture (object maps), {n} images", seconds=tf.median_s, peak_mib=tf.peak_mib,
            baseline="bare forward", ratio=bare.median_s / tf.median_s,
            result=f"capture costs {tf.median_s / bare.median_s - 1:+.1%}")

    def eager_per_image():
        lm.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                for i in range(n):
                    eager_maps(bundle, tf_prompts[i:i + 1], tokens[i:i + 1], tf_objects[i:i + 1])
        finally:
            lm.set_attn_implementation("sdpa")

    eager = timed(ctx, "eager output_attentions per image", eager_per_image, repeats=1)
    ctx.add(f"eager output_attentions, one image at a time, {n} images", seconds=eager.median_s,
            peak_mib=eager.peak_mib, baseline="teacher-forced capture", ratio=tf.median_s / eager.median_s,
            result=f"capture {eager.median_s / tf.median_s:.2f}x faster (target 20x, #14)")


def part_loss(ctx: Context) -> None:
    """Obj-SimPO + SFT over the generation head's last Linear, forward + backward to hidden, weight and bias, bf16:
    the fused op against the naive reference (full logits + float32 log-softmax)."""
    import torch

    from ospo_fast.config import LossConfig
    from ospo_fast.ops.simpo_loss import fused_obj_simpo_loss, fused_obj_simpo_loss_ref

    bundle, pairs = ctx.need("1b"), ctx.settings.loss_pairs
    head = bundle.model.model.generation_head.vision_head
    g = torch.Generator().manual_seed(0)
    n, vocab = bundle.num_image_tokens, head.out_features
    hidden = torch.randn(2 * pairs, n, head.in_features, generator=g).to(ctx.device, head.weight.dtype)
    leaves = [hidden.requires_grad_(), head.weight.detach().clone().requires_grad_(),
              head.bias.detach().clone().requires_grad_()]
    targets = torch.randint(0, vocab, (2 * pairs, n), generator=g).to(ctx.device)
    masks = torch.rand(2 * pairs, n, generator=g).to(ctx.device)
    config = LossConfig()

    def step(loss_fn):
        def run():
            for leaf in leaves:
                leaf.grad = None
            out = loss_fn(*leaves, targets, masks, config)
            out.loss.backward()
        return run

    cases = {"naive (logits + log_softmax)": step(fused_obj_simpo_loss_ref),
             "fused head + loss": step(lambda *a: fused_obj_simpo_loss(*a, check_values=False))}
    results = {}
    for name, fn in cases.items():
        fn()  # warm-up
        results[name] = timed(ctx, name, fn, repeats=5)
    base = results["naive (logits + log_softmax)"]
    for name, m in results.items():
        ctx.add(f"{name}, {pairs} pairs x {n} tokens, V {vocab}, bf16, fwd+bwd", seconds=m.median_s,
                peak_mib=m.peak_mib, baseline="naive", ratio=base.median_s / m.median_s,
                result="" if m is base else (f"memory {m.peak_mib / base.peak_mib:.2f}x naive"
                                             if m.peak_mib and base.peak_mib else ""))


def part_vqa(ctx: Context) -> None:
    import numpy as np

    from benchmarks.bench_vqa import QUESTIONS, batched_full, per_question
    from ospo_fast.engine.vqa import answer_token_ids, score_yes_no

    bundle, n = ctx.need("1b"), ctx.settings.vqa_images
    side = bundle.grid * 16
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]
    questions = [list(QUESTIONS) for _ in images]
    ids = answer_token_ids(bundle)
    cases = {"per-question forward": lambda: per_question(bundle, images, ids),
             "batched full forwards": lambda: batched_full(bundle, images, ids),
             "engine score_yes_no (prefix cache)": lambda: score_yes_no(bundle, images, questions, n)}
    results = {}
    for name, fn in cases.items():
        fn()  # warm-up
        results[name] = timed(ctx, name, fn)
    base = results["per-question forward"]
    for name, m in results.items():
        ctx.add(f"{name}, {n} images x {len(QUESTIONS)} questions", seconds=m.median_s, peak_mib=m.peak_mib,
                baseline="per-question forward", ratio=base.median_s / m.median_s,
                result=f"{n * len(QUESTIONS) / m.median_s:.1f} questions/s")


def part_train(ctx: Context) -> None:
    """One optimizer step of the trainer on the 1B model in place (LoRA r 64, bf16 autocast, checkpointing): fused
    loss, then the naive loss on the same trainer. Last of the model parts: LoRA stays in the model."""
    from benchmarks.bench_train import write_random_pairs
    from ospo_fast.config import OSPOConfig
    from ospo_fast.train.trainer import Trainer

    bundle, pairs = ctx.need("1b"), ctx.settings.train_pairs
    config = OSPOConfig()
    config.model.path, config.model.device, config.model.dtype = bundle.source, str(ctx.device), "bfloat16"
    tc = config.train
    tc.per_device_batch, tc.grad_accum, tc.max_steps, tc.gradient_checkpointing, tc.bf16 = pairs, 1, 10**6, True, True
    config.loss.fused = True
    with tempfile.TemporaryDirectory() as tmp:
        file = write_random_pairs(Path(tmp) / "pairs.jsonl", 2 * pairs, bundle.grid,
                                  bundle.model.config.vq_config.num_embeddings)
        trainer = Trainer(config, file, Path(tmp) / "train", bundle=bundle)
        results = {}
        for name, fused in (("fused head + loss", True), ("naive loss (full logits)", False)):
            trainer.core.loss_config = dataclasses.replace(config.loss, fused=fused)
            metrics = trainer.train_step()  # warm-up
            results[name] = (timed(ctx, name, trainer.train_step, repeats=2), metrics)
    base = results["naive loss (full logits)"][0]
    for name, (m, metrics) in results.items():
        ctx.add(f"train step, {name}, {pairs} pairs, LoRA r {tc.lora_r}, checkpointing", seconds=m.median_s,
                peak_mib=m.peak_mib, baseline="naive loss", ratio=base.median_s / m.median_s,
                result=f"{pairs / m.median_s:.2f} pairs/s; loss {metrics['loss']:.4f} at its warm-up step")


def parse_pytest(output: str) -> tuple[dict[str, int], list[str]]:
    """Counts per outcome and the failed tests, from ``pytest -v`` lines ("tests/x.py::test PASSED [ 5%]"): also
    what a killed run had printed."""
    counts: dict[str, int] = {}
    failed = []
    for line in output.splitlines():
        match = TEST_LINE.match(line.strip())
        if match:
            counts[match.group(2).lower()] = counts.get(match.group(2).lower(), 0) + 1
            if match.group(2) in ("FAILED", "ERROR"):
                failed.append(match.group(1))
    return counts, failed


def part_gpu_tests(ctx: Context) -> None:
    """The tests tests/gpu.py gates on CUDA (``-p benchmarks.gpu_check --gpu-only``), real Triton JIT (no
    ``TRITON_INTERPRET``), in a subprocess with the time left; the models of this process are freed first."""
    ctx.models.clear()
    ctx.results.clear()
    release_decoders()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # each result line reaches the log at once: a stopped run still counts
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check",
           "--gpu-only", *ctx.settings.tests]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)  # its own process group: stopped with all it started
        ctx.children.append(child)
        try:
            status = f"exit {child.wait(timeout=max(1.0, ctx.left() - 3))}"
        except subprocess.TimeoutExpired as error:
            status = f"stopped at {error.timeout:.0f} s"
        finally:
            stop_children(ctx)
        log.seek(0)
        output = log.read()
    print(output[-6000:], flush=True)
    counts, failed = parse_pytest(output)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no test lines"
    ctx.add(f"GPU tests ({' '.join(ctx.settings.tests)}), {status}", seconds=time.perf_counter() - start,
            result=summary + (f"; failed: {', '.join(failed[:8])}" if failed else ""), counts=counts, failed=failed)


PARTS = [Part("smoke", part_smoke), Part("build-1b", part_build_1b),
         Part("synthesis-1b-b16", part_synthesis_1b_b16), Part("generate-1b-b16", part_generate_1b_b16),
         Part("synthesis-1b-planned", part_synthesis_1b_planned),
         Part("synthesis-7b-planned", part_synthesis_7b_planned, optional=True),
         Part("masks", part_masks), Part("loss", part_loss), Part("vqa", part_vqa), Part("train", part_train),
         Part("gpu-tests", part_gpu_tests)]


# ------------------------------------------------------------------------------------------------ main

def require_cuda() -> str:
    """The CUDA device's name; exits with a one-line reason where there is none."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check needs a CUDA device, and torch {torch.__version__} ({build}) sees none "
              f"(torch.cuda.is_available() is False): run it on the lent GPU machine; on a CPU use `make test` "
              f"(or `python benchmarks/gpu_check.py --dry-run`)", file=sys.stderr)
        sys.exit(2)
    return torch.cuda.get_device_name(0)


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def pinned(package: str) -> str:
    """The version requirements.txt pins for ``package`` ("?" where it pins none)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}\s*==\s*([^\s;#]+)", line.strip())
        if match:
            return match.group(1)
    return "?"


def versions(device) -> dict[str, str]:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda),
           "triton": triton_version, "transformers": transformers.__version__,
           "pinned": f"torch {pinned('torch')}, triton {pinned('triton')}, transformers {pinned('transformers')}"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, memory_gib=f"{props.total_memory / 2**30:.1f}", driver=driver_version(),
                   capability=f"sm_{props.major}{props.minor}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny shapes, rows to "
                        "temporary files (or --benchmarks-file / --results-file)")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole check (default {GPU.budget:.0f}; "
                        f"dry run {DRY.budget:.0f})")
    parser.add_argument("--parts", help="comma-separated subset, run in the fixed order: "
                        + ",".join(p.name for p in PARTS))
    parser.add_argument("--benchmarks-file", type=Path, help="markdown rows (default BENCHMARKS.md)")
    parser.add_argument("--results-file", type=Path, help="JSON lines (default benchmarks/results.jsonl)")
    args = parser.parse_args(argv)
    names = [p.name for p in PARTS]
    if args.parts:
        unknown = sorted(set(args.parts.split(",")) - set(names))
        if unknown:
            parser.error(f"--parts {unknown} unknown; choose from {names}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = DRY if args.dry_run else GPU
    from ospo_fast.threads import configure_cpu_threads

    configure_cpu_threads()  # before torch loads OpenMP: the host side shares the machine too (ospo_fast/threads.py)
    device_name = None if args.dry_run else require_cuda()
    import torch

    from benchmarks import harness

    device = torch.device("cpu" if args.dry_run else "cuda")
    budget = args.budget or settings.budget
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else None
    markdown = args.benchmarks_file or (scratch / "BENCHMARKS.md" if scratch else ROOT / "BENCHMARKS.md")
    results = args.results_file or (scratch / "results.jsonl" if scratch else harness.RESULTS)
    env = versions(device)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/gpu_check.py" + (" " + shlex.join(given) if given else "")
    what = "Dry run on the CPU at tiny shapes" if args.dry_run else "Models random-initialised in bf16 on the device"
    intro = (f"{what}; "
             f"torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, transformers {env['transformers']}"
             + (f", driver {env['driver']}, {env['gpu']} {env['memory_gib']} GiB {env['capability']}"
                if "gpu" in env else "")
             + f" (requirements.txt pins {env['pinned']}); budget {budget:.0f} s; each row written when measured.")
    rows = Rows(markdown, results, device_name or harness.device_name(device), command, intro)
    ctx = Context(settings=settings, device=device, rows=rows, run_deadline=time.monotonic() + budget, part="setup")
    start = time.monotonic()
    start_watchdog(rows, ctx, budget + WATCHDOG_GRACE_S)
    rows.add("setup", "versions", result="; ".join(f"{k} {v}" for k, v in env.items()), versions=env)
    wanted = set(args.parts.split(",")) if args.parts else None
    outcome = run_parts(ctx, [p for p in PARTS if wanted is None or p.name in wanted])
    bad = {name: why for name, why in outcome.items() if why != "ok"}
    ctx.part = "total"
    rows.add("total", f"{len(outcome) - len(bad)} of {len(outcome)} parts ok", seconds=time.monotonic() - start,
             result="; ".join(f"{k}: {v}" for k, v in bad.items()) or "every part ran")
    print(f"\nrows appended to {markdown} and {results}")
    return 1 if bad else 0


# pytest plugin (``-p benchmarks.gpu_check --gpu-only``): keep only the tests that tests/gpu.py gates on CUDA.

def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true", help="run only the tests gated by tests/gpu.py")


def gpu_gated(item) -> bool:
    """True for a test marked with one of tests/gpu.py's CUDA gates or its "triton" parameter's skip mark."""
    from tests.gpu import CUDA_GATES, TRITON

    gates = [*(g.mark for g in CUDA_GATES), *(m.mark if hasattr(m, "mark") else m for m in TRITON.marks)]
    return any(mark in gates for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-only"):
        return
    keep = [item for item in items if gpu_gated(item)]
    kept = {id(item) for item in keep}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep


if __name__ == "__main__":
    sys.exit(main())
