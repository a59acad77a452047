#!/usr/bin/env bash
# GPU measurements of the fused training kernels wired into `kvdistill train` (bench/RESULTS.md), one stage per
# call on the GPU machine (source .device/setup.sh first):
#   bench/gpu_kernels.sh stage    (here, on the CPU machine) what the calls carry in the ignored .devdata/: packed
#                                 Linux filesystem docs at 2K, 8K and 32K (long/docs-T.h5), the PyTorch reference step
#                                 and SmolLM2's tokenizer files (ref/); carry .devdata with .device
#   bench/gpu_kernels.sh build    kvdistill, the kernels' GoogleTests and the attention bench into build-gpu/
#   bench/gpu_kernels.sh tests    the kernels' tests (fused vs reference, determinism) and forward_train's fused
#                                 path against its reference path (tests/kernels/test_fused_forward_train.cpp)
#   bench/gpu_kernels.sh attn     the attention bench: ours vs SDPA flash (no bias), forward and forward+backward, with
#                                 the two-pass backward (the default) and the one-pass one (KVD_RA_BACKWARD=one-pass;
#                                 `step` and `profile` take that variable too)
#   bench/gpu_kernels.sh rows     the distillation losses' vocabulary work: the fused rows kernel against the
#                                 LibTorch chain (bench_distill_rows), forward + backward over 8K rows
#   bench/gpu_kernels.sh randmodel  writes a SmolLM2-135M-shaped Llama with random weights to $MODEL (HF format),
#                                 with the tokenizer files found in $TOKENIZER_DIR (default .devdata/ref)
#   bench/gpu_kernels.sh model    joins the GGUF parts staged in /root/kvd-stage and converts the model to $MODEL
#   bench/gpu_kernels.sh step     the whole TRIM-KV step, in one run: `kvdistill train` (KL + capacity, batch 1)
#                                 with train.kernels=fused and =reference, and the PyTorch reference step
#                                 (../shared/bench/trimkv_ref_step.py, flex_attention, no capacity loss) at each
#                                 length of STEP_SEQS; tokens/s, peak memory and the ratios
#   bench/gpu_kernels.sh profile  the sections of a fused step at PROFILE_T (default 8192) under KVD_PROFILE=1
#   bench/gpu_kernels.sh trace    KVD_TRACE of a 4-step fused run at PROFILE_T (default 8192) and its summary
#                                 (scripts/trace_summary.py): the device time by kernel and op
#   bench/gpu_kernels.sh session  one call's worth (about 7 minutes): build, tests, randmodel, `step` at 8K with the
#                                 two-pass backward and again with the one-pass one, `attn` at 8K (both), then while
#                                 time is left the step with train.float32_matmul=ieee and `loss50`
#   bench/gpu_kernels.sh loss50   50 training steps with train.kernels=fused and =reference from the same seed:
#                                 the largest relative difference of the loss and of each term
# Inputs (env): MODEL (default /root/model), LONG (dir of docs-<T>.h5, default .devdata/long), W (work dir,
# default /root/kern), STEP_EXTRA (more `train` overrides for the fused step), STEP_SEQS (default 4096 8192 16384
# 32768), REF_STEP (the reference script, default .devdata/ref/trimkv_ref_step.py, a copy of
# ../shared/bench/trimkv_ref_step.py), REF_PATH (0: `step` skips train.kernels=reference, which needs about 121 GB
# at 8K), OUT (logs). `randmodel` writes over $MODEL.
set -uo pipefail
MODEL=${MODEL:-/root/model}
LONG=${LONG:-.devdata/long}
W=${W:-/root/kern}
OUT=${OUT:-/tmp/kvd-out}
REF_STEP=${REF_STEP:-.devdata/ref/trimkv_ref_step.py}
STEP_SEQS=${STEP_SEQS:-4096 8192 16384 32768}
REF_SEQS=${REF_SEQS:-$STEP_SEQS}  # lengths at which the PyTorch step runs too
mkdir -p "$W" "$OUT"
t() { local s=$SECONDS; "$@"; local rc=$?; echo "[time] $((SECONDS - s)) s (rc $rc): $*" >&2; return $rc; }

# One short training run; prints "<tokens/s> <peak MiB> <last loss>" from its metrics (steps after the third).
train_run() {  # out_dir data steps overrides...
  local dir=$1 data=$2 steps=$3; shift 3
  rm -rf "$dir"
  build-gpu/kvdistill train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$data" \
    train.out_dir="$dir" train.steps="$steps" train.warmup=2 train.eval_every=0 train.save_every=0 \
    train.log_every=1 train.batch_size=1 train.grad_accum=1 train.progress=never "$@" --resume none \
    >"$dir.log" 2>&1 || { echo "failed (rc $?): $(grep -m1 'error' "$dir.log")"; return 1; }
  python3 - "$dir/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
steady = rows[3:] or rows
print(f"{sum(r['tokens_per_s'] for r in steady) / len(steady):.0f} {max(r['cuda_max_alloc_mb'] for r in rows):.0f} {rows[-1]['loss']:.6f}")
PY
}

case "${1:-}" in
  stage)
    m=.cache/models/SmolLM2-135M-Instruct
    [ -x build/kvdistill ] && [ -f "$m/tokenizer.json" ] && [ -d .cache/corpus/linux-doc/filesystems ] ||
      { echo "stage: needs build/kvdistill and scripts/bootstrap.sh's model and corpus" >&2; exit 1; }
    mkdir -p .devdata/long .devdata/ref
    for T in ${STAGE_SEQS:-2048 8192 32768}; do
      [ -f .devdata/long/docs-$T.h5 ] || build/kvdistill prepare text --model "$m" \
        --input .cache/corpus/linux-doc/filesystems --seq-len "$T" --progress never --out .devdata/long/docs-$T.h5
    done
    cp ../shared/bench/trimkv_ref_step.py .devdata/ref/ 2>/dev/null ||
      echo "(no ../shared/bench/trimkv_ref_step.py: copy the PyTorch reference step to .devdata/ref/ by hand)"
    cp "$m"/tokenizer*.json .devdata/ref/
    du -sh .devdata
    ;;
  build)
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" \
      >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
    t ninja -C build-gpu kvdistill kvd_test_retention_attention kvd_test_soft_cache_size kvd_test_distill_rows \
      kvd_test_decode_step kvd_test_fused_forward_train bench_retention_attention bench_distill_rows \
      >"$OUT/build.log" 2>&1 ||
      { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
    ;;
  tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    for b in kvd_test_retention_attention kvd_test_soft_cache_size kvd_test_distill_rows kvd_test_decode_step \
      kvd_test_fused_forward_train; do
      t build-gpu/$b >"$OUT/$b.log" 2>&1
      echo "$b rc=$?"
      grep -E "rel L2|relative|peak|kl |^\[  (PASSED|FAILED|SKIPPED)|Failure|Expected|Which is|which is|exception" \
        "$OUT/$b.log" | head -40
    done
    # The one-pass backward (KVD_RA_BACKWARD=one-pass) through the same tests, determinism included.
    for b in kvd_test_retention_attention kvd_test_fused_forward_train; do
      t env KVD_RA_BACKWARD=one-pass build-gpu/$b >"$OUT/$b-one-pass.log" 2>&1
      echo "$b (one-pass) rc=$?"
      grep -E "rel L2|gate gradient|^\[  (PASSED|FAILED)|Failure|exception" "$OUT/$b-one-pass.log" | head -24
    done
    ;;
  attn)
    # The two backwards of kernels/retention_attention.h, one process each: two-pass (the default) and one-pass.
    build-gpu/bench_retention_attention --seqs "${SEQS:-8192,16384}" --csv "$OUT/attn.csv" 2>&1 | tee "$OUT/attn.log"
    KVD_RA_BACKWARD=one-pass build-gpu/bench_retention_attention --seqs "${SEQS:-8192,16384}" \
      --csv "$OUT/attn-one-pass.csv" 2>&1 | tee "$OUT/attn-one-pass.log"
    ;;
  rows)
    build-gpu/bench_distill_rows 2>&1 | tee "$OUT/rows.jsonl"
    ;;
  randmodel)  # SmolLM2-135M's shape with random weights, as the PyTorch reference step builds it (no staging)
    python3 - "$MODEL" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32768,
                  rope_theta=100000.0, tie_word_embeddings=True)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
print("random SmolLM2-135M-shaped Llama in", sys.argv[1])
PY
    cp "${TOKENIZER_DIR:-.devdata/ref}"/tokenizer*.json "$MODEL/" 2>/dev/null || echo "(no tokenizer files in ${TOKENIZER_DIR:-.devdata/ref})"
    ;;
  model)
    cat /root/kvd-stage/part-* > /root/smollm2.gguf
    sha256sum /root/smollm2.gguf
    t build-gpu/kvdistill convert --gguf /root/smollm2.gguf --out "$MODEL"
    ;;
  step)
    nvidia-smi --query-gpu=name --format=csv,noheader
    printf "%-7s %-28s %-28s %-28s %s\n" T "fused: tok/s MiB loss" "reference: tok/s MiB loss" "PyTorch step: tok/s MiB" "fused / PyTorch"
    for T in $STEP_SEQS; do
      f=$(train_run "$W/step-fused-$T" "$LONG/docs-$T.h5" 10 train.kernels=fused ${STEP_EXTRA:-})
      if [ "$T" -le 8192 ] && [ "${REF_PATH:-1}" = 1 ]; then
        r=$(train_run "$W/step-ref-$T" "$LONG/docs-$T.h5" 6 train.kernels=reference)
      else
        r="-"
      fi
      p=""
      case " $REF_SEQS " in *" $T "*) p=$(timeout 240 python3 "$REF_STEP" "$T" 2>"$W/ref-$T.err" | tail -1) ;; esac
      [ -n "$p" ] || p="failed: $(grep -m1 -E 'Error|error' "$W/ref-$T.err")"
      pt=$(echo "$p" | python3 -c 'import json, sys
try:
    d = json.loads(sys.stdin.read()); print("%.0f %.0f" % (d["tokens_per_s"], d["peak_GB"] * 1e9 / 2**20))
except Exception:
    print("-")')
      ratio=$(python3 -c 'import sys
try: print("%.2fx" % (float(sys.argv[1].split()[0]) / float(sys.argv[2].split()[0])))
except Exception: print("-")' "$f" "$pt")
      printf "%-7s %-28s %-28s %-28s %s\n" "$T" "$f" "$r" "$pt" "$ratio"
      echo "  ref step: $p"
    done
    ;;
  profile)  # where the time of a fused step goes at PROFILE_T (KVD_PROFILE sections, synchronized)
    T=${PROFILE_T:-8192}
    rm -rf "$W/prof"
    KVD_PROFILE=1 build-gpu/kvdistill train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" \
      data.train="$LONG/docs-$T.h5" train.out_dir="$W/prof" train.steps=6 train.warmup=2 train.eval_every=0 \
      train.save_every=0 train.batch_size=1 train.grad_accum=1 train.progress=never --resume none 2>&1 | grep profile
    ;;
  trace)  # where a fused step's device time goes at PROFILE_T (default 8192): KVD_TRACE of a 4-step run (the trace
          # also holds the model load and the bundle's export: divide per-step figures by 4), then its summary
    T=${PROFILE_T:-8192}
    rm -rf "$W/trace"
    KVD_TRACE="$W/step-trace.json" build-gpu/kvdistill train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" \
      data.train="$LONG/docs-$T.h5" train.out_dir="$W/trace" train.steps=4 train.warmup=2 train.eval_every=0 \
      train.save_every=0 train.batch_size=1 train.grad_accum=1 train.progress=never --resume none \
      >"$W/trace.log" 2>&1 || { tail -5 "$W/trace.log"; exit 1; }
    python3 scripts/trace_summary.py "$W/step-trace.json" --top 30 | tee "$OUT/step-trace-summary.txt"
    ;;
  session)
    self=${BASH_SOURCE[0]}
    bash "$self" build && bash "$self" tests && bash "$self" randmodel || exit 1
    STEP_SEQS=8192 REF_SEQS=8192 REF_PATH=0 bash "$self" step
    echo "== the same step with KVD_RA_BACKWARD=one-pass"
    STEP_SEQS=8192 REF_SEQS=none REF_PATH=0 KVD_RA_BACKWARD=one-pass bash "$self" step
    SEQS=8192 bash "$self" attn
    if [ "$SECONDS" -lt 380 ]; then
      echo "== the same step (two-pass) with the gate's float32 products in full float32 (train.float32_matmul=ieee)"
      STEP_SEQS=8192 REF_SEQS=none REF_PATH=0 STEP_EXTRA=train.float32_matmul=ieee bash "$self" step
    fi
    if [ "$SECONDS" -lt 420 ]; then bash "$self" loss50; else echo "(loss50 left for another call: ${SECONDS} s used)"; fi
    ;;
  loss50)
    data=${DATA:-$LONG/docs-2048.h5}
    for k in fused reference; do
      rm -rf "$W/l50-$k"
      t build-gpu/kvdistill train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$data" \
        train.out_dir="$W/l50-$k" train.steps=50 train.warmup=5 train.eval_every=0 train.save_every=0 \
        train.log_every=10 train.batch_size=2 train.grad_accum=1 train.progress=never train.kernels=$k \
        --resume none >"$W/l50-$k.log" 2>&1 || { echo "$k failed"; tail -5 "$W/l50-$k.log"; }
    done
    python3 - "$W/l50-fused/metrics.jsonl" "$W/l50-reference/metrics.jsonl" <<'PY'
import json, sys
def rows(p): return [json.loads(l) for l in open(p) if '"tokens_per_s"' in l]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
print(f"steps: {len(a)} fused, {len(b)} reference")
for key in ("loss", "kl", "capacity"):
    d = [abs(x[key] - y[key]) / max(abs(y[key]), 1e-12) for x, y in zip(a, b)]
    print(f"{key}: max relative difference {max(d):.3e} (step {d.index(max(d)) + 1}); "
          f"step 1 {a[0][key]:.6f} / {b[0][key]:.6f}; step 50 {a[-1][key]:.6f} / {b[-1][key]:.6f}")
ta = sum(r['tokens_per_s'] for r in a[5:]) / len(a[5:]); tb = sum(r['tokens_per_s'] for r in b[5:]) / len(b[5:])
print(f"tokens/s (steps 6-50): fused {ta:.0f}, reference {tb:.0f} ({ta / tb:.2f}x)")
PY
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
