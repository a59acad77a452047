"""`kvdistill export` and `inspect-bundle` (docs/bundle.md) on a TRIM-KV run of the tiny random Llama: a run's
bundle and any kept checkpoint export to bundles whose tensors equal the source (read back independently with
the safetensors package); bf16 / f16 exports equal torch's round-to-nearest of the float32 weights; an exported
bundle compresses a prompt; and a corrupt, truncated, newer-format or foreign bundle exits with one clear line."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file as load_torch

from conftest import assert_clean_error, copy_model, run_kvd
from train_helpers import broken_bundle, retention_run, set_manifest_field, truncate_tensors, weights


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A 4-step retention-gate run with checkpoints at steps 2 and 4 and its final bundle."""
    return retention_run(tiny_model, tmp_path_factory.mktemp("export_run"))


def bundle_name(param):
    """A checkpoint parameter name ('layers.1.w1.weight') as a retention-gate bundle names it."""
    _, layer, rest = param.split(".", 2)
    return f"model.layers.{layer}.self_attn.retention_gate.{rest}"


def manifest(d):
    return json.loads((Path(d) / "kvdistill.json").read_text())


def test_export_run_bundle_and_checkpoint(trained, tiny_model, tmp_path):
    r = run_kvd("export", "--run", trained, "--out", tmp_path / "final")
    assert r.returncode == 0, r.stderr
    assert "validated" in r.stdout
    src, got = load_np(str(trained / "bundle" / "gates.safetensors")), load_np(str(tmp_path / "final" / "gates.safetensors"))
    assert src.keys() == got.keys() and len(got) > 0
    for k in src:
        assert got[k].dtype == np.float32 and got[k].tobytes() == src[k].tobytes(), k
    m = manifest(tmp_path / "final")
    assert m["format_version"] == 1 and m["kind"] == "retention_gate" and m["dtype"] == "F32"
    assert (m["score"], m["higher_keeps"], m["score_timing"]) == ("log_beta", True, "on_append")
    assert m["base_model"] == manifest(trained / "bundle")["base_model"]
    assert m["tensors"] == manifest(trained / "bundle")["tensors"]

    # --step 2: the weights of that checkpoint, not the final ones
    r = run_kvd("export", "--run", trained, "--step", 2, "--out", tmp_path / "step2")
    assert r.returncode == 0, r.stderr
    ck = weights(trained, 2)
    got = load_np(str(tmp_path / "step2" / "gates.safetensors"))
    assert set(got) == {bundle_name(k) for k in ck}
    for k, v in ck.items():
        assert got[bundle_name(k)].tobytes() == v.tobytes(), k
    assert any(got[bundle_name(k)].tobytes() != src[bundle_name(k)].tobytes() for k in ck), \
        "step 2 equals the final weights: the test would not see a wrong checkpoint"


def test_stopped_run_exports_its_checkpoint_into_its_own_bundle_dir(trained, tmp_path):
    """A run stopped before its end (SIGTERM: checkpoints, no bundle) exports its latest checkpoint into
    <run>/bundle, the path its evaluation expects."""
    stopped = tmp_path / "stopped"
    shutil.copytree(trained / "checkpoints", stopped / "checkpoints")
    r = run_kvd("export", "--run", stopped, "--out", stopped / "bundle")
    assert r.returncode == 0, r.stderr
    got = load_np(str(stopped / "bundle" / "gates.safetensors"))
    for k, v in weights(trained, 4).items():
        assert got[bundle_name(k)].tobytes() == v.tobytes(), k
    # now that it exists, exporting the run into it again is refused
    assert_clean_error(run_kvd("export", "--run", stopped, "--out", stopped / "bundle"), "source bundle itself")


@pytest.mark.parametrize("dtype,torch_dtype,name", [("bf16", torch.bfloat16, "BF16"), ("f16", torch.float16, "F16")])
def test_export_smaller_dtype_rounds_to_nearest(trained, tiny_model, tmp_path, dtype, torch_dtype, name):
    out = tmp_path / dtype
    r = run_kvd("export", "--bundle", trained / "bundle", "--model", tiny_model, "--out", out, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    src, got = load_torch(str(trained / "bundle" / "gates.safetensors")), load_torch(str(out / "gates.safetensors"))
    for k in src:
        assert got[k].dtype == torch_dtype, k
        assert torch.equal(got[k], src[k].to(torch_dtype)), k
    assert manifest(out)["dtype"] == name
    # a smaller bundle that compresses: the bf16 / f16 weights load into float32 gates
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    r = run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method", f"gate:{out}",
                "--budget-tokens", 8, "--out", tmp_path / "kept.json")
    assert r.returncode == 0, r.stderr
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert all(len(h) == 8 for layer in kept["layers"] for h in layer)


def test_inspect_bundle(trained):
    r = run_kvd("inspect-bundle", trained / "bundle", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    src = load_np(str(trained / "bundle" / "gates.safetensors"))
    assert s["manifest"] == manifest(trained / "bundle")
    assert {t["name"]: tuple(t["shape"]) for t in s["tensors"]} == {k: v.shape for k, v in src.items()}
    assert s["tensor_bytes"] == sum(v.nbytes for v in src.values())
    r = run_kvd("inspect-bundle", trained / "bundle")
    assert r.returncode == 0, r.stderr
    assert "kind: retention_gate" in r.stdout and "dtype: F32" in r.stdout and f"tensors: {len(src)}," in r.stdout


def test_bad_bundles_and_arguments(trained, tiny_model, tmp_path):
    def broken(name, edit):
        return broken_bundle(trained / "bundle", tmp_path / name, edit)

    assert_clean_error(run_kvd("inspect-bundle", broken("truncated", truncate_tensors)), "gates.safetensors")
    assert_clean_error(run_kvd("inspect-bundle", broken("json", lambda d: (d / "kvdistill.json").write_text("{\"kind"))),
                       "kvdistill.json", "export it again")
    assert_clean_error(run_kvd("inspect-bundle", broken("v2", set_manifest_field("format_version", 2))),
                       "format_version 2", "reads 1")
    # the manifest says bf16, the file holds f32
    assert_clean_error(run_kvd("inspect-bundle", broken("dtype", set_manifest_field("dtype", "BF16"))), "F32", "BF16")
    # a bundle for another model (one more layer)
    other = copy_model(tiny_model, tmp_path / "other_model")
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_kvd("export", "--bundle", trained / "bundle", "--model", other, "--out", tmp_path / "x"),
                       "trained for model")
    # arguments
    assert_clean_error(run_kvd("export", "--run", trained, "--out", tmp_path / "y", "--dtype", "int8"), "f32, bf16 or f16")
    assert_clean_error(run_kvd("export", "--run", trained, "--step", 3, "--out", tmp_path / "y"), "no checkpoint at step 3")
    assert_clean_error(run_kvd("export", "--run", trained, "--out", trained / "bundle"), "source bundle itself")
    assert_clean_error(run_kvd("export", "--bundle", trained / "bundle", "--out", tmp_path / "y"), "--model")
    assert not (tmp_path / "y").exists() and not (tmp_path / "x").exists()
