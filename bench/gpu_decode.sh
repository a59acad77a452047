#!/usr/bin/env bash
# The decode paths (models/generate.h: cache, static, graph) and the ragged decode attention kernel on the GPU, one
# call (source .device/setup.sh first; results go to bench/RESULTS.md by hand):
#   bench/gpu_decode.sh build   this tree into build-gpu/ with the decode tests, and the tiny golden models they use
#   bench/gpu_decode.sh model   joins the GGUF parts staged in /root/kvd-stage and converts SmolLM2 to $MODEL
#   bench/gpu_decode.sh tests   kvd_test_padded_prefill (the flash varlen and masked prefills vs each row alone),
#                               kvd_test_kvzip, kvd_test_decode_attention (kernel vs float64 loops), kvd_test_decode_step (the step's
#                               row kernels vs their LibTorch references) and kvd_test_static_decode (graph replays =
#                               eager fixed-shape steps; both vs the cache path), kvd_test_fused_selection and
#                               kvd_test_kv_select (select + compact vs the reference path, device keeps),
#                               kvd_test_decode_eviction (eviction inside graph steps = eager steps = the cache
#                               path), kvd_test_window_scores (the window-scores kernel vs float64 loops),
#                               kvd_test_decoder (the bf16 CUDA prefill, fused row kernels, vs transformers) and
#                               kvd_test_kv_cache (appends of left-padded chunks)
#   bench/gpu_decode.sh bench   bench_cache_decode at batch 1 and 16 (2K context, 64 steps, full / uniform / ragged
#                               caches): the three paths timed in the same run, with their tokens compared
#   bench/gpu_decode.sh attn    bench_decode_attention: the ragged decode kernel against SDPA over the same kept
#                               tokens (uniform and ragged caches, 8K / 32K per head, batch 1 / 16), bandwidth, and
#                               the kernel at 8 / 32 / 128 / 512 CTAs per segment (to choose its split rule)
#   bench/gpu_decode.sh eval    an eval slice ($TASKS: 16 samples per length) with $METHODS at $RATIOS: --decode cache
#                               and --decode graph with each budget decoded alone (--decode-rows 0), then graph with
#                               a prefill's budgets decoded together (the default): wall times, how many records agree
#   bench/gpu_decode.sh kernels the same slice with $KMETHODS at $RATIOS, --kernels fused against --kernels reference
#                               (window scoring, the selectors' radix select, the decode evictors' scorers): wall
#                               times, and how many records agree in output, score and kept bytes; KL / hit rate gaps
# Inputs (env): MODEL (default /root/model), TASKS (default /root/rivals/tasks-2k4k8k.jsonl), W (default /root/dec),
# METHODS (default snapkv,adakv_snapkv), RATIOS (default 0.25,0.5,0.75,0.875), OUT (the call's return folder).
set -euo pipefail
MODEL=${MODEL:-/root/model}
TASKS=${TASKS:-/root/rivals/tasks-2k4k8k.jsonl}
W=${W:-/root/dec}
METHODS=${METHODS:-snapkv,adakv_snapkv}
KMETHODS=${KMETHODS:-snapkv,pyramidkv,tova,h2o,adakv_snapkv,streaming_llm,defensivekv,tova_decode,h2o_decode}
RATIOS=${RATIOS:-0.25,0.5,0.75,0.875}
OUT=${OUT:-/tmp}
KVD=build-gpu/kvdistill
mkdir -p "$W"
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"  # t, gpu_model, tasks_slice

case "${1:-}" in
  build)
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" \
      >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
    t ninja -C build-gpu kvdistill bench_cache_decode bench_decode_attention kvd_test_decode_attention kvd_test_decode_step \
      kvd_test_static_decode kvd_test_fused_selection kvd_test_kv_select kvd_test_padded_prefill kvd_test_kvzip \
      kvd_test_decode_eviction kvd_test_window_scores kvd_test_decoder kvd_test_kv_cache >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
    t python3 tests/oracles/decoder_golden.py --out build-gpu/testdata/decoder_golden >"$OUT/oracle.log" 2>&1 ||
      tail -5 "$OUT/oracle.log"
    ;;
  model)
    gpu_model "$MODEL"
    ;;
  tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    for b in kvd_test_padded_prefill kvd_test_kvzip kvd_test_decode_attention kvd_test_decode_step kvd_test_static_decode \
      kvd_test_fused_selection kvd_test_kv_select kvd_test_decode_eviction kvd_test_window_scores kvd_test_decoder \
      kvd_test_kv_cache; do
      t build-gpu/$b >"$OUT/$b.log" 2>&1 && echo "$b rc=0" || echo "$b rc=$?"
      grep -E "error |tokens equal|each row alone|^\[  (PASSED|FAILED|SKIPPED)|Failure|Expected|Which is|which is|exception" \
        "$OUT/$b.log" | head -40
    done
    ;;
  bench)
    for b in 1 16; do
      t build-gpu/bench_cache_decode --model "$MODEL" --device cuda --batch $b --context 2048 --keep 0.5 --steps 64 \
        --repeat 2 --paths cache,static,graph | tee "$OUT/bench-decode-b$b.log"
    done
    ;;
  attn)
    t build-gpu/bench_decode_attention --splits 8,32,128,512 | tee "$OUT/bench-decode-attention.log"
    ;;
  kernels)
    tasks_slice "$TASKS" "$W/tasks-slice.jsonl"
    for k in fused reference; do
      rm -rf "$W/eval-kernels-$k"
      t $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch 16 --methods "$KMETHODS" \
        --ratios "$RATIOS" --kernels $k --out "$W/eval-kernels-$k" 2>&1 | tail -n 1
    done
    python3 - "$W/eval-kernels-fused/results.jsonl" "$W/eval-kernels-reference/results.jsonl" <<'PY' |
import collections, json, sys
a, b = ({(r["method"], r["budget"], r["id"]): r for r in map(json.loads, open(p))} for p in sys.argv[1:])
assert a.keys() == b.keys(), "the two runs hold different records"
per = collections.defaultdict(lambda: collections.Counter())
dkl, dhit = collections.defaultdict(float), collections.defaultdict(float)
for k in sorted(a):
    m, x, y = k[0], a[k], b[k]
    c = per[m]
    c["records"] += 1
    c["output"] += x["output"] == y["output"]
    c["score"] += x["score"] == y["score"]
    c["kept bytes"] += x["kv_bytes_kept"] == y["kv_bytes_kept"] and x["peak_kv_bytes"] == y["peak_kv_bytes"]
    dhit[m] = max(dhit[m], abs(x.get("hit_rate", 0) - y.get("hit_rate", 0)))
    dkl[m] = max(dkl[m], abs(x["kl"] - y["kl"]))
for m, c in per.items():
    ta = sum(r["prefill_s"] + r["decode_s"] for k, r in a.items() if k[0] == m)
    tb = sum(r["prefill_s"] + r["decode_s"] for k, r in b.items() if k[0] == m)
    print(f"{m}: {c['records']} records, identical output {c['output']}, score {c['score']}, kept / peak bytes "
          f"{c['kept bytes']}; max |dKL| {dkl[m]:.2e}, max |d hit rate| {dhit[m]:.2e}; prefill + decode seconds (sum) "
          f"fused {ta:.1f} / reference {tb:.1f}")
PY
      tee "$OUT/eval-kernels.txt"
    ;;
  eval)
    tasks_slice "$TASKS" "$W/tasks-slice.jsonl"
    for v in cache:0 graph:0 graph:256; do
      d=${v%:*} rows=${v#*:}
      rm -rf "$W/eval-$d-$rows"
      t $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch 16 --methods "$METHODS" \
        --ratios "$RATIOS" --decode $d --decode-rows $rows --out "$W/eval-$d-$rows" 2>&1 | tail -n 1
    done
    python3 - "$W/eval-cache-0/results.jsonl" "$W/eval-graph-0/results.jsonl" "$W/eval-graph-256/results.jsonl" \
      <<'PY' | tee "$OUT/eval-decode.txt"
import json, sys
runs = [{(r["method"], r["budget"], r["id"]): r for r in map(json.loads, open(p))} for p in sys.argv[1:]]
names = ["cache, alone", "graph, alone", "graph, budgets together"]
def compare(i, j):
    a, b = runs[i], runs[j]
    keys = sorted(a)
    same_out = sum(a[k]["output"] == b[k]["output"] for k in keys)
    same_score = sum(a[k]["score"] == b[k]["score"] for k in keys)
    same_bytes = sum(a[k]["peak_kv_bytes"] == b[k]["peak_kv_bytes"] and a[k]["kv_bytes_kept"] == b[k]["kv_bytes_kept"]
                     for k in keys)
    dkl = max(abs(a[k]["kl"] - b[k]["kl"]) for k in keys)
    sa, sb = (sum(x[k]["score"] for k in keys) / len(keys) for x in (a, b))
    ta, tb = (sum(x[k]["decode_s"] for k in keys) for x in (a, b))
    print(f"{names[i]} vs {names[j]}: {len(keys)} records: output identical {same_out}, score identical {same_score}, "
          f"peak / kept bytes identical {same_bytes}; max |dKL| {dkl:.2e}; mean score {sa:.4f} / {sb:.4f}; decode "
          f"seconds (sum over records) {ta:.1f} / {tb:.1f} ({ta / tb:.2f}x); paths {sorted({r['decode'] for r in b.values()})}")
compare(0, 1)
compare(1, 2)
compare(0, 2)
PY
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
