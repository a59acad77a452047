#!/usr/bin/env bash
# GPU acceptance of the query-row component (Judge-Q / LookaheadKV, issue 12) on SmolLM2-135M-Instruct, one
# stage per call, on the GPU machine (source .device/setup.sh first; results go to bench/RESULTS.md and
# docs/results/ by hand):
#   bench/gpu_query_rows.sh build      this tree into build-gpu/ (kvdistill, bench_query_rows)
#   bench/gpu_query_rows.sh model      joins the GGUF parts staged in /root/kvd-stage and converts it to $MODEL
#   bench/gpu_query_rows.sh data       long prompts (~1,800 tokens) cut from $CORPUS, the model's own greedy
#                                      responses to them (512 tokens), and the RULER-style tasks at 2K and 4K
#   bench/gpu_query_rows.sh train      Judge-Q (MSE), Judge-Q with KL, and LookaheadKV (configs/*-smollm2.yaml)
#   bench/gpu_query_rows.sh bench      the efficient objective vs whole-sequence forwards (peak memory, tokens/s)
#                                      at 2K + 512, both presets, and the rows' eviction overhead at 4K and 8K
#   bench/gpu_query_rows.sh eval [MODE] both modes (query-agnostic, --query-aware; or the one named), ratios
#                                      0.5 / 0.75 / 0.875: the three trained variants (and LookaheadKV under
#                                      AdaKV budgets) next to SnapKV, PyramidKV, AdaKV-SnapKV, StreamingLLM, TOVA
#                                      and (if $TRIMKV is a bundle) TRIM-KV; resumable
#   bench/gpu_query_rows.sh report     paired bootstrap intervals against SnapKV (accuracy and critical-KV hit
#                                      rate, scripts/paired_bootstrap.py) and the plots, per mode
# Inputs (env): MODEL (converted model dir, default /root/model), CORPUS (text corpus dir, default
# .cache/corpus), W (work dir, default /root/qr), STEPS (training steps, default 600), PROMPTS (default 2000),
# SAMPLES (task samples per task and length, default 10: 160 samples), TRIMKV (a TRIM-KV bundle dir, optional).
set -euo pipefail
MODEL=${MODEL:-/root/model}
CORPUS=${CORPUS:-.cache/corpus}
W=${W:-/root/qr}
STEPS=${STEPS:-600}
PROMPTS=${PROMPTS:-2000}
SAMPLES=${SAMPLES:-10}
TRIMKV=${TRIMKV:-}
KVD=build-gpu/kvdistill
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[time] $((SECONDS - s)) s: $*" >&2; }

case "${1:-}" in
  build)
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVD_BUILD_TESTS=OFF \
      -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" >/dev/null
    t ninja -C build-gpu kvdistill bench_query_rows
    ;;
  model)
    cat /root/kvd-stage/part-* > /root/smollm2.gguf
    sha256sum /root/smollm2.gguf
    t $KVD convert --gguf /root/smollm2.gguf --out "$MODEL"
    ;;
  data)
    t $KVD prepare prompts --input "$CORPUS" --out "$W/prompts-long.jsonl" --count "$PROMPTS" --seed 0 \
      --model "$MODEL" --passage-tokens 1800
    t $KVD prepare responses --model "$MODEL" --prompts "$W/prompts-long.jsonl" --out "$W/responses-long.h5" \
      --max-new-tokens 512 --batch 64 --device cuda
    t $KVD prepare tasks --model "$MODEL" --suite ruler --lengths 2048,4096 --samples "$SAMPLES" --seed 7 \
      --out "$W/tasks-2k4k.jsonl"
    ;;
  train)
    common=(model.dir="$MODEL" data.train="$W/responses-long.h5" train.steps="$STEPS" train.progress=lines)
    t $KVD train --config configs/judgeq-smollm2.yaml "${common[@]}" train.out_dir="$W/judgeq"
    t $KVD train --config configs/judgeq-smollm2.yaml "${common[@]}" component.loss=kl train.lr=0.001 \
      train.out_dir="$W/judgeq-kl"
    t $KVD train --config configs/lookahead-smollm2.yaml "${common[@]}" train.out_dir="$W/lookahead"
    for r in judgeq judgeq-kl lookahead; do
      echo "$r: $(grep heldout_kl "$W/$r/metrics.jsonl" | tail -1)"
    done
    ;;
  bench)
    for p in judgeq lookahead; do
      t build-gpu/bench_query_rows --model "$MODEL" --device cuda --preset "$p" --prompt 2048 --response 512 \
        --rows 32 --repeat 5 --overhead 4096,8192 | tee "$W/bench-$p.json"
    done
    ;;
  eval)
    # One eval process per mode, overlapped on the GPU (a 135M model's decode is launch-bound). Resumable:
    # re-running skips the results already in $W/eval-<mode>/results.jsonl. `eval aware` / `eval agnostic` runs one.
    methods="snapkv,pyramidkv,adakv_snapkv,streaming_llm,tova"
    methods+=",gate:$W/judgeq/bundle,gate:$W/judgeq-kl/bundle,gate:$W/lookahead/bundle"
    methods+=",adakv_gate:$W/lookahead/bundle"
    [ -n "$TRIMKV" ] && methods+=",gate:$TRIMKV"
    modes=(${2:-agnostic aware})
    for mode in "${modes[@]}"; do
      flag=(); [ "$mode" = aware ] && flag=(--query-aware)
      t $KVD eval --model "$MODEL" --tasks "$W/tasks-2k4k.jsonl" --device cuda --batch 16 "${flag[@]}" \
        --methods "$methods" --ratios 0.5,0.75,0.875 --out "$W/eval-$mode" > "$W/eval-$mode.log" 2>&1 &
    done
    wait
    tail -n 3 "$W"/eval-*.log
    ;;
  report)
    for mode in agnostic aware; do
      [ -s "$W/eval-$mode/results.jsonl" ] || continue
      python3 scripts/paired_bootstrap.py "$W/eval-$mode" --baseline snapkv | tee "$W/eval-$mode/bootstrap.md"
      python3 scripts/plot_results.py "$W/eval-$mode" --title "query rows, $mode, SmolLM2-135M, RULER 2K+4K" || true
    done
    ;;
  *)
    sed -n '2,23p' "$0"
    exit 2
    ;;
esac
