#!/bin/bash
# The device check as run on a lent GPU (H100/H200), in one call of the device tool:
#   python -m perf.device_bundle --out .whl      # here, once (.whl ignored via .git/info/exclude)
#   device run: bash perf/device_run.sh   (carry: [".whl"], timeout_s 480)
# Installs the bundle under /tmp/site, builds the Cython kernels, runs tests/test_cuda.py and
# perf/cuda_check.py on the default 4-layer model and on the full-size Phi-4-mini shape.
# Everything it writes goes to $OUT (the folder the device tool brings back).
set -u
T0=$(date +%s)
el() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
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
timeout 170 python3 -m perf.cuda_check --out "$OUT" 2>&1 | grep -v "plugin EP device"
el small-check-done
# -n 4: a test that kills its process is reported as such and the others still run
timeout 140 python3 -m pytest -q -n 4 --tb=short -rfEs tests/test_cuda.py -p no:cacheprovider > "$OUT/test_cuda.log" 2>&1
grep -v "plugin EP device" "$OUT/test_cuda.log" | tail -25
el tests-done
left=$(( 430 - ($(date +%s) - T0) ))
if [ $left -gt 100 ]; then
  timeout $left python3 -m perf.cuda_check --layers 32 --vocab 200064 --reps 3 --out "$OUT" 2>&1 | grep -v "plugin EP device"
fi
el end
