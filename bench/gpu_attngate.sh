#!/usr/bin/env bash
# GPU acceptance of the Attention-Gate (issue 13) on SmolLM2-135M-Instruct, one stage per device call (source
# .device/setup.sh first; results go to bench/RESULTS.md and docs/results/ by hand):
#   bench/gpu_attngate.sh build        this tree into build-gpu/ (kvdistill)
#   bench/gpu_attngate.sh model        joins the GGUF parts staged in /root/kvd-stage, checks the sha256 and
#                                      converts it to $MODEL
#   bench/gpu_attngate.sh train [S]    the gate at targets 0.5 and 0.25 (configs/attngate-smollm2.yaml), both on
#                                      the GPU at once, each stopped after S seconds (default 420) and resumed
#                                      from its last checkpoint by the next call
#   bench/gpu_attngate.sh eval [S]     the tasks at 2K and 4K: both gates at their own flags (--thresholds 0.5),
#                                      and at ratios 0.5 / 0.75 / 0.875 next to SnapKV, AdaKV-SnapKV,
#                                      DefensiveKV and StreamingLLM; three processes sharing the GPU, each
#                                      resumable (re-running skips the results already written)
#   bench/gpu_attngate.sh eval-matched [S]  the heuristics at the mean kept fraction of each gate's flags
#   bench/gpu_attngate.sh collect      metrics, results and logs into $OUT (the device's return folder, one
#                                      tarball: a call returns only a few files)
# Then, here: scripts/paired_bootstrap.py over the collected results (see docs/results/attngate-*).
# Inputs (env): MODEL (default /root/model), DATA (default .devdata/ag: py-2k.h5 from `prepare text --seq-len
# 2048 --val-fraction 0.02` over the Python docs, tasks-2k4k.jsonl from `prepare tasks --lengths 2048,4096
# --samples 12 --seed 7`), W (work dir, default /root/ag), STEPS (default 400), SCHEDULE (default 100).
set -euo pipefail
MODEL=${MODEL:-/root/model}
DATA=${DATA:-.devdata/ag}
W=${W:-/root/ag}
STEPS=${STEPS:-400}
SCHEDULE=${SCHEDULE:-100}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
KVD=build-gpu/kvdistill
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[time] $((SECONDS - s)) s: $*" >&2; }

case "${1:-}" in
  build)
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVD_BUILD_TESTS=OFF \
      -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" >/dev/null
    t ninja -C build-gpu kvdistill
    ;;
  model)
    cat /root/kvd-stage/part-* > /root/smollm2.gguf
    echo "$SHA  /root/smollm2.gguf" | sha256sum -c -
    t $KVD convert --gguf /root/smollm2.gguf --out "$MODEL"
    ;;
  train)
    limit=${2:-420}
    for target in 0.5 0.25; do
      name=ag$(echo "$target" | tr -d .)
      timeout "$limit" $KVD train --config configs/attngate-smollm2.yaml model.dir="$MODEL" \
        data.train="$DATA/py-2k.h5" component.target="$target" component.schedule_steps="$SCHEDULE" \
        train.steps="$STEPS" train.eval_every=100 train.save_every=50 train.progress=lines \
        train.out_dir="$W/$name" >> "$W/train-$name.log" 2>&1 &
    done
    wait || true
    for name in ag05 ag025; do
      echo "== $name"; grep -E '"val_kept"|val_kept' "$W/$name/metrics.jsonl" | tail -2 || true
      tail -n 2 "$W/train-$name.log"
      ls "$W/$name/bundle" 2>/dev/null || echo "(no bundle yet: run train again to resume)"
    done
    ;;
  eval)
    limit=${2:-540}
    common=(--model "$MODEL" --tasks "$DATA/tasks-2k4k.jsonl" --device cuda --batch 16)
    timeout "$limit" $KVD eval "${common[@]}" --thresholds 0.5 --out "$W/eval-flags" \
      --methods "attngate:$W/ag05/bundle,attngate:$W/ag025/bundle" > "$W/eval-flags.log" 2>&1 &
    timeout "$limit" $KVD eval "${common[@]}" --ratios 0.5,0.75,0.875 --out "$W/eval-a" \
      --methods "snapkv,adakv_snapkv,attngate:$W/ag05/bundle" > "$W/eval-a.log" 2>&1 &
    timeout "$limit" $KVD eval "${common[@]}" --ratios 0.5,0.75,0.875 --out "$W/eval-b" \
      --methods "defensivekv,streaming_llm,attngate:$W/ag025/bundle" > "$W/eval-b.log" 2>&1 &
    wait || true
    tail -n 2 "$W"/eval-*.log
    wc -l "$W"/eval-*/results.jsonl
    ;;
  eval-matched)
    # The heuristics at the kept fraction each gate chose at its own flags (the mean over the samples of
    # eval-flags), into eval-matched: the comparison "at the fraction the gate chooses".
    # RATIOS (comma-separated) overrides the ratios read from eval-flags (e.g. on a fresh machine). One eval
    # process per ratio and method, overlapped on the GPU (a 135M model's decode is launch-bound).
    limit=${2:-540}
    ratios=${RATIOS:-$(python3 - "$W/eval-flags/results.jsonl" <<'PY'
import json, sys
kept = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["method"] != "full":
        kept.setdefault(r["label"], []).append(r["kept_fraction"])
print(",".join(sorted({f"{1 - sum(v) / len(v):.3f}" for v in kept.values()})))
PY
)}
    echo "ratios matching the gates' flags: $ratios"
    for r in ${ratios//,/ }; do
      for m in snapkv adakv_snapkv defensivekv streaming_llm; do
        timeout "$limit" $KVD eval --model "$MODEL" --tasks "$DATA/tasks-2k4k.jsonl" --device cuda --batch 16 \
          --ratios "$r" --out "$W/eval-matched-$r-$m" --methods "$m" > "$W/eval-matched-$r-$m.log" 2>&1 &
      done
    done
    wait || true
    for f in "$W"/eval-matched-*.log; do echo "$f: $(tail -n 1 "$f")"; done
    ;;
  collect)
    out=${OUT:?OUT is the device call\'s return folder}
    (cd "$W" && tar czf "$out/attngate-results.tgz" --ignore-failed-read ag*/metrics.jsonl ag*/bundle *.log \
      eval-*/results.jsonl eval-*/run.json)
    ls -la "$out"
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
