#!/usr/bin/env bash
# The main job on the default model, end to end on this machine. Today: the frozen SmolLM2-135M-Instruct,
# converted from its GGUF, answers a chat prompt and scores English prose (perplexity).
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
