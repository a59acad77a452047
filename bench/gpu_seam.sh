#!/usr/bin/env bash
# GPU measurements of the component seam and of TRIM-KV evicting while it decodes (bench/RESULTS.md), one
# stage per call, on the GPU machine (source .device/setup.sh first):
#   bench/gpu_seam.sh build      this tree into build-gpu/, and the tree before the seam (.devold/, a `git archive`
#                                of that commit) into build-old/
#   bench/gpu_seam.sh model      joins the GGUF parts staged in /root/kvd-stage and converts the model to $MODEL
#   bench/gpu_seam.sh train-ab   the same TRIM-KV run with both builds, in one call: tokens/s on the GPU (30 steps
#                                at 8 x 2048) and a CPU run of the tiny demo config whose losses must be bitwise
#                                equal (metrics.jsonl compared without the timing fields)
#   bench/gpu_seam.sh gate       trains a TRIM-KV gate with this build (corpus text, M = 128)
#   bench/gpu_seam.sh heldout    KL at M = 128 on held-out text, continuous and once; then the generation-time
#                                check: 128 greedy tokens after 1,024 prompt tokens, the gate against
#                                streaming_llm_decode, h2o_decode, tova_decode and lazy_eviction
# Inputs (env): MODEL (converted model dir, default /root/model), DATA (docs-2k.h5, default .devdata/docs-2k.h5),
# W (work dir, default /root/seam), GATE_STEPS (default 150).
set -euo pipefail
MODEL=${MODEL:-/root/model}
DATA=${DATA:-.devdata/docs-2k.h5}
W=${W:-/root/seam}
GATE_STEPS=${GATE_STEPS:-150}
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[time] $((SECONDS - s)) s: $*" >&2; }
configure() {  # src build
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVD_BUILD_TESTS=OFF \
    -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" >/dev/null
}

case "${1:-}" in
  build)
    configure . build-gpu
    t ninja -C build-gpu kvdistill
    if [ -d .devold ]; then
      configure .devold build-old
      t ninja -C build-old kvdistill
    fi
    ;;
  model)
    cat /root/kvd-stage/part-* > /root/smollm2.gguf
    sha256sum /root/smollm2.gguf
    t build-gpu/kvdistill convert --gguf /root/smollm2.gguf --out "$MODEL"
    ;;
  train-ab)
    # GPU throughput, old then new then old again (the spread of one build against itself bounds the noise).
    for b in old new old2; do
      bin=build-${b%2}/kvdistill; [ "$b" = new ] && bin=build-gpu/kvdistill
      rm -rf "$W/ab-$b"
      t "$bin" train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$DATA" \
        train.out_dir="$W/ab-$b" train.steps=30 train.warmup=5 train.eval_every=0 train.save_every=0 \
        train.log_every=10 train.batch_size=2 train.grad_accum=4 train.progress=lines --resume none
      python3 - "$W/ab-$b/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
steady = rows[5:]  # after warm-up of the allocator and kernels
print(f"{sys.argv[1]}: mean tokens/s over steps 6-{len(rows)}: {sum(r['tokens_per_s'] for r in steady) / len(steady):.0f}; "
      f"loss at 1/10/30: {rows[0]['loss']:.6f} {rows[9]['loss']:.6f} {rows[-1]['loss']:.6f}")
PY
    done
    # Bitwise: the tiny CPU run with both builds.
    for b in old new; do
      bin=build-old/kvdistill; [ "$b" = new ] && bin=build-gpu/kvdistill
      rm -rf "$W/cpu-$b"
      OMP_NUM_THREADS=4 "$bin" train --config configs/demo-trimkv.yaml model.dir="$MODEL" data.train="$DATA" \
        train.device=cpu train.out_dir="$W/cpu-$b" train.steps=12 train.eval_every=0 train.save_every=0 \
        train.progress=never --resume none >/dev/null
    done
    python3 - "$W/cpu-old/metrics.jsonl" "$W/cpu-new/metrics.jsonl" <<'PY'
import json, sys
def losses(p):
    return [{k: v for k, v in json.loads(l).items() if k in ("step", "loss", "kl", "ce", "capacity", "grad_norm")}
            for l in open(p) if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
same = a == b
print(f"CPU 12 steps, old vs new: {'bitwise equal' if same else 'DIFFERENT'} ({len(a)} steps; last loss {a[-1]['loss']!r} vs {b[-1]['loss']!r})")
sys.exit(0 if same else 1)
PY
    ;;
  gate)
    t build-gpu/kvdistill train --config configs/trimkv-smollm2.yaml model.dir="$MODEL" data.train="$DATA" \
      train.out_dir="$W/gate" train.steps="$GATE_STEPS" train.warmup=15 train.eval_every=0 train.save_every=50 \
      train.log_every=25 train.batch_size=2 train.grad_accum=4 train.progress=lines
    ;;
  heldout)
    t build-gpu/kvdistill heldout --model "$MODEL" --data "$DATA" --budget 128 --sequences 16 --device cuda --mode both \
      --scorers "streaming_llm,gate-untrained,gate:$W/gate/bundle" --out "$W/heldout.json"
    t build-gpu/kvdistill heldout --model "$MODEL" --data "$DATA" --budget 128 --sequences 8 --device cuda \
      --generate 128 --prompt 1024 \
      --scorers "gate:$W/gate/bundle,streaming_llm_decode,h2o_decode,tova_decode,lazy_eviction" --out "$W/fidelity.json"
    ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
