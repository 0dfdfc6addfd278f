#!/usr/bin/env bash
# Everything only a GPU can show, in one go: build the CUDA extension, run the gpu-marked tests, run the
# benchmarks (the four op/step/data scripts and bench/model.py) and the sm_90 compile report with measured times
# beside its floors, and leave logs and JSON results in $OUT (default bench/results/gpu_session). Meant for a lent
# GPU machine with torch and triton preinstalled (nothing downloaded), run from the repository root:
#
#   bash bench/gpu_session.sh [tests|bench|all]      # default all; each part fits in about 10 minutes on an H200
#
# Copy the JSON files into bench/results/<gpu>/ and commit them with the date; README figures come from there.
set -uo pipefail
export PYTHONUNBUFFERED=1
part=${1:-all}
out=${OUT:-bench/results/gpu_session}
mkdir -p "$out"

python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$out/build.log"
python3 -m rgt | tee "$out/info.txt" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee -a "$out/info.txt"

status=0
if [[ $part == tests || $part == all ]]; then
    python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -25 || status=1
fi
if [[ $part == bench || $part == all ]]; then
    for script in attention dwconv train_step data; do
        python3 "bench/$script.py" --out "$out/$script.json" 2>&1 | tee "$out/$script.log" | tail -30 || status=1
    done
    # The sm_90 compile report with each op's measured time beside its analytic floor.
    python3 bench/sm90.py --time --jobs 8 --out "$out/sm90.json" 2>&1 | tee "$out/sm90.log" | tail -30 || status=1
    # whole images (64x64, 256x256, 750x1000; RGT-S and RGT, x2 and x4) and a training step, every provider
    python3 bench/model.py --models rgt_s --scales 4 --compile --out "$out/model.json" 2>&1 | tee "$out/model.log" | tail -40 || status=1
fi
exit $status
