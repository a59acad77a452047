# Shared by the bench/gpu_*.sh stage scripts (source it): the staged SmolLM2 GGUF, a timer, and the two stages
# every GPU session starts with.
SMOLLM2_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# Runs a command and prints its wall time on stderr.
t() { local s=$SECONDS; "$@"; echo "[time] $((SECONDS - s)) s: $*" >&2; }

# This tree into build-gpu/ (tests off), then the ninja targets given (default kvdistill).
gpu_build() {
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVD_BUILD_TESTS=OFF \
    -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" >/dev/null
  t ninja -C build-gpu "${@:-kvdistill}"
}

# Joins the GGUF parts staged in /root/kvd-stage, checks the sha256 and converts the model into $1.
gpu_model() {
  cat /root/kvd-stage/part-* > /root/smollm2.gguf
  echo "$SMOLLM2_GGUF_SHA  /root/smollm2.gguf" | sha256sum -c -
  t build-gpu/kvdistill convert --gguf /root/smollm2.gguf --out "$1"
}

# The first 16 samples of each context length of task file $1, written to $2 (a slice for timing the eval).
tasks_slice() {
  python3 - "$1" "$2" <<'PY'
import json, sys
seen = {}
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        r = json.loads(line)
        if seen.get(r["length"] // 1000, 0) < 16:
            seen[r["length"] // 1000] = seen.get(r["length"] // 1000, 0) + 1
            out.write(line)
print("slice:", seen)
PY
}
