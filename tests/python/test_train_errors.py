"""Bad input to `kvdistill train`: each case exits 1 with exactly one line on stderr that names the key (or
the checkpoint) and says what to do; a checkpoint of another model or component refuses to load."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import KVD_BIN
from train_helpers import prepare_data, train, write_config
import subprocess

from train_helpers import train_env


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    return prepare_data(tiny_model, tmp_path_factory.mktemp("data") / "prose.h5")


def fails(config, *args):
    r = subprocess.run([KVD_BIN, "train", "--config", str(config), *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=train_env())
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kvdistill: error: ")
    return lines[0]


@pytest.mark.parametrize("override, key, words", [
    ("loss.kll=1.0", "loss.kll", "unknown"),
    ("train.stepz=3", "train.stepz", "unknown"),
    ("train.steps=many", "train.steps", "integer"),
    ("loss.kl=high", "loss.kl", "number"),
    ("component.budget=0", "component.budget", "must be in [1, "),
    ("component.budget=-3", "component.budget", "must be in [1, "),
    ("train.lr=-1e-3", "train.lr", ">= 0"),
    ("component.budget=4096", "component.budget", "sequence length"),  # M larger than the data's 32
    ("data.seq_len=1", "data.seq_len", ">= 2"),
    ("data.val_fraction=1.5", "data.val_fraction", "[0, 1)"),
])
def test_bad_config_value_names_the_key(tiny_model, data, tmp_path, override, key, words):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out")
    line = fails(cfg, override)
    assert f"'{key}'" in line and words in line, line


def test_unknown_key_and_wrong_type_in_the_file(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(cfg).read_text() + "component: {budgit: 8}\n")
    line = fails(bad)
    assert "'component.budgit'" in line and "component.budget" in line, line
    bad.write_text(Path(cfg).read_text().replace("steps: 4", "steps: [4]"))
    line = fails(bad)
    assert "'train.steps'" in line, line


def test_checkpoint_of_another_model_or_component_refuses_to_load(tiny_model, data, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=1)
    train(cfg)
    # Another model (same tokenizer, another config.json) in the same out_dir.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    c = json.loads((other / "config.json").read_text())
    c["rms_norm_eps"] = 1e-5 if c.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(c))
    line = fails(cfg, f"model.dir={other}", "train.steps=2")
    assert "step_00000001" in line and "trained on model" in line and "other-model" in line, line
    assert "--resume none" in line
    # Another component kind recorded in the checkpoint.
    state = tmp_path / "out/checkpoints/step_00000001/state.json"
    s = json.loads(state.read_text())
    s["component_kind"] = "soft_queries"
    state.write_text(json.dumps(s))
    line = fails(cfg, "train.steps=2")
    assert "component 'soft_queries'" in line and "retention_gate" in line, line
    # An explicit path that is no checkpoint.
    line = fails(cfg, "--resume", tmp_path)
    assert "not a kvdistill training checkpoint" in line, line


def test_nonfinite_loss_reports_the_step_and_saves_nothing_poisoned(tiny_model, data, tmp_path):
    # lr = 1e30 (no warm-up, no clipping): step 1 is finite, its update blows the gate up, step 2's loss is NaN.
    cfg = write_config(tmp_path / "run.yaml", tiny_model, data, tmp_path / "out", steps=6, save_every=1, lr=1e30,
                       min_lr=0, warmup=0, clip=0, progress="never")
    line = fails(cfg)
    assert "step 2: " in line and "nothing of this step was applied or saved" in line and "step_00000001" in line, line
    assert "loss term '" in line or "the loss is" in line or "the gradient of '" in line, line  # names the term
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == ["step_00000001"]


@pytest.fixture(scope="module")
def responses_data(tiny_model, tmp_path_factory):
    """A finished responses file of the tiny model, and an unfinished one (2 of 3 prompts done)."""
    import h5py
    d = tmp_path_factory.mktemp("responses")
    prompts = d / "p.jsonl"
    prompts.write_text('{"prompt": "One."}\n{"prompt": "Two."}\n{"prompt": "Three."}\n')
    out = d / "r.h5"
    r = subprocess.run([KVD_BIN, "prepare", "responses", "--model", str(tiny_model), "--prompts", str(prompts),
                        "--out", str(out), "--max-new-tokens", "4", "--device", "cpu", "--progress", "never"],
                       capture_output=True, text=True, timeout=300, env=train_env())
    assert r.returncode == 0, r.stderr
    part = d / "unfinished.h5"
    shutil.copy(out, part)
    with h5py.File(part, "r+") as f:
        f.attrs["num_done"] = 2
    return out, part


def test_responses_data_errors_name_the_key(tiny_model, responses_data, tmp_path):
    out, unfinished = responses_data
    cfg = write_config(tmp_path / "run.yaml", tiny_model, out, tmp_path / "out")
    line = fails(cfg, "data.seq_len=16", "component.budget=32")
    assert "'component.budget'" in line and "raise data.seq_len" in line, line
    line = fails(cfg, f"data.train={unfinished}")
    assert "unfinished.h5" in line and "holds 2 of 3 responses" in line and "prepare responses" in line, line
    line = fails(cfg, "data.seq_len=16", "train.batch_size=64")
    assert "too few for one batch" in line, line
