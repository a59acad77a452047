#!/usr/bin/env bash
# Decoder throughput, kvdistill vs transformers, in one run on one machine; prints both and the ratios.
#   bench/decoder.sh MODEL_DIR [cpu|cuda] [PREFILL] [DECODE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=$1; DEV=${2:-cpu}; P=${3:-4096}; D=${4:-128}
BUILD=${KVD_BUILD_DIR:-build}; PY=${KVD_PYTHON:-.venv/bin/python}
ours=$("$BUILD/bench_decoder" --model "$MODEL" --device "$DEV" --prefill "$P" --decode "$D")
ref=$("$PY" bench/hf_decoder.py --model "$MODEL" --device "$DEV" --prefill "$P" --decode "$D")
echo "$ours"; echo "$ref"
"$PY" - "$ours" "$ref" <<'PY'
import json, sys
o, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"ratio kvdistill/transformers: prefill {o['prefill_tok_s']/r['prefill_tok_s']:.2f}x, decode {o['decode_tok_s']/r['decode_tok_s']:.2f}x")
PY
