"""Bad input through the CLI: each case exits non-zero (not by a signal) with exactly one line on
stderr that names the offending file and the problem, and never crashes."""
import json
import struct

import pytest

from conftest import GGUF, assert_clean_error, copy_model, run_kvd


def test_good_tiny_model_runs(tiny_model, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5")
    proc = run_kvd("forward", "--model", tiny_model, "--input-ids", ids, "--out", tmp_path / "l.safetensors")
    assert proc.returncode == 0, proc.stderr


def write_safetensors_raw(path, header, buffer):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + buffer)


@pytest.mark.parametrize("case", ["truncated", "garbage_header", "overlap", "length_past_eof"])
def test_bad_safetensors(tiny_model, tmp_path, case):
    d = copy_model(tiny_model, tmp_path / "m")
    st = d / "model.safetensors"
    data = st.read_bytes()
    if case == "truncated":
        st.write_bytes(data[: len(data) // 2])
        needle = "truncat"
    elif case == "garbage_header":
        n = struct.unpack("<Q", data[:8])[0]
        st.write_bytes(data[:8] + b"{\"x\": [1,2" + b" " * (n - 10) + data[8 + n:])
        needle = "model.safetensors"
    elif case == "overlap":
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        names = [k for k in header if k != "__metadata__"]
        a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
        # b starts inside a: same length, shifted back by 4 bytes.
        b0, b1 = header[b]["data_offsets"]
        header[b]["data_offsets"] = [b0 - 4, b1 - 4]
        write_safetensors_raw(st, header, data[8 + n:])
        needle = "overlap"
    else:
        st.write_bytes(struct.pack("<Q", 10**12) + data[8:])
        needle = "model.safetensors"
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    proc = run_kvd("forward", "--model", d, "--input-ids", ids, "--out", tmp_path / "l.safetensors")
    line = assert_clean_error(proc, "model.safetensors")
    assert needle.lower() in line.lower()
    assert not (tmp_path / "l.safetensors").exists()


def test_missing_shard(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    d = tmp_path / "sharded"
    LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    proc = run_kvd("forward", "--model", d, "--input-ids", ids, "--out", tmp_path / "l.safetensors")
    assert_clean_error(proc, shards[1].name)


@pytest.mark.parametrize("case", ["truncated", "unknown_arch", "missing_field"])
def test_bad_config(tiny_model, tmp_path, case):
    d = copy_model(tiny_model, tmp_path / "m")
    cfg_path = d / "config.json"
    text = cfg_path.read_text()
    cfg = json.loads(text)
    if case == "truncated":
        cfg_path.write_text(text[: len(text) // 2])
        needle = "config.json"
    elif case == "unknown_arch":
        cfg["architectures"] = ["GPTNeoXForCausalLM"]
        cfg["model_type"] = "gpt_neox"
        cfg_path.write_text(json.dumps(cfg))
        needle = "GPTNeoX"
    else:
        del cfg["num_attention_heads"]
        cfg_path.write_text(json.dumps(cfg))
        needle = "num_attention_heads"
    proc = run_kvd("info", "--model", d)
    assert_clean_error(proc, "config.json", needle)


def test_bad_tokenizer(tiny_model, tmp_path):
    d = copy_model(tiny_model, tmp_path / "m")
    tok = d / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:5000])
    proc = run_kvd("generate", "--model", d, "--prompt", "hello", "--max-new-tokens", "2")
    assert_clean_error(proc, "tokenizer.json")


@pytest.mark.parametrize("case", ["truncated", "bad_magic", "version2"])
def test_bad_gguf(tmp_path, case):
    data = GGUF.read_bytes()[: 4 << 20]
    f = tmp_path / "bad.gguf"
    if case == "truncated":
        f.write_bytes(data)
    elif case == "bad_magic":
        f.write_bytes(b"GGML" + data[4:])
    else:
        f.write_bytes(data[:4] + struct.pack("<I", 2) + data[8:])
    out = tmp_path / "out"
    proc = run_kvd("convert", "--gguf", f, "--out", out)
    assert_clean_error(proc, "bad.gguf")
    assert not (out / "config.json").exists(), "a failed convert must not leave a model directory behind"


def test_missing_model_dir(tmp_path):
    proc = run_kvd("info", "--model", tmp_path / "nope")
    assert_clean_error(proc, "nope")


def test_usage_error():
    proc = run_kvd("generate", "--prompt", "x")
    assert proc.returncode == 2
    assert "--model" in proc.stderr
