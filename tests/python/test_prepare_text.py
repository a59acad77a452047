"""`kvdistill prepare text` and `prepare inspect`, checked independently of the C++ reader: the file is read
with h5py, its schema (attributes, dtypes, chunking, compression, CSR structure) is checked against
data/packed_text.h, and every document is re-tokenized with HF tokenizers (chat lines rendered with
transformers' apply_chat_template) and its train/val assignment recomputed from the documented rule.
Bad input cases each give one line on stderr, exit != 0 and no output file."""
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MODEL_DIR, assert_clean_error, run_kvd

ROOT = Path(__file__).resolve().parents[2]
PROSE = ROOT / "data/samples/prose.txt"
MASK = (1 << 64) - 1


# ---- the split rule of data/packed_text.h (split_of) and data/random.h, reimplemented ----------------
def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def hash_bytes(seed, data):
    h = mix64(seed) ^ 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return mix64(h ^ len(data))


def is_val(seed, text, val_fraction):
    return val_fraction > 0 and (hash_bytes(seed, text.encode()) >> 11) * 2.0**-53 < val_fraction


# ---- fixtures ----------------------------------------------------------------------------------------
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


@pytest.fixture()
def corpus(tmp_path):
    """A small corpus over every input kind, and the documents in the order prepare reads them."""
    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    prose = PROSE.read_text()
    paras = [p for p in prose.split("\n\n") if p.strip()]
    docs = []
    (d / "a/01_prose.txt").write_text(prose)
    docs.append(("text", prose))
    for i, p in enumerate(paras[:12]):
        name = f"a/{10 + i:02d}_para." + ("md" if i % 2 else "rst")
        (d / name).write_text(p + "\n")
        docs.append(("text", p + "\n"))
    lines = []
    for i in range(30):
        t = f"Record {i}: " + " ".join(paras[i % len(paras)].split()[: 5 + 3 * i])
        lines.append(json.dumps({"text": t}))
        docs.append(("text", t))
    for c in CHATS:
        lines.append(json.dumps({"messages": c}))
        docs.append(("chat", c))
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    (d / "ignored.py").write_text("print('not ingested')\n")
    return d, docs


def hf_tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


def render_chat(messages):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def prepare(inp, out, *extra):
    return run_kvd("prepare", "text", "--model", MODEL_DIR, "--input", inp, "--out", out, "--progress", "never",
                   *extra)


def no_leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if ".tmp." in p.name]


# ---- schema and content ------------------------------------------------------------------------------
def test_schema_and_tokens_checked_with_h5py(corpus, tmp_path):
    inp, docs = corpus
    out = tmp_path / "out.h5"
    seq_len, seed, val_fraction = 96, 5, 0.3
    proc = prepare(inp, out, "--seq-len", seq_len, "--seed", seed, "--val-fraction", val_fraction)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --progress never

    sha = hashlib.sha256((MODEL_DIR / "tokenizer.json").read_bytes()).hexdigest()
    with h5py.File(out, "r") as f:
        a = f.attrs
        assert a["kvdistill_format"] == "packed_text" and isinstance(a["kvdistill_format"], str)
        assert a["format_version"] == 1 and a["format_version"].dtype.kind == "i"
        assert a["tokenizer_sha256"] == sha
        assert a["model_id"] == MODEL_DIR.name
        assert a["seq_len"] == seq_len
        assert a["seed"] == seed
        assert a["val_fraction"] == pytest.approx(val_fraction)
        assert a["num_documents"] == len(docs)
        assert a["source_bytes"] == sum(p.stat().st_size for p in inp.rglob("*") if p.suffix != ".py" and p.is_file())
        sep = int(a["separator_id"])
        assert sep == hf_tokenizer().token_to_id("<|endoftext|>")
        assert set(f.keys()) == {"train", "val"}

        per_doc, split_of_doc = {}, {}
        for split in ("train", "val"):
            g = f[split]
            assert set(g.keys()) == {"tokens", "seq_offsets", "seg_offsets", "seg_starts", "seg_docs"}
            for name, dt in [("tokens", np.int32), ("seq_offsets", np.int64), ("seg_offsets", np.int64),
                             ("seg_starts", np.int32), ("seg_docs", np.int64)]:
                ds = g[name]
                assert ds.dtype == dt, (split, name, ds.dtype)
                assert ds.ndim == 1 and ds.maxshape == (None,), (split, name)
                assert ds.chunks is not None and ds.compression == "gzip", (split, name)
            tokens, seq_off = g["tokens"][:], g["seq_offsets"][:]
            seg_off, seg_starts, seg_docs = g["seg_offsets"][:], g["seg_starts"][:], g["seg_docs"][:]
            n = len(seq_off) - 1
            assert g.attrs["num_sequences"] == n and g.attrs["num_tokens"] == len(tokens)
            assert seq_off[0] == 0 and seq_off[-1] == len(tokens) and np.all(np.diff(seq_off) > 0)
            lengths = np.diff(seq_off)
            assert np.all(lengths[:-1] == seq_len) and 0 < lengths[-1] <= seq_len
            assert len(seg_off) == n + 1 and seg_off[0] == 0 and seg_off[-1] == len(seg_starts) == len(seg_docs)
            for i in range(n):
                starts = seg_starts[seg_off[i]:seg_off[i + 1]]
                assert starts[0] == 0 and np.all(np.diff(starts) > 0) and starts[-1] < lengths[i]
                bounds = list(starts) + [lengths[i]]
                for k, doc in enumerate(seg_docs[seg_off[i]:seg_off[i + 1]]):
                    per_doc.setdefault(int(doc), []).extend(tokens[seq_off[i] + bounds[k]: seq_off[i] + bounds[k + 1]])
                    split_of_doc[int(doc)] = split
            assert g.attrs["num_documents"] == sum(1 for s in split_of_doc.values() if s == split)

    tok = hf_tokenizer()
    assert sorted(per_doc) == list(range(len(docs)))
    n_val = 0
    for i, (kind, d) in enumerate(docs):
        text = d if kind == "text" else render_chat(d)
        want = tok.encode(text, add_special_tokens=True).ids + [sep]
        assert per_doc[i] == want, f"document {i} ({kind}) differs from HF tokenizers"
        assert split_of_doc[i] == ("val" if is_val(seed, text, val_fraction) else "train"), f"document {i}"
        n_val += split_of_doc[i] == "val"
    assert 0 < n_val < len(docs)


def test_same_input_gives_identical_files_whatever_the_threads(corpus, tmp_path):
    inp, _ = corpus
    outs = []
    for threads in (1, 2, 4):
        out = tmp_path / f"t{threads}.h5"
        proc = prepare(inp, out, "--seq-len", 64, "--threads", threads)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_inspect_prints_a_summary(corpus, tmp_path):
    inp, docs = corpus
    out = tmp_path / "out.h5"
    assert prepare(inp, out, "--seq-len", 128).returncode == 0
    proc = run_kvd("prepare", "inspect", out, "--model", MODEL_DIR)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["kvdistill_format"] == "packed_text" and s["tokenizer_checked"] is True
    assert s["num_documents"] == len(docs) and s["seq_len"] == 128
    with h5py.File(out, "r") as f:
        assert s["train"]["num_tokens"] == f["train/tokens"].shape[0]
        assert s["val"]["num_sequences"] == f["val/seq_offsets"].shape[0] - 1


# ---- bad input -----------------------------------------------------------------------------------------
def test_missing_input_file(tmp_path):
    out = tmp_path / "out.h5"
    line = assert_clean_error(prepare(tmp_path / "nope.txt", out), "nope.txt", "no such file")
    assert not out.exists() and not no_leftovers(tmp_path), line


def test_malformed_jsonl_names_the_line_and_leaves_no_output(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.txt").write_text("Some good text.\n")
    (d / "data.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    out = tmp_path / "out.h5"
    assert_clean_error(prepare(d, out), "data.jsonl:4:", "malformed JSON")
    assert not out.exists() and not no_leftovers(tmp_path)
    # A previous valid file stays untouched.
    (d / "data.jsonl").write_text('{"text": "one"}\n')
    assert prepare(d, out).returncode == 0
    before = out.read_bytes()
    (d / "data.jsonl").write_text('{"text": "one"}\n{"txt": "x"}\n')
    assert_clean_error(prepare(d, out), "data.jsonl:2:", '"text"')
    assert out.read_bytes() == before and not no_leftovers(tmp_path)


def test_invalid_utf8_is_reported_with_its_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    out = tmp_path / "out.h5"
    assert_clean_error(prepare(bad, out), "latin1.txt", "invalid UTF-8 at byte 3")
    assert not out.exists()
    proc = prepare(bad, out, "--invalid-utf8", "replace")
    assert proc.returncode == 0, proc.stderr


@pytest.fixture()
def good_file(corpus, tmp_path):
    inp, _ = corpus
    out = tmp_path / "good.h5"
    assert prepare(inp, out, "--seq-len", 64).returncode == 0
    return out


def inspect(path, *extra):
    return run_kvd("prepare", "inspect", path, *extra)


def test_missing_dataset_file(tmp_path):
    assert_clean_error(inspect(tmp_path / "missing.h5"), "missing.h5", "no such file")


def test_wrong_format_version(good_file, tmp_path):
    bad = tmp_path / "v3.h5"
    shutil.copy(good_file, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["format_version"] = 3
    assert_clean_error(inspect(bad), "v3.h5: format_version 3, this kvdistill reads 1")


def test_wrong_format_kind(good_file, tmp_path):
    bad = tmp_path / "kind.h5"
    shutil.copy(good_file, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["kvdistill_format"] = "responses"
    assert_clean_error(inspect(bad), "kind.h5", "kvdistill_format 'responses', expected 'packed_text'")


def test_tokenizer_sha_mismatch(good_file, tmp_path):
    other = tmp_path / "other_model"
    other.mkdir()
    tj = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(tj, indent=1))  # same tokenizer, other bytes
    line = assert_clean_error(inspect(good_file, "--model", other), "good.h5: tokenizer_sha256",
                              f"does not match {other}/tokenizer.json",
                              "re-run `kvdistill prepare text` with this model")
    assert "SmolLM2-135M-Instruct" in line
    assert inspect(good_file, "--model", MODEL_DIR).returncode == 0


def test_truncated_hdf5(good_file, tmp_path):
    bad = tmp_path / "cut.h5"
    data = good_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert_clean_error(inspect(bad), "cut.h5", "truncated")


def test_not_hdf5(tmp_path):
    bad = tmp_path / "text.h5"
    bad.write_text("hello\n")
    assert_clean_error(inspect(bad), "text.h5", "not an HDF5 file")


def test_missing_attribute_and_dataset(good_file, tmp_path):
    bad = tmp_path / "noattr.h5"
    shutil.copy(good_file, bad)
    with h5py.File(bad, "r+") as f:
        del f.attrs["tokenizer_sha256"]
    assert_clean_error(inspect(bad), "noattr.h5", "tokenizer_sha256 is missing")
    bad2 = tmp_path / "nods.h5"
    shutil.copy(good_file, bad2)
    with h5py.File(bad2, "r+") as f:
        del f["val/seg_docs"]
    assert_clean_error(inspect(bad2), "nods.h5", "/val/seg_docs is missing")


def test_output_directory_missing_is_created(corpus, tmp_path):
    inp, _ = corpus
    out = tmp_path / "no/such/dir/out.h5"
    proc = prepare(inp, out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and not list(out.parent.glob("*.tmp.*"))
