#!/usr/bin/env bash
# The strongest rivals and the comparison protocol (issue 14) on SmolLM2-135M-Instruct, one stage per device call
# (source .device/setup.sh first; the GGUF parts, task file and training text come from bench/stage_rivals.sh, run
# on the CPU machine and carried one folder per call; results go to bench/RESULTS.md and docs/results/ by hand):
#   bench/gpu_rivals.sh build          this tree into build-gpu/ (kvdistill)
#   bench/gpu_rivals.sh gpu-tests [T...] the decode paths' GPU tests (default kvd_test_static_decode,
#                                      kvd_test_decode_eviction), with the decoder goldens carried in .rv0/testdata
#   bench/gpu_rivals.sh model          joins the GGUF parts staged in /root/kvd-stage, checks the sha256 and
#                                      converts it to $MODEL
#   bench/gpu_rivals.sh train [S]      the learned parts of $TRAIN at once on the GPU: KVzap
#                                      (configs/kvzap-smollm2.yaml, $DATA/$KVZAP_H5), DMS (configs/dms-smollm2.yaml,
#                                      $DATA/$DMS_H5), TRIM-KV's gate (configs/trimkv-smollm2.yaml, $TRIMKV_H5) and
#                                      the Attention-Gate (configs/attngate-smollm2.yaml, keep_scope sequence,
#                                      $ATTNGATE_H5), each stopped after S seconds (default 540) and resumed from its
#                                      last checkpoint by the next call; prints their last logged step
#   bench/gpu_rivals.sh protocol [S]   $TASKS (50 samples per task and length at 2K / 4K / 8K) at ratios
#                                      0.25 / 0.5 / 0.75 / 0.875, in $MODES (agnostic: the default, aware:
#                                      --query-aware): every heuristic of $HEURISTICS, with the learned parts
#                                      that act once after the prefill (learned_jobs), in one eval process per
#                                      shard of the samples ($SHARDS shards, --shard K/N: the full-cache reference
#                                      is computed once per sample and mode), and every other learned part of
#                                      $LEARNED sharded alike; $P processes at a time on the GPU, each resumable
#                                      (re-running skips what is written); S seconds per call
#   bench/gpu_rivals.sh report         per mode (also here, W=<unpacked results>): paired bootstrap against the best heuristic at each ratio and the
#                                      headline table (scripts/paired_bootstrap.py --baseline best), the plots
#   bench/gpu_rivals.sh harness [M]    the eval's speed on a slice of $TASKS (16 samples per length), method M
#                                      (default snapkv) at $RATIOS: with and without the shared prefill, then
#                                      where the time goes (KVD_PROFILE)
#   bench/gpu_rivals.sh prefill [M]    the slice with method(s) M (default snapkv,defensivekv) at $RATIOS, the
#                                      padded prefill's attention masked (KVD_CHUNK_ATTENTION=masked) and flash
#                                      (the default): wall times and how many records agree
#   bench/gpu_rivals.sh evict-decode [M] the slice with the decode-time evictors M (default
#                                      tova_decode,h2o_decode,streaming_llm_decode,lazy_eviction) at $RATIOS, decoded step by step
#                                      (--decode cache) and in CUDA graphs that evict inside each step (the
#                                      default): wall times, mean decode_s, how many records agree
#   bench/gpu_rivals.sh share-methods [M] the slice with methods M (default snapkv,defensivekv,adakv_snapkv,pyramidkv,
#                                      tova,knorm) at $RATIOS, one prefill per method (--share-prefill budgets) and
#                                      one per group of methods (--share-prefill methods, what the protocol runs):
#                                      wall times (each record's prefill_s is its whole shared prefill's), how many
#                                      records agree
#   bench/gpu_rivals.sh joined-prefill [M] the slice with a continuous learned part M (default
#                                      retention_gate:$W/trimkv/bundle) at $RATIOS, each budget prefilled alone
#                                      (--join-prefill no) and its budgets prefilled as the rows of one batch
#                                      (--join-prefill yes, the default on CUDA): wall times, mean prefill_s per
#                                      record (its share of the joint prefill), how many records agree
#   bench/gpu_rivals.sh profile [M...] each method M (default: kvzip kvzip_plus tova_decode h2o_decode
#                                      lazy_eviction streaming_llm_decode snapkv) alone on the slice, at the
#                                      protocol's BATCH / BATCH_TOKENS, one process, with KVD_PROFILE: wall time and
#                                      its three largest sections; every section in $OUT/profile-M.log
#   bench/gpu_rivals.sh trace [M]      one eval process on the slice's 16 samples of length $TRACE_LEN (default
#                                      2048) with methods M (default snapkv,defensivekv,adakv_snapkv,tova,
#                                      tova_decode,kvzip) at $RATIOS under KVD_TRACE (LibTorch's profiler: every host
#                                      op with its input shapes, every device kernel, the eval's scopes), then
#                                      scripts/trace_summary.py: how busy the GPU was, the kernels' durations, which
#                                      kernels, ops (and shapes) and method scopes took the device time; the summary
#                                      (and the trace gzipped) into $OUT when set
#   bench/gpu_rivals.sh workers [N...] every heuristic of $HEURISTICS on the slice in one eval process, as the
#                                      protocol runs them, with --workers N for each N (default 1 2 3 4): wall
#                                      time, results per second, and how many records equal the first run's; a
#                                      run past $WORKERS_LIMIT s (default 150) is stopped, its threads' stacks kept
#   bench/gpu_rivals.sh chunk-attention the same run (--workers $WORKERS) with a chunk's attention into a stored
#                                      cache masked over padded copies (KVD_CHUNK_ATTENTION=masked), then flash over
#                                      the cache's segments in place (the default): wall times, records that agree
#   bench/gpu_rivals.sh mps [P...]     the same run split into P shards (default 1 2 4), one eval process each,
#                                      all at once under CUDA MPS (the daemon started if it is not running): wall
#                                      time and agreement with `workers 1`'s records
#   bench/gpu_rivals.sh bundle-variant SRC NAME k=v...  a copy of bundle SRC as $W/NAME/bundle with manifest keys
#                                      set (Judge-Q's pooling, say), for LEARNED
#   bench/gpu_rivals.sh collect        results, metrics and logs into $OUT, and each bundle (tarballs in 15 MB parts)
#   bench/gpu_rivals.sh archive D      the records of $W (W=<an unpacked collected tarball> here) made small enough to
#                                      commit, into D (docs/results/...): outputs dropped, numbers to 5 digits
#   bench/gpu_rivals.sh restore F      a collected results tarball F (parts joined), or an archive directory F
#                                      (and any collected bundle parts in it), unpacked into $W: `protocol` resumes
#                                      from its records and finds the bundles, `report` reads them
# Inputs (env): MODEL (default /root/model); DATA (default /root/rivals): tasks-2k4k8k.jsonl (`prepare tasks
# --lengths 2048,4096,8192 --samples 50 --seed 7`), $KVZAP_H5 (default corpus-1k.h5: `prepare text --seq-len
# 1024`) and $DMS_H5 (default corpus-2k.h5: `prepare text --seq-len 2048`); W (work dir, default /root/rv);
# TRAIN (which of them `train` runs, default "kvzap dms"; also trimkv, attngate: TRIMKV_H5 / ATTNGATE_H5 default
# $DMS_H5, TRIMKV_STEPS / ATTNGATE_STEPS default 400); KVZAP_VARIANT (linear, the default, or mlp); KVZAP_STEPS (default 600: 4.9M tokens of 1K documents), DMS_STEPS (default 400, the target ramp over the first
# three quarters); P (eval processes at once, default 1: without MPS the GPU time-slices between processes, and
# one process was twice as fast as six on 2026-12-06), WORKERS (each process's --workers, default 2: 19% faster
# than one on the slice, records identical, 2026-12-07), SHARDS (of the samples, default $P), BATCH (default 32), BATCH_TOKENS (default 65536: 32 rows at 2K, 16 at 4K, 8 at 8K; at
# BATCH=64 BATCH_TOKENS=131072 six processes ran out of the H200's memory on 2026-12-04: KVzip's repeat pass and
# the teacher-forced logits of budgets decoded together), SHARE_GIB (default 6: the protocol's methods share a
# prefill while their compressed caches stay within this many GiB per process, --share-prefill-gib; a batch's full
# cache at BATCH_TOKENS=65536 is 1.5 GB and four ratios keep 1.625 of it, so two methods share), DECODE_GIB (default 8:
# the teacher-forced logits budgets decoded together may hold, --decode-logits-gib; one process at a time can
# afford more than the eval's default 2, so a group's budgets decode in fewer, larger batches), RATIOS (default 0.25,0.5,0.75,0.875); MODES (default "agnostic aware"); HEURISTICS (default
# below); LEARNED (extra learned methods, e.g. "gate:/root/trimkv/bundle attngate:/root/ag/bundle"; the KVzap, DMS
# and Judge-Q bundles are added, trained here or committed: learned_jobs); KVD (default build-gpu/kvdistill).
set -euo pipefail
MODEL=${MODEL:-/root/model}
DATA=${DATA:-/root/rivals}
W=${W:-/root/rv}
KVZAP_H5=${KVZAP_H5:-corpus-1k.h5}
DMS_H5=${DMS_H5:-corpus-2k.h5}
KVZAP_STEPS=${KVZAP_STEPS:-600}
# linear: 30 x (576 -> 3) weights, a 0.2 MB bundle that can be committed and carried to later calls (the MLP's is 35.6 MB)
KVZAP_VARIANT=${KVZAP_VARIANT:-linear}
DMS_STEPS=${DMS_STEPS:-400}
TRIMKV_H5=${TRIMKV_H5:-$DMS_H5}
TRIMKV_STEPS=${TRIMKV_STEPS:-400}
ATTNGATE_H5=${ATTNGATE_H5:-$DMS_H5}
ATTNGATE_STEPS=${ATTNGATE_STEPS:-400}
TRAIN=${TRAIN:-kvzap dms}
MODES=${MODES:-agnostic aware}
# Every heuristic, the strongest first (a call that ends early has them): the prefill ones, then those that evict
# while decoding. KVzip+ follows KVzip so that both score from one prefill and one reconstruction pass.
HEURISTICS=${HEURISTICS:-kvzip kvzip_plus defensivekv snapkv adakv_snapkv streaming_llm expected_attention pyramidkv \
tova layer_defensivekv cake criticalkv_snapkv h2o observed_attention keydiff knorm random tova_decode h2o_decode \
lazy_eviction streaming_llm_decode}
LEARNED=${LEARNED:-}
RATIOS=${RATIOS:-0.25,0.5,0.75,0.875}
P=${P:-1}
WORKERS=${WORKERS:-2}
SHARDS=${SHARDS:-$P}
BATCH=${BATCH:-32}
BATCH_TOKENS=${BATCH_TOKENS:-65536}
SHARE_GIB=${SHARE_GIB:-6}
DECODE_GIB=${DECODE_GIB:-8}
KVD=${KVD:-build-gpu/kvdistill}
mkdir -p "$W"
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"  # t, gpu_build, gpu_model, tasks_slice

# The learned parts, one per line with the eval flags they run under: at a ratio both compress once after prefill
# (as kvpress's KVzapPress does; DMS's scores protect its delay window, docs/methods/dms.md), which shares one
# prefill across the ratios.
# The learned parts' eval jobs: $LEARNED, then KVzap, DMS and Judge-Q: each trained here ($W/NAME/bundle) or else the
# bundle committed in docs/results/ (KVzap linear, 2026-12-06; DMS, 2026-12-04; Judge-Q with the KL loss,
# 2026-12-06). LookaheadKV's bundle (9.5 MB) is not committed: pass it in LEARNED. A line: the method, then its
# extra eval flags.
learned_jobs() {
  local m
  for m in $LEARNED; do  # query rows act once after the prefill in either mode (gates/registry.cpp)
    case $m in judgeq:* | lookahead:*) echo "$m --learned-mode once" ;; *) echo "$m" ;; esac
  done
  local kvzap=docs/results/rivals-h100-2026-12-06-night/kvzap-linear-bundle
  local dms=docs/results/rivals-h200-2026-12-04-night/dms-bundle
  local judgeq=docs/results/queryrows-h100-2026-12-06/judgeq-kl-bundle
  # TRIM-KV's gate and the Attention-Gate, when trained here (or restored into $W): continuous by default, as their
  # papers run them, each its own job (11 results/s for the gate on an H100, 2026-12-07); GATES_MODE=once joins them
  # to the heuristics' process instead.
  local gm=""
  [ "${GATES_MODE:-continuous}" = once ] && gm=" --learned-mode once"
  [ -f "$W/trimkv/bundle/kvdistill.json" ] && echo "retention_gate:$W/trimkv/bundle$gm"
  [ -f "$W/attngate/bundle/kvdistill.json" ] && echo "attngate:$W/attngate/bundle$gm"
  [ -f "$W/kvzap/bundle/kvdistill.json" ] && kvzap=$W/kvzap/bundle
  [ -f "$W/dms/bundle/kvdistill.json" ] && dms=$W/dms/bundle
  [ -f "$kvzap/kvdistill.json" ] && echo "kvzap:$kvzap --learned-mode once"
  [ -f "$dms/kvdistill.json" ] && echo "dms:$dms --learned-mode once"
  [[ " $LEARNED " == *" judgeq:$judgeq "* ]] || { [ -f "$judgeq/kvdistill.json" ] && echo "judgeq:$judgeq --learned-mode once"; }
  return 0
}

# What `train` runs for part $1: its config, training file (in $DATA), steps, and its extra overrides.
train_spec() {
  case $1 in
    kvzap) echo "configs/kvzap-smollm2.yaml $KVZAP_H5 $KVZAP_STEPS component.variant=$KVZAP_VARIANT" ;;
    dms) echo "configs/dms-smollm2.yaml $DMS_H5 $DMS_STEPS component.ramp_steps=$((DMS_STEPS * 3 / 4))" ;;
    trimkv) echo "configs/trimkv-smollm2.yaml $TRIMKV_H5 $TRIMKV_STEPS train.eval_every=0" ;;
    attngate) echo "configs/attngate-smollm2.yaml $ATTNGATE_H5 $ATTNGATE_STEPS component.keep_scope=sequence \
      component.schedule_steps=$((ATTNGATE_STEPS / 2)) train.eval_every=0" ;;
    *) echo "gpu_rivals.sh train: unknown part '$1' in TRAIN (kvzap, dms, trimkv, attngate)" >&2; exit 2 ;;
  esac
}

# The slice with methods $1 run twice, as configuration A ($3: a label, $4: a command prefix such as "env X=1" or
# eval flags starting with "--") and B ($5, $6), then how many records agree and the mean of time field $2 per
# record in each (prefill: the padded prefill's two paths; evict-decode: decode-time eviction step by step or in
# graphs).
slice_ab() {
  local m=$1 field=$2
  tasks_slice "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl"
  for side in "$3|$4" "$5|$6"; do
    local label=${side%%|*} how=${side#*|} pre=() flags=()
    # shellcheck disable=SC2206  # split on purpose
    if [[ $how == --* ]]; then flags=($how); else pre=($how); fi
    rm -rf "$W/ab-$label"
    t "${pre[@]}" $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda "${flags[@]}" \
      --batch "$BATCH" --batch-tokens "$BATCH_TOKENS" --methods "$m" --ratios "$RATIOS" --out "$W/ab-$label" 2>&1 |
      tail -n 1
  done
  python3 - "$W/ab-$3/results.jsonl" "$W/ab-$5/results.jsonl" "$field" "$3" "$5" <<'PY'
import collections, json, statistics, sys
a, b = ({(r["method"], r["budget"], r["id"]): r for r in map(json.loads, open(p))} for p in sys.argv[1:3])
field, la, lb = sys.argv[3:6]
assert a.keys() == b.keys(), "the two runs hold different records"
paths = {n: dict(collections.Counter(r[k].get("decode") for k in r)) for n, r in ((la, a), (lb, b))}
same = {f: sum(a[k][f] == b[k][f] for k in a) for f in ("output", "score", "kv_bytes_kept", "peak_kv_bytes")}
dkl = [abs(a[k]["kl"] - b[k]["kl"]) for k in a]
t = {n: statistics.mean(r[k][field] for k in r) for n, r in ((la, a), (lb, b))}
print(f"{len(a)} records, decode paths {paths}; identical output {same['output']}, score {same['score']}, kept bytes "
      f"{same['kv_bytes_kept']}, peak bytes {same['peak_kv_bytes']}; |dKL| max {max(dkl):.4g} mean "
      f"{statistics.mean(dkl):.3g}; mean {field} per record {la} {t[la] * 1e3:.1f} ms, {lb} {t[lb] * 1e3:.1f} ms "
      f"({t[la] / t[lb]:.2f}x)")
PY
}

# The slice with every heuristic of $HEURISTICS in one eval process as the protocol runs them, --workers $2, extra
# environment $3... (VAR=value), into $W/$1 and ${OUT:-$W}/$1.log: its wall time and results per second. A run past
# $WORKERS_LIMIT s (default 150; one worker took about 67 on an H100) is stuck: every thread's stack goes to
# $1-stacks.txt (gdb, where the machine has it) before it is killed.
slice_run() {
  local name=$1 n=$2 s pid heuristics
  shift 2
  tasks_slice "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl" >/dev/null
  heuristics=$(echo "$HEURISTICS" | tr ' ' '\n' | sed '/^$/d' | paste -sd, -)
  rm -rf "${W:?}/$name"
  s=$SECONDS
  env OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$@" $KVD eval --model "$MODEL" \
    --tasks "$W/tasks-slice.jsonl" --device cuda --batch "$BATCH" --batch-tokens "$BATCH_TOKENS" \
    --share-prefill methods --share-prefill-gib "$SHARE_GIB" --decode-logits-gib "$DECODE_GIB" --workers "$n" \
    --methods "$heuristics" --ratios "$RATIOS" --out "$W/$name" > "${OUT:-$W}/$name.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - s)) -lt "${WORKERS_LIMIT:-150}" ]; do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "== $name: stuck after $((SECONDS - s)) s: $(grep '^\[eval\]' "${OUT:-$W}/$name.log" | tail -n 1)"
    local dbg
    dbg=$(command -v gdb || command -v cuda-gdb || true)  # the device image has cuda-gdb only
    [ -n "$dbg" ] && timeout 60 "$dbg" -p "$pid" -batch -ex "thread apply all bt" > "${OUT:-$W}/$name-stacks.txt" 2>&1
    kill -9 "$pid"
    exit 1
  fi
  wait "$pid" || { tail -n 20 "${OUT:-$W}/$name.log"; exit 1; }
  s=$((SECONDS - s))
  local r
  r=$(wc -l < "$W/$name/results.jsonl")
  echo "== $name (--workers $n${*:+, $*}): $s s, $r results ($((r / s)) per s)"
}

# How many records of runs $2... equal those of run $1 (dirs under $W) field by field, and the mean |score gap|.
compare_runs() {
  python3 - "$W" "$@" <<'PY'
import json, sys
w, ns = sys.argv[1], sys.argv[2:]
load = lambda n: {(r["method"], r["budget"], r["id"]): r for r in map(json.loads, open(f"{w}/{n}/results.jsonl"))}
a = load(ns[0])
for n in ns[1:]:
    b = load(n)
    assert a.keys() == b.keys(), f"{n} holds other records than {ns[0]}"
    same = {f: sum(a[k][f] == b[k][f] for k in a) for f in ("output", "score", "kl", "kv_bytes_kept", "peak_kv_bytes")}
    gap = sum(abs(a[k]["score"] - b[k]["score"]) for k in a) / len(a)
    mean = lambda d: sum(r["score"] for r in d.values()) / len(d)
    print(f"{n} vs {ns[0]}: {len(a)} records; identical {same}; mean |score gap| {gap:.4f}; "
          f"mean score {mean(b):.4f} vs {mean(a):.4f}")
PY
}

case "${1:-}" in
  build)
    gpu_build kvdistill
    ;;
  gpu-tests)
    # The GPU tests of the decode paths (or the targets given), in build-gpu/ reconfigured with the tests on: they load
    # the decoder goldens made on the CPU machine, staged in .rv0/testdata (bench/stage_rivals.sh) and copied to where
    # the binaries look (build-gpu/testdata). Carry .rv0 in the same call.
    [ -d .rv0/testdata/decoder_golden ] || { echo "gpu-tests: carry .rv0 with testdata/ (bench/stage_rivals.sh)" >&2; exit 2; }
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVD_BUILD_TESTS=ON \
      -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" >/dev/null
    targets=("${@:2}")
    [ ${#targets[@]} -gt 0 ] || targets=(kvd_test_static_decode kvd_test_decode_eviction)
    t ninja -C build-gpu "${targets[@]}" | tail -n 1
    mkdir -p build-gpu/testdata && cp -r .rv0/testdata/decoder_golden build-gpu/testdata/
    for b in "${targets[@]}"; do
      echo "== $b"
      "build-gpu/$b" 2>&1 | grep -E '^\[  (PASSED|FAILED|SKIPPED) |Failure|exception' | head -n 20 || true
    done
    ;;
  model)
    gpu_model "$MODEL"
    ;;
  train)
    limit=${2:-540}
    # Every part of $TRAIN at once on the GPU (train_spec), each stopped after S seconds and resumed from its last
    # checkpoint by the next call; one whose bundle exists is left alone.
    for r in $TRAIN; do train_spec "$r" > /dev/null; done  # an unknown name stops here
    for r in $TRAIN; do
      read -r config h5 steps extra <<< "$(train_spec "$r")"
      [ -f "$W/$r/bundle/kvdistill.json" ] && continue
      # shellcheck disable=SC2086  # extra: overrides, split on purpose
      timeout "$limit" $KVD train --config "$config" model.dir="$MODEL" data.train="$DATA/$h5" train.steps="$steps" \
        train.save_every=50 train.progress=lines train.out_dir="$W/$r" $extra >> "$W/train-$r.log" 2>&1 &
    done
    wait || true
    for r in $TRAIN; do
      echo "== $r: $(tail -n 1 "$W/train-$r.log" 2>/dev/null)"
      [ -f "$W/$r/bundle/kvdistill.json" ] && echo "   bundle ready" || echo "   (no bundle yet: run train again to resume)"
    done
    ;;
  protocol)
    # A pool of P eval processes (default 1: the GPU time-slices between processes, so more of them only add
    # context switches once one keeps it busy; bench/RESULTS.md 2026-12-06), each over one shard of the samples in
    # one mode (every heuristic in one process, so the full-cache reference runs once per sample and mode), all
    # stopped at the call's deadline and resumed by the next call (re-running skips what is written). One CPU
    # thread each: LibTorch's spinning threads would contend.
    limit=${2:-540}
    jobs=$W/protocol-jobs.txt
    : > "$jobs"
    heuristics=$(echo "$HEURISTICS" | tr ' ' '\n' | sed '/^$/d' | paste -sd, -)
    # The learned parts that run with --learned-mode once join the heuristics' process (which then passes that flag:
    # heuristics ignore it), so they share its full-cache reference and prefills; the others run on their own.
    joined=$(learned_jobs | awk '$2 == "--learned-mode" && $3 == "once" && NF == 3 {print $1}' | paste -sd, -)
    for mode in $MODES; do  # a line: mode, name, shard, methods (comma-separated), extra eval flags
      for k in $(seq 0 $((SHARDS - 1))); do
        echo "$mode heuristics $k $heuristics${joined:+,$joined}${joined:+ --learned-mode once}"
      done >> "$jobs"
      learned_jobs | awk '!($2 == "--learned-mode" && $3 == "once" && NF == 3)' | while read -r m extra; do
        for k in $(seq 0 $((SHARDS - 1))); do echo "$mode $(echo "$m" | tr '/:,' '__+') $k $m $extra"; done
      done >> "$jobs"
    done
    echo "[protocol] $(wc -l < "$jobs") jobs ($SHARDS shards of the samples each), $P at a time, $limit s"
    export KVD MODEL DATA W RATIOS BATCH BATCH_TOKENS SHARDS SHARE_GIB DECODE_GIB WORKERS
    export OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    run_job() {
      local mode name k methods extra left=$(($2 - $(date +%s)))
      read -r mode name k methods extra <<< "$1"
      [ "$left" -gt 10 ] || return 0
      local flag=(); [ "$mode" = aware ] && flag=(--query-aware)
      local out=$W/eval-$mode-$name-s$k
      # shellcheck disable=SC2086  # extra: flags, split on purpose
      timeout "$left" $KVD eval --model "$MODEL" --tasks "$DATA/tasks-2k4k8k.jsonl" --device cuda --batch "$BATCH" \
        --batch-tokens "$BATCH_TOKENS" --share-prefill methods --share-prefill-gib "$SHARE_GIB" \
        --decode-logits-gib "$DECODE_GIB" --workers "$WORKERS" "${flag[@]}" $extra \
        --methods "$methods" --ratios "$RATIOS" \
        --shard "$k/$SHARDS" --out "$out" >> "$out.log" 2>&1 || true
    }
    export -f run_job
    end=$(($(date +%s) + limit))
    t xargs -a "$jobs" -d '\n' -P "$P" -I{} bash -c 'run_job "$1" '"$end" _ {}
    for f in "$W"/eval-*.log; do echo "$(basename "$f"): $(grep '^\[eval\]' "$f" | tail -n 1)"; done
    cat "$W"/eval-*/results.jsonl 2>/dev/null | wc -l | sed 's/^/[protocol] results written: /'
    ;;
  harness)
    m=${2:-snapkv}
    tasks_slice "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl"
    # The same slice at four ratios: one prefill per (method, budget) against one per method, then the profile.
    for share in none budgets; do
      rm -rf "$W/harness-$share"
      t $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch 16 --methods "$m" \
        --ratios "$RATIOS" --share-prefill $share --out "$W/harness-$share" 2>&1 | tail -n 1
    done
    python3 - "$W/harness-none/results.jsonl" "$W/harness-budgets/results.jsonl" <<'PY'
import json, sys
a, b = ({(r["method"], r["budget"], r["id"]): r for r in map(json.loads, open(p))} for p in sys.argv[1:])
same = sum(a[k]["output"] == b[k]["output"] and a[k]["kv_bytes_kept"] == b[k]["kv_bytes_kept"] for k in a)
print(f"harness: {len(a)} records; {same} identical in output and kept bytes with and without the shared prefill")
PY
    rm -rf "$W/harness-prof"
    KVD_PROFILE=1 $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch 16 --methods "$m" \
      --ratios "$RATIOS" --out "$W/harness-prof" 2>&1 | grep '^\[profile\] eval\|^\[profile\] decode\|^\[profile\] prefill'
    ;;
  prefill)
    slice_ab "${2:-snapkv,defensivekv}" prefill_s masked "env KVD_CHUNK_ATTENTION=masked" flash "env KVD_CHUNK_ATTENTION=flash"
    ;;
  share-methods)
    slice_ab "${2:-snapkv,defensivekv,adakv_snapkv,pyramidkv,tova,knorm}" prefill_s budgets "--share-prefill budgets" \
      methods "--share-prefill methods --share-prefill-gib $SHARE_GIB"
    ;;
  joined-prefill)
    # Each record's prefill_s is its budget's share of a joined prefill: the ratio is the prefill's speed-up.
    slice_ab "${2:-retention_gate:$W/trimkv/bundle}" prefill_s alone "--join-prefill no" joined "--join-prefill yes"
    ;;
  evict-decode)
    slice_ab "${2:-tova_decode,h2o_decode,streaming_llm_decode,lazy_eviction}" decode_s cache "--decode cache" \
      graph "--decode auto"
    ;;
  profile)
    shift
    tasks_slice "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl"
    # Each method's sections go to $OUT/profile-M.log (whole) when OUT is set; the call prints its wall time and
    # its three largest sections.
    for m in ${@:-kvzip kvzip_plus tova_decode h2o_decode lazy_eviction streaming_llm_decode snapkv}; do
      rm -rf "$W/profile-$m"
      log=${OUT:-$W}/profile-$m.log
      s=$SECONDS
      env KVD_PROFILE=1 OMP_NUM_THREADS=1 $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda \
        --batch "$BATCH" --batch-tokens "$BATCH_TOKENS" --methods "$m" --ratios "$RATIOS" --out "$W/profile-$m" 2>&1 |
        grep '^\[profile\] ' > "$log" || true
      echo "== $m: $((SECONDS - s)) s"
      grep -v '^\[profile\] timed\|^\[profile\] eval ' "$log" |
        awk '{for (i = 2; i < NF; i++) if ($(i + 1) == "s") { print $i "\t" $0; break }}' | sort -rn | head -n 3 | cut -f2-
    done
    ;;
  trace)
    tasks_slice "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl"
    # TRACE_LEN (default 2048): the slice's samples of that length (16).
    python3 -c 'import json,sys; [print(l, end="") for l in open(sys.argv[1]) if json.loads(l)["length"] // 1000 == int(sys.argv[2]) // 1000]' \
      "$W/tasks-slice.jsonl" "${TRACE_LEN:-2048}" > "$W/tasks-trace.jsonl"
    rm -rf "$W/trace-eval"
    env KVD_TRACE="$W/trace.json" OMP_NUM_THREADS=1 $KVD eval --model "$MODEL" --tasks "$W/tasks-trace.jsonl" \
      --device cuda --batch "$BATCH" --batch-tokens "$BATCH_TOKENS" --share-prefill methods \
      --share-prefill-gib "$SHARE_GIB" --decode-logits-gib "$DECODE_GIB" \
      --methods "${2:-snapkv,defensivekv,adakv_snapkv,tova,tova_decode,kvzip}" \
      --ratios "$RATIOS" --out "$W/trace-eval" 2>&1 | grep '^\[trace\]\|^\[eval\] .*ETA 0 s' || true
    python3 scripts/trace_summary.py "$W/trace.json" --top 25 | tee "${OUT:-$W}/trace-summary.txt"
    if [ -n "${OUT:-}" ]; then
      gzip -c "$W/trace.json" > "$W/trace.json.gz"
      [ "$(stat -c %s "$W/trace.json.gz")" -lt 15000000 ] && cp "$W/trace.json.gz" "$OUT/" || echo "(trace.json.gz over 15 MB: kept on the device)"
    fi
    ;;
  report)
    # Also here, on the collected records: W=<unpacked tarball> bench/gpu_rivals.sh report. The plots need matplotlib.
    plot=()
    python3 -c 'import matplotlib' 2>/dev/null && plot=(--plot)
    for mode in $MODES; do
      dirs=("$W"/eval-"$mode"-*/)
      [ -e "${dirs[0]}" ] || continue
      python3 scripts/paired_bootstrap.py "${dirs[@]}" --baseline best "${plot[@]}" | tee "$W/bootstrap-$mode.md"
    done
    ;;
  workers)
    shift
    [ $# -gt 0 ] || set -- 1 2 3 4
    for n in "$@"; do slice_run "workers-$n" "$n"; done
    compare_runs "${@/#/workers-}"
    ;;
  chunk-attention)
    # The same run as `workers $WORKERS` with a chunk's attention into a stored cache (the rest of the prompt, the
    # teacher-forced answer, KVzip's repeated context) masked over padded copies, then through flash on the cache's
    # segments in place (models/attention.h, ChunkAttention): wall times, records that agree, the scores' mean gap.
    slice_run chunk-masked "$WORKERS" KVD_CHUNK_ATTENTION=masked
    slice_run chunk-flash "$WORKERS" KVD_CHUNK_ATTENTION=flash
    compare_runs chunk-masked chunk-flash
    ;;
  mps)
    # The same run as `workers 1` split into P shards (default 1 2 4), one eval process each, all at once under the
    # MPS control daemon (started here if it is not running): without MPS the GPU time-slices between processes, with
    # it their kernels share the GPU as one context's streams would. Wall time and agreement with workers-1.
    shift
    tasks_slice "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl"
    heuristics=$(echo "$HEURISTICS" | tr ' ' '\n' | sed '/^$/d' | paste -sd, -)
    if ! pgrep -f nvidia-cuda-mps-control >/dev/null; then  # -f: -x compares the 15-character process name
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      nvidia-cuda-mps-control -d && echo "[mps] control daemon started" || echo "[mps] could not start the daemon"
    fi
    for np in ${@:-1 2 4}; do
      rm -rf "$W"/mps-"$np"-s*
      s=$SECONDS
      for k in $(seq 0 $((np - 1))); do
        env OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${WORKERS_LIMIT:-150}" $KVD eval \
          --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch "$BATCH" --batch-tokens "$BATCH_TOKENS" \
          --share-prefill methods --share-prefill-gib "$SHARE_GIB" --decode-logits-gib "$DECODE_GIB" \
          --methods "$heuristics" --ratios "$RATIOS" --shard "$k/$np" --out "$W/mps-$np-s$k" \
          > "${OUT:-$W}/mps-$np-s$k.log" 2>&1 &
      done
      wait
      n=$(cat "$W"/mps-"$np"-s*/results.jsonl 2>/dev/null | wc -l)
      echo "== $np processes under MPS: $((SECONDS - s)) s, $n results ($((n / (SECONDS - s + 1))) per s)"
    done
    echo get_server_list | nvidia-cuda-mps-control 2>/dev/null | sed 's/^/[mps] server /' || true
    python3 - "$W" ${@:-1 2 4} <<'PY'
import glob, json, sys
w, ns = sys.argv[1], sys.argv[2:]
def load(pattern):
    return {(r["method"], r["budget"], r["id"]): r for p in glob.glob(pattern) for r in map(json.loads, open(p))}
ref = load(f"{w}/workers-1/results.jsonl")
for n in ns:
    b = load(f"{w}/mps-{n}-s*/results.jsonl")
    common = ref.keys() & b.keys()
    same = {f: sum(ref[k][f] == b[k][f] for k in common) for f in ("output", "score", "kl", "kv_bytes_kept")}
    print(f"{n} processes: {len(b)} records, {len(common)} in workers-1's; identical {same}")
PY
    ;;
  archive)
    # The records of $W (here: a collected tarball unpacked, W=<dir>) into D, small enough to commit: one
    # NAME.jsonl.gz and NAME.run.json per eval directory, each record without its output text and with its numbers
    # to 5 significant digits (2.1 MB for 87k records). `report` and the bootstrap read them back through
    # `restore D`, and `protocol` resumes from them (a rerun skips the (method, budget, sample) they hold).
    dest=${2:?archive takes the directory to write into}
    mkdir -p "$dest"
    python3 - "$W" "$dest" <<'PY'
import glob, gzip, json, os, shutil, sys
w, dest = sys.argv[1:3]
def small(v):
    return float(f"{v:.5g}") if isinstance(v, float) else v
for d in sorted(glob.glob(os.path.join(w, "eval-*/"))):
    name = os.path.basename(d.rstrip("/"))
    n = 0
    with open(os.path.join(d, "results.jsonl")) as f, gzip.open(os.path.join(dest, name + ".jsonl.gz"), "wt", compresslevel=9) as out:
        for line in f:
            if line.strip():
                r = json.loads(line)
                r.pop("output", None)
                out.write(json.dumps({k: small(v) for k, v in r.items()}, separators=(",", ":")) + "\n")
                n += 1
    shutil.copy(os.path.join(d, "run.json"), os.path.join(dest, name + ".run.json"))
    print(f"[archive] {name}: {n} records, {os.path.getsize(os.path.join(dest, name + '.jsonl.gz'))} bytes")
PY
    ;;
  restore)
    # A `collect`ed results tarball (e.g. carried back in a later call), or a directory written by `archive`,
    # unpacked into $W, so that `protocol` resumes it (and `report` reads it).
    # A directory may also hold collected bundles (bundle-NAME.tgz.part-*, carried to the device): each goes back to
    # $W/NAME/bundle, where `protocol` finds it.
    src=${2:?restore takes the rivals-results tarball or an archive directory}
    if [ -d "$src" ]; then
      for f in "$src"/eval-*.jsonl.gz; do
        [ -e "$f" ] || continue
        name=$(basename "$f" .jsonl.gz)
        mkdir -p "$W/$name"
        gunzip -c "$f" > "$W/$name/results.jsonl"
        cp "$src/$name.run.json" "$W/$name/run.json"
      done
      for f in "$src"/bundle-*.tgz.part-aa; do
        [ -e "$f" ] || continue
        cat "${f%aa}"* | tar xzf - -C "$W"
        echo "[restore] $(basename "${f%.tgz.part-aa}") into $W"
      done
    else
      tar xzf "$src" -C "$W"
    fi
    { cat "$W"/eval-*/results.jsonl 2>/dev/null || true; } | wc -l | sed 's/^/[restore] results in place: /'
    ;;
  bundle-variant)
    # A copy of bundle $2 as $W/$3/bundle with manifest keys set ($4...: key=value, written at the top level and in
    # "options"; numbers stay numbers), e.g. Judge-Q with another score pooling: bundle-variant
    # docs/results/queryrows-h100-2026-12-06/judgeq-kl-bundle judgeq-mean3 pooling=mean pool_kernel=3; then
    # LEARNED="judgeq:$W/judgeq-mean3/bundle". Its label in the records is query_rows(judgeq-mean3).
    [ $# -ge 4 ] || { echo "usage: gpu_rivals.sh bundle-variant SRC NAME key=value..." >&2; exit 2; }
    [ -f "$2/kvdistill.json" ] || { echo "bundle-variant: $2 holds no kvdistill.json" >&2; exit 2; }
    rm -rf "${W:?}/$3/bundle" && mkdir -p "$W/$3" && cp -r "$2" "$W/$3/bundle"
    python3 - "$W/$3/bundle/kvdistill.json" "${@:4}" <<'PY'
import json, sys
path, kvs = sys.argv[1], sys.argv[2:]
m = json.load(open(path))
for kv in kvs:
    k, _, v = kv.partition("=")
    try:
        v = int(v)
    except ValueError:
        pass
    if k not in m:
        sys.exit(f"bundle-variant: the manifest has no key '{k}'")
    m[k] = v
    if k in m.get("options", {}):
        m["options"][k] = v
json.dump(m, open(path, "w"), indent=2, sort_keys=True)
print(f"bundle-variant: {path}: " + ", ".join(kvs))
PY
    ;;
  collect)
    # Into $OUT in parts of at most 15 MB (the device call returns files of up to 16 MiB): the results, metrics
    # and logs, and each trained bundle. Rejoin with `cat NAME.tgz.part-* | tar xz`.
    out=${OUT:?OUT is the device call\'s return folder}
    (cd "$W" && tar czf - --ignore-failed-read kvzap/metrics.jsonl dms/metrics.jsonl trimkv/metrics.jsonl \
      attngate/metrics.jsonl ./*.log \
      eval-*/results.jsonl eval-*/run.json bootstrap-*.md harness-*/results.jsonl 2>/dev/null) |
      split -b 15M - "$out/rivals-results.tgz.part-"
    for r in kvzap dms trimkv attngate; do  # COLLECT_BUNDLES=0: bundles carried here from this machine stay out
      [ "${COLLECT_BUNDLES:-1}" = 1 ] && [ -d "$W/$r/bundle" ] &&
        (cd "$W" && tar czf - "$r/bundle") | split -b 15M - "$out/bundle-$r.tgz.part-"
    done
    ls -la "$out"
    ;;
  *)
    awk 'NR > 1 && /^set -euo/ {exit} NR > 1' "$0"
    exit 2
    ;;
esac
