"""Data-parallel `kvdistill train` on CPU: 2 Gloo ranks on 127.0.0.1 (launched by torchrun, as users do)
train the same gate as one process with the same global batch; a rank that dies (SIGKILL) or fails (an
error) makes every rank exit != 0 with one clear line.

Tolerance: after 3 AdamW steps the two runs' gate weights must agree to max |diff| <= 1e-5. The one-process
run accumulates g1/2 + g2/2 over two micro-steps, the ranks all-reduce g1 + g2 and multiply by 1/2; with 2
ranks both are exact in fp32 up to the one addition, and the observed difference is 0 (bitwise equal), but
the tolerance leaves room for other reduction orders (more ranks, another Gloo algorithm). A run on half
the global batch differs by ~4e-2, far outside it, so the comparison can fail."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import KVD_BIN
from train_helpers import (ROOT, free_port, kill9, launch_ranks, max_abs_diff, prepare_data, train, train_env,
                           weights, write_config)

TOL = 1e-5
# torchrun as a module of the running interpreter: the same launcher whether or not a venv/bin/torchrun exists.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    return prepare_data(tiny_model, tmp_path_factory.mktemp("data") / "prose.h5")


def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tiny_model, data, tmp_path):
    steps = 3
    # One process: global batch 2 as 2 micro-steps of 1 sequence.
    single = write_config(tmp_path / "single.yaml", tiny_model, data, tmp_path / "single", steps=steps, grad_accum=2)
    train(single)
    # Two ranks under torchrun: global batch 2 as 1 sequence per rank.
    dist = write_config(tmp_path / "dist.yaml", tiny_model, data, tmp_path / "dist", steps=steps, grad_accum=1)
    r = subprocess.run([*TORCHRUN, "--no-python", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                        f"--master-port={free_port()}", KVD_BIN, "train", "--config", str(dist)],
                       capture_output=True, text=True, timeout=300, env=train_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "distributed: torchrun, world size 2" in r.stdout
    # Rank 0 alone prints and saves.
    assert r.stdout.count("resolved config:") == 1
    # The half-batch run: what rank 0 alone would have done.
    half = write_config(tmp_path / "half.yaml", tiny_model, data, tmp_path / "half", steps=steps, grad_accum=1)
    train(half)

    w1, w2, wh = weights(tmp_path / "single", steps), weights(tmp_path / "dist", steps), weights(tmp_path / "half", steps)
    d = max_abs_diff(w1, w2)
    print(f"max |w_single - w_2ranks| = {d:.3g}; vs half batch {max_abs_diff(w1, wh):.3g}")
    assert d <= TOL
    assert max_abs_diff(w1, wh) > 100 * TOL

    # The metrics log: one line per step with every loss term, from rank 0 only.
    recs = [json.loads(l) for l in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3]
    for key in ("loss", "kl", "ce", "capacity", "lr", "grad_norm", "tokens_per_s", "rss_mb"):
        assert key in recs[0], key
    assert recs[0]["world_size"] == 2
    single_recs = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["tokens"] == single_recs[0]["tokens"]
    assert abs(recs[0]["loss"] - single_recs[0]["loss"]) < 1e-5


def test_a_rank_that_dies_makes_the_other_exit_nonzero(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=100000, save_every=0)
    procs = launch_ranks(cfg, 2, "dist.timeout_s=30")
    metrics = tmp_path / "out" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        assert procs[0].poll() is None and procs[1].poll() is None, procs[0].stderr.read() + procs[1].stderr.read()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    kill9(procs[1])
    try:
        _, err = procs[0].communicate(timeout=90)
    finally:
        if procs[0].poll() is None:
            kill9(procs[0])
    assert procs[0].returncode not in (0, None)
    lines = [l for l in err.splitlines() if l.startswith("kvdistill: error:")]
    assert len(lines) == 1, err
    print(lines[0])
    assert "rank 0" in lines[0] and ("all-reduce" in lines[0] or "broadcast" in lines[0]), lines[0]


def test_a_rank_that_fails_tells_the_others_why(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=3)
    port = free_port()
    # Rank 1 alone gets a data file that does not exist: it fails after the rendezvous, rank 0 waits in the
    # parameter broadcast, learns why from the store, and both exit 1.
    extra = {0: [], 1: [f"data.train={tmp_path / 'missing.h5'}"]}
    procs = [subprocess.Popen([KVD_BIN, "train", "--config", str(cfg), *extra[r]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=train_env(r, 2, port)) for r in range(2)]
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=120)[1])
        finally:
            if p.poll() is None:
                kill9(p)
    assert [p.returncode for p in procs] == [1, 1], errs
    assert "missing.h5" in errs[1] and "rank 1" in errs[1], errs[1]
    line0 = [l for l in errs[0].splitlines() if l.startswith("kvdistill: error:")]
    assert len(line0) == 1, errs[0]
    print(line0[0])
    assert "rank 1 failed" in line0[0] and "missing.h5" in line0[0], line0[0]
