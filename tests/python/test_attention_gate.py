"""The Attention-Gate (kind attention_gate, alias attngate) through the CLI on the tiny random Llama: it trains
under its alias and logs its kept fraction and target (and, at the held-out check, val_kept); 2 Gloo ranks
match 1 process at the same global batch; a resumed run matches an uninterrupted one bitwise; its bundle
compresses a prompt at its own flags (`compress --threshold 0.5`, each head its own count) and at a ratio; bad
targets and a bundle of another kind exit with one clear line."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_kvd
from train_helpers import launch_ranks, max_abs_diff, one_line_error, train, weights, write_config


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ag_data") / "prose.h5"
    root = Path(__file__).resolve().parents[2]  # prose plus the method notes: enough documents for a val split
    r = run_kvd("prepare", "text", "--model", tiny_model, "--input", root / "data/samples/prose.txt",
                root / "docs/methods", "--out", out, "--seq-len", 32, "--val-fraction", "0.2", "--progress", "never")
    assert r.returncode == 0, r.stderr
    return out


def config(path, model_dir, data, out_dir, **train_keys):
    t = dict(steps=4, batch_size=2, grad_accum=1, lr=0.01, min_lr=0.001, warmup=1, clip=1.0, seed=0, save_every=0,
             keep_last=10, progress="lines", eval_every=0)
    t.update(train_keys)
    lines = [f"model: {{dir: {model_dir}}}", f"data: {{train: {data}, prefetch: 2}}",
             "component: {kind: attngate, heads: 2, head_dim: 8, target: 0.5, sinks: 2, schedule_steps: 2, "
             "bias_init: 0.5}",
             "loss: {kl: 1.0, ce: 0.0, keep: 10.0, block: 16}", "dist: {timeout_s: 60, bucket_mb: 0.001}",
             "train:", f"  out_dir: {out_dir}", "  device: cpu"]
    lines += [f"  {k}: {v}" for k, v in t.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def records(out_dir):
    return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_trains_logs_kept_resumes_in_parallel_and_compresses(tiny_model, data, tmp_path):
    one = config(tmp_path / "one.yaml", tiny_model, data, tmp_path / "one", save_every=2, eval_every=4)
    train(one, "--resume", "none")
    recs = records(tmp_path / "one")
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 4
    assert all(0.0 <= r["kept"] <= 1.0 and "keep" in r and "kl" in r for r in steps)
    assert [r["keep_target"] for r in steps] == [1.0, 0.75, 0.5, 0.5]  # the schedule, step by step
    checks = [r for r in recs if "heldout_kl" in r]
    assert checks and all(0.0 <= r["val_kept"] <= 1.0 and "val_kl" in r for r in checks), checks
    # After the last step the flags are calibrated to the target on training sequences, before the last check.
    cal = [r for r in recs if "calibration" in r]
    assert len(cal) == 1 and cal[0]["step"] == 4, cal
    c = cal[0]["calibration"]
    assert c["unit"] == "layer" and c["target"] == 0.5, c
    assert all(abs(k - 0.5) <= 0.01 for k in c["kept_after_per_unit"]), c
    assert recs.index(cal[0]) < recs.index(checks[-1]) and checks[-1]["step"] == 4
    manifest = json.loads((tmp_path / "one" / "bundle" / "kvdistill.json").read_text())
    assert manifest["kind"] == "attention_gate" and manifest["score"] == "keep_probability"
    assert manifest["options"]["target"] == 0.5

    # 2 ranks of batch 1 = 1 process of batch 2.
    two = config(tmp_path / "two.yaml", tiny_model, data, tmp_path / "two", batch_size=1)
    procs = launch_ranks(two, 2, "--resume", "none")
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    plain = config(tmp_path / "plain.yaml", tiny_model, data, tmp_path / "plain", save_every=2)
    train(plain, "--resume", "none")
    lp = [r["loss"] for r in records(tmp_path / "plain") if "loss" in r]
    l2 = [r["loss"] for r in records(tmp_path / "two") if "loss" in r]
    assert max(abs(a - b) for a, b in zip(lp, l2)) < 1e-5

    # Resume from step 2: steps 3 and 4 are those of the uninterrupted run, bitwise.
    w1 = weights(tmp_path / "plain", 4)
    shutil.rmtree(tmp_path / "plain" / "checkpoints" / "step_00000004")
    train(plain, "--resume", "auto")
    assert max_abs_diff(w1, weights(tmp_path / "plain", 4)) == 0

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    bundle = tmp_path / "one" / "bundle"
    r = run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method", f"attngate:{bundle}",
                "--threshold", "0.5", "--out", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["threshold"] == 0.5
    kept = sum(len(h) for layer in t["layers"] for h in layer)
    assert t["bytes"]["kept"] == kept * t["bytes"]["per_entry"]
    assert all(h[:2] == [0, 1] for layer in t["layers"] for h in layer)  # the sinks stay
    r = run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method", f"adakv_attngate:{bundle}",
                "--ratio", "0.5", "--out", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "r.json").read_text())
    assert 0 < c["bytes"]["kept"] < c["bytes"]["full"]


@pytest.mark.parametrize("override, words", [
    ("component.target=0", ["component.target", "(0, 1]"]),
    ("component.target=1.2", ["component.target", "(0, 1]"]),
    ("component.tau=1", ["component.tau"]),
    ("component.heads=0", ["component.heads"]),
])
def test_bad_options_get_one_line(tiny_model, data, tmp_path, override, words):
    cfg = config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "run")
    line = one_line_error(["train", "--config", cfg, override])
    assert all(w in line for w in words), line


def test_bundle_of_another_kind_gets_one_line(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "rg.yaml", tiny_model, data, tmp_path / "rg", steps=1)
    train(cfg, "--resume", "none")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello there. " * 10)
    line = one_line_error(["compress", "--model", tiny_model, "--prompt-file", prompt, "--method",
                           f"attngate:{tmp_path / 'rg' / 'bundle'}", "--threshold", "0.5", "--out", tmp_path / "c.json"])
    assert "holds a 'retention_gate' component, not a 'attention_gate'" in line, line


def test_calibrate_refits_a_bundle_on_other_text(tiny_model, data, tmp_path):
    """`kvdistill calibrate`: a bundle trained without calibration is refit on text of another kind; each layer
    then keeps the target on it, only the gate's output biases change, the source bundle stays as it was, and
    calibrating the written bundle again finds it already at the target (what was measured is what was saved)."""
    from safetensors.numpy import load_file

    cfg = config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "run", calibration_sequences=0)
    train(cfg, "--resume", "none")
    src = tmp_path / "run" / "bundle"
    other = tmp_path / "code.h5"
    root = Path(__file__).resolve().parents[2]
    # Every document in the train split (what calibrate reads): with a val fraction, which documents go to val depends
    # on their text, and an edit of the README once sent both there.
    r = run_kvd("prepare", "text", "--model", tiny_model, "--input", root / "README.md", root / "docs/scoring.md", "--out", other,
                "--seq-len", 48, "--val-fraction", "0", "--progress", "never")
    assert r.returncode == 0, r.stderr
    before = load_file(src / "gates.safetensors")

    def calibrate(bundle, out):
        r = run_kvd("calibrate", "--model", tiny_model, "--bundle", bundle, "--data", other, "--out", out,
                    "--sequences", 12, "--batch", 4, "--json")
        assert r.returncode == 0, r.stderr
        assert "kept_after" in r.stderr  # the one-line summary
        return json.loads(r.stdout)

    rec = calibrate(src, tmp_path / "cal")
    c = rec["calibration"]
    assert rec["sequences"] == 12 and c["target"] == 0.5 and c["unit"] == "layer", rec
    assert all(abs(k - 0.5) <= 0.002 for k in c["kept_after_per_unit"]), c
    assert abs(c["kept_before"] - 0.5) > 0.002, c  # the training text's flags do not hold the target here
    after = load_file(tmp_path / "cal" / "gates.safetensors")
    assert after.keys() == before.keys()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.endswith("wo.bias") for k in changed), changed
    assert all((load_file(src / "gates.safetensors")[k] == before[k]).all() for k in before)  # the source kept
    again = calibrate(tmp_path / "cal", tmp_path / "cal2")["calibration"]
    assert all(abs(k - 0.5) <= 0.002 for k in again["kept_after_per_unit"]) and len(again["passes"]) == 1, again

    # Bad input: a part with nothing fitted to data, and the source as the destination.
    rg = write_config(tmp_path / "rg.yaml", tiny_model, data, tmp_path / "rg", steps=1)
    train(rg, "--resume", "none")
    line = one_line_error(["calibrate", "--model", tiny_model, "--bundle", tmp_path / "rg" / "bundle", "--data",
                           other, "--out", tmp_path / "rgc"])
    assert "retention_gate" in line and "nothing to calibrate" in line, line
    assert not (tmp_path / "rgc").exists()
    line = one_line_error(["calibrate", "--model", tiny_model, "--bundle", src, "--data", other, "--out", src])
    assert "source bundle itself" in line, line
