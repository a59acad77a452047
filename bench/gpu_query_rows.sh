#!/usr/bin/env bash
# GPU acceptance of the query-row component (Judge-Q / LookaheadKV, issue 12) on SmolLM2-135M-Instruct, one
# stage per call, on the GPU machine (source .device/setup.sh first; results go to bench/RESULTS.md and
# docs/results/ by hand):
#   bench/gpu_query_rows.sh build      this tree into build-gpu/ (kvdistill, bench_query_rows)
#   bench/gpu_query_rows.sh model      joins the GGUF parts staged in /root/kvd-stage and converts it to $MODEL
#   bench/gpu_query_rows.sh data       long prompts (~1,800 tokens) cut from $CORPUS, the model's own greedy
#                                      responses to them (512 tokens), and the RULER-style tasks at 2K and 4K;
#                                      a prompts or tasks file already in $W (staged: prepared elsewhere) is kept
#   bench/gpu_query_rows.sh trimkv     a TRIM-KV gate to compare with ($TRIMKV_STEPS steps on the prompts'
#                                      passages packed into 2,048-token sequences), unless $TRIMKV is given
#   bench/gpu_query_rows.sh train      Judge-Q (KL, the default), Judge-Q with MSE (the paper's loss) and LookaheadKV
#                                      (configs/*-smollm2.yaml), the three at once (a 135M model leaves the GPU
#                                      mostly idle; with TRIM-KV beside them, 1.4-2.0 s/step on an H100); a run
#                                      stopped early by SIGTERM is exported from its last checkpoint
#   bench/gpu_query_rows.sh bench      the efficient objective vs whole-sequence forwards (peak memory, tokens/s)
#                                      at 2K + 512, both presets, and the rows' eviction overhead at 4K and 8K
#   bench/gpu_query_rows.sh eval [S]   both modes (query-agnostic, --query-aware), ratios 0.5 / 0.75 / 0.875: the
#                                      three trained variants (and LookaheadKV under AdaKV budgets) next to SnapKV,
#                                      PyramidKV, AdaKV-SnapKV, StreamingLLM, TOVA and TRIM-KV (if its bundle is
#                                      there); P processes over shards of the samples, stopped after S seconds
#                                      (default 480) and resumable (re-running skips the results written)
#   bench/gpu_query_rows.sh report     paired bootstrap intervals against SnapKV and against the best heuristic
#                                      (accuracy and critical-KV hit rate, scripts/paired_bootstrap.py), per mode
#   bench/gpu_query_rows.sh pipeline   bench, then trimkv beside data and train, eval and report, detached from the call
#                                      (setsid; log in $W/pipeline.log): later calls poll it while the machine is
#                                      kept, each within 30 s of the last
#   bench/gpu_query_rows.sh stop       stops the query-row trainings at their current step, for a pipeline to
#                                      export them and go on
#   bench/gpu_query_rows.sh collect    the results (eval records, bootstrap tables, training metrics, bench
#                                      JSON) into $OUT/qr-results.tgz, the query-row bundles into $OUT/qr-bundles.tgz
#                                      (TRIM-KV's, 35 MB, is over the 16 MB a returned file may have)
# Inputs (env): MODEL (converted model dir, default /root/model), CORPUS (text corpus dir, default
# .cache/corpus), W (work dir, default /root/qr), STEPS (training steps, default 600), PROMPTS (default 2000),
# SAMPLES (task samples per task and length, default 10: 160 samples), TRIMKV (a TRIM-KV bundle dir; default
# $W/trimkv/bundle, trained by the trimkv stage), TRIMKV_STEPS (default 600), P (eval processes, default 6),
# EVAL_S (the pipeline's eval deadline, default 480).
set -euo pipefail
MODEL=${MODEL:-/root/model}
CORPUS=${CORPUS:-.cache/corpus}
W=${W:-/root/qr}
STEPS=${STEPS:-600}
PROMPTS=${PROMPTS:-2000}
SAMPLES=${SAMPLES:-10}
TRIMKV=${TRIMKV:-$W/trimkv/bundle}
TRIMKV_STEPS=${TRIMKV_STEPS:-600}
P=${P:-6}
EVAL_S=${EVAL_S:-480}
KVD=${KVD:-build-gpu/kvdistill}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
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
    [ -s "$W/prompts-long.jsonl" ] ||
      t $KVD prepare prompts --input "$CORPUS" --out "$W/prompts-long.jsonl" --count "$PROMPTS" --seed 0 \
        --model "$MODEL" --passage-tokens 1800
    t $KVD prepare responses --model "$MODEL" --prompts "$W/prompts-long.jsonl" --out "$W/responses-long.h5" \
      --max-new-tokens 512 --batch 128 --device cuda --progress lines
    [ -s "$W/tasks-2k4k.jsonl" ] ||
      t $KVD prepare tasks --model "$MODEL" --suite ruler --lengths 2048,4096 --samples "$SAMPLES" --seed 7 \
        --out "$W/tasks-2k4k.jsonl"
    ;;
  trimkv)
    [ -f "$TRIMKV/kvdistill.json" ] && { echo "trimkv: $TRIMKV is there"; exit 0; }
    # The prompts' passages as plain text, packed into 2,048-token sequences.
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    print(json.dumps({"text": json.loads(line)["prompt"]}))' "$W/prompts-long.jsonl" > "$W/passages.jsonl"
    [ -s "$W/passages-2k.h5" ] ||
      t $KVD prepare text --model "$MODEL" --input "$W/passages.jsonl" --out "$W/passages-2k.h5" --seq-len 2048 \
        --val-fraction 0.02 --progress never
    t $KVD train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$W/passages-2k.h5" \
      train.steps="$TRIMKV_STEPS" train.warmup=30 train.eval_every=200 train.save_every=200 train.progress=lines \
      train.out_dir="$W/trimkv"
    ;;
  train)
    common=(model.dir="$MODEL" data.train="$W/responses-long.h5" train.steps="$STEPS" train.progress=lines)
    t $KVD train --config configs/judgeq-smollm2.yaml "${common[@]}" train.out_dir="$W/judgeq" \
      > "$W/train-judgeq.log" 2>&1 &
    t $KVD train --config configs/judgeq-smollm2.yaml "${common[@]}" component.loss=mse train.lr=0.003 \
      train.out_dir="$W/judgeq-mse" > "$W/train-judgeq-mse.log" 2>&1 &
    t $KVD train --config configs/lookahead-smollm2.yaml "${common[@]}" train.out_dir="$W/lookahead" \
      > "$W/train-lookahead.log" 2>&1 &
    wait
    # A run stopped early (SIGTERM at a deadline: its last step is checkpointed) has no bundle yet: export it.
    for r in judgeq judgeq-mse lookahead; do
      [ -f "$W/$r/bundle/kvdistill.json" ] || $KVD export --run "$W/$r" --out "$W/$r/bundle"
      tail -n 2 "$W/train-$r.log"
      echo "$r: $(grep heldout "$W/$r/metrics.jsonl" | tail -1)"
    done
    ;;
  bench)
    for p in judgeq lookahead; do
      t build-gpu/bench_query_rows --model "$MODEL" --device cuda --preset "$p" --prompt 2048 --response 512 \
        --rows 32 --repeat 5 --overhead 4096,8192 | tee "$W/bench-$p.json"
    done
    ;;
  eval)
    # A pool of P eval processes, each over one shard of the samples in one mode, with every method of its group
    # in one process (the full-cache reference runs once per sample, mode and group). TRIM-KV evicts while it
    # prefills and decodes, so it runs in its own group. One CPU thread each (LibTorch's threads spin).
    limit=${2:-480}
    methods="snapkv,pyramidkv,adakv_snapkv,streaming_llm,tova"
    methods+=",judgeq:$W/judgeq/bundle,judgeq:$W/judgeq-mse/bundle,lookahead:$W/lookahead/bundle"
    methods+=",adakv_lookahead:$W/lookahead/bundle"
    groups=("rows $methods")
    [ -f "$TRIMKV/kvdistill.json" ] && groups+=("trimkv gate:$TRIMKV")
    shards=$(( P / 2 ))
    jobs=$W/eval-jobs.txt
    : > "$jobs"
    for mode in agnostic aware; do
      for g in "${groups[@]}"; do
        for k in $(seq 0 $((shards - 1))); do echo "$mode $g $k"; done >> "$jobs"
      done
    done
    export KVD MODEL W shards OMP_NUM_THREADS=1
    run_job() {
      local mode name methods k left=$(($2 - $(date +%s)))
      read -r mode name methods k <<< "$1"
      [ "$left" -gt 10 ] || return 0
      local flag=(); [ "$mode" = aware ] && flag=(--query-aware)
      local out=$W/eval-$mode/$name-s$k
      mkdir -p "$W/eval-$mode"
      timeout "$left" $KVD eval --model "$MODEL" --tasks "$W/tasks-2k4k.jsonl" --device cuda --batch 32 \
        --batch-tokens 65536 "${flag[@]}" --methods "$methods" --ratios 0.5,0.75,0.875 \
        --shard "$k/$shards" --out "$out" >> "$out.log" 2>&1 || true
    }
    export -f run_job
    end=$(($(date +%s) + limit))
    echo "[eval] $(wc -l < "$jobs") jobs, $P at a time, $limit s"
    t xargs -a "$jobs" -d '\n' -P "$P" -I{} bash -c 'run_job "$1" '"$end" _ {}
    for f in "$W"/eval-*/*.log; do echo "$f: $(grep '^\[eval\]' "$f" | tail -n 1)"; done
    cat "$W"/eval-*/*/results.jsonl 2>/dev/null | wc -l | sed 's/^/[eval] results written: /'
    ;;
  report)
    for mode in agnostic aware; do
      dirs=("$W/eval-$mode"/*/)
      [ -d "${dirs[0]}" ] || continue
      python3 scripts/paired_bootstrap.py "${dirs[@]}" --baseline snapkv | tee "$W/eval-$mode/bootstrap-snapkv.md"
      python3 scripts/paired_bootstrap.py "${dirs[@]}" --baseline best | tee "$W/eval-$mode/bootstrap-best.md"
    done
    ;;
  pipeline)
    # Detached from the call that starts it, from a copy of this tree and build (later calls replace the
    # tree's files); each stage's output and time go to $W/pipeline.log.
    src=/root/kvd-src
    rm -rf "$src" && mkdir -p "$src"
    tar cf - --exclude=./.qrA --exclude=./.qrB --exclude=./.devpart1 --exclude=./.devpart2 --exclude=./.devpart3 . |
      tar xf - -C "$src"
    cd "$src"
    setsid nohup bash -c "
      set -x
      bash $0 bench
      [ -s $W/prompts-long.jsonl ] || bash $0 data  # TRIM-KV trains on the prompts' passages
      bash $0 trimkv > $W/train-trimkv.log 2>&1 &
      bash $0 data
      bash $0 train
      wait
      bash $0 eval $EVAL_S
      bash $0 report
      echo PIPELINE-DONE" > "$W/pipeline.log" 2>&1 < /dev/null &
    echo "pipeline started; log: $W/pipeline.log"
    ;;
  stop)
    # Ends the query-row trainings at their current step (each checkpoints it): a pipeline then exports them and
    # goes on to the eval. For a deadline: a later call runs this while the pipeline trains.
    pkill -TERM -f "kvdistill train --config configs/(judgeq|lookahead)" || true
    ;;
  collect)
    # The results (eval records, tables, logs, metrics, bench JSON) and the trained bundles, two archives in $OUT.
    (cd "$W" && tar czf "$OUT/qr-results.tgz" --exclude='*.h5' --exclude='checkpoints' --exclude='bundle' \
      --exclude='passages.jsonl' --exclude='prompts-long.jsonl' --exclude='tasks-2k4k.jsonl' . || true)
    (cd "$W" && tar czf "$OUT/qr-bundles.tgz" judgeq/bundle judgeq-mse/bundle lookahead/bundle || true)
    ls -la "$OUT"
    ;;
  *)
    sed -n '2,37p' "$0"
    exit 2
    ;;
esac
