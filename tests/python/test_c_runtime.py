"""libkvdistill_runtime.so (export/runtime/kvdistill.h) and the C example that uses it.

- Linked against the runtime only: neither the example nor the runtime needs LibTorch (ldd).
- On a TRIM-KV bundle of the tiny random Llama, the example scores each layer's prompt from transformers'
  attention inputs, and its kept sets equal `kvdistill compress --budget-tokens K` for the same bundle and prompt,
  in F32 and in a bf16 export, on the CPU and (where a GPU is present) through the kvd_cuda_ functions. The example also checks its own flat and paged compaction.
- Without a GPU the kvd_cuda_ functions return KVD_ERR_UNSUPPORTED.
- Through ctypes: another model's dims, a wrong dtype, NULL pointers and bad indices return their error codes
  with a message; a corrupt, truncated, newer-format or other-kind bundle fails to open with its code.
"""
import ctypes
import json
import subprocess
from pathlib import Path

import pytest

from conftest import KVD_BIN, run_kvd
from hf_helpers import PROMPT, attention_inputs
from train_helpers import broken_bundle, retention_run, set_manifest_field, truncate_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BUILD = Path(KVD_BIN).parent
EXAMPLE = BUILD / "kvd_example"
RUNTIME = BUILD / "libkvdistill_runtime.so"
KEEP = 40
STATUS = {0: "KVD_OK", 1: "KVD_ERR_INVALID_ARGUMENT", 2: "KVD_ERR_IO", 3: "KVD_ERR_CORRUPT", 4: "KVD_ERR_VERSION",
          5: "KVD_ERR_UNSUPPORTED", 6: "KVD_ERR_MODEL_MISMATCH", 7: "KVD_ERR_DTYPE"}


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return retention_run(tiny_model, tmp_path_factory.mktemp("runtime_run"))


@pytest.fixture(scope="module")
def prompt_inputs(tiny_model, tmp_path_factory):
    """The prompt's file, its length and one .f32 file of attention inputs per layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tmp_path_factory.mktemp("runtime_prompt")
    (d / "prompt.txt").write_text(PROMPT)
    ids = AutoTokenizer.from_pretrained(tiny_model)(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    files = []
    for l, x in enumerate(attention_inputs(model, ids)):
        f = d / f"hidden{l}.f32"
        f.write_bytes(x.contiguous().numpy().astype("<f4").tobytes())
        files.append(f)
    return d / "prompt.txt", ids.shape[1], files


def test_linked_without_libtorch():
    for binary in (EXAMPLE, RUNTIME):
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
        assert "libtorch" not in out and "libc10" not in out, f"{binary.name} links LibTorch:\n{out}"
    assert "libkvdistill_runtime.so" in subprocess.run(["ldd", str(EXAMPLE)], capture_output=True, text=True).stdout


def cuda_available():
    return ctypes.CDLL(str(RUNTIME)).kvd_cuda_available() == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_example_keeps_what_compress_keeps(run, tiny_model, prompt_inputs, tmp_path, dtype, device):
    if device == "cuda" and not cuda_available():
        pytest.skip("no CUDA device, or a runtime built without CUDA")
    prompt, n, files = prompt_inputs
    bundle = run / "bundle"
    if dtype != "f32":
        bundle = tmp_path / "bundle-bf16"
        r = run_kvd("export", "--bundle", run / "bundle", "--model", tiny_model, "--out", bundle, "--dtype", dtype)
        assert r.returncode == 0, r.stderr
    r = run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method", f"gate:{bundle}",
                "--budget-tokens", KEEP, "--out", tmp_path / "kept.json")
    assert r.returncode == 0, r.stderr
    ours = json.loads((tmp_path / "kept.json").read_text())
    assert ours["tokens"] == n
    for l, f in enumerate(files):
        r = subprocess.run([str(EXAMPLE), str(bundle), str(l), str(f), str(n), str(KEEP), device],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "hold the kept rows in order" in r.stderr
        out = json.loads(r.stdout)
        assert out["device"] == device
        assert out["kept"] == ours["layers"][l], f"layer {l}: the C runtime ({device}) keeps other entries than compress"


def test_cuda_functions_without_a_device(lib):
    """Without a device (CI) every kvd_cuda_ function returns KVD_ERR_UNSUPPORTED with a message, never a crash."""
    if cuda_available():
        pytest.skip("a CUDA device is present: the example covers the device path")
    buf = (ctypes.c_float * 16)()
    idx = (ctypes.c_int32 * 4)()
    assert STATUS[lib.kvd_cuda_select_topk(buf, 1, 2, 8, 2, idx, None)] == "KVD_ERR_UNSUPPORTED"
    assert "CPU functions" in lib.kvd_last_error().decode()
    assert STATUS[lib.kvd_cuda_compact_flat(buf, 1, 2, 8, 4, idx, 2, None)] == "KVD_ERR_UNSUPPORTED"


class Info(ctypes.Structure):
    _fields_ = [("format_version", ctypes.c_int32), ("kind", ctypes.c_int), ("num_layers", ctypes.c_int32),
                ("num_kv_heads", ctypes.c_int32), ("hidden_size", ctypes.c_int32), ("gate_hidden", ctypes.c_int32),
                ("base_model_id", ctypes.c_char * 128), ("base_model_sha256", ctypes.c_char * 65)]


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(str(RUNTIME))
    lib.kvd_last_error.restype = ctypes.c_char_p
    lib.kvd_bundle_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.kvd_bundle_close.argtypes = [ctypes.c_void_p]
    lib.kvd_bundle_get_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
    lib.kvd_bundle_check_model.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    lib.kvd_score_log_beta.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                       ctypes.c_void_p]
    lib.kvd_select_topk.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.kvd_compact_flat.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int64]
    lib.kvd_cuda_select_topk.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.kvd_cuda_compact_flat.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return lib


def opened(lib, d):
    h = ctypes.c_void_p()
    s = lib.kvd_bundle_open(str(d).encode(), ctypes.byref(h))
    return s, h, lib.kvd_last_error().decode()


def test_c_api_errors(lib, run, tiny_model, tmp_path):
    s, h, _ = opened(lib, run / "bundle")
    assert s == 0
    info = Info()
    assert lib.kvd_bundle_get_info(h, ctypes.byref(info)) == 0
    cfg = json.loads((Path(tiny_model) / "config.json").read_text())
    assert (info.num_layers, info.hidden_size, info.num_kv_heads) == \
        (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"])
    assert lib.kvd_bundle_check_model(h, info.num_layers, info.hidden_size, info.num_kv_heads) == 0
    # another model
    assert STATUS[lib.kvd_bundle_check_model(h, info.num_layers + 1, info.hidden_size, info.num_kv_heads)] == \
        "KVD_ERR_MODEL_MISMATCH"
    assert "use the bundle trained for this model" in lib.kvd_last_error().decode()
    x = (ctypes.c_float * (4 * info.hidden_size))()
    out = (ctypes.c_float * (4 * info.num_kv_heads))()
    assert lib.kvd_score_log_beta(h, 0, x, 0, 4, out) == 0
    assert STATUS[lib.kvd_score_log_beta(h, 0, x, 9, 4, out)] == "KVD_ERR_DTYPE"
    assert "dtype 9" in lib.kvd_last_error().decode()
    assert STATUS[lib.kvd_score_log_beta(h, info.num_layers, x, 0, 4, out)] == "KVD_ERR_INVALID_ARGUMENT"
    assert STATUS[lib.kvd_score_log_beta(h, 0, None, 0, 4, out)] == "KVD_ERR_INVALID_ARGUMENT"
    scores = (ctypes.c_float * 8)(*range(8))
    idx = (ctypes.c_int32 * 4)()
    assert STATUS[lib.kvd_select_topk(scores, 2, 4, 5, idx)] == "KVD_ERR_INVALID_ARGUMENT"
    assert lib.kvd_select_topk(scores, 2, 4, 2, idx) == 0 and list(idx) == [2, 3, 2, 3]
    cache = (ctypes.c_float * 8)()
    bad = (ctypes.c_int32 * 4)(3, 1, 0, 1)  # not ascending
    assert STATUS[lib.kvd_compact_flat(cache, 2, 4, 4, bad, 2)] == "KVD_ERR_INVALID_ARGUMENT"
    assert "ascending" in lib.kvd_last_error().decode()
    lib.kvd_bundle_close(h)
    lib.kvd_bundle_close(None)

    def broken(name, edit):
        return broken_bundle(run / "bundle", tmp_path / name, edit)

    cases = [("truncated", truncate_tensors, "KVD_ERR_CORRUPT", "gates.safetensors"),
             ("json", lambda d: (d / "kvdistill.json").write_text("{"), "KVD_ERR_CORRUPT", "not valid JSON"),
             ("v2", set_manifest_field("format_version", 2), "KVD_ERR_VERSION", "format_version 2"),
             ("kind", set_manifest_field("kind", "attention_gate"), "KVD_ERR_UNSUPPORTED", "'attention_gate'"),
             ("dims", set_manifest_field("hidden_size", 64), "KVD_ERR_CORRUPT", "shape")]
    for name, edit, code, needle in cases:
        s, h, msg = opened(lib, broken(name, edit))
        assert STATUS[s] == code and needle in msg and not h.value, (name, STATUS.get(s), msg)
    s, h, msg = opened(lib, tmp_path / "missing")
    assert STATUS[s] == "KVD_ERR_IO" and "cannot be opened" in msg
