#!/usr/bin/env bash
# The strongest rivals and the comparison protocol (issue 14) on SmolLM2-135M-Instruct, one stage per device call
# (source .device/setup.sh first; results go to bench/RESULTS.md and docs/results/ by hand):
#   bench/gpu_rivals.sh build          this tree into build-gpu/ (kvdistill)
#   bench/gpu_rivals.sh model          joins the GGUF parts staged in /root/kvd-stage, checks the sha256 and
#                                      converts it to $MODEL
#   bench/gpu_rivals.sh train [S]      KVzap (configs/kvzap-smollm2.yaml, $DATA/$KVZAP_H5) and DMS
#                                      (configs/dms-smollm2.yaml, $DATA/$DMS_H5) at once on the GPU, each stopped
#                                      after S seconds (default 540) and resumed from its last checkpoint by the
#                                      next call; prints their last logged step
#   bench/gpu_rivals.sh protocol [S]   $TASKS (50 samples per task and length at 2K / 4K / 8K) at ratios
#                                      0.25 / 0.5 / 0.75 / 0.875, in $MODES (agnostic: the default, aware:
#                                      --query-aware): every heuristic of $HEURISTICS and every learned part of
#                                      $LEARNED, one eval process per method and mode sharing the GPU, each
#                                      resumable (re-running skips what is written); S seconds per call
#   bench/gpu_rivals.sh report         per mode: paired bootstrap against the best heuristic at each ratio and the
#                                      headline table (scripts/paired_bootstrap.py --baseline best), the plots
#   bench/gpu_rivals.sh harness [M]   where the eval's time goes: KVD_PROFILE over a slice of $TASKS (16 samples
#                                      per length), method M (default snapkv) at two ratios, batch 16 and 64
#   bench/gpu_rivals.sh collect        results, metrics and logs into $OUT (one tarball), one tarball per bundle
# Inputs (env): MODEL (default /root/model); DATA (default /root/rivals): tasks-2k4k8k.jsonl (`prepare tasks
# --lengths 2048,4096,8192 --samples 50 --seed 7`), $KVZAP_H5 (default corpus-1k.h5: `prepare text --seq-len
# 1024`) and $DMS_H5 (default corpus-2k.h5: `prepare text --seq-len 2048`); W (work dir, default /root/rv);
# KVZAP_STEPS (default 1000), DMS_STEPS (default 600); MODES (default "agnostic aware"); HEURISTICS (default
# below); LEARNED (extra learned methods, e.g. "gate:/root/trimkv/bundle attngate:/root/ag/bundle"; the trained
# KVzap and DMS bundles are added when they exist).
set -euo pipefail
MODEL=${MODEL:-/root/model}
DATA=${DATA:-/root/rivals}
W=${W:-/root/rv}
KVZAP_H5=${KVZAP_H5:-corpus-1k.h5}
DMS_H5=${DMS_H5:-corpus-2k.h5}
KVZAP_STEPS=${KVZAP_STEPS:-1000}
DMS_STEPS=${DMS_STEPS:-600}
MODES=${MODES:-agnostic aware}
HEURISTICS=${HEURISTICS:-streaming_llm snapkv pyramidkv tova expected_attention adakv_snapkv defensivekv layer_defensivekv cake kvzip}
LEARNED=${LEARNED:-}
RATIOS=0.25,0.5,0.75,0.875
KVD=build-gpu/kvdistill
mkdir -p "$W"
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"  # t, gpu_build, gpu_model

learned_methods() {
  local m=$LEARNED
  [ -f "$W/kvzap/bundle/kvdistill.json" ] && m+=" kvzap:$W/kvzap/bundle"
  [ -f "$W/dms/bundle/kvdistill.json" ] && m+=" dms:$W/dms/bundle"
  echo "$m"
}

case "${1:-}" in
  build)
    gpu_build kvdistill
    ;;
  model)
    gpu_model "$MODEL"
    ;;
  train)
    limit=${2:-540}
    timeout "$limit" $KVD train --config configs/kvzap-smollm2.yaml model.dir="$MODEL" data.train="$DATA/$KVZAP_H5" \
      train.steps="$KVZAP_STEPS" train.save_every=50 train.progress=lines train.out_dir="$W/kvzap" \
      >> "$W/train-kvzap.log" 2>&1 &
    timeout "$limit" $KVD train --config configs/dms-smollm2.yaml model.dir="$MODEL" data.train="$DATA/$DMS_H5" \
      train.steps="$DMS_STEPS" train.save_every=50 train.progress=lines train.out_dir="$W/dms" \
      >> "$W/train-dms.log" 2>&1 &
    wait || true
    for r in kvzap dms; do
      echo "== $r: $(tail -n 1 "$W/train-$r.log")"
      [ -f "$W/$r/bundle/kvdistill.json" ] && echo "   bundle ready" || echo "   (no bundle yet: run train again to resume)"
    done
    ;;
  protocol)
    limit=${2:-540}
    for mode in $MODES; do
      flag=(); [ "$mode" = aware ] && flag=(--query-aware)
      for m in $HEURISTICS $(learned_methods); do
        name=$(echo "$m" | tr '/:' '__')
        timeout "$limit" $KVD eval --model "$MODEL" --tasks "$DATA/tasks-2k4k8k.jsonl" --device cuda --batch 16 \
          "${flag[@]}" --methods "$m" --ratios "$RATIOS" --out "$W/eval-$mode-$name" \
          > "$W/eval-$mode-$name.log" 2>&1 &
      done
    done
    wait || true
    for f in "$W"/eval-*.log; do echo "$f: $(tail -n 1 "$f")"; done
    wc -l "$W"/eval-*/results.jsonl | tail -n 1
    ;;
  harness)
    m=${2:-snapkv}
    python3 - "$DATA/tasks-2k4k8k.jsonl" "$W/tasks-slice.jsonl" <<'PY'
import json, sys
seen = {}
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        r = json.loads(line)
        if seen.get(r["length"] // 1000, 0) < 16:
            seen[r["length"] // 1000] = seen.get(r["length"] // 1000, 0) + 1
            out.write(line)
print("slice:", seen)
PY
    for b in 16 64; do
      rm -rf "$W/harness-$b"
      KVD_PROFILE=1 t $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch $b \
        --methods "$m" --ratios 0.5,0.75 --out "$W/harness-$b" 2>&1 | grep -v '^\[eval\]' | tee "$W/harness-$b.log"
    done
    rm -rf "$W/harness-plain"
    t $KVD eval --model "$MODEL" --tasks "$W/tasks-slice.jsonl" --device cuda --batch 16 --methods "$m" \
      --ratios 0.5,0.75 --out "$W/harness-plain" 2>&1 | tail -n 2
    ;;
  report)
    for mode in $MODES; do
      dirs=("$W"/eval-"$mode"-*/)
      [ -e "${dirs[0]}" ] || continue
      python3 scripts/paired_bootstrap.py "${dirs[@]}" --baseline best | tee "$W/bootstrap-$mode.md"
    done
    ;;
  collect)
    out=${OUT:?OUT is the device call\'s return folder}
    (cd "$W" && tar czf "$out/rivals-results.tgz" --ignore-failed-read kvzap/metrics.jsonl dms/metrics.jsonl \
      *.log eval-*/results.jsonl eval-*/run.json bootstrap-*.md)
    for r in kvzap dms; do (cd "$W" && tar czf "$out/bundle-$r.tgz" --ignore-failed-read "$r/bundle"); done
    ls -la "$out"
    ;;
  *)
    sed -n '2,27p' "$0"
    exit 2
    ;;
esac
