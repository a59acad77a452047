#!/usr/bin/env bash
# Fuzz campaigns (docs/reliability.md): builds the libFuzzer targets of tests/fuzz/ with clang
# (build-fuzz/, KVD_FUZZ=ON, no LibTorch), writes the seed corpora, then runs each target for SECONDS,
# one after another, niced, with the acceptance limits (2 GB RSS, 10 s per input). Logs and the grown
# corpora stay in build-fuzz/; a crash leaves build-fuzz/artifacts/<target>/crash-* (copy it to
# tests/fuzz/regressions/<target>/ once fixed, so CTest replays it).
#
#   scripts/fuzz.sh 600                      # every target, 10 minutes each
#   scripts/fuzz.sh 60 tokenizer gguf        # some targets
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_TARGET=${1:-600}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(safetensors gguf config tokenizer chat_template run_config eval_tasks h5 bundle)
B=${KVD_FUZZ_BUILD_DIR:-build-fuzz}
if [ ! -f "$B/build.ninja" ]; then
  cmake -S . -B "$B" -G Ninja -DKVD_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang >/dev/null
fi
nice -n 10 cmake --build "$B" -- -j"${KVD_JOBS:-2}" >/dev/null
"$B/fuzz_seeds" "$B/seeds" >/dev/null
mkdir -p "$B/logs"
for t in "${TARGETS[@]}"; do
  mkdir -p "$B/corpus/$t" "$B/artifacts/$t"
  log="$B/logs/$t.log"
  echo "[fuzz] $t: ${SECONDS_PER_TARGET} s -> $log"
  set +e
  nice -n 19 "$B/fuzz_$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -timeout=10 -max_len=32768 -print_final_stats=1 -artifact_prefix="$B/artifacts/$t/" \
    "$B/corpus/$t" "$B/seeds/$t" tests/fuzz/regressions/"$t" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  kinds=$(ls "$B/artifacts/$t" | sed 's/-.*//' | sort | uniq -c | tr -s ' ' | tr '\n' ',' )
  echo "[fuzz] $t: exit $rc, $execs execs in ${SECONDS_PER_TARGET} s, artifacts (crash / leak / timeout / oom): ${kinds:-none}"
done
