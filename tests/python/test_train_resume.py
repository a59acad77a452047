"""Resumable training: a run killed with SIGKILL mid-run and resumed with `--resume auto` ends with the same
gate weights, bitwise, as an uninterrupted run; and "train k, checkpoint, reload, train k more" equals an
uninterrupted 2k (llm.c's determinism test); activation checkpointing trains to the same weights. CPU, one
process, OMP_NUM_THREADS=1."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import KVD_BIN
from train_helpers import (assert_bitwise_equal, kill9, max_abs_diff, prepare_data, train, train_env, wait_for, weights,
                           write_config)


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    return prepare_data(tiny_model, tmp_path_factory.mktemp("data") / "prose.h5")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    train(write_config(d / "run.yaml", tiny_model, data, d / "out", steps=12, save_every=2, grad_accum=2))
    return d / "out"


def test_sigkill_then_resume_auto_is_bitwise_identical(tiny_model, data, uninterrupted, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=12, save_every=2, grad_accum=2)
    p = subprocess.Popen([KVD_BIN, "train", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=train_env())
    wait_for(tmp_path / "out/checkpoints/step_00000004/state.json", p)
    assert kill9(p) == -9  # killed mid-run, not finished
    assert not (tmp_path / "out/checkpoints/step_00000012").exists()
    r = train(cfg, "--resume", "auto")
    assert "resumed from" in r.stdout
    assert_bitwise_equal(weights(tmp_path / "out", 12), weights(uninterrupted, 12))
    # The optimizer continued too: the AdamW state file is the same size and the metrics go on to step 12.
    steps = [json.loads(l)["step"] for l in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the killed run's steps after its last checkpoint were dropped


def test_train_k_checkpoint_reload_train_k_more_equals_2k(tiny_model, data, uninterrupted, tmp_path):
    # Only the step-6 checkpoint of the uninterrupted run: reload it and train 6 more.
    (tmp_path / "out/checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints/step_00000006", tmp_path / "out/checkpoints/step_00000006")
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=12, save_every=2, grad_accum=2)
    r = train(cfg, "--resume", "auto")
    assert "at step 6" in r.stdout
    assert_bitwise_equal(weights(tmp_path / "out", 12), weights(uninterrupted, 12))
    # And the comparison can fail: a fresh run with another seed ends elsewhere.
    other = write_config(tmp_path / "o.yaml", tiny_model, data, tmp_path / "other", steps=12, save_every=2, grad_accum=2,
                         seed=1)
    train(other)
    with pytest.raises(AssertionError):
        assert_bitwise_equal(weights(tmp_path / "other", 12), weights(uninterrupted, 12))
    # keep_last: the resumed run kept at most 10 (all here), the checkpoints hold the resolved config.
    state = json.loads((tmp_path / "out/checkpoints/step_00000012/state.json").read_text())
    assert state["config"]["train.steps"] == 12 and state["component_kind"] == "retention_gate"


def test_activation_checkpointing_trains_to_the_same_weights(tiny_model, data, uninterrupted, tmp_path):
    """train.activation_checkpointing=layers recomputes every frozen layer in the backward: the same 12 steps end
    at the uninterrupted run's weights (CPU float32; observed bitwise or within 1e-6)."""
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=12, save_every=2, grad_accum=2,
                       activation_checkpointing="layers")
    r = train(cfg)
    assert "activation_checkpointing: layers" in r.stdout  # the resolved config says so
    a, b = weights(tmp_path / "out", 12), weights(uninterrupted, 12)
    assert max_abs_diff(a, b) <= 1e-6 * max(float(np.max(np.abs(v))) for v in b.values())
