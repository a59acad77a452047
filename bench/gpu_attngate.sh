#!/usr/bin/env bash
# GPU acceptance of the Attention-Gate (issue 13) on SmolLM2-135M-Instruct, one stage per device call (source
# .device/setup.sh first; results go to bench/RESULTS.md and docs/results/ by hand):
#   bench/gpu_attngate.sh build        this tree into build-gpu/ (kvdistill)
#   bench/gpu_attngate.sh model        joins the GGUF parts staged in /root/kvd-stage, checks the sha256 and
#                                      converts it to $MODEL
#   bench/gpu_attngate.sh train [S]    every run of $RUNS (configs/attngate-smollm2.yaml), all on the GPU at
#                                      once, each stopped after S seconds (default 420) and resumed from its
#                                      last checkpoint by the next call; prints each run's held-out kept fraction
#                                      (the last one after the flags are calibrated to the target)
#   bench/gpu_attngate.sh eval [S]     the tasks at 2K and 4K: every gate of $GATES at its own flags
#                                      (--thresholds 0.5), and at ratios 0.5 / 0.75 / 0.875 next to SnapKV,
#                                      AdaKV-SnapKV, DefensiveKV and StreamingLLM; one process per gate and
#                                      budget and per heuristic, sharing the GPU, each resumable (re-running
#                                      skips the results already written). SEED (a results.jsonl of an earlier
#                                      run on the same tasks) pre-fills the heuristics' results it holds.
#   bench/gpu_attngate.sh eval-matched [S]  the heuristics at the mean kept fraction of each gate's flags
#   bench/gpu_attngate.sh collect      metrics, results and logs into $OUT (the device's return folder, one
#                                      tarball: a call returns only a few files), and one tarball per bundle
# Then, here: scripts/paired_bootstrap.py over the collected results (see docs/results/attngate-*).
# Inputs (env): MODEL (default /root/model), DATA (default .devdata/ag: tasks-2k4k.jsonl from `prepare tasks
# --lengths 2048,4096 --samples 12 --seed 7`, and the training file $TRAIN_H5), TRAIN_H5 (default py-2k.h5:
# `prepare text --seq-len 2048 --val-fraction 0.02` over the Python docs), W (work dir, default /root/ag),
# STEPS (default 400), SCHEDULE (default 100), RUNS (space-separated name:target:keep_scope[:keep_penalty[:keep_unit]],
# default "ag05:0.5:batch ag025:0.25:batch"; two runs fill the H200, four run at half speed each; e.g. the units
# compared: "l05:0.5:sequence:dual:layer c05:0.5:sequence:dual:cache l025:0.25:sequence:dual:layer
# c025:0.25:sequence:dual:cache"), GATES (the run names eval compares at fixed ratios, default all of RUNS),
# FLAGS_ONLY (run names evaluated at their own flags only).
set -euo pipefail
MODEL=${MODEL:-/root/model}
DATA=${DATA:-.devdata/ag}
W=${W:-/root/ag}
STEPS=${STEPS:-400}
SCHEDULE=${SCHEDULE:-100}
TRAIN_H5=${TRAIN_H5:-py-2k.h5}
RUNS=${RUNS:-ag05:0.5:batch ag025:0.25:batch}
GATES=${GATES:-$(for r in $RUNS; do printf '%s ' "${r%%:*}"; done)}
FLAGS_ONLY=${FLAGS_ONLY:-}
KVD=build-gpu/kvdistill
mkdir -p "$W"
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"  # t, gpu_build, gpu_model

case "${1:-}" in
  build)
    gpu_build kvdistill
    ;;
  model)
    gpu_model "$MODEL"
    ;;
  train)
    limit=${2:-420}
    for run in $RUNS; do
      IFS=: read -r name target scope penalty unit <<< "$run"
      timeout "$limit" $KVD train --config configs/attngate-smollm2.yaml model.dir="$MODEL" \
        data.train="$DATA/$TRAIN_H5" component.target="$target" component.keep_scope="$scope" \
        component.keep_penalty="${penalty:-dual}" component.keep_unit="${unit:-layer}" \
        component.schedule_steps="$SCHEDULE" train.steps="$STEPS" train.eval_every=100 train.eval_batches=16 \
        train.save_every=50 train.progress=lines train.out_dir="$W/$name" >> "$W/train-$name.log" 2>&1 &
    done
    wait || true
    for run in $RUNS; do
      name=${run%%:*}
      echo "== $run: step, held-out kept fraction, held-out KL"
      python3 - "$W/$name/metrics.jsonl" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "val_kept" in r:
        print(f"  {r['step']:5d}  val_kept {r['val_kept']:.4f}  val_kl {r['val_kl']:.4f}")
    if "calibration" in r:
        c = r["calibration"]
        print(f"  {r['step']:5d}  calibrated on {r['calibration_sequences']} training sequences: kept "
              f"{c['kept_before']:.4f} -> {c['kept_after']:.4f} in {len(c['passes'])} passes")
PY
      tail -n 1 "$W/train-$name.log"
      ls "$W/$name/bundle" >/dev/null 2>&1 && echo "  bundle ready" || echo "  (no bundle yet: run train again to resume)"
    done
    ;;
  eval)
    limit=${2:-540}
    common=(--model "$MODEL" --tasks "$DATA/tasks-2k4k.jsonl" --device cuda --batch 16)
    for g in $GATES $FLAGS_ONLY; do
      timeout "$limit" $KVD eval "${common[@]}" --thresholds 0.5 --out "$W/eval-flags-$g" \
        --methods "attngate:$W/$g/bundle" > "$W/eval-flags-$g.log" 2>&1 &
    done
    for g in $GATES; do
      for r in 0.5 0.75 0.875; do
        timeout "$limit" $KVD eval "${common[@]}" --ratios "$r" --out "$W/eval-$g-$r" \
          --methods "attngate:$W/$g/bundle" > "$W/eval-$g-$r.log" 2>&1 &
      done
    done
    for m in snapkv adakv_snapkv defensivekv streaming_llm; do
      out="$W/eval-h-$m"
      if [ -n "${SEED:-}" ] && [ ! -e "$out/results.jsonl" ]; then
        mkdir -p "$out"
        python3 - "$SEED" "$m" "$out/results.jsonl" <<'PY'
import json, sys
seed, method, out = sys.argv[1:]
with open(out, "w") as f:
    for line in open(seed):
        if json.loads(line)["method"] in ("full", method):
            f.write(line)
PY
        cp "$(dirname "$SEED")/run.json" "$out/run.json"
      fi
      timeout "$limit" $KVD eval "${common[@]}" --ratios 0.5,0.75,0.875 --out "$out" --methods "$m" \
        > "$W/eval-h-$m.log" 2>&1 &
    done
    wait || true
    for f in "$W"/eval-*.log; do echo "$f: $(tail -n 1 "$f")"; done
    wc -l "$W"/eval-*/results.jsonl
    ;;
  eval-matched)
    # The heuristics at the kept fraction each gate chose at its own flags (the mean over the samples of
    # eval-flags), into eval-matched: the comparison "at the fraction the gate chooses".
    # RATIOS (comma-separated) overrides the ratios read from eval-flags (e.g. on a fresh machine). One eval
    # process per ratio and method, overlapped on the GPU (a 135M model's decode is launch-bound).
    limit=${2:-540}
    ratios=${RATIOS:-$(cat "$W"/eval-flags-*/results.jsonl | python3 -c '
import json, sys
kept = {}
for line in sys.stdin:
    r = json.loads(line)
    if r["method"] != "full":
        kept.setdefault(r["label"], []).append(r["kept_fraction"])
print(",".join(sorted({f"{1 - sum(v) / len(v):.3f}" for v in kept.values()})))
'
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
    (cd "$W" && tar czf "$out/attngate-results.tgz" --ignore-failed-read ag*/metrics.jsonl *.log \
      eval-*/results.jsonl eval-*/run.json)
    # The bundles of $GATES, one file each (a returned file holds at most 16 MiB).
    for g in $GATES; do (cd "$W" && tar czf "$out/bundle-$g.tgz" --ignore-failed-read "$g/bundle"); done
    ls -la "$out"
    ;;
  *)
    sed -n '2,25p' "$0"
    exit 2
    ;;
esac
