#!/usr/bin/env bash
# Runs every test through CTest (unit, oracle parity, integration; GPU tests skip without a GPU).
# Bootstraps first, so it works on a fresh machine. Extra arguments go to ctest (e.g. -R decoder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
BUILD=${KVD_BUILD_DIR:-build}
echo "[test] ctest --test-dir $BUILD"
ctest --test-dir "$BUILD" --output-on-failure -j"${KVD_JOBS:-$(nproc)}" "$@"
