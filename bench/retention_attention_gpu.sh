#!/usr/bin/env bash
# One GPU-machine call for the fused retention attention: use the binaries built on the CPU machine (devbin/)
# if they run there, else build; then the GoogleTests, the C++ bench (ours vs SDPA flash) and, time permitting,
# the flex_attention script on a subset of the shapes. Logs and the CSV go to $OUT.
#   source .device/setup.sh && cd .kstage && bash bench/retention_attention_gpu.sh
# Environment: SEQS (4096,8192,16384,32768), FLEX_SEQS (8192,16384; empty: skip), FLEX_TIMEOUT (s, 150).
set -uo pipefail
OUT=${OUT:-/tmp/kvd-out}
mkdir -p "$OUT"
BIN=devbin
if ! LD_LIBRARY_PATH="$LD_LIBRARY_PATH" "$BIN/kvd_test_retention_attention" --gtest_list_tests >/dev/null 2>&1; then
  echo "prebuilt binaries do not run here; building in build-gpu"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  ninja -C build-gpu kvd_test_retention_attention kvd_test_soft_cache_size bench_retention_attention >"$OUT/build.log" 2>&1 ||
    { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }
  BIN=build-gpu
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
date -u
for t in kvd_test_retention_attention kvd_test_soft_cache_size; do
  "$BIN/$t" >"$OUT/$t.log" 2>&1
  echo "$t rc=$?"
  grep -E "rel L2|^\[  (PASSED|FAILED)|Failure|Expected|Which is|which is|error|exception" "$OUT/$t.log" | head -60
done
"$BIN/bench_retention_attention" --seqs "${SEQS:-4096,8192,16384,32768}" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log"
if [ -n "${FLEX_SEQS-8192,16384}" ]; then
  PYTHONUNBUFFERED=1 timeout "${FLEX_TIMEOUT:-150}" python3 bench/flex_retention_attention.py \
    --seqs "${FLEX_SEQS-8192,16384}" --ours-csv "$OUT/bench.csv" 2>&1 | grep -v Warning | tee "$OUT/flex.log"
fi
date -u
