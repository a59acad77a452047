"""Fault injection (docs/reliability.md), on the conftest tiny model, CPU:
- NaN / Inf: KVD_TEST_POISON poisons a loss term or the gradient at a chosen step. With train.on_nonfinite=stop
  the run exits 1 naming the step and the term, and neither that step's checkpoint nor a bundle is written;
  with skip the step's update is dropped (weights unchanged across it) and training finishes with finite weights.
- A full disk: KVD_TEST_DISK_FULL makes writes to matching paths fail as ENOSPC does. Checkpoint, bundle,
  `prepare text` and `eval` each fail with one line saying the disk is full and where; the previous checkpoint
  survives; a rerun after space is freed continues to the same result as an undisturbed run.
- Rank death: of 2 Gloo ranks, the one killed with SIGKILL is named by the other, which exits != 0 well within
  dist.timeout_s (nothing hangs), whichever rank dies (rank 0 also hosts the TCPStore).
- A stop signal: SIGTERM / SIGINT (raised mid-step by KVD_TEST_POISON, or sent from outside) ends the run after
  its current step with a checkpoint of that step and exit 128 + the signal; `--resume auto` then ends on the
  weights of an undisturbed run; a signal on one rank stops both at the same step."""
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import KVD_BIN
from train_helpers import (assert_bitwise_equal, free_port, kill9, launch_ranks, prepare_data, train, train_env, weights,
                           write_config)


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    return prepare_data(tiny_model, tmp_path_factory.mktemp("data") / "prose.h5")


def run_train(cfg, *args, env_extra=None, timeout=300):
    env = train_env()
    env.update(env_extra or {})
    return subprocess.run([KVD_BIN, "train", "--config", str(cfg), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_clean_error(proc, *needles):
    """Exit > 0 (not a signal) and exactly one "kvdistill: error:" line (progress lines may precede it) holding
    every needle."""
    assert proc.returncode > 0, f"expected a clean non-zero exit, got {proc.returncode}\n{proc.stderr}"
    lines = [l for l in proc.stderr.splitlines() if l.startswith("kvdistill: error:")]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{proc.stderr}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in: {lines[0]}"
    return lines[0]


def ckpts(out):
    root = Path(out) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---- NaN / Inf -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("term,value", [("kl", "nan"), ("capacity", "inf"), ("grad", "nan")])
def test_nonfinite_stop_names_step_and_term_and_saves_nothing_poisoned(tiny_model, data, tmp_path, term, value):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=5, save_every=1)
    r = run_train(cfg, env_extra={"KVD_TEST_POISON": f"{term}@3={value}"})
    line = assert_clean_error(r, "step 3:")
    if term == "grad":
        assert "the gradient of 'layers." in line and "is not finite" in line, line
    else:
        assert f"loss term '{term}' is {value}" in line, line
    assert "nothing of this step was applied or saved" in line and "step_00000002" in line, line
    assert ckpts(tmp_path / "out") == ["step_00000001", "step_00000002"]
    assert not (tmp_path / "out" / "bundle").exists()
    for k, v in weights(tmp_path / "out", 2).items():
        assert np.isfinite(v).all(), k


def test_nonfinite_skip_drops_the_update_and_finishes(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=4, save_every=1)
    r = run_train(cfg, "train.on_nonfinite=skip", env_extra={"KVD_TEST_POISON": "grad@2"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 2 skipped: the gradient of 'layers." in r.stdout + r.stderr
    recs = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in recs if "skipped" in x]
    assert [x["step"] for x in skipped] == [2], recs
    # The skipped step left the weights as they were; the steps around it moved them.
    assert_bitwise_equal(weights(tmp_path / "out", 1), weights(tmp_path / "out", 2))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(weights(tmp_path / "out", 2), weights(tmp_path / "out", 3))
    for k, v in weights(tmp_path / "out", 4).items():
        assert np.isfinite(v).all(), k
    assert (tmp_path / "out" / "bundle" / "gates.safetensors").exists()
    # A typed key: anything but stop | skip is refused.
    bad = run_train(cfg, "train.on_nonfinite=maybe")
    assert_clean_error(bad, "train.on_nonfinite", "stop | skip")


# ---- a full disk -----------------------------------------------------------------------------------------

def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_a_rerun_continues(tiny_model, data, tmp_path):
    ref = write_config(tmp_path / "ref.yaml", tiny_model, data, tmp_path / "ref", steps=4, save_every=2)
    train(ref)
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=4, save_every=2)
    r = run_train(cfg, env_extra={"KVD_TEST_DISK_FULL": "step_00000004"})
    line = assert_clean_error(r, "no space left on device", "is full", str(tmp_path / "out" / "checkpoints"))
    assert "the previous checkpoint" in line and "step_00000002 is intact" in line, line
    assert ckpts(tmp_path / "out") == ["step_00000002"]  # no .tmp.* leftover, the previous checkpoint whole
    assert_bitwise_equal(weights(tmp_path / "out", 2), weights(tmp_path / "ref", 2))
    # Space is freed: the rerun resumes from step 2 and ends where the undisturbed run ended.
    r = run_train(cfg, "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "at step 2" in r.stdout
    assert_bitwise_equal(weights(tmp_path / "out", 4), weights(tmp_path / "ref", 4))


def test_full_disk_at_the_bundle_keeps_the_checkpoint_and_a_rerun_writes_it(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=2, save_every=1)
    r = run_train(cfg, env_extra={"KVD_TEST_DISK_FULL": "/bundle.tmp."})
    assert_clean_error(r, "no space left on device", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "bundle").exists()
    assert not list((tmp_path / "out").glob("bundle.tmp.*"))
    assert ckpts(tmp_path / "out")[-1] == "step_00000002"
    r = run_train(cfg, "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out" / "bundle" / "gates.safetensors").exists()
    assert (tmp_path / "out" / "bundle" / "kvdistill.json").exists()


def test_full_disk_in_prepare_text_and_a_rerun(tiny_model, tmp_path):
    out = tmp_path / "data.h5"
    args = [KVD_BIN, "prepare", "text", "--model", str(tiny_model), "--input",
            str(Path(__file__).resolve().parents[2] / "data/samples/prose.txt"), "--out", str(out), "--seq-len", "32",
            "--val-fraction", "0", "--progress", "never"]
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "KVD_TEST_DISK_FULL": "data.h5"}, timeout=300)
    assert_clean_error(r, "no space left on device", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary is left
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_full_disk_in_eval_and_a_rerun_continues(tiny_model, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    rows = [{"id": f"s{i}", "context": "The magic number is 7. " * 8, "question": "What is the magic number?",
             "answers": ["7"], "task": "niah_single", "length": 80} for i in range(2)]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    args = [KVD_BIN, "eval", "--model", str(tiny_model), "--tasks", str(tasks), "--methods", "streaming_llm",
            "--ratios", "0.5", "--out", str(out), "--max-new-tokens", "2"]
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "KVD_TEST_DISK_FULL": "results.jsonl"},
                       timeout=300)
    assert_clean_error(r, "no space left on device", str(out))
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((x["method"], x["id"]) for x in rows) == sorted(
        (m, f"s{i}") for m in ("full", "streaming_llm") for i in range(2))


# ---- rank death ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dead", [1, 0])
def test_a_dead_rank_is_named_and_the_other_exits_within_the_timeout(tiny_model, data, tmp_path, dead):
    timeout_s = 20
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=100000, save_every=0)
    procs = launch_ranks(cfg, 2, f"dist.timeout_s={timeout_s}")
    metrics = tmp_path / "out" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read() + procs[1].stderr.read()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    pid = procs[dead].pid
    kill9(procs[dead])
    alive = procs[1 - dead]
    t_kill = time.time()
    try:
        _, err = alive.communicate(timeout=timeout_s + 30)
    finally:
        if alive.poll() is None:
            kill9(alive)
    elapsed = time.time() - t_kill
    assert alive.returncode not in (0, None)
    assert elapsed < timeout_s, f"the surviving rank took {elapsed:.1f} s (dist.timeout_s={timeout_s})"
    lines = [l for l in err.splitlines() if l.startswith("kvdistill: error:")]
    assert len(lines) == 1, err
    print(f"{elapsed:.1f} s: {lines[0]}")
    assert f"rank {dead} (pid {pid}) exited" in lines[0], lines[0]


# ---- a stop signal (timeout, SLURM preemption, Ctrl-C) ---------------------------------------------------

def metric_steps(out):
    return [json.loads(l)["step"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig,code", [("sigterm", 143), ("sigint", 130)])
def test_a_stop_signal_checkpoints_its_step_and_resume_matches_an_undisturbed_run(tiny_model, data, tmp_path, sig,
                                                                                   code):
    # No periodic checkpoint (save_every 0): the only one before the end can come from the signal.
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=8, save_every=0, grad_accum=2)
    r = run_train(cfg, env_extra={"KVD_TEST_POISON": f"{sig}@3"})
    assert r.returncode == code, r.stdout + r.stderr
    assert f"stopped by {sig.upper()} after step 3 of 8" in r.stderr and "--resume auto" in r.stderr, r.stderr
    assert ckpts(tmp_path / "out") == ["step_00000003"]
    assert metric_steps(tmp_path / "out") == [1, 2, 3]
    assert not (tmp_path / "out" / "bundle").exists()
    r = run_train(cfg, "--resume", "auto")
    assert r.returncode == 0 and "at step 3" in r.stdout, r.stdout + r.stderr
    assert metric_steps(tmp_path / "out") == list(range(1, 9))
    ref = write_config(tmp_path / "ref.yaml", tiny_model, data, tmp_path / "ref", steps=8, save_every=0, grad_accum=2)
    train(ref)
    assert_bitwise_equal(weights(tmp_path / "out", 8), weights(tmp_path / "ref", 8))


def test_an_external_sigterm_loses_no_step(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=100000, save_every=0)
    p = subprocess.Popen([KVD_BIN, "train", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=train_env())
    metrics = tmp_path / "out" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert p.poll() is None, p.stderr.read()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    last = metric_steps(tmp_path / "out")[-1]
    assert ckpts(tmp_path / "out") == [f"step_{last:08d}"], err
    assert f"after step {last} of 100000" in err


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=8, save_every=0)
    port = free_port()
    procs = []
    for rank in range(2):
        env = train_env(rank, 2, port)
        if rank == 1:
            env["KVD_TEST_POISON"] = "sigterm@4"
        procs.append(subprocess.Popen([KVD_BIN, "train", "--config", str(cfg)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errs
    assert "stopped by SIGTERM after step 4 of 8" in errs[0], errs[0]
    assert ckpts(tmp_path / "out") == ["step_00000004"]
    assert metric_steps(tmp_path / "out") == [1, 2, 3, 4]
