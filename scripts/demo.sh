#!/usr/bin/env bash
# The main job on the default model, end to end on this machine. Today: the frozen SmolLM2-135M-Instruct,
# converted from its GGUF, answers a chat prompt and scores English prose (perplexity); the default corpus
# becomes a packed HDF5 distillation dataset and a RULER-style long-context task suite; a TRIM-KV retention
# gate is distilled from the frozen model on CPU (configs/demo-trimkv.yaml, about 8 minutes on 2 cores), and
# its held-out KL at M tokens per KV head is printed before and after training.
# Bootstraps first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
KVD=${KVD_BUILD_DIR:-build}/kvdistill
MODEL=.cache/models/SmolLM2-135M-Instruct
DEVICE=${KVD_DEVICE:-cpu}
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
step "distill a TRIM-KV retention gate (CPU-sized; resumes if interrupted)" "$KVD" train --config configs/demo-trimkv.yaml
echo
echo "held-out KL to the full cache at M=64 per KV head (step 0 = untrained gate):"
grep heldout_kl runs/demo-trimkv/metrics.jsonl || true
echo "gate bundle: runs/demo-trimkv/bundle (gates.safetensors + kvdistill.json)"
