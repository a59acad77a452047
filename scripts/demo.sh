#!/usr/bin/env bash
# The main job on the default model, end to end on this machine. Today: the frozen SmolLM2-135M-Instruct,
# converted from its GGUF, answers a chat prompt and scores English prose (perplexity); the default corpus
# becomes a packed HDF5 distillation dataset and a RULER-style long-context task suite.
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
