#!/usr/bin/env bash
# The eval's decode with PyTorch's cuDNN attention on (KVD_CUDNN_ATTENTION=1) and off (kvdistill's default on
# CUDA), in one run on one GPU: the same tasks, methods and batch; prints prefill / decode seconds per batch
# of each and the ratios.
#   bench/cudnn_attention.sh MODEL_DIR TASKS.jsonl [METHODS] [RATIO]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=$1; TASKS=$2; METHODS=${3:-adakv_snapkv}; RATIO=${4:-0.75}
KVD=${KVD:-build/kvdistill}; PY=${KVD_PYTHON:-python3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for mode in on off; do
  env $([ $mode = on ] && echo KVD_CUDNN_ATTENTION=1) "$KVD" eval --model "$MODEL" --tasks "$TASKS" --methods "$METHODS" \
    --ratios "$RATIO" --out "$tmp/$mode" --batch 16 --device cuda > "$tmp/$mode.log" 2>&1
done
"$PY" - "$tmp" <<'PY'
import json, sys
from collections import defaultdict
def per_batch(d):
    # Every record carries its batch's times divided by the batch size: sum them per configuration.
    t = defaultdict(lambda: [0.0, 0.0])
    for line in open(f"{d}/results.jsonl"):
        r = json.loads(line)
        t[r["method"]][0] += r["prefill_s"]
        t[r["method"]][1] += r["decode_s"]
    return t
on, off = per_batch(sys.argv[1] + "/on"), per_batch(sys.argv[1] + "/off")
for m in on:
    print(f"{m}: cuDNN attention on: prefill {on[m][0]:.2f} s, decode {on[m][1]:.2f} s; off: prefill {off[m][0]:.2f} s, "
          f"decode {off[m][1]:.2f} s; decode ratio on/off {on[m][1] / off[m][1]:.1f}x")
PY
