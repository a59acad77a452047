#!/usr/bin/env bash
# Runs every test through CTest (unit, oracle parity, integration; GPU tests skip without a GPU).
# Bootstraps first, so it works on a fresh machine. Extra arguments go to ctest (e.g. -R decoder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
BUILD=${KVD_BUILD_DIR:-build}
# ctest runs as many tests at once as there are cores. LibTorch's intra-op threads spin, so two tests with a
# thread per core each slow each other 2-3x (a pair of eval tests: 59 s each, against 35 s with one thread each).
# One intra-op thread per test process, unless the caller sets OMP_NUM_THREADS.
# (The job count is read first: nproc honours OMP_NUM_THREADS.)
JOBS=${KVD_JOBS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "[test] ctest --test-dir $BUILD -j$JOBS (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
ctest --test-dir "$BUILD" --output-on-failure -j"$JOBS" "$@"
