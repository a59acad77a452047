"""Golden safetensors files written by the reference implementation (the `safetensors` package), for
tests/models/test_safetensors.cpp.

Writes under --out:
  basic.safetensors        every dtype, odd shapes (scalar, zero-size dims), names that need JSON escaping,
                           one metadata key (so the reference's header bytes are deterministic)
  empty.safetensors        no tensors, no metadata
  meta.safetensors         several metadata keys (the reference orders them randomly: compare parsed)
  expected.json            for each file: metadata and tensors in the order they were given to the writer
                           (name, dtype, shape, raw bytes as hex, and decoded values for the numeric dtypes)
  sharded/                 an HF-layout checkpoint (3 shards + model.safetensors.index.json), by hand
  sharded_hf/              a tiny LlamaForCausalLM saved by transformers with max_shard_size
  corrupt/*.safetensors    invalid files; corrupt.json maps each to the problem the reader must name
  bad_ckpt/*/              invalid checkpoint directories; listed in corrupt.json too
"""
import argparse
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, deserialize, serialize
from safetensors.numpy import load, save, save_file


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def raw_serialize(tensors, metadata):
    """Reference serialization from raw bytes: tensors is a list of (name, dtype string, shape, bytes)."""
    keep = []
    specs = {}
    for name, dtype, shape, data in tensors:
        buf = np.frombuffer(data, np.uint8).copy() if data else np.zeros(1, np.uint8)
        keep.append(buf)
        specs[name] = TensorSpec(dtype=dtype, shape=list(shape), data_ptr=buf.ctypes.data, data_len=len(data))
    return bytes(serialize(specs, metadata))


ST_DTYPE = {  # safetensors python dtype name -> header dtype
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64",
}


def basic_tensors():
    """(name, python dtype, shape, bytes, decoded values or None), in a deliberately unsorted order."""
    rng = np.random.default_rng(1234)
    out = []

    def add(name, arr, dtype=None, values=None):
        arr = np.array(arr, order="C")  # (np.ascontiguousarray would turn scalars into shape [1])
        dtype = dtype or arr.dtype.name
        if values is None and dtype not in ("float8_e5m2", "float8_e4m3fn", "bfloat16"):
            values = arr.reshape(-1).tolist()
        out.append((name, dtype, list(arr.shape), arr.astype(arr.dtype.newbyteorder("<")).tobytes(), values))

    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    add("model.layers.0.weight", f32)
    bf = rng.standard_normal((4, 3)).astype(np.float32)
    bits = bf16_bits(bf)
    add("model.bf16", bits, "bfloat16",
        values=(bits.astype(np.uint32) << 16).view(np.float32).reshape(-1).astype(float).tolist())
    add("f16.vec", (rng.standard_normal(7) * 100).astype(np.float16))
    add("i64.ids", np.array([[[0, -1], [2**62, -(2**63)]], [[2**63 - 1, 7], [-7, 123456789]]], np.int64))
    add("u8.bytes", np.arange(250, 263, dtype=np.int64).astype(np.uint8))
    add("bool.mask", np.array([True, False, True, True, False]))
    add("scalar.f64", np.array(np.pi, np.float64))
    add("scalar.i32", np.array(-42, np.int32))
    add("empty.rows", np.zeros((0, 4), np.float32))
    add("empty.mid", np.zeros((3, 0, 2), np.int32))
    add("i8", np.array([-128, -1, 0, 1, 127], np.int8))
    add("i16", np.array([[-32768, 32767], [5, -5]], np.int16))
    add("u16", np.array([0, 65535, 258], np.uint16))
    add("u32", np.array([4294967295, 1], np.uint32))
    add("u64", np.array([2**64 - 1, 0, 2**40], np.uint64))
    add("f8.e4m3", np.array([0x00, 0x38, 0xB8, 0x7E], np.uint8), "float8_e4m3fn")
    add("f8.e5m2", np.array([0x00, 0x3C, 0xBC], np.uint8), "float8_e5m2")
    # Ties within one dtype sort by name, bytewise: "B" < "a" < "a.z" < "b".
    add("b", np.array([1.5], np.float32))
    add("a.z", np.array([2.5], np.float32))
    add("B", np.array([3.5], np.float32))
    add("a", np.array([4.5, 5.5], np.float32))
    # A name that needs JSON escaping (quote, backslash, control characters) and non-ASCII.
    add('odd "name"\\\t\x01 é', np.array([9.25], np.float32))
    return out


def describe(tensors, metadata):
    return {
        "metadata": metadata or {},
        "tensors": [{"name": n, "dtype": ST_DTYPE[d], "shape": s, "hex": b.hex(), "values": v}
                    for n, d, s, b, v in tensors],
    }


def write_raw(path, header_bytes, buffer):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + buffer)


def header_json(entries, meta=None):
    h = {}
    if meta is not None:
        h["__metadata__"] = meta
    h.update(entries)
    return json.dumps(h).encode()


def reference_rejects(path):
    try:
        deserialize(Path(path).read_bytes())
    except Exception:
        return True
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir")  # unused
    ap.add_argument("--gguf")       # unused
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    expected = {}

    # --- reference files ---------------------------------------------------------------------------
    basic = basic_tensors()
    meta1 = {"format": "pt"}
    (out / "basic.safetensors").write_bytes(raw_serialize([(n, d, s, b) for n, d, s, b, _ in basic], meta1))
    expected["basic.safetensors"] = describe(basic, meta1)

    (out / "empty.safetensors").write_bytes(raw_serialize([], None))
    expected["empty.safetensors"] = describe([], None)

    small = [t for t in basic if t[0] in ("u8.bytes", "scalar.f64", "model.bf16")]
    meta3 = {"format": "pt", "note": 'kvd "quoted"\nline é', "z": "", "a key": "1"}
    (out / "meta.safetensors").write_bytes(raw_serialize([(n, d, s, b) for n, d, s, b, _ in small], meta3))
    expected["meta.safetensors"] = describe(small, meta3)

    # The reference reader agrees with what we describe (sanity of the oracle itself).
    got = dict(deserialize((out / "basic.safetensors").read_bytes()))
    for n, d, s, b, _ in basic:
        assert got[n]["dtype"] == ST_DTYPE[d] and got[n]["shape"] == s and bytes(got[n]["data"]) == b, n

    # --- sharded checkpoint by hand (HF layout) ---------------------------------------------------------
    rng = np.random.default_rng(7)
    shard_tensors = [
        ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
        ["model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"],
        ["model.norm.weight", "lm_head.weight"],
    ]
    sharded = out / "sharded"
    sharded.mkdir()
    weight_map, ck = {}, {}
    total = 0
    for k, names in enumerate(shard_tensors):
        fname = f"model-{k + 1:05d}-of-{len(shard_tensors):05d}.safetensors"
        tensors = {}
        for i, n in enumerate(names):
            a = rng.standard_normal((k + 2, i + 3)).astype(np.float16 if k == 1 else np.float32)
            tensors[n] = a
            weight_map[n] = fname
            ck[n] = {"dtype": "F16" if k == 1 else "F32", "shape": list(a.shape), "hex": a.tobytes().hex(),
                     "file": fname}
            total += a.nbytes
        save_file(tensors, str(sharded / fname), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    expected["sharded"] = {"tensors": ck}

    # --- a tiny model saved by transformers, sharded --------------------------------------------------
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    hf_dir = out / "sharded_hf"
    LlamaForCausalLM(cfg).save_pretrained(hf_dir, max_shard_size="20KB")
    hf = {}
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():
        arr = load((hf_dir / fname).read_bytes())[name]
        hf[name] = {"dtype": ST_DTYPE[arr.dtype.name], "shape": list(arr.shape),
                    "sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "file": fname}
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    expected["sharded_hf"] = {"tensors": hf}

    (out / "expected.json").write_text(json.dumps(expected, indent=1))

    # --- corrupt files -----------------------------------------------------------------------------------
    cdir = out / "corrupt"
    cdir.mkdir()
    good = (out / "basic.safetensors").read_bytes()
    n_good = struct.unpack("<Q", good[:8])[0]
    u8 = lambda name, off, shape=None: {name: {"dtype": "U8", "shape": shape or [off[1] - off[0]], "data_offsets": off}}
    corrupt = {}  # file -> substring the error must contain (besides the path)

    def bad(name, data, needle, reference_agrees=True):
        p = cdir / name
        p.write_bytes(data)
        if reference_agrees:
            assert reference_rejects(p), f"reference accepts {name}"
        corrupt[f"corrupt/{name}"] = needle

    bad("truncated.safetensors", good[:-5], "truncated")
    bad("too_short.safetensors", b"\x10\x00\x00", "truncated")
    bad("header_past_eof.safetensors", struct.pack("<Q", len(good) + 100) + good[8:], "truncated: header says")
    bad("header_huge.safetensors", struct.pack("<Q", 10**12) + good[8:], "exceeds")
    h = b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2' + b" " * 6
    bad("header_not_json.safetensors", struct.pack("<Q", len(h)) + h + b"xx", "not valid JSON")
    h = b'[1, 2]  '
    bad("header_not_object.safetensors", struct.pack("<Q", len(h)) + h, "start with '{'")
    h = b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}} \xff\xfe'
    bad("header_bad_utf8.safetensors", struct.pack("<Q", len(h)) + h + b"xx", "not valid JSON")

    def st(name, entries, buffer, needle, meta=None, reference_agrees=True):
        hb = header_json(entries, meta)
        p = cdir / name
        write_raw(p, hb, buffer)
        if reference_agrees:
            assert reference_rejects(p), f"reference accepts {name}"
        corrupt[f"corrupt/{name}"] = needle

    st("overlap.safetensors", {**u8("a", [0, 4]), **u8("b", [2, 6])}, b"x" * 6,
       "overlapping data_offsets for 'b' and 'a'")
    st("hole.safetensors", {**u8("a", [0, 2]), **u8("b", [3, 5])}, b"x" * 5, "hole in data_offsets")
    st("trailing_bytes.safetensors", u8("a", [0, 2]), b"x" * 4, "trailing bytes")
    st("buffer_short.safetensors", {**u8("a", [0, 2]), **u8("b", [2, 8])}, b"x" * 5, "truncated")
    st("length_mismatch.safetensors", {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
       b"x" * 12, "length mismatch")
    st("unknown_dtype.safetensors", {"a": {"dtype": "Q4_0", "shape": [2], "data_offsets": [0, 2]}}, b"xx",
       "unknown dtype 'Q4_0'")
    st("end_before_begin.safetensors", {**u8("a", [0, 2]), "b": {"dtype": "U8", "shape": [0], "data_offsets": [2, 1]}},
       b"xx", "end before they begin")
    st("shape_overflow.safetensors",
       {"a": {"dtype": "F32", "shape": [2**32, 2**32, 16], "data_offsets": [0, 0]}}, b"", "too large")
    st("shape_negative.safetensors", {"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}, b"xx",
       "shape entries must be non-negative integers")
    st("offsets_float.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2.0]}}, b"xx",
       "data_offsets must be non-negative integers")
    st("offsets_three.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2, 2]}}, b"xx",
       "'data_offsets' must be [begin, end]")
    st("offset_huge.safetensors", {**u8("a", [0, 2]), "b": {"dtype": "U8", "shape": [2],
                                                          "data_offsets": [2**64 - 1, 2**64 + 1]}},
       b"xx", "data_offsets must be non-negative integers")
    st("missing_dtype.safetensors", {"a": {"shape": [2], "data_offsets": [0, 2]}}, b"xx", "missing 'dtype'")
    st("dtype_not_string.safetensors", {"a": {"dtype": 3, "shape": [2], "data_offsets": [0, 2]}}, b"xx",
       "'dtype' must be a string")
    st("entry_not_object.safetensors", {"a": [0, 2]}, b"xx", "entry must be an object")
    st("metadata_not_string.safetensors", u8("a", [0, 2]), b"xx", "'__metadata__' value of 'n' must be a string",
       meta={"n": 1})
    # Duplicate names: JSON text written by hand (a dict cannot hold them). The reference keeps the last
    # silently and only notices here because the first entry's bytes become a hole.
    h = (b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, '
         b'"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}')
    bad("duplicate_name.safetensors", struct.pack("<Q", len(h)) + h + b"xxxx", "duplicate name 'a'")
    h = b'{"a": {"dtype": "U8", "dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}'
    bad("duplicate_field.safetensors", struct.pack("<Q", len(h)) + h + b"xx", "duplicate key 'dtype' in 'a'")
    h = b'{"__metadata__": {"x": ' + b'[' * 200 + b']' * 200 + b'}}'
    bad("deep_nesting.safetensors", struct.pack("<Q", len(h)) + h, "nests deeper")

    # --- corrupt checkpoint directories ---------------------------------------------------------------
    bdir = out / "bad_ckpt"

    def copy_sharded(name):
        d = bdir / name
        shutil.copytree(sharded, d)
        return d

    d = copy_sharded("missing_shard")
    (d / "model-00002-of-00003.safetensors").unlink()
    corrupt["bad_ckpt/missing_shard"] = "model-00002-of-00003.safetensors"

    d = copy_sharded("tensor_missing_from_shard")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.1.self_attn.q_proj.weight"] = "model-00003-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    corrupt["bad_ckpt/tensor_missing_from_shard"] = "'model.layers.1.self_attn.q_proj.weight' is listed"

    d = copy_sharded("tensor_in_two_shards")
    f3 = d / "model-00003-of-00003.safetensors"
    t3 = load(f3.read_bytes())
    t3["model.embed_tokens.weight"] = np.zeros((2, 3), np.float32)
    f3.write_bytes(save(t3, metadata={"format": "pt"}))
    corrupt["bad_ckpt/tensor_in_two_shards"] = "'model.embed_tokens.weight' is in two shards"

    d = copy_sharded("broken_index")
    text = (d / "model.safetensors.index.json").read_text()
    (d / "model.safetensors.index.json").write_text(text[: len(text) // 2])
    corrupt["bad_ckpt/broken_index"] = "not valid JSON"

    d = copy_sharded("index_no_weight_map")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    corrupt["bad_ckpt/index_no_weight_map"] = "missing 'weight_map'"

    d = copy_sharded("index_escapes_dir")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "../model-00003-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    corrupt["bad_ckpt/index_escapes_dir"] = "not a file in"

    d = bdir / "no_weights"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    corrupt["bad_ckpt/no_weights"] = "no model.safetensors or model.safetensors.index.json; run `kvdistill convert` first"

    d = bdir / "corrupt_single"
    d.mkdir()
    (d / "model.safetensors").write_bytes(good[: 8 + n_good + 3])
    corrupt["bad_ckpt/corrupt_single"] = "truncated"

    (out / "corrupt.json").write_text(json.dumps(corrupt, indent=1, ensure_ascii=False))
    print(f"wrote {len(expected)} reference sets and {len(corrupt)} corrupt variants to {out}")


if __name__ == "__main__":
    main()
