"""The query-row component (Judge-Q / LookaheadKV, kind query_rows) through the CLI on the tiny random Llama:
it trains from packed text (each document split in half: the first half the prompt, the rest its continuation),
2 Gloo ranks match 1 process at the same global batch, a run resumed from its checkpoint matches an
uninterrupted one bitwise, the bundle compresses a prompt (`compress --method gate:<bundle>`), and bad options
or a bundle of another model exit with one clear line."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_kvd
from train_helpers import launch_ranks, max_abs_diff, one_line_error, prepare_data, train, weights


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    return prepare_data(tiny_model, tmp_path_factory.mktemp("qr_data") / "prose.h5", seq_len=32)


def config(path, model_dir, data, out_dir, **train_keys):
    t = dict(steps=4, batch_size=2, grad_accum=1, lr=0.01, min_lr=0.001, warmup=1, clip=1.0, seed=0, save_every=0,
             keep_last=10, progress="lines", eval_every=0)
    t.update(train_keys)
    lines = [f"model: {{dir: {model_dir}}}", f"data: {{train: {data}, prefetch: 2}}",
             "component: {kind: query_rows, preset: lookahead, rows: 3, lora_rank: 2, lora_alpha: 4.0, budget: 8}",
             "loss: {attention: 1.0}", "dist: {timeout_s: 60, bucket_mb: 0.001}",
             "train:", f"  out_dir: {out_dir}", "  device: cpu"]
    lines += [f"  {k}: {v}" for k, v in t.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def losses(out_dir):
    return [json.loads(l)["loss"] for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_trains_in_parallel_resumes_and_compresses(tiny_model, data, tmp_path):
    one = config(tmp_path / "one.yaml", tiny_model, data, tmp_path / "one", save_every=2)
    train(one, "--resume", "none")
    assert len(losses(tmp_path / "one")) == 4
    manifest = json.loads((tmp_path / "one" / "bundle" / "kvdistill.json").read_text())
    assert manifest["kind"] == "query_rows" and manifest["variant"] == "lookahead"
    assert manifest["score"] == "query_row_attention" and manifest["rows"] == 3

    # 2 ranks of batch 1 = 1 process of batch 2.
    two = config(tmp_path / "two.yaml", tiny_model, data, tmp_path / "two", batch_size=1)
    procs = launch_ranks(two, 2, "--resume", "none")
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    w1 = weights(tmp_path / "one", 4)
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two"))) < 1e-5

    # Resume from step 2: steps 3 and 4 are those of the uninterrupted run, bitwise.
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "step_00000004")
    train(one, "--resume", "auto")
    w2 = weights(tmp_path / "one", 4)
    assert max_abs_diff(w1, w2) == 0

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    r = run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method",
                f"gate:{tmp_path / 'one' / 'bundle'}", "--ratio", "0.5", "--out", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    assert 0 < c["bytes"]["kept"] < c["bytes"]["full"]


@pytest.mark.parametrize("override, words", [
    ("component.rows=0", ["component.rows", "> 0"]),
    ("component.preset=snapkv", ["component.preset", "judgeq"]),
    ("component.lora_targets=q,zz", ["component.lora_targets", "'zz'"]),
    ("component.loss=l1", ["component.loss"]),
])
def test_bad_options_get_one_line(tiny_model, data, tmp_path, override, words):
    cfg = config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "run")
    line = one_line_error(["train", "--config", cfg, override])
    assert all(w in line for w in words), line


def test_bundle_of_another_model_gets_one_line(tiny_model, data, tmp_path):
    cfg = config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "run", steps=1)
    train(cfg, "--resume", "none")
    bundle = tmp_path / "run" / "bundle"
    m = json.loads((bundle / "kvdistill.json").read_text())
    m["base_model"]["config_sha256"] = "0" * 64
    (bundle / "kvdistill.json").write_text(json.dumps(m))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello there. " * 10)
    line = one_line_error(["compress", "--model", tiny_model, "--prompt-file", prompt, "--method", f"gate:{bundle}",
                           "--ratio", "0.5", "--out", tmp_path / "c.json"])
    assert "trained for model" in line, line
