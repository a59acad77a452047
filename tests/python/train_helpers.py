"""Helpers shared by the `kvdistill train` pytest files: a tiny packed dataset for the conftest tiny model,
run configs, launching (single, 2 Gloo ranks), and reading trained weights back with safetensors."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from conftest import KVD_BIN, run_kvd

ROOT = Path(__file__).resolve().parents[2]
PROSE = ROOT / "data/samples/prose.txt"


def prepare_data(model_dir, out, seq_len=32):
    r = run_kvd("prepare", "text", "--model", model_dir, "--input", PROSE, "--out", out, "--seq-len", seq_len,
                "--val-fraction", "0", "--progress", "never")
    assert r.returncode == 0, r.stderr
    return out


def write_config(path, model_dir, data, out_dir, **train):
    """A tiny-model run: a 16-wide retention gate, M=8, KL + CE + capacity, CPU, Gloo."""
    t = dict(steps=4, batch_size=1, grad_accum=1, lr=0.01, min_lr=0.001, warmup=1, clip=1.0, seed=0,
             save_every=0, keep_last=10, progress="lines")
    t.update(train)
    lines = [f"model: {{dir: {model_dir}}}", f"data: {{train: {data}, prefetch: 2}}",
             "component: {kind: retention_gate, budget: 8, hidden: 16, bias_init: 3.0}",
             "loss: {kl: 1.0, ce: 0.1, capacity: 0.5, block: 16}",
             "dist: {timeout_s: 60, bucket_mb: 0.001}",  # ~1 KiB buckets: several buckets even for a tiny gate
             "train:", f"  out_dir: {out_dir}", "  device: cpu"]
    lines += [f"  {k}: {v}" for k, v in t.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def retention_run(model_dir, d, **train_keys):
    """A finished TRIM-KV run of the tiny model under directory d (4 steps, checkpoints every 2): returns its
    train.out_dir, which holds bundle/ and checkpoints/."""
    data = prepare_data(model_dir, Path(d) / "prose.h5")
    out = Path(d) / "run"
    r = train(write_config(Path(d) / "run.yaml", model_dir, data, out, **{"save_every": 2, **train_keys}))
    assert r.returncode == 0, r.stderr
    assert (out / "bundle" / "kvdistill.json").exists()
    return out


def broken_bundle(src, dst, edit):
    """A copy of bundle directory src at dst, changed by edit(dst): for the bad-input tests."""
    shutil.copytree(src, dst)
    edit(Path(dst))
    return Path(dst)


def set_manifest_field(key, value):
    """An edit for broken_bundle: kvdistill.json's `key` set to `value`."""
    def edit(d):
        m = json.loads((d / "kvdistill.json").read_text())
        m[key] = value
        (d / "kvdistill.json").write_text(json.dumps(m))
    return edit


def truncate_tensors(d):
    """An edit for broken_bundle: gates.safetensors loses its last 9 bytes."""
    f = d / "gates.safetensors"
    f.write_bytes(f.read_bytes()[:-9])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(rank=None, world=None, port=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env["OMP_NUM_THREADS"] = "1"  # the same intra-op threads in every run (bitwise comparisons)
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def train(config, *args, timeout=300):
    r = subprocess.run([KVD_BIN, "train", "--config", str(config), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=train_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def launch_ranks(config, world, *args, port=None):
    """Starts `world` ranks by hand (as torchrun would) on 127.0.0.1; returns the Popen objects."""
    port = port or free_port()
    return [subprocess.Popen([KVD_BIN, "train", "--config", str(config), *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=train_env(r, world, port))
            for r in range(world)]


def weights(out_dir, step):
    return load_file(str(Path(out_dir) / "checkpoints" / f"step_{step:08d}" / "weights.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k}: max |diff| {np.max(np.abs(a[k] - b[k]))}"


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not Path(path).exists():
        assert proc.poll() is None, f"training ended before {path} appeared: " + proc.stderr.read()
        assert time.time() - t0 < timeout, f"{path} did not appear in {timeout} s"
        time.sleep(0.005)


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def one_line_error(args):
    """Runs kvdistill expecting a failure: exit 1 and exactly one stderr line, `kvdistill: error: ...`."""
    r = subprocess.run([KVD_BIN, *map(str, args)], capture_output=True, text=True, timeout=300, env=train_env())
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvdistill: error: "), r.stderr
    return lines[0]
