#!/bin/bash
# One call on a lent GPU machine that has no network (this workplace's device tool): install what is carried,
# run `benchmarks/gpu_check.py` (the GPU tests + the GPU benchmark suite, rows appended to BENCHMARKS.md), build the
# C++ extension against that machine's torch and run its CPU tests, then the toy demo on CUDA with the time left.
# Everything it writes comes back under $OUT (BENCHMARKS.md, results.jsonl, logs).
#
# Here, once (the machine's image has torch, triton, peft, scikit-image, ...; these five are missing or older):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.23.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Then: device run `bash benchmarks/gpu_session.sh` with carry [".whl"] and timeout_s 590 (about 9 minutes).
# On a GPU machine with a network, `make gpu-check` does the first part.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
REPO=$(pwd)
BUDGET=${BUDGET:-400}  # seconds for gpu_check.py
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } 2>&1 | tee "$OUT/env.txt"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site
fi
python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
      triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/env.txt"
OSPO_FAST_NO_EXT=1 python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . 2>&1 | tail -3
echo "== installed at $(elapsed) s"

# The C++ extension against this torch, in a copy, so that no process of the check imports a half-written .so.
( cp -r "$REPO" /tmp/extcopy && cd /tmp/extcopy && rm -rf build ospo_fast/_C*.so \
  && nice timeout 300 python3 setup.py build_ext --inplace > "$OUT/ext.log" 2>&1; echo "build exit $?" >> "$OUT/ext.log"
  cd /tmp/extcopy && TRITON_INTERPRET=1 PYTHONPATH=/tmp/extcopy:${PYTHONPATH:-} nice timeout 200 python3 -m pytest -q \
    -p no:cacheprovider tests/test_object_masks.py tests/test_simpo_loss.py -k cpp >> "$OUT/ext.log" 2>&1
  echo "cpp tests exit $?" >> "$OUT/ext.log" ) &

python3 benchmarks/gpu_check.py --budget "$BUDGET" 2>&1 | tee "$OUT/gpu_check.log"
echo "== gpu_check exit ${PIPESTATUS[0]} at $(elapsed) s"
cp BENCHMARKS.md benchmarks/results.jsonl "$OUT/" 2>/dev/null

LEFT=$(( 555 - $(elapsed) ))
if [ "$LEFT" -gt 40 ]; then
  timeout "$LEFT" python3 -m ospo_fast.cli run --preset toy --out /tmp/demo > "$OUT/demo.log" 2>&1
  echo "== demo exit $? at $(elapsed) s (limit $LEFT s)" | tee -a "$OUT/demo.log"
fi
wait
tail -5 "$OUT/ext.log"
