"""Every Triton kernel in kernels/ compiles for real GPUs (sm_80, sm_90) on this CPU machine, at Janus-Pro shapes
(V = 16,384; float32 and bfloat16 logits; 24x24 object maps), with every autotune configuration, and spills
nothing. The compile runs once per session in a Python without ``TRITON_INTERPRET`` (``kernels/aot.py``): a kernel
that only the interpreter accepts (e.g. ``tl.math.div_rn`` on float64) fails here, not on the first GPU.
"""

import importlib
import inspect
import pkgutil

import pytest
import torch

triton = pytest.importorskip("triton")

import ospo_fast.kernels  # noqa: E402
from ospo_fast.kernels import aot  # noqa: E402

from tests.gpu import requires_cuda, triton_device  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return aot.compile_in_subprocess()


def _kernel_modules() -> list[str]:
    """Every module of the kernels package that defines a Triton kernel."""
    names = [f"{ospo_fast.kernels.__name__}.{m.name}" for m in pkgutil.iter_modules(ospo_fast.kernels.__path__)]
    return [n for n in names if aot.kernel_objects(importlib.import_module(n))]


def test_every_kernel_has_a_launch():
    """A kernel is either compiled from a registered launch or a helper called from one (inlined there)."""
    assert sorted(_kernel_modules()) == sorted(aot.MODULES) == sorted(aot.LAUNCHES)
    for name in aot.MODULES:
        objects = aot.kernel_objects(importlib.import_module(name))
        launched = {launch.kernel for launch in aot.LAUNCHES[name]()}
        assert launched <= set(objects), f"{name}: launches name missing kernels {launched - set(objects)}"
        sources = "\n".join(inspect.getsource(aot.base_function(objects[k])) for k in launched)
        for kernel in set(objects) - launched:
            assert f"{kernel}(" in sources, (f"{name}.{kernel} is neither launched in kernels/aot.py LAUNCHES nor "
                                             f"called by a launched kernel: add its launch there")


def test_all_kernels_compile_for_sm80_and_sm90(compiled):
    got = {(r["module"], r["kernel"], r["case"], r["arch"]) for r in compiled}
    want = {(launch.module, launch.kernel, launch.case, arch) for name in aot.MODULES
            for launch in aot.LAUNCHES[name]() for arch in (80, 90)}
    assert got == want
    assert all(r["cubin_bytes"] > 0 and r["registers"] > 0 for r in compiled)
    cases = {r["case"].split()[0] for r in compiled if r["kernel"].startswith("_logp")}
    assert cases == {"float32", "bfloat16"}


def test_no_register_spills(compiled):
    spilling = [(r["kernel"], r["case"], r["arch"], r["num_warps"], r["local"], r["stack"]) for r in compiled
                if r["local"] or r["stack"]]
    assert not spilling, f"kernels using local memory (kernel, case, sm, warps, LOCAL, STACK): {spilling}"
    assert all(r["registers"] <= 255 for r in compiled)


def test_autotune_configs_and_heuristics_are_compiled(compiled):
    """Each autotune configuration of the object-mask kernel is its own cubin; the heuristic puts the 24x24 map in
    one block of 1,024."""
    from ospo_fast.kernels import object_masks

    rows = [r for r in compiled if r["kernel"] == "_object_masks_otsu_kernel"]
    assert {r["case"] for r in rows} == {"float32 P=576", "float64 P=576"}
    for arch in (80, 90):
        for case in ("float32 P=576", "float64 P=576"):
            warps = [r["num_warps"] for r in rows if r["arch"] == arch and r["case"] == case]
            assert sorted(warps) == sorted(object_masks.WARPS)
    assert {r["meta"]["BLOCK"] for r in rows} == {1024}


def test_compile_refuses_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    with pytest.raises(RuntimeError, match="compile_in_subprocess"):
        aot.compile_all()


def test_table_has_a_row_per_variant_and_both_archs(compiled):
    table = aot.format_table(compiled).splitlines()
    assert "sm_80 regs" in table[0] and "sm_90 spill B" in table[0]
    assert len(table) == 2 + len({(r["kernel"], r["case"], r["num_warps"]) for r in compiled})


def _launches() -> list:
    return [launch for name in aot.MODULES for launch in aot.LAUNCHES[name]()]


@pytest.mark.parametrize("launch", _launches(), ids=lambda launch: f"{launch.kernel}-{launch.case}")
def test_registered_launch_runs(launch):
    """The registry's arguments are the kernel's real ones: each launch runs (interpreter on the CPU, the JIT on a
    GPU), so the AOT compile describes a call that works."""
    device = triton_device()
    if device is None:
        pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")
    aot.run_launch(launch, device)


@requires_cuda
def test_jit_on_this_gpu_builds_the_aot_cubin(compiled):
    """On a GPU: the JIT's own compile of each launch has the AOT compile's registers and shared memory, and no
    spills (the check that the AOT recipe reproduces the runtime specialisation)."""
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    if arch not in aot.ARCHS:
        pytest.skip(f"AOT compiles sm_80 and sm_90, this GPU is sm_{arch}")
    for launch in _launches():
        kernel = aot.run_launch(launch, "cuda")
        torch.cuda.synchronize()
        usage = aot.resource_usage(kernel.asm["cubin"])
        row = next(r for r in compiled if (r["kernel"], r["case"], r["arch"], r["num_warps"]) ==
                   (launch.kernel, launch.case, arch, kernel.metadata.num_warps))
        assert (usage["REG"], usage["LOCAL"], kernel.metadata.shared) == (row["registers"], row["local"],
                                                                          row["shared"]), launch
        assert kernel.n_spills == 0, launch
