#!/usr/bin/env python3
"""Kill / resume soak of `kvdistill train` (docs/reliability.md).

Trains a config once without interruption (the reference), then trains it again in another directory while
sending SIGKILL N times at seeded random moments, resuming with `--resume auto` after each kill. About half
of the kills are aimed at checkpoint writes: the script watches the checkpoints directory and kills while a
`.tmp.*` save is in flight. After every kill it checks that each `step_*` directory that looks valid (has
state.json) is complete and loadable, and that a gate bundle, if present, is whole. At the end the final
checkpoint's weights and the gate bundle must equal the reference's byte for byte.

    python scripts/soak.py --kills 20 --seed 0 --work runs/soak -- train.steps=40 train.save_every=2
    (CTest `soak.kill_resume` runs it with --kills 3 on a shortened config.)

Exit code 0 when every check passed; the last line is a one-line summary.
"""
import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                          "SLURM_PROCID", "SLURM_NTASKS", "KVD_TEST_POISON",
                                                          "KVD_TEST_DISK_FULL")}
    e["OMP_NUM_THREADS"] = "1"  # the same intra-op threads in every run: bitwise comparisons
    return e


def cmd(args, out_dir):
    return [args.kvd, "train", "--config", str(args.config), *args.overrides, f"train.out_dir={out_dir}",
            "train.progress=lines"]


def safetensors_ok(path):
    """The header length, the JSON header and the data size agree (a torn file fails)."""
    b = Path(path).read_bytes()
    if len(b) < 8:
        return False
    n = struct.unpack("<Q", b[:8])[0]
    if 8 + n > len(b):
        return False
    h = json.loads(b[8:8 + n])
    end = max([v["data_offsets"][1] for k, v in h.items() if k != "__metadata__"] or [0])
    return 8 + n + end == len(b)


def check_tree(out_dir):
    """Every checkpoint that would be resumed from is whole; so is the bundle. Returns a list of problems."""
    problems = []
    root = Path(out_dir) / "checkpoints"
    if root.exists():
        for d in sorted(root.iterdir()):
            if not d.name.startswith("step_"):
                continue
            if not (d / "state.json").exists():
                continue  # not valid by construction: never resumed from
            try:
                s = json.loads((d / "state.json").read_text())
                assert s["format"] == "kvdistill_train_checkpoint" and s["step"] == int(d.name[5:]), "state.json"
                for f in ("weights.safetensors", "optimizer.pt", "rng.pt"):
                    assert (d / f).exists() and (d / f).stat().st_size > 0, f"{f} missing"
                assert safetensors_ok(d / "weights.safetensors"), "weights.safetensors torn"
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                problems.append(f"{d}: half-written checkpoint that looks valid ({e})")
    b = Path(out_dir) / "bundle"
    if b.exists():
        if not ((b / "kvdistill.json").exists() and (b / "gates.safetensors").exists()):
            problems.append(f"{b}: incomplete bundle")
        else:
            try:
                json.loads((b / "kvdistill.json").read_text())
                assert safetensors_ok(b / "gates.safetensors")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{b}: torn bundle ({e})")
    return problems


def saving(out_dir, pid):
    """Whether process `pid` is writing a checkpoint (or retiring an old one) now: its temporary directory
    exists. A killed run's leftovers carry another pid."""
    root = Path(out_dir) / "checkpoints"
    try:
        return any(n.startswith(".tmp.") and n.endswith(f".{pid}") for n in os.listdir(root))
    except FileNotFoundError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvd", default=str(ROOT / "build" / "kvdistill"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-trimkv.yaml"))
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "soak"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the whole soak")
    ap.add_argument("--prepare-text", metavar="INPUT",
                    help="first make the training data from INPUT with `prepare text` (into --work; sets data.train)")
    ap.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct", help="model of --prepare-text")
    ap.add_argument("--seq-len", type=int, default=64, help="sequence length of --prepare-text")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "soak"
    t_start = time.time()
    if args.prepare_text:
        data = work / "data.h5"
        r = subprocess.run([args.kvd, "prepare", "text", "--model", args.model, "--input", args.prepare_text, "--out",
                            str(data), "--seq-len", str(args.seq_len), "--val-fraction", "0.05", "--progress", "never"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"soak: prepare text failed:\n{r.stderr}")
        args.overrides.append(f"data.train={data}")

    # ---- the reference: one uninterrupted run ------------------------------------------------------------
    t0 = time.time()
    r = subprocess.run(cmd(args, work / "ref") + ["--resume", "none"], capture_output=True, text=True, env=env())
    if r.returncode != 0:
        sys.exit(f"soak: the reference run failed:\n{r.stdout}\n{r.stderr}")
    ref_s = time.time() - t0
    ref_ckpts = sorted((work / "ref" / "checkpoints").glob("step_*"))
    final = ref_ckpts[-1].name
    steps = int(final[5:])
    # Startup (model load, data open) and per-step times, to aim kills inside the part of a run still to come.
    step_s = {}
    for line in (work / "ref" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step_s" in rec:
            step_s[rec["step"]] = rec["step_s"]
    startup_s = max(0.5, ref_s - sum(step_s.values()))
    print(f"soak: reference run {ref_s:.1f} s ({startup_s:.1f} s startup), {steps} steps, final checkpoint {final}",
          flush=True)

    mean_step_s = sum(step_s.values()) / max(1, len(step_s))

    def latest_step():
        latest = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
        return int(latest[-1].name[5:]) if latest else 0

    def logged_step():
        """The last step the running process logged (a resumed run first cuts metrics.jsonl to its start)."""
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
            return max([json.loads(l).get("step", 0) for l in lines if l.endswith("}")] or [0])
        except (FileNotFoundError, ValueError):
            return 0

    def fresh_metrics(since):
        """metrics.jsonl was written by the running process (at its start it keeps only the lines up to its
        checkpoint, so older lines of a killed run cannot be mistaken for progress)."""
        try:
            return (out / "metrics.jsonl").stat().st_mtime >= since
        except FileNotFoundError:
            return False

    # ---- the soak: N kills, each followed by --resume auto -------------------------------------------------
    kills = kills_in_save = 0
    problems = []
    attempts = 0
    while kills < args.kills:
        attempts += 1
        if time.time() - t_start > args.timeout:
            sys.exit(f"soak: timed out after {kills} kills")
        start = latest_step()
        if start >= steps - 1:
            # Too close to the end for a kill inside training: begin again from scratch (kills so far count).
            print("soak: near the end; starting over from scratch", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            start = 0
        aim_save = rng.random() < 0.5
        # Otherwise a random moment of a random step among the next three (while it computes, or logs, or
        # saves): wait until step k - 1 is logged, then up to one step's time more.
        k = rng.randint(start + 1, min(start + 3, steps - 1))
        extra = rng.uniform(0.0, mean_step_s)
        t_logged = None
        p = subprocess.Popen(cmd(args, out) + ["--resume", "auto"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env())
        t_launch = time.time()
        in_save = False
        while p.poll() is None:
            now = time.time() - t_launch
            s = saving(out, p.pid)
            if not aim_save and t_logged is None and fresh_metrics(t_launch) and logged_step() >= k - 1:
                t_logged = now
            if (aim_save and s) or (not aim_save and t_logged is not None and now >= t_logged + extra):
                in_save = s
                p.send_signal(signal.SIGKILL)
                break
            if now >= 2 * ref_s:  # neither a save nor the step came: kill anyway
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005 if aim_save else 0.005)
        rc = p.wait()
        err = p.stderr.read()
        # The kill landed inside a checkpoint write (or the pruning of an old one) if the killed process left
        # its temporary directory behind.
        in_save = saving(out, p.pid)
        if rc == -signal.SIGKILL:
            kills += 1
            kills_in_save += in_save
            found = check_tree(out)
            problems += found
            latest = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
            print(f"soak: kill {kills}/{args.kills} at {time.time() - t_launch:.2f} s"
                  f"{' inside a checkpoint write' if in_save else ''}; latest {latest[-1].name if latest else 'none'}"
                  f"{'; PROBLEMS: ' + '; '.join(found) if found else ''}", flush=True)
        elif rc == 0:
            # The run finished before the kill: start over so that every kill lands on a run in progress.
            print(f"soak: attempt {attempts} finished before its kill; starting over from scratch", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        else:
            sys.exit(f"soak: a resumed run failed (exit {rc}) after {kills} kills:\n{err}")

    # ---- run to the end and compare -------------------------------------------------------------------------
    r = subprocess.run(cmd(args, out) + ["--resume", "auto"], capture_output=True, text=True, env=env())
    if r.returncode != 0:
        sys.exit(f"soak: the final resumed run failed:\n{r.stdout}\n{r.stderr}")
    problems += check_tree(out)
    same_w = (out / "checkpoints" / final / "weights.safetensors").read_bytes() == \
        (ref_ckpts[-1] / "weights.safetensors").read_bytes()
    same_b = (out / "bundle" / "gates.safetensors").read_bytes() == (work / "ref" / "bundle" / "gates.safetensors").read_bytes()
    ok = same_w and same_b and not problems
    print(f"soak: {'PASS' if ok else 'FAIL'}: {kills} kills ({kills_in_save} inside checkpoint writes), seed {args.seed}, "
          f"final weights {'bitwise equal' if same_w else 'DIFFER'}, bundle {'bitwise equal' if same_b else 'DIFFERS'}, "
          f"{len(problems)} half-written checkpoints, {time.time() - t_start:.0f} s", flush=True)
    for pr in problems:
        print("  " + pr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
