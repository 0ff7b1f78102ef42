#!/bin/bash
# One call on a lent GPU machine without a network (this workplace's device tool): install what is carried, print
# the versions it runs on, then `benchmarks/gpu_check.py` (the whole `make gpu-check`: every part in order of value,
# then the GPU tests, within $BUDGET seconds). No C++ extension build and no demo: no GPU figure needs them.
# Everything comes back under $OUT: env.txt, gpu_check.log, and BENCHMARKS.md / results.jsonl, to which each row is
# appended (and fsynced) the moment it is measured, so a call killed at its limit still returns every row before it.
#
# Here, once (the lent image has torch, triton, numpy, peft, scikit-image, ...; these five are missing or older):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.23.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (well under the 64 MiB carry limit, which torch 2.13 and Triton 3.9 would pass: the check runs on the image's
# torch and Triton, and its first row says which.) Then: device run `bash benchmarks/gpu_session.sh` with carry
# [".whl"] and timeout_s 590; the rows are in files_at/BENCHMARKS.md (the last section) and files_at/results.jsonl.
# On a GPU machine with a network, `make gpu-check` does the same.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
BUDGET=${BUDGET:-480}  # seconds for gpu_check.py (its own watchdog ends it 10 s later at most)
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; echo "cpus $(nproc)"; } 2>&1 \
  | tee "$OUT/env.txt"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site
fi
python3 -c "import sys, torch, triton, transformers
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton',
      triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0))" 2>&1 \
  | tee -a "$OUT/env.txt"
grep -E '^(torch|triton|transformers)==' requirements.txt | tr '\n' ' ' | sed 's/^/pinned here: /' | tee -a "$OUT/env.txt"
echo | tee -a "$OUT/env.txt"
# the package itself, editable, without dependencies (the image's torch and Triton) and without the C++ extension
OSPO_FAST_NO_EXT=1 python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . 2>&1 | tail -3
echo "== installed at $(elapsed) s"

cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
python3 benchmarks/gpu_check.py --budget "$BUDGET" --benchmarks-file "$OUT/BENCHMARKS.md" \
  --results-file "$OUT/results.jsonl" 2>&1 | tee "$OUT/gpu_check.log"
echo "== gpu_check exit ${PIPESTATUS[0]} at $(elapsed) s"
