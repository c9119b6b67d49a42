#!/usr/bin/env bash
# 1 vs 2 workers on the lent device machine's 16 idle CPU cores (issue 5's scaling goal needs more than the 2 cores
# of the development machine): bench_dtrain --part limit with slots of C pinned cores each, for C in ${SLOTS:-4 2 1}
# and each importance-cache fraction F in ${CACHES:-1.0}, each its own section of $OUT/dtrain_device.json (saved as
# it finishes), plus the CPU topology it ran on. GATHER=0 drops --gather-candidates; WARMUP=N (default 0) runs one
# untimed 2-worker run of N steps first in each section.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
{ nproc; lscpu; lscpu -e; } > "$OUT/cpu.txt" 2>&1
gather=(--gather-candidates)
[ "${GATHER:-1}" = "0" ] && gather=()
for c in ${SLOTS:-4 2 1}; do
  for f in ${CACHES:-1.0}; do
    python3 benchmarks/bench_dtrain.py --part limit --slot-cores "$c" --timing-steps "${STEPS:-60}" \
      --timing-repeats "${REPEATS:-3}" --warmup-steps "${WARMUP:-0}" --lr-scaling adam-sqrt --partition random \
      --cache-fraction "$f" "${gather[@]}" --run-dir /tmp/bench_dtrain --out "$OUT/dtrain_device.json" \
      --note "lent device machine, idle 16-core CPU, nothing else running" 2>&1 | grep -v "distributed.shuffle" \
      | tee -a "$OUT/dtrain_device.log" | grep -E '"limit"|Error|error'
  done
done
