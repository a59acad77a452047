#!/usr/bin/env bash
# GPU checks of the serving path (issue: export to serving engines; inference kernels), one call on the GPU machine
# (source .device/setup.sh first; results go to bench/RESULTS.md by hand):
#   bench/gpu_serving.sh build   kvdistill, the C runtime and its example, libkvdistill_ops.so, the kernels' GPU test
#                                and bench_select_compact into build-gpu/
#   bench/gpu_serving.sh tests   kvd_test_kv_select (kernels vs CPU references at serving sizes) and
#                                kvd_test_fused_selection (the selectors' fused path = the reference's kept sets;
#                                KVCache::keep with device indices = a host keep), then the runtime's
#                                and the ops' Python tests on the GPU: the C example's kept sets through the
#                                kvd_cuda_ functions against `kvdistill compress`, the ops' CUDA path
#   bench/gpu_serving.sh bench   bench_select_compact: select + compact vs PyTorch's topk / sort / gather, one
#                                layer's score + select + compact next to its attention, at 8K and 32K, and the
#                                cache's eviction after a prefill through the selectors (fused vs reference)
#   bench/gpu_serving.sh profile Nsight Compute (ncu, on a Firecracker machine) over the three inference kernels' benches
#                                at --reps 1: per launch the GPU time, DRAM throughput, achieved occupancy and what
#                                limits it, registers; the warp stall breakdown of the selection, compaction, window
#                                statistics and decode split kernels (ncu-*.csv, ncu-*-detail.txt, in $OUT/ncu.tgz:
#                                the device tool returns at most 8 files a call)
#   bench/gpu_serving.sh window  kvd_test_window_scores (the window-scoring kernel vs float64 loops, deterministic),
#                                then bench_window_scores: the kernel vs the explicit softmax path, next to the
#                                layer's prefill attention (SmolLM2 and Llama-3-8B shapes, 8K and 32K, w 64 / 32 / 1)
# Inputs (env): TOK (a dir with SmolLM2's tokenizer.json and tokenizer_config.json, for the tests' tiny model;
# default .devdata/tok, staged here with `mkdir -p .devdata/tok && cp .cache/models/SmolLM2-135M-Instruct/tokenizer*.json
# .devdata/tok/` and carried with the call), OUT (logs, default /tmp/kvd-out).
set -uo pipefail
TOK=${TOK:-.devdata/tok}
OUT=${OUT:-/tmp/kvd-out}
mkdir -p "$OUT"
t() { local s=$SECONDS; "$@"; local rc=$?; echo "[time] $((SECONDS - s)) s (rc $rc): $*" >&2; return $rc; }

case "${1:-}" in
  build)
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" \
      >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
    t ninja -C build-gpu kvdistill kvdistill_runtime kvd_example kvdistill_ops kvd_test_kv_select kvd_test_fused_selection \
      bench_select_compact kvd_test_window_scores bench_window_scores bench_decode_attention >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
    ;;
  tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    for b in kvd_test_kv_select kvd_test_fused_selection; do
      t build-gpu/$b >"$OUT/$b.log" 2>&1
      echo "$b rc=$?"
      grep -E "max error|^\[  (PASSED|FAILED|SKIPPED)|Failure|Expected|Which is|differs|[Ww]hat" "$OUT/$b.log" | head -40
    done
    ldd build-gpu/libkvdistill_runtime.so build-gpu/kvd_example | grep -E "torch|c10|cudart|kvdistill"
    for py in test_c_runtime test_serving_ops; do
      KVD_BIN=build-gpu/kvdistill KVD_OPS_LIB=build-gpu/libkvdistill_ops.so KVD_MODEL_DIR="$TOK" \
        t python3 -X faulthandler -m pytest -v -p no:cacheprovider -rs tests/python/$py.py >"$OUT/$py.log" 2>&1
      echo "$py rc=$?"
      grep -E "PASSED|FAILED|SKIPPED|ERROR|Error|error|passed|failed|Fatal|tests/python|kvdistill_export" "$OUT/$py.log" |
        grep -v "^  File \"/opt" | head -30
    done
    ;;
  bench)
    t build-gpu/bench_select_compact --reps 20 | tee "$OUT/bench_select_compact.jsonl"
    ;;
  window)
    t build-gpu/kvd_test_window_scores >"$OUT/kvd_test_window_scores.log" 2>&1
    echo "kvd_test_window_scores rc=$?"
    grep -E "error [0-9]|^\[  (PASSED|FAILED|SKIPPED)|Failure|Expected|Which is|differ" "$OUT/kvd_test_window_scores.log"
    t build-gpu/bench_window_scores --reps 20 | tee "$OUT/bench_window_scores.jsonl"
    ;;
  profile)
    P=$(mktemp -d)
    m=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
    m=$m,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__grid_size
    for b in select_compact window_scores decode_attention; do
      t ncu --clock-control none --metrics "$m" --csv -k 'regex:select_kernel|compact_kernel|stats_kernel|merge_kernel|columns_kernel|split_kernel' \
        build-gpu/bench_$b --reps 1 >"$P/ncu-$b.csv" 2>"$P/ncu-$b.err"
      echo "bench_$b: $(grep -c gpu__time_duration "$P/ncu-$b.csv") launches profiled"
    done
    # One launch of each kernel in detail: the first selection and the third compaction (one cache) of the 32K case,
    # SmolLM2 at 32K with a 64-row window (the 10th launch of each window kernel at --reps 1), and the decode kernel's
    # first launch.
    for spec in select_kernel:0 compact_kernel:2 stats_kernel:9 columns_kernel:9 split_kernel:0; do
      t ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis -k "${spec%%:*}" --launch-skip "${spec##*:}" --launch-count 1 \
        build-gpu/bench_$(case ${spec%%:*} in select*|compact*) echo select_compact ;; split*) echo decode_attention ;; *) echo window_scores ;; esac) \
        --reps 1 >"$P/ncu-${spec%%:*}-detail.txt" 2>&1
    done
    tar czf "$OUT/ncu.tgz" -C "$P" . && rm -rf "$P"
    ;;
  *)
    echo "usage: bench/gpu_serving.sh build|tests|bench|profile|window" >&2
    exit 2
    ;;
esac
