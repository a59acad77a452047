#!/usr/bin/env bash
# Prepares here (the CPU machine) what the protocol's device calls carry for bench/gpu_rivals.sh: the SmolLM2 GGUF in
# four parts, the protocol's task file and the training text, in four ignored folders. A device call carries the
# tree and .device (about 21 MiB, the committed result archives included) plus what `carry` names, 64 MiB in all, so
# each call takes one folder (at most 34 MiB, which leaves the tree room to grow):
#   .rv0: kvd-stage/part-00, rivals/tasks-2k4k8k.jsonl.gz  (prepare tasks --lengths 2048,4096,8192 --samples 50
#         --seed 7: 50 samples per task and length, 1,200 in all), testdata/decoder_golden (2.6 MB: what
#         `gpu_rivals.sh gpu-tests` needs)
#   .rv1: kvd-stage/part-01, rivals/pylinux-1k.h5           (prepare text of the corpus' Linux and Python docs,
#         --seq-len 1024: what KVzap, TRIM-KV's gate and the Attention-Gate train on)
#   .rv2: kvd-stage/part-02
#   .rv3: kvd-stage/part-03
# On the device, in each call: `mkdir -p /root/kvd-stage /root/rivals && cp .rvN/kvd-stage/* /root/kvd-stage/ &&
# cp .rvN/rivals/* /root/rivals/ 2>/dev/null; gunzip -kf /root/rivals/*.gz` (and with .rv0, `bench/gpu_rivals.sh
# gpu-tests`, which finds .rv0/testdata); once all four are there,
# `bench/gpu_rivals.sh model`. Everything is rebuilt from the project's own inputs (scripts/bootstrap.sh fetches the
# GGUF and the corpus), and a folder already complete is kept.
#   bench/stage_rivals.sh            all four
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KVD=${KVD:-build/kvdistill}
MODEL=.cache/models/SmolLM2-135M-Instruct
GGUF=.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
say() { printf '[stage] %s\n' "$*"; }
for f in "$KVD" "$MODEL/config.json" "$GGUF" .cache/corpus/MANIFEST; do
  [ -e "$f" ] || { echo "stage_rivals: $f is missing; run scripts/bootstrap.sh first" >&2; exit 1; }
done
mkdir -p .rv0/kvd-stage .rv0/rivals .rv1/kvd-stage .rv1/rivals .rv2/kvd-stage .rv3/kvd-stage
if [ ! -f .rv3/kvd-stage/part-03 ]; then
  say "the GGUF in four parts"
  rm -f .rv?/kvd-stage/part-*  # an older split
  tmp=$(mktemp -d)
  split -n 4 -d -a 2 "$GGUF" "$tmp/part-"
  for i in 0 1 2 3; do mv "$tmp/part-0$i" ".rv$i/kvd-stage/part-0$i"; done
  rmdir "$tmp"
fi
if [ ! -f .rv0/rivals/tasks-2k4k8k.jsonl.gz ]; then
  say "the protocol's tasks (1,200 samples at 2K / 4K / 8K)"
  "$KVD" prepare tasks --model "$MODEL" --suite ruler --lengths 2048,4096,8192 --samples 50 --seed 7 \
    --corpus .cache/corpus --out .rv0/rivals/tasks-2k4k8k.jsonl
  gzip -9f .rv0/rivals/tasks-2k4k8k.jsonl
fi
if [ ! -f .rv1/rivals/pylinux-1k.h5 ]; then
  say "the training text (Linux and Python docs, 1,024-token sequences)"
  "$KVD" prepare text --model "$MODEL" --input .cache/corpus/linux-doc .cache/corpus/python-doc --seq-len 1024 \
    --progress lines --out .rv1/rivals/pylinux-1k.h5
fi
if [ ! -d .rv0/testdata/decoder_golden ] && [ -d build/testdata/decoder_golden ]; then
  say "the decoder goldens the GPU tests load (made by tests/oracles when the tests were configured here)"
  mkdir -p .rv0/testdata && cp -r build/testdata/decoder_golden .rv0/testdata/
fi
for d in .rv0 .rv1 .rv2 .rv3; do say "$d: $(du -sm "$d" | cut -f1) MiB"; done
