"""(From the workplace's shared/gpu_rehearsal/fakecuda.py, kept here so that CI's fresh clone has it.)

Make a CPU-only torch build look like it has one CUDA device (an H100 or H200), so that inductor generates and
AOT-compiles (triton.compile -> ptxas, GPUTarget("cuda", 90, 32)) its Triton kernels for CUDA without a GPU.

Nothing runs on a device: inputs are FakeTensors on "cuda", the compiled module is loaded but never called,
and launcher creation (which needs libcuda) is skipped after each kernel compiled. What is caught: inductor's
lowering/codegen errors for the CUDA device and Triton front-end/back-end errors (the class of the first H200
run's "Scalar 2654435761 is out of range for type int32"). Import this module before anything else imports torch.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in this process (the patches live here)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

CC = int(os.environ.get("FAKE_CUDA_CC", "90"))
PROPS = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (fake)", major=CC // 10, minor=CC % 10, multi_processor_count=132,
    total_memory=80 * 2**30, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
    max_threads_per_block=1024, warp_size=32, shared_memory_per_block_optin=227 * 1024,
    shared_memory_per_multiprocessor=228 * 1024, shared_memory_per_block=48 * 1024, L2_cache_size=50 * 2**20,
    gcnArchName="", is_integrated=False, uuid="fake", clock_rate=1_980_000, memory_clock_rate=2_619_000,
    memory_bus_width=5120,
)


def _props(device=None):
    return PROPS


def install() -> None:
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.get_device_properties = _props
    c.get_device_capability = lambda device=None: (PROPS.major, PROPS.minor)
    c.get_device_name = lambda device=None: PROPS.name
    c.is_bf16_supported = lambda *a, **k: True
    c.set_device = lambda *a, **k: None
    c.synchronize = lambda *a, **k: None
    c._lazy_init = lambda: None
    c.is_initialized = lambda: True
    c.mem_get_info = lambda device=None: (70 * 2**30, 80 * 2**30)
    c._exchange_device = lambda device: 0
    torch._C._cuda_getCurrentRawStream = lambda device=0: 0  # imported by inductor's generated wrapper
    c._maybe_exchange_device = lambda device: 0
    import torch.cuda.random as cr

    state = torch.zeros(16, dtype=torch.uint8)
    for mod in (c, cr):
        mod.get_rng_state = lambda device="cuda": state
        mod.set_rng_state = lambda new_state, device="cuda": None
        mod.get_rng_state_all = lambda: [state]
        mod.set_rng_state_all = lambda states: None
    from torch._dynamo import device_interface as di

    ci = di.CudaInterface
    ci.get_device_properties = staticmethod(_props)
    ci.get_compute_capability = staticmethod(lambda device=None: CC)
    ci.is_available = staticmethod(lambda: True)
    ci.device_count = staticmethod(lambda: 1)
    ci.current_device = staticmethod(lambda: 0)
    ci.set_device = staticmethod(lambda *a: None)
    ci.is_bf16_supported = staticmethod(lambda *a, **k: True)
    ci.synchronize = staticmethod(lambda *a, **k: None)
    ci.Worker.get_device_properties = staticmethod(_props)
    ci.Worker.current_device = staticmethod(lambda: 0)
    ci.exchange_device = staticmethod(lambda d: 0)
    ci.maybe_exchange_device = staticmethod(lambda d: 0)

    # inductor compiles each Triton kernel with triton.compile(target=GPUTarget(cuda, CC, 32)); making launchers
    # would load the cubin through libcuda: record the compiled kernels instead.
    from torch._inductor.runtime import triton_heuristics as th

    COMPILED.clear()

    def _no_launchers(self):
        for result in getattr(self, "compile_results", []):
            COMPILED.append((self.fn.__name__, getattr(result, "config", None), result))
        self.launchers = []

    th.CachingAutotuner._make_launchers = _no_launchers

    # Tensor methods bound in C++ open a CUDA DeviceGuard, which a CPU-only build cannot: route the ones inductor's
    # passes call on fake cuda tensors (Tensor.copy_ in reinplace's scatter check) to the dispatcher directly
    from torch._subclasses.fake_tensor import FakeTensor

    original_copy = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):
        if isinstance(self, FakeTensor) and self.device.type == "cuda":
            return torch.ops.aten.copy_.default(self, src, non_blocking)
        return original_copy(self, src, non_blocking)

    torch.Tensor.copy_ = copy_

    # a Triton driver that reports the target and never touches libcuda
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    class FakeCudaDriver(CudaDriver):
        def __init__(self):
            self.utils = None
            self.launcher_cls = CudaLauncher
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: (PROPS.major, PROPS.minor)

        def get_current_target(self):
            return GPUTarget("cuda", CC, 32)

    triton.runtime.driver.set_active(FakeCudaDriver())
    triton.runtime.driver._default = triton.runtime.driver._active

    # inductor's pattern-matcher init traces its replacement patterns on real tensors of the input device
    # (torch.tensor(2.0, device="cuda")): trace them on the CPU instead (the patterns are device-independent aten)
    from torch._inductor.fx_passes import fuse_attention, misc_patterns, pad_mm

    for mod, name in ((fuse_attention, "_sfdp_init"), (misc_patterns, "_misc_patterns_init"),
                      (pad_mm, "_pad_mm_init")):
        original = getattr(mod, name)

        def on_cpu(input_device=None, _original=original, **kw):
            if input_device is not None and torch.device(input_device).type == "cuda":
                input_device = torch.device("cpu")
            return _original(input_device, **kw) if input_device is not None else _original(**kw)

        setattr(mod, name, on_cpu)


COMPILED: list = []


def fake_cuda_like(t: torch.Tensor, mode) -> torch.Tensor:
    """A FakeTensor on cuda:0 with t's shape, strides and dtype."""
    with mode:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda:0")
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _to_cuda_device(value):
    if isinstance(value, torch.device) and value.type == "cpu":
        return torch.device("cuda", 0)
    if isinstance(value, str) and value == "cpu":
        return "cuda:0"
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cuda_device(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cuda_device(v) for k, v in value.items()}
    return value


def retarget(gm: torch.fx.GraphModule) -> int:
    """Rewrite every cpu device constant in ``gm``'s nodes to cuda:0 (what dynamo would have recorded on a GPU).
    Returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        args, kwargs = _to_cuda_device(node.args), _to_cuda_device(node.kwargs)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    gm.recompile()
    return changed


def capture(fn, *args, **kwargs):
    """Run ``fn`` once under torch.compile(fullgraph=True) on the CPU through AOT autograd with inductor's
    decompositions; return the aten-level forward graphs (what inductor lowers) and their example inputs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, decompositions=select_decomp_table())
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args, **kwargs)
    return graphs


def compile_for_cuda(gm, example_inputs, static_input_idxs=(), cudagraphs: bool = False):
    """inductor's post-AOT compile (compile_fx_inner) of the aten graph ``gm``, retargeted to cuda, with
    FakeTensor cuda inputs of the examples' shapes: generates the CUDA Triton kernels and compiles each with
    triton.compile for GPUTarget("cuda", CC, 32) (ptxas included). Returns the compiled kernels."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    retarget(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fakes = [fake_cuda_like(t, mode) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    COMPILED.clear()
    with inductor_config.patch({"triton.cudagraphs": cudagraphs, "compile_threads": 1}), torch.no_grad():
        compile_fx_inner(gm, fakes, static_input_idxs=list(static_input_idxs), is_inference=True)
    return list(COMPILED)
