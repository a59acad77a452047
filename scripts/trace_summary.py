#!/usr/bin/env python3
"""Summarize a Chrome trace written by `KVD_TRACE=FILE.json kvdistill ...` (models/profile.h).

What it answers: is the run bound by the GPU or by the host? It prints the span of the trace, the time the GPU
was busy (the union of its kernels, copies and fills), how the kernels' durations are distributed (a launch-bound
run is thousands of kernels of a few microseconds with idle gaps between them), the kernels that took the most
device time and the host ops that launched them, and the host ops called most often.

    scripts/trace_summary.py run.json [--top 15] [--json]
"""
import argparse
import gzip
import json
import sys
from collections import defaultdict

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# Kernel duration bins, microseconds: [lo, hi).
BINS = ((0, 5), (5, 20), (20, 100), (100, 1000), (1000, float("inf")))


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


def union_length(intervals):
    """Total length covered by the [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def summarize(events, top=15):
    """A dict of the trace's figures; times in microseconds."""
    if not events:
        raise ValueError("the trace holds no complete events (ph 'X'); was the run recorded with KVD_TRACE?")
    t0 = min(float(e["ts"]) for e in events)
    t1 = max(float(e["ts"]) + float(e["dur"]) for e in events)
    dev = [e for e in events if e.get("cat") in DEVICE_CATS]
    kernels = [e for e in dev if e.get("cat") == "kernel"]
    busy = union_length([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in dev])
    out = {
        "span_us": t1 - t0,
        "device_events": len(dev),
        "kernels": len(kernels),
        "device_busy_us": busy,
        "device_busy_fraction": busy / (t1 - t0) if t1 > t0 else 0.0,
    }
    durs = sorted(float(e["dur"]) for e in kernels)
    if durs:
        out["kernel_us_total"] = sum(durs)
        out["kernel_us_mean"] = sum(durs) / len(durs)
        out["kernel_us_median"] = durs[len(durs) // 2]
    out["kernel_bins"] = []
    for lo, hi in BINS:
        sel = [d for d in durs if lo <= d < hi]
        out["kernel_bins"].append({"lo_us": lo, "hi_us": hi, "count": len(sel), "us": sum(sel)})
    by_kernel = defaultdict(lambda: [0, 0.0])
    for e in dev:
        k = by_kernel[(e.get("cat"), e.get("name", "?"))]
        k[0] += 1
        k[1] += float(e["dur"])
    out["top_device"] = [
        {"cat": c, "name": n, "calls": v[0], "us": v[1]}
        for (c, n), v in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    ]
    by_op = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "cpu_op":
            o = by_op[e.get("name", "?")]
            o[0] += 1
            o[1] += float(e["dur"])
    out["cpu_ops"] = sum(v[0] for v in by_op.values())
    out["top_cpu_ops"] = [
        {"name": n, "calls": v[0], "us_inclusive": v[1]}
        for n, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    ]
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", "")]
    out["launch_calls"] = len(launches)
    out["launch_us"] = sum(float(e["dur"]) for e in launches)
    # The host's CUDA calls by time: waits (synchronize, blocking copies) and allocations (malloc / free) show here.
    by_api = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            a = by_api[e.get("name", "?")]
            a[0] += 1
            a[1] += float(e["dur"])
    out["top_cuda_api"] = [
        {"name": n, "calls": v[0], "us": v[1]} for n, v in sorted(by_api.items(), key=lambda kv: -kv[1][1])[:top]
    ]
    out["top_device_by_op"], out["top_device_by_op_shapes"], out["top_device_by_scope"] = device_time_by_op(events, top)
    return out


def device_time_by_op(events, top):
    """Device time by the host op that launched it: each kernel / copy is tied to its launch call by the trace's
    correlation id, and the launch to the outermost op around it on its thread (what our code called: aten::to,
    not the aten::copy_ inside it). Device work launched outside any op counts as "(no op)".

    Returns three tables: by that op; by that op and its input shapes (recorded by KVD_TRACE); and by the
    innermost user scope around the launch (the eval's "eval compress METHOD" / "eval answer METHOD" scopes, or
    "(no scope)")."""
    launched_by = {}  # correlation id -> (outermost op name, its input shapes, innermost user scope)
    by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"):
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        ops, scopes = [], []  # open at the current time, outermost first

        def close(stack, ts):
            while stack and float(stack[-1]["ts"]) + float(stack[-1]["dur"]) <= ts:
                stack.pop()

        for e in evs:
            ts = float(e["ts"])
            close(ops, ts)
            close(scopes, ts)
            if e.get("cat") == "cpu_op":
                ops.append(e)
            elif e.get("cat") == "user_annotation":
                scopes.append(e)
            elif "correlation" in e.get("args", {}):
                op = ops[0] if ops else None
                launched_by[e["args"]["correlation"]] = (
                    op.get("name", "?") if op else "(no op)",
                    json.dumps(op.get("args", {}).get("Input Dims")) if op and "Input Dims" in op.get("args", {}) else "",
                    scopes[-1].get("name", "?") if scopes else "(no scope)",
                )
    by_op, by_shape, by_scope = (defaultdict(lambda: [0, 0.0]) for _ in range(3))
    for e in events:
        if e.get("cat") in DEVICE_CATS:
            name, shapes, scope = launched_by.get(e.get("args", {}).get("correlation"), ("(no op)", "", "(no scope)"))
            for table, key in ((by_op, name), (by_shape, (name, shapes)), (by_scope, scope)):
                table[key][0] += 1
                table[key][1] += float(e["dur"])

    def rows(table, label):
        return [{**label(k), "calls": v[0], "us": v[1]} for k, v in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]]

    return (rows(by_op, lambda k: {"name": k}), rows(by_shape, lambda k: {"name": k[0], "shapes": k[1]}),
            rows(by_scope, lambda k: {"name": k}))


def short(name, n=96):
    return name if len(name) <= n else name[: n - 3] + "..."


def print_summary(s):
    ms = 1e-3
    print(f"span {s['span_us'] * ms:.1f} ms; device busy {s['device_busy_us'] * ms:.1f} ms "
          f"({100 * s['device_busy_fraction']:.1f}% of the span) in {s['device_events']} kernels / copies / fills")
    if s["kernels"]:
        print(f"kernels: {s['kernels']}, {s['kernel_us_total'] * ms:.1f} ms in all, mean {s['kernel_us_mean']:.1f} us, "
              f"median {s['kernel_us_median']:.1f} us")
        print("kernel durations:")
        for b in s["kernel_bins"]:
            hi = "inf" if b["hi_us"] == float("inf") else f"{b['hi_us']:g}"
            share = b["us"] / s["kernel_us_total"] if s["kernel_us_total"] else 0.0
            print(f"  [{b['lo_us']:g}, {hi}) us: {b['count']:8d} kernels, {100 * share:5.1f}% of kernel time")
    if s["launch_calls"]:
        print(f"host launch calls: {s['launch_calls']}, {s['launch_us'] * ms:.1f} ms")
    if s["top_device"]:
        print("device time by kernel:")
        for k in s["top_device"]:
            print(f"  {k['us'] * ms:9.2f} ms {k['calls']:8d}x  {short(k['name'])}")
    if s["top_device_by_op"]:
        print("device time by the host op that launched it (outermost):")
        for o in s["top_device_by_op"]:
            print(f"  {o['us'] * ms:9.2f} ms {o['calls']:8d}x  {short(o['name'])}")
    if any(o["shapes"] for o in s["top_device_by_op_shapes"]):
        print("device time by the launching op and its input shapes:")
        for o in s["top_device_by_op_shapes"]:
            print(f"  {o['us'] * ms:9.2f} ms {o['calls']:8d}x  {o['name']} {short(o['shapes'], 120)}")
    if any(o["name"] != "(no scope)" for o in s["top_device_by_scope"]):
        print("device time by the innermost user scope around its launch:")
        for o in s["top_device_by_scope"]:
            print(f"  {o['us'] * ms:9.2f} ms {o['calls']:8d}x  {short(o['name'])}")
    if s["top_cuda_api"]:
        print("host time in CUDA calls (waits and allocations show here):")
        for a in s["top_cuda_api"]:
            print(f"  {a['us'] * ms:9.2f} ms {a['calls']:8d}x  {short(a['name'])}")
    print(f"host ops: {s['cpu_ops']}; most called (inclusive time):")
    for o in s["top_cpu_ops"]:
        print(f"  {o['calls']:8d}x {o['us_inclusive'] * ms:9.2f} ms  {short(o['name'])}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="Chrome trace (.json or .json.gz) from KVD_TRACE")
    ap.add_argument("--top", type=int, default=15, help="rows in the kernel and op tables")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    try:
        s = summarize(load(a.trace), a.top)
    except (OSError, ValueError, KeyError) as e:
        print(f"trace_summary: {a.trace}: {e}", file=sys.stderr)
        return 1
    if a.json:
        json.dump(s, sys.stdout, indent=1)
        print()
    else:
        print_summary(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
