"""KVD_TRACE (models/profile.h) and scripts/trace_summary.py: the figures of a hand-made trace, and a real
recording of a kvdistill command."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KVD_BIN

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import trace_summary  # noqa: E402


def ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_figures_of_a_hand_made_trace(tmp_path):
    # Host: one op over [0, 40). Device: kernels [0, 10) and [5, 15) overlap (union 15), a copy [20, 25), a kernel
    # [30, 1530) of 1,500 us: busy 15 + 5 + 1500 = 1520 of a span of 1530.
    events = [
        ev("cpu_op", "aten::mm", 0, 40),
        ev("cpu_op", "aten::mm", 1, 2),
        ev("cpu_op", "aten::add", 3, 1),
        ev("kernel", "gemm", 0, 10),
        ev("kernel", "gemm", 5, 10),
        ev("gpu_memcpy", "Memcpy HtoD", 20, 5),
        ev("kernel", "big", 30, 1500),
        ev("cuda_runtime", "cudaLaunchKernel", 0, 4),
        {"ph": "i", "name": "marker", "ts": 9999},  # not a complete event: ignored
    ]
    p = tmp_path / "t.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary.summarize(trace_summary.load(str(p)))
    assert s["span_us"] == 1530
    assert s["device_busy_us"] == 1520
    assert s["device_busy_fraction"] == pytest.approx(1520 / 1530)
    assert s["kernels"] == 3 and s["device_events"] == 4
    assert s["kernel_us_total"] == 1520 and s["kernel_us_median"] == 10
    counts = {b["lo_us"]: b["count"] for b in s["kernel_bins"]}
    assert counts == {0: 0, 5: 2, 20: 0, 100: 0, 1000: 1}
    assert s["top_device"][0] == {"cat": "kernel", "name": "big", "calls": 1, "us": 1500}
    assert s["top_device"][1]["name"] == "gemm" and s["top_device"][1]["us"] == 20
    assert s["cpu_ops"] == 3 and s["top_cpu_ops"][0] == {"name": "aten::mm", "calls": 2, "us_inclusive": 42}
    assert s["launch_calls"] == 1 and s["launch_us"] == 4
    assert s["top_cuda_api"] == [{"name": "cudaLaunchKernel", "calls": 1, "us": 4}]



def test_device_time_is_charged_to_the_outermost_launching_op():
    # Thread 1: aten::to [0, 50) holds aten::copy_ [1, 40), which launches kernel k1 (correlation 1); aten::add
    # [60, 70) launches k2 (2) and k3 (3). Thread 2 launches k4 (4) outside any op. Device: k1 30 us, k2 5, k3 7, k4 2.
    def run(ts, corr, tid=1):
        return {**ev("cuda_runtime", "cudaLaunchKernel", ts, 1), "tid": tid, "args": {"correlation": corr}}

    def kern(name, ts, dur, corr):
        return {**ev("kernel", name, ts, dur), "args": {"correlation": corr}}

    events = [
        {**ev("cpu_op", "aten::to", 0, 50), "tid": 1},
        {**ev("cpu_op", "aten::copy_", 1, 39), "tid": 1},
        run(2, 1),
        {**ev("cpu_op", "aten::add", 60, 10), "tid": 1},
        run(61, 2), run(65, 3), run(80, 4, tid=2),
        kern("k1", 10, 30, 1), kern("k2", 70, 5, 2), kern("k3", 75, 7, 3), kern("k4", 90, 2, 4),
    ]
    by_op = trace_summary.summarize(events)["top_device_by_op"]
    assert by_op == [{"name": "aten::to", "calls": 1, "us": 30}, {"name": "aten::add", "calls": 2, "us": 12},
                     {"name": "(no op)", "calls": 1, "us": 2}]


def test_device_time_by_op_shapes_and_by_user_scope():
    # Thread 1: scope "eval compress snapkv" [0, 100) holds scope "inner" [0, 30) and index_select ops of two
    # shapes; thread 2 launches outside any scope. Each op launches one kernel (correlation = its number).
    def op(name, ts, dims, corr, tid=1):
        return [{**ev("cpu_op", name, ts, 5), "tid": tid, "args": {"Input Dims": dims}},
                {**ev("cuda_runtime", "cudaLaunchKernel", ts + 1, 1), "tid": tid, "args": {"correlation": corr}},
                {**ev("kernel", "gather", 200 + 10 * corr, corr), "args": {"correlation": corr}}]

    events = [{**ev("user_annotation", "eval compress snapkv", 0, 100), "tid": 1},
              {**ev("user_annotation", "inner", 0, 30), "tid": 1},
              *op("aten::index_select", 10, [[8, 64], [], [4]], 1),
              *op("aten::index_select", 40, [[8, 64], [], [4]], 2),
              *op("aten::index_select", 50, [[1024, 64], [], [512]], 3),
              *op("aten::add", 10, [[4], [4]], 4, tid=2)]
    s = trace_summary.summarize(events)
    shapes = {(o["name"], o["shapes"]): (o["calls"], o["us"]) for o in s["top_device_by_op_shapes"]}
    assert shapes == {("aten::index_select", "[[8, 64], [], [4]]"): (2, 3),
                      ("aten::index_select", "[[1024, 64], [], [512]]"): (1, 3),
                      ("aten::add", "[[4], [4]]"): (1, 4)}
    scopes = {o["name"]: (o["calls"], o["us"]) for o in s["top_device_by_scope"]}
    assert scopes == {"inner": (1, 1), "eval compress snapkv": (2, 5), "(no scope)": (1, 4)}


def test_a_file_without_events_is_an_error(tmp_path):
    p = tmp_path / "empty.json"
    p.write_text(json.dumps({"traceEvents": []}))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/trace_summary.py"), str(p)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "no complete events" in r.stderr and "KVD_TRACE" in r.stderr


def test_kvd_trace_records_a_command(tiny_model, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 5 9 13 17 21 25 29")
    trace = tmp_path / "run.json"
    env = dict(os.environ, KVD_TRACE=str(trace))
    r = subprocess.run([KVD_BIN, "forward", "--model", str(tiny_model), "--input-ids", str(ids), "--out",
                        str(tmp_path / "l.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[trace] wrote" in r.stderr
    s = trace_summary.summarize(trace_summary.load(str(trace)))
    names = {o["name"] for o in s["top_cpu_ops"]}
    assert s["cpu_ops"] > 0 and s["span_us"] > 0
    # The decoder's projections and its attention are among the recorded ops.
    assert any("linear" in n or "matmul" in n or "mm" in n for n in names), names
    # The CLI prints the same figures.
    out = subprocess.run([sys.executable, str(ROOT / "scripts/trace_summary.py"), str(trace)], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "host ops:" in out.stdout
    # Without KVD_TRACE nothing is recorded.
    r2 = subprocess.run([KVD_BIN, "forward", "--model", str(tiny_model), "--input-ids", str(ids), "--out",
                         str(tmp_path / "l2.safetensors")], capture_output=True, text=True,
                        env={k: v for k, v in os.environ.items() if k != "KVD_TRACE"}, timeout=300)
    assert r2.returncode == 0 and "[trace]" not in r2.stderr
