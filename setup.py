"""Build ospo_fast: the Python package, the Triton kernels (mapped to ``ospo_fast.kernels``) and the compiled
extension ``ospo_fast._C`` from ``csrc/``.

- Every ``csrc/*.cpp`` is compiled with g++ -O3 and OpenMP through torch's cpp_extension.
- ``csrc/cuda/*.cu`` is compiled only where torch is a CUDA build and nvcc is present.
- ``OSPO_FAST_NO_EXT=1`` skips the extension entirely; the package then runs on its PyTorch and Triton paths.

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch already
installed (an isolated build would download a second torch).
"""

import glob
import os
import shutil
import time

from setuptools import find_namespace_packages, setup


def _extensions() -> tuple[list, dict]:
    if os.environ.get("OSPO_FAST_NO_EXT", "0") == "1":
        print("ospo_fast: OSPO_FAST_NO_EXT=1, skipping the compiled extension")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    extra = {"cxx": ["-O3", "-fopenmp", "-std=c++20"]}  # torch 2.13 headers are C++20 (c++17 warns)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    has_nvcc = cpp_extension.CUDA_HOME is not None and shutil.which("nvcc") is not None
    if cuda_sources and torch.version.cuda is not None and has_nvcc:
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        ext = cpp_extension.CUDAExtension(
            "ospo_fast._C", sources + cuda_sources, extra_compile_args=extra,
            extra_link_args=["-fopenmp"], define_macros=[("OSPO_WITH_CUDA", "1")],
        )
    else:
        ext = cpp_extension.CppExtension(
            "ospo_fast._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": _announced(cpp_extension.BuildExtension).with_options(use_ninja=False)}


def _announced(build_ext: type) -> type:
    """``build_ext`` that says which sources it compiles before it starts (compiling takes minutes on 2 cores and
    pip shows nothing meanwhile unless -v) and how long it took."""

    class AnnouncedBuildExtension(build_ext):
        def build_extension(self, ext):
            names = ", ".join(os.path.basename(s) for s in ext.sources)
            print(f"ospo_fast: compiling {ext.name} from {len(ext.sources)} sources ({names}); about 40 s a file "
                  "on 2 cores", flush=True)
            start = time.perf_counter()
            super().build_extension(ext)
            print(f"ospo_fast: built {ext.name} in {time.perf_counter() - start:.0f} s", flush=True)

    return AnnouncedBuildExtension


ext_modules, cmdclass = _extensions()

setup(
    name="ospo_fast",
    version="0.1.0",
    description="Fast Object-centric Self-improving Preference Optimization for unified multimodal LLMs (Janus-Pro)",
    # namespace packages too: presets/ and assets/ hold only data files, and setuptools warns about (and will stop
    # installing) data folders that are not listed as packages
    packages=find_namespace_packages(include=["ospo_fast", "ospo_fast.*"], exclude=["*.__pycache__"])
    + ["ospo_fast.kernels"],
    package_dir={"ospo_fast.kernels": "kernels"},
    package_data={"ospo_fast": ["presets/*.yaml", "assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0", "transformers>=5.23,<6", "tokenizers", "safetensors", "peft", "numpy",
        "pillow", "pyyaml", "tqdm", "pyarrow",
    ],
    extras_require={"triton": ["triton>=3.9"], "flash": ["flash-attn"]},
    entry_points={"console_scripts": ["ospo-fast=ospo_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
