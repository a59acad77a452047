#!/usr/bin/env bash
# The main job on the default model, end to end on this machine. Today: the frozen SmolLM2-135M-Instruct,
# converted from its GGUF, answers a chat prompt and scores English prose (perplexity); the default corpus
# becomes a packed HDF5 distillation dataset and a RULER-style long-context task suite; a TRIM-KV retention
# gate is distilled from the frozen model on CPU (configs/demo-trimkv.yaml, about 2 minutes on 2 cores), and
# its held-out KL at M tokens per KV head is printed before and after training; the model writes its own
# responses to a few prompts, and LookaheadKV-style query rows are distilled from them
# (configs/demo-lookahead.yaml); finally a CPU-sized comparison of the full cache, heuristics, the trained gate and the query rows on the task
# suite (accuracy, KL, memory; table and plots).
# Bootstraps first, so it works on a fresh machine.
#
# KVD_DEMO_SCALE=full (default) or ci: `ci` is the same pipeline, shortened to fit CI (10 gate and 4 query-row
# training steps, a comparison of 4 methods at one ratio), written under runs/demo-ci/ so it never resumes a full
# run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
KVD=${KVD_BUILD_DIR:-build}/kvdistill
MODEL=.cache/models/SmolLM2-135M-Instruct
DEVICE=${KVD_DEVICE:-cpu}
SCALE=${KVD_DEMO_SCALE:-full}
case "$SCALE" in
  full) RUNS=runs; TRAIN_ARGS=(); QR_ARGS=(); METHODS=streaming_llm,snapkv,adakv_snapkv,defensivekv; RATIOS=0.5,0.75 ;;
  ci)   RUNS=runs/demo-ci
        TRAIN_ARGS=(train.steps=10 train.eval_every=10 train.save_every=5 train.warmup=2 train.out_dir=$RUNS/demo-trimkv)
        QR_ARGS=(train.steps=4 train.save_every=2 train.warmup=1 train.out_dir=$RUNS/demo-lookahead)
        METHODS=streaming_llm,snapkv; RATIOS=0.75 ;;
  *) echo "demo.sh: KVD_DEMO_SCALE=$SCALE: expected full or ci" >&2; exit 2 ;;
esac
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "the model, as kvdistill resolves it" "$KVD" info --model "$MODEL"
step "chat generation (greedy)" "$KVD" generate --model "$MODEL" --chat --device "$DEVICE" \
  --prompt "What is the capital of France?" --max-new-tokens 32
step "perplexity on English prose" "$KVD" perplexity --model "$MODEL" --device "$DEVICE" \
  --text data/samples/prose.txt --ctx 512
step "pack the Python docs of the corpus into a distillation dataset" "$KVD" prepare text --model "$MODEL" \
  --input .cache/corpus/python-doc --out .cache/data/python-doc.h5 --seq-len 1024 --progress lines
step "inspect it" "$KVD" prepare inspect .cache/data/python-doc.h5 --model "$MODEL"
step "a RULER-style task suite at 1K and 2K tokens" "$KVD" prepare tasks --model "$MODEL" --suite ruler \
  --lengths 1024,2048 --samples 2 --seed 0 --out .cache/data/tasks.jsonl
echo "tasks: $(wc -l < .cache/data/tasks.jsonl) samples in .cache/data/tasks.jsonl"
step "data for the demo's gate training" "$KVD" prepare text --model "$MODEL" \
  --input data/samples/prose.txt .cache/corpus/linux-doc/RCU --out .cache/data/demo-trimkv.h5 \
  --seq-len 256 --val-fraction 0.05 --progress never
step "distill a TRIM-KV retention gate (CPU-sized; resumes if interrupted)" "$KVD" train --config configs/demo-trimkv.yaml "${TRAIN_ARGS[@]}"
echo
echo "held-out KL to the full cache at M=64 per KV head (step 0 = untrained gate):"
grep heldout_kl $RUNS/demo-trimkv/metrics.jsonl || true
echo "gate bundle: $RUNS/demo-trimkv/bundle (gates.safetensors + kvdistill.json)"
step "prompts cut from the corpus" "$KVD" prepare prompts --input .cache/corpus/python-doc --out .cache/data/demo-prompts.jsonl \
  --count 4 --seed 0 --model "$MODEL" --passage-tokens 120
step "the model's own greedy responses to them (teacher data for response-trained gates)" "$KVD" prepare responses \
  --model "$MODEL" --prompts .cache/data/demo-prompts.jsonl --out .cache/data/demo-responses.h5 --max-new-tokens 32 \
  --batch 4 --device "$DEVICE"
step "distill LookaheadKV-style query rows on those responses (8 rows + LoRA on the rows only; CPU-sized)" \
  "$KVD" train --config configs/demo-lookahead.yaml "${QR_ARGS[@]}"
echo "query-rows bundle: $RUNS/demo-lookahead/bundle (kind query_rows, variant lookahead)"
step "a small task suite for the comparison (8 tasks at 1K tokens)" "$KVD" prepare tasks --model "$MODEL" --suite ruler \
  --lengths 1024 --samples 1 --seed 1 --out .cache/data/demo-tasks.jsonl
step "the comparison, CPU-sized: full cache vs heuristics vs the trained gate and query rows (resumes if interrupted)" \
  "$KVD" eval --model "$MODEL" --tasks .cache/data/demo-tasks.jsonl --device "$DEVICE" --batch 4 \
  --methods "$METHODS,gate:$RUNS/demo-trimkv/bundle,gate:$RUNS/demo-lookahead/bundle" --ratios "$RATIOS" --out "$RUNS/demo-eval"
test -s "$RUNS/demo-eval/results.md" || { echo "demo.sh: the comparison wrote no report" >&2; exit 1; }
.venv/bin/python scripts/plot_results.py "$RUNS/demo-eval" --title "demo: 8 samples at 1K, CPU"
echo
sed -n '/^## Accuracy (%)$/,/^## KL/p' $RUNS/demo-eval/results.md | sed '$d'
test -s "$RUNS/demo-eval/accuracy.png" && test -s "$RUNS/demo-eval/kl.png" || { echo "demo.sh: the plots were not written" >&2; exit 1; }
echo "full report: $RUNS/demo-eval/results.md (also .json, .csv); plots: $RUNS/demo-eval/accuracy.png, $RUNS/demo-eval/kl.png"
