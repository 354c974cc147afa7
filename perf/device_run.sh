#!/bin/bash
# The device check as run on a lent GPU (H100/H200), in one call of the device tool (~9 minutes):
#   python -m perf.device_bundle --out .whl      # here, once (.whl ignored via .git/info/exclude)
#   device run: bash perf/device_run.sh   (carry: [".whl"], timeout_s 600)
# Installs the bundle under /tmp/site, builds the Cython kernels, then, most important first, each
# step under its own timeout and the budget left (BUDGET seconds in all, default 540):
#   1. the GPU tests (tests/test_cuda.py, the cuda-marked tests of tests/test_cuda_batch.py);
#   2. perf/cuda_batch.py on the full-size Phi-4-mini shape: batch 1/8/32 decode tok/s and rows vs
#      batch 1 and vs onnxruntime-genai-cuda, 8/32 concurrent clients (serialised, auto_batch, genai);
#   3. perf/cuda_concat.py: 100 concat-layout engines created, run and freed (the refusal's check);
#   4. perf/cuda_check.py on 4 layers: graph/no-graph/genai parity and tok/s, no Memcpy node at
#      batch 1 and batch 8;
#   5. make perf's CPU vs CUDA sweep and plot (perf.run, small settings).
# Everything it writes goes to $OUT (the folder the device tool brings back).
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-540}
el() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# run STEP_NAME MAX_SECONDS MIN_SECONDS CMD...: under min(MAX, budget left), skipped below MIN
run() {
  local name=$1 max=$2 min=$3
  shift 3
  local t
  t=$(left)
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt "$min" ]; then
    echo "== SKIPPED $name: $(left) s of the budget left (needs $min)"
    return
  fi
  timeout "$t" "$@" 2>&1 | grep -v "plugin EP device" | tee -a "$OUT/device_run.log"
  echo "== $name: exit ${PIPESTATUS[0]} (124: its ${t} s ran out)"
  el "$name done"
}
OUT=${OUT:-perf/results}
mkdir -p /tmp/site "$OUT"
tar -xJf .whl/ort_gpu_sm*.tar.xz -C /tmp/site
python3 -m zipfile -e .whl/onnxruntime_genai_cuda-*.whl /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the CUDA 13 libraries of the image's nvidia-* wheels, for libonnxruntime_providers_cuda.so
SP=$(python3 -c 'import numpy,os;print(os.path.dirname(os.path.dirname(numpy.__file__)))')
export LD_LIBRARY_PATH=$(find "$SP/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 setup.py build_ext --inplace -j 8 > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; tail -30 "$OUT/build.log"; }
el built
# -n 4: a test that kills its process is reported as such and the others still run
run tests 150 60 python3 -m pytest -q -n 4 --tb=short -rfEs -m cuda tests/test_cuda.py tests/test_cuda_batch.py \
  -p no:cacheprovider --junitxml="$OUT/test_cuda.xml"
run batches-phi4 250 120 python3 -m perf.cuda_batch --layers 32 --vocab 200064 --batches 1,8,32 --clients 8,32 \
  --prompt 16 --new 64 --reps 3 --out "$OUT"
run concat-100 100 40 python3 -m perf.cuda_concat --cycles 100 --timeout 45 --out "$OUT"
run check-4-layers 90 45 python3 -m perf.cuda_check --reps 3 --out "$OUT"
run make-perf-cpu-vs-cuda 200 60 python3 -m perf.run --models tiny,phi4 --layers 4 --providers cpu,cuda \
  --prompts 16,128 --new-tokens 32 --reps 2 --batch 1,8 --clients 8 --soak-tokens 0 --membw-gib 0 --out "$OUT"
el end
