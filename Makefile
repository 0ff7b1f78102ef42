# The two set-up commands of the README: `make demo` (the main job on the built-in default) and `make test`.
# Both create or reuse the virtual environment in $(VENV) and install what is needed first.
VENV ?= .venv
PY := $(VENV)/bin/python
# PY_STAMP: requirements + the package (editable), all the demo needs; STAMP: + the C++ extension (the tests check it)
PY_STAMP := $(VENV)/.ospo_fast_python
STAMP := $(VENV)/.ospo_fast_installed

.PHONY: demo test test-gpu gpu-check bench bench-pytest lint install clean

$(PY_STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "== installing requirements.txt into $(VENV) (about a minute)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@echo "== installing ospo_fast (editable, its C++ extension built separately by make install / make test)"
	OSPO_FAST_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(PY_STAMP)

$(STAMP): $(PY_STAMP) $(wildcard csrc/*.cpp csrc/cuda/*.cu)
	@echo "== compiling the C++ extension ospo_fast._C from csrc/ (minutes on 2 cores; each g++ line as it starts)"
	# setup.py directly, not through pip (pip shows a build's output only with -v), against the torch just
	# installed; --force: a new torch needs a new build.
	$(PY) setup.py build_ext --inplace --force
	touch $(STAMP)

install: $(STAMP)

# The demo does not wait for the C++ build: its ops have PyTorch references that give the same masks (the
# extension is a CPU speed-up, tested by make test), so it uses the extension when built and the references when not.
demo: $(PY_STAMP)
	$(PY) -m ospo_fast.cli run --preset toy --out runs/demo

# CI has no GPU: Triton kernels run on the CPU through the interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The same suite through pytest-benchmark (JSON: --benchmark-json=FILE; --benchmark-autosave, --benchmark-compare).
bench-pytest: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

# On a lent GPU, one command (benchmarks/gpu_check.py, one process): smoke, Janus-Pro-1B-shape synthesis images/s
# (compiled engine at batch 16 and at the planned batch, transformers' generate), the 7B shape if the budget allows,
# mask capture, fused loss, Self-VQA, a training step, then the GPU tests; within 8 minutes on an H100, each row
# (device, date, commit, command) appended to BENCHMARKS.md the moment it is measured. No C++ extension build (no
# GPU figure needs it): an installed $(VENV) is used as it is, a missing one gets requirements.txt and the package
# without the extension. Refuses without CUDA; `$(PY) benchmarks/gpu_check.py --dry-run` rehearses it on a CPU.
gpu-check:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import ospo_fast.kernels, transformers" 2>/dev/null || { $(PY) -m pip install -q -r requirements.txt \
	  && OSPO_FAST_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .; }
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ospo_fast kernels benchmarks tests recipes

clean:
	rm -rf build *.egg-info ospo_fast/_C*.so
