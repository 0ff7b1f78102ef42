# The two set-up commands of the README: `make demo` (the main job on the built-in default) and `make test`.
# Both create or reuse the virtual environment in $(VENV) and install what is needed first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ospo_fast_installed

.PHONY: demo test test-gpu gpu-check bench bench-pytest lint install clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/cuda/*.cu)
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "== installing requirements.txt into $(VENV) (about a minute)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@echo "== compiling the C++ extension ospo_fast._C from csrc/ (minutes on 2 cores; each g++ line as it starts)"
	# setup.py directly, not through pip (pip shows a build's output only with -v), against the torch just
	# installed; --force: a new torch needs a new build. Then the package itself, editable, without a second build.
	$(PY) setup.py build_ext --inplace --force
	@echo "== installing ospo_fast (editable)"
	OSPO_FAST_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
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

# On a lent GPU, one command: the GPU tests and the GPU benchmark suite (Janus-Pro-1B shapes) within 8 minutes,
# rows (device, date, commit, command) appended to BENCHMARKS.md. Refuses on a machine without CUDA.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ospo_fast kernels benchmarks tests recipes

clean:
	rm -rf build *.egg-info ospo_fast/_C*.so
