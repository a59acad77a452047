"""Every command that writes a file creates the missing parent directories of its output (`--out runs/x/y.h5`
works on a fresh machine), while a missing *input* stays a one-line error, and an output path through an
existing file is refused cleanly. One test per command with an output, on the tiny random model (fast)."""
import json
from pathlib import Path

import pytest

from conftest import GGUF, MODEL_DIR, assert_clean_error, run_kvd
from train_helpers import PROSE, prepare_data, write_config, train

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / ".cache/corpus"


def deep(tmp_path, name):
    """An output path three directories below tmp_path, none of which exists yet."""
    p = tmp_path / "a" / "b" / "c" / name
    assert not (tmp_path / "a").exists()
    return p


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_forward(tiny_model, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4")
    out = deep(tmp_path, "logits.safetensors")
    ok(run_kvd("forward", "--model", tiny_model, "--input-ids", ids, "--out", out))
    assert out.stat().st_size > 0


@pytest.mark.skipif(not GGUF.exists(), reason="the default GGUF is missing: run scripts/bootstrap.sh")
def test_convert(tmp_path):
    out = deep(tmp_path, "model")
    ok(run_kvd("convert", "--gguf", GGUF, "--out", out))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_prepare_text(tiny_model, tmp_path):
    out = deep(tmp_path, "data.h5")
    ok(run_kvd("prepare", "text", "--model", tiny_model, "--input", PROSE, "--out", out, "--seq-len", 64,
               "--progress", "never"))
    assert out.exists() and not list(out.parent.glob("*.tmp.*"))


@pytest.mark.skipif(not (CORPUS / "MANIFEST").exists(), reason="the default corpus is missing: run scripts/corpus.sh")
def test_prepare_tasks(tmp_path):
    out = deep(tmp_path, "tasks.jsonl")
    ok(run_kvd("prepare", "tasks", "--model", MODEL_DIR, "--suite", "ruler", "--lengths", 256, "--samples", 1,
               "--tasks", "niah_single", "--corpus", CORPUS / "python-doc", "--out", out))
    assert len(out.read_text().splitlines()) == 1


def test_prepare_prompts_and_responses(tiny_model, tmp_path):
    prompts = deep(tmp_path, "prompts.jsonl")
    ok(run_kvd("prepare", "prompts", "--input", PROSE, "--out", prompts, "--count", 2, "--passage-tokens", 20))
    assert len(prompts.read_text().splitlines()) == 2
    out = tmp_path / "x" / "y" / "responses.h5"
    ok(run_kvd("prepare", "responses", "--model", tiny_model, "--prompts", prompts, "--out", out,
               "--max-new-tokens", 2, "--device", "cpu", "--progress", "never"))
    assert out.exists()


def test_compress(tiny_model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    out = deep(tmp_path, "kept.json")
    ok(run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method", "knorm", "--ratio", 0.5,
               "--out", out))
    assert json.loads(out.read_text())["method"] == "knorm"


def test_eval(tiny_model, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t0", "context": "The code is 4711. " * 8, "question": "What is the code?",
                                 "answers": ["4711"], "task": "niah_single", "length": 64}) + "\n")
    out = deep(tmp_path, "eval")
    ok(run_kvd("eval", "--model", tiny_model, "--tasks", tasks, "--methods", "streaming_llm", "--ratios", 0.5,
               "--out", out, "--max-new-tokens", 2))
    assert (out / "results.jsonl").exists() and (out / "results.md").exists()


def test_heldout_and_train(tiny_model, tmp_path):
    data = prepare_data(tiny_model, tmp_path / "d.h5")
    docs = tmp_path / "docs"  # four documents, so that a val split exists
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(PROSE.read_text())
    val = tmp_path / "v.h5"
    ok(run_kvd("prepare", "text", "--model", tiny_model, "--input", docs, "--out", val, "--seq-len", 32,
               "--val-fraction", "0.5", "--progress", "never"))
    out = deep(tmp_path, "heldout.json")
    ok(run_kvd("heldout", "--model", tiny_model, "--data", val, "--budget", 8, "--chunk", 8, "--sequences", 1,
               "--scorers", "streaming_llm", "--out", out))
    assert json.loads(out.read_text())
    run_dir = tmp_path / "runs" / "deep" / "gate"
    train(write_config(tmp_path / "c.yaml", tiny_model, data, run_dir, steps=1))
    assert (run_dir / "bundle" / "kvdistill.json").exists()


def test_missing_input_stays_an_error(tiny_model, tmp_path):
    out = tmp_path / "new" / "data.h5"
    assert_clean_error(run_kvd("prepare", "text", "--model", tiny_model, "--input", tmp_path / "nope.txt", "--out",
                               out, "--progress", "never"), "nope.txt")


def test_output_below_a_file_is_refused(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    assert_clean_error(run_kvd("forward", "--model", tiny_model, "--input-ids", ids, "--out",
                               blocker / "sub" / "l.safetensors"), "not a directory")
