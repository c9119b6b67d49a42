#!/usr/bin/env bash
# GPU checks on a lent device machine (see README, "GPU"): installs the carried wheels (.whl/) that its image
# lacks, then runs the CUDA-marked tests, the GPU benchmark, and writes everything under $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, numpy, pandas, numba; print(sys.version.split()[0], torch.__version__, numpy.__version__, pandas.__version__, numba.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -p no:cacheprovider -q -rs "${@:-tests/gnn/test_cuda.py}" 2>&1 | tee "$OUT/pytest.txt"
# The GPU benchmark (results/gpu.json in the repository is a copy of what this wrote on the lent H200).
if [ "${BENCH:-1}" = "1" ]; then
  python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
fi
