#!/usr/bin/env bash
# The GPU run behind bench/RESULTS.md and docs/results/ (issue-level acceptance runs), one stage per call:
#   bench/gpu_pipeline.sh bench-decode      batched decode over full / uniform / ragged caches (2K and 4K)
#   bench/gpu_pipeline.sh responses         1,000 long prompts -> self-generated greedy responses
#   bench/gpu_pipeline.sh train-corpus      TRIM-KV gate from the corpus (docs-2k.h5)
#   bench/gpu_pipeline.sh train-responses   TRIM-KV gate from the responses (completion-only)
#   bench/gpu_pipeline.sh heldout           KL at M = 128 on held-out 2K corpus text: both gates, StreamingLLM,
#                                           the untrained gate
#   bench/gpu_pipeline.sh eval-shard NAME M1,M2,...   the comparison for some methods, into $W/eval-NAME
#   bench/gpu_pipeline.sh eval-merge        every $W/eval-*/results.jsonl -> $W/eval (reports included)
#   bench/gpu_pipeline.sh all               all of the above, overlapped on one GPU; logs in $W/*.log
# The comparison's methods are split over a few eval processes that share the GPU (one process leaves it
# mostly idle: a 135M model's decode step is launch-bound); each computes the full cache as its reference.
# Inputs (env): KVD (binary), BENCH (bench_cache_decode), MODEL (converted SmolLM2 dir), W (work dir), DATA
# (dir with docs-2k.h5, prompts-long-1k.jsonl and tasks-gpu.jsonl). Every stage is resumable: re-running it
# continues.
set -euo pipefail
KVD=${KVD:-build/kvdistill}
BENCH=${BENCH:-build/bench_cache_decode}
MODEL=${MODEL:-.cache/models/SmolLM2-135M-Instruct}
W=${W:-runs/gpu}
DATA=${DATA:-.cache/data}
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[time] $((SECONDS - s)) s: $*" >&2; }
# Every heuristic of the comparison (the gates are added by name where they exist).
HEURISTICS=knorm,streaming_llm,h2o,observed_attention,snapkv,pyramidkv,tova,keydiff,expected_attention
HEURISTICS=$HEURISTICS,adakv_snapkv,criticalkv_snapkv,defensivekv,cake,h2o_decode,tova_decode,lazy_eviction

case "${1:-}" in
  bench-decode)
    for ctx in 2048 4096; do t "$BENCH" --model "$MODEL" --device cuda --batch 16 --context $ctx --keep 0.5 --steps 64; done
    ;;
  responses)
    # Prompts: kvdistill prepare prompts --input .cache/corpus --out prompts-long-1k.jsonl --count 1000 --seed 3
    #          --model MODEL --passage-tokens 1600   (each prompt + response fills most of a 2048-token sequence)
    t "$KVD" prepare responses --model "$MODEL" --prompts "$DATA/prompts-long-1k.jsonl" --out "$W/responses-long-1k.h5" \
      --max-new-tokens 256 --batch 128 --device cuda
    ;;
  train-corpus)
    t "$KVD" train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$DATA/docs-2k.h5" \
      train.out_dir="$W/gate-corpus" train.steps=200 train.warmup=20 train.eval_every=100 train.save_every=100 \
      train.log_every=20 train.batch_size=2 train.grad_accum=4
    ;;
  train-responses)
    t "$KVD" train --config configs/trimkv-smollm2-responses.yaml model.dir="$MODEL" \
      data.train="$W/responses-long-1k.h5" train.out_dir="$W/gate-responses" train.steps=250 train.warmup=25 \
      train.eval_every=125 train.save_every=125 train.log_every=25 train.batch_size=2 train.grad_accum=4
    ;;
  heldout)
    t "$KVD" heldout --model "$MODEL" --data "$DATA/docs-2k.h5" --budget 128 --sequences 16 --device cuda \
      --scorers "streaming_llm,gate-untrained,gate:$W/gate-corpus/bundle,gate:$W/gate-responses/bundle" \
      --out "$W/heldout.json"
    ;;
  eval-shard)
    [ $# -eq 3 ] || { echo "usage: gpu_pipeline.sh eval-shard NAME METHODS" >&2; exit 2; }
    t "$KVD" eval --model "$MODEL" --tasks "$DATA/tasks-gpu.jsonl" --methods "$3" --ratios 0.5,0.75,0.875 \
      --out "$W/eval-$2" --batch 16 --device cuda
    ;;
  eval-merge)
    # One line per (method, budget, sample): the full cache is in every shard (each one's reference), and a
    # resumed shard may repeat another's methods; the first line of a key wins (shards in name order).
    mkdir -p "$W/eval"
    python3 - "$W" <<'PY'
import glob, json, os, shutil, sys
w = sys.argv[1]
seen, out = set(), []
dirs = sorted(glob.glob(os.path.join(w, "eval-*/")))
for d in dirs:
    for line in open(os.path.join(d, "results.jsonl")):
        if not line.strip():
            continue
        r = json.loads(line)
        key = (r["method"], r["budget"], r["id"])
        if key not in seen:
            seen.add(key)
            out.append(line if line.endswith("\n") else line + "\n")
open(os.path.join(w, "eval", "results.jsonl"), "w").writelines(out)
shutil.copy(os.path.join(dirs[0], "run.json"), os.path.join(w, "eval", "run.json"))
print(f"eval-merge: {len(out)} results from {len(dirs)} shards", file=sys.stderr)
PY
    "$KVD" eval --report-only --model "$MODEL" --out "$W/eval"
    ;;
  all)
    # The heuristics' eval shards start at once, next to response generation + training; the gates' shard
    # and the held-out check follow the training. OMP_NUM_THREADS keeps the processes off each other's cores.
    self=$(readlink -f "$0")
    run() { local log=$W/$1.log; shift; OMP_NUM_THREADS=2 bash "$self" "$@" > "$log" 2>&1; }
    run bench-decode bench-decode
    { run responses responses && run train-responses train-responses; } &
    r=$!
    run train-corpus train-corpus &
    c=$!
    run eval-a eval-shard a adakv_snapkv,knorm,snapkv,tova &
    run eval-b eval-shard b defensivekv,streaming_llm,keydiff,h2o_decode &
    run eval-c eval-shard c cake,h2o,expected_attention,tova_decode &
    run eval-d eval-shard d pyramidkv,observed_attention,criticalkv_snapkv,lazy_eviction &
    wait $r $c
    run heldout heldout &
    run eval-e eval-shard e "gate:$W/gate-corpus/bundle,gate:$W/gate-responses/bundle"
    wait
    run eval-merge eval-merge
    echo "all stages done" >&2
    ;;
  *) echo "usage: gpu_pipeline.sh bench-decode|responses|train-corpus|train-responses|heldout|eval-shard NAME METHODS|eval-merge|all" >&2; exit 2 ;;
esac
