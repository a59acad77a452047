#!/usr/bin/env bash
# The GPU run behind bench/RESULTS.md and docs/results/ (issue-level acceptance runs), one stage per call:
#   bench/gpu_pipeline.sh responses   1,000 prompts -> self-generated greedy responses (throughput)
#   bench/gpu_pipeline.sh train       TRIM-KV gates from the corpus (docs-2k.h5) and from the responses
#   bench/gpu_pipeline.sh eval        the comparison: full cache, every heuristic and both gates, 2K + 4K
# Inputs (env): KVD (binary), MODEL (converted SmolLM2 dir), W (work dir), DATA (dir with docs-2k.h5,
# prompts-1k.jsonl and tasks-gpu.jsonl). Everything is resumable: re-running a stage continues it.
set -euo pipefail
KVD=${KVD:-build/kvdistill}
MODEL=${MODEL:-.cache/models/SmolLM2-135M-Instruct}
W=${W:-runs/gpu}
DATA=${DATA:-.cache/data}
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[time] $((SECONDS - s)) s: $*" >&2; }

case "${1:-}" in
  responses)
    t "$KVD" prepare responses --model "$MODEL" --prompts "$DATA/prompts-1k.jsonl" --out "$W/responses-1k.h5" \
      --max-new-tokens 256 --batch 128 --device cuda
    ;;
  train-corpus)
    t "$KVD" train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$DATA/docs-2k.h5" \
      train.out_dir="$W/gate-corpus" train.steps=200 train.warmup=20 train.eval_every=100 train.save_every=100 \
      train.log_every=20
    ;;
  train-responses)
    t "$KVD" train --config configs/trimkv-smollm2-responses.yaml model.dir="$MODEL" data.train="$W/responses-1k.h5" \
      train.out_dir="$W/gate-responses" train.steps=120 train.warmup=12 train.eval_every=60 train.save_every=60 \
      train.log_every=20
    ;;
  eval)
    METHODS=knorm,streaming_llm,h2o,observed_attention,snapkv,pyramidkv,tova,keydiff,expected_attention
    METHODS=$METHODS,adakv_snapkv,criticalkv_snapkv,defensivekv,cake,h2o_decode,tova_decode,lazy_eviction
    METHODS=$METHODS,gate:$W/gate-corpus/bundle,gate:$W/gate-responses/bundle
    t "$KVD" eval --model "$MODEL" --tasks "$DATA/tasks-gpu.jsonl" --methods "$METHODS" --ratios 0.5,0.75,0.875 \
      --out "$W/eval" --batch 16 --device cuda
    ;;
  *) echo "usage: gpu_pipeline.sh responses|train-corpus|train-responses|eval" >&2; exit 2 ;;
esac
