"""`kvdistill prepare prompts`, `prepare responses` and training from a responses file, checked independently of
the C++ reader: the .h5 is read with h5py against the layout documented in data/responses.h, prompt tokens are
compared with transformers' apply_chat_template, responses with transformers' own greedy generate(), the
train/val rule is reimplemented here, and the completion-only loss is checked through the trained token count.
Bad input gives one line on stderr, exit != 0 and no file at --out."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import KVD_BIN, MODEL_DIR, assert_clean_error, run_kvd
from train_helpers import train_env

ROOT = Path(__file__).resolve().parents[2]
PROSE = ROOT / "data/samples/prose.txt"
MASK = (1 << 64) - 1

PROMPTS = [
    {"prompt": "What is the capital of France?", "id": "q-france"},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]},
    {"prompt": "Name a primary color.", "id": 7},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "Again, louder."}]},
]


def write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def responses(prompts, out, *extra, model=MODEL_DIR, progress="never"):
    return run_kvd("prepare", "responses", "--model", model, "--prompts", prompts, "--out", out, "--device", "cpu",
                   "--progress", progress, *extra)


def leftovers(d):
    return sorted(p.name for p in Path(d).iterdir() if ".partial" in p.name or ".tmp." in p.name or ".rebuild" in p.name)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("responses")
    prompts = write_prompts(d / "prompts.jsonl")
    out = d / "r.h5"
    proc = responses(prompts, out, "--max-new-tokens", 8, "--batch", 3)
    assert proc.returncode == 0, proc.stderr
    return d, prompts, out


def hf_messages(p):
    return [{"role": "user", "content": p["prompt"]}] if "prompt" in p else p["messages"]


# ---- the file, read with h5py ------------------------------------------------------------------------------
def test_schema_prompts_and_greedy_responses_match_transformers(made):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, prompts, out = made
    sha = hashlib.sha256((MODEL_DIR / "tokenizer.json").read_bytes()).hexdigest()
    with h5py.File(out, "r") as f:
        a = f.attrs
        assert a["kvdistill_format"] == "responses" and a["format_version"] == 1
        assert a["tokenizer_sha256"] == sha and a["model_id"] == MODEL_DIR.name
        assert a["max_new_tokens"] == 8 and a["batch"] == 3 and a["sampling"] == "greedy"
        assert a["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
        assert a["chat_template"] == "chatml"
        assert a["num_prompts"] == 4 and a["num_done"] == 4
        want = {"prompt_tokens": np.int32, "prompt_offsets": np.int64, "response_tokens": np.int32,
                "response_offsets": np.int64, "stop_reason": np.int32, "prompt_lines": np.int64,
                "id_bytes": np.int32, "id_offsets": np.int64}
        assert set(f.keys()) == set(want)
        for name, dt in want.items():
            ds = f[name]
            assert ds.dtype == dt and ds.ndim == 1 and ds.maxshape == (None,), name
            assert ds.chunks is not None and ds.compression == "gzip", name
        po, ro, io = f["prompt_offsets"][:], f["response_offsets"][:], f["id_offsets"][:]
        pt, rt, ib = f["prompt_tokens"][:], f["response_tokens"][:], f["id_bytes"][:]
        for off, data in ((po, pt), (ro, rt), (io, ib)):
            assert len(off) == 5 and off[0] == 0 and off[-1] == len(data) and np.all(np.diff(off) >= 0)
        stop, lines = f["stop_reason"][:], f["prompt_lines"][:]
        ids = [bytes(ib[io[i]:io[i + 1]].astype(np.uint8)).decode() for i in range(4)]
    assert list(lines) == [1, 2, 3, 4]
    assert ids == ["q-france", "2", "7", "4"]  # "id" string as is, a number as its JSON text, else the line

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), torch_dtype=torch.float32)
    eos = {tok.convert_tokens_to_ids("<|im_end|>")} | set(np.atleast_1d(model.config.eos_token_id).tolist())
    for i, p in enumerate(PROMPTS):
        ids_hf = tok.apply_chat_template(hf_messages(p), add_generation_prompt=True, tokenize=True)
        if isinstance(ids_hf, dict) or hasattr(ids_hf, "input_ids"):
            ids_hf = ids_hf["input_ids"]
        assert list(pt[po[i]:po[i + 1]]) == list(ids_hf), f"prompt {i}"
        with torch.no_grad():
            g = model.generate(torch.tensor([ids_hf]), max_new_tokens=8, do_sample=False,
                               eos_token_id=sorted(eos), pad_token_id=0)
        new = g[0, len(ids_hf):].tolist()
        if new and new[-1] in eos:
            stopped = 0
        else:
            stopped = 1
            assert len(new) == 8
        assert list(rt[ro[i]:ro[i + 1]]) == new, f"response {i}"
        assert stop[i] == stopped, f"stop reason {i}"


def test_inspect_and_rerun_is_a_no_op(made):
    d, prompts, out = made
    proc = run_kvd("prepare", "inspect", out, "--model", MODEL_DIR)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["kvdistill_format"] == "responses" and s["num_done"] == 4 and s["tokenizer_checked"]
    with h5py.File(out, "r") as f:
        assert s["response_tokens"] == f["response_tokens"].shape[0]
    before = out.read_bytes()
    proc = responses(prompts, out, "--max-new-tokens", 8, "--batch", 3)
    assert proc.returncode == 0 and "already complete" in proc.stdout, proc.stderr
    assert out.read_bytes() == before


def test_interrupted_run_resumes_after_the_done_prompts(made, tmp_path):
    d, prompts, out = made
    # An interruption in the middle of the second batch: num_done says 3 (the first batch of --batch 3), and the
    # second batch's tokens were partly appended already.
    part = tmp_path / "r2.h5.partial"
    shutil.copy(out, part)
    with h5py.File(part, "r+") as f:
        f.attrs["num_done"] = 3
        for name in ("prompt_offsets", "response_offsets", "id_offsets"):
            f[name].resize((4,))  # offsets of the 4th sample not yet written...
        for name in ("stop_reason", "prompt_lines"):
            f[name].resize((3,))
        f["response_tokens"][f["response_tokens"].shape[0] - 1] = 12345  # ...and its tokens were garbage
    with h5py.File(part, "r") as f:
        assert f["response_tokens"].shape[0] > f["response_offsets"][3]  # trailing data beyond num_done
    out2 = tmp_path / "r2.h5"
    proc = responses(prompts, out2, "--max-new-tokens", 8, "--batch", 3, progress="lines")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "after 3 of 4 prompts" in proc.stderr
    assert "4 / 4 prompts" in proc.stderr and "tokens/s" in proc.stderr and "ETA" in proc.stderr
    assert "1 generated now" in proc.stdout
    assert not leftovers(tmp_path)
    with h5py.File(out, "r") as a, h5py.File(out2, "r") as b:
        for name in a.keys():
            assert np.array_equal(a[name][:], b[name][:]), name
        assert b.attrs["num_done"] == 4


def test_other_settings_refuse_to_resume(made, tmp_path):
    d, prompts, out = made
    part = tmp_path / "r3.h5.partial"
    shutil.copy(out, part)
    with h5py.File(part, "r+") as f:
        f.attrs["num_done"] = 3
    out3 = tmp_path / "r3.h5"
    line = assert_clean_error(responses(prompts, out3, "--max-new-tokens", 9, "--batch", 3), "r3.h5.partial",
                              "max_new_tokens 8, this run asks for 9", "use a new --out or pass --overwrite")
    assert not out3.exists(), line
    other = write_prompts(tmp_path / "other.jsonl", PROMPTS[:3] + [{"prompt": "Something else."}])
    assert_clean_error(responses(other, out3, "--max-new-tokens", 8, "--batch", 3), "prompts_sha256",
                       "use a new --out or pass --overwrite")
    # A finished file made otherwise is refused too, and --overwrite starts over.
    assert_clean_error(responses(prompts, out, "--max-new-tokens", 8, "--batch", 2), "batch 3, this run asks for 2")
    proc = responses(prompts, out3, "--max-new-tokens", 2, "--batch", 4, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out3, "r") as f:
        assert f.attrs["max_new_tokens"] == 2 and f.attrs["num_done"] == 4
        assert np.all(np.diff(f["response_offsets"][:]) <= 2)
    assert not leftovers(tmp_path)


# ---- bad input -------------------------------------------------------------------------------------------
def test_missing_prompts_file(tmp_path):
    out = tmp_path / "o.h5"
    assert_clean_error(responses(tmp_path / "nope.jsonl", out, "--max-new-tokens", 4), "nope.jsonl", "cannot open")
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("text, needles", [
    ('{"prompt": "ok"}\n\n{"prompt": "broken"\n', ["bad.jsonl:3:", "malformed JSON"]),
    ('{"prompt": "ok"}\n{"text": "not a prompt"}\n', ["bad.jsonl:2:", '"prompt"', '"messages"']),
    ('{"messages": [{"role": "user"}]}\n', ["bad.jsonl:1:", "messages[0]"]),
    ('{"prompt": 3}\n', ["bad.jsonl:1:", "must be a string"]),
    ("\n\n", ["bad.jsonl", "no prompts"]),
])
def test_bad_prompts_lines(tmp_path, text, needles):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    out = tmp_path / "o.h5"
    assert_clean_error(responses(bad, out, "--max-new-tokens", 4), *needles)
    assert not out.exists() and not leftovers(tmp_path)


def test_reading_checks_version_and_tokenizer(made, tmp_path):
    d, prompts, out = made
    bad = tmp_path / "v2.h5"
    shutil.copy(out, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["format_version"] = 2
    assert_clean_error(run_kvd("prepare", "inspect", bad), "v2.h5: format_version 2, this kvdistill reads 1")
    other = tmp_path / "other_model"
    other.mkdir()
    tj = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(tj, indent=1))  # same tokenizer, other bytes
    assert_clean_error(run_kvd("prepare", "inspect", out, "--model", other), "tokenizer_sha256",
                       "re-run `kvdistill prepare responses` with this model")


# ---- prepare prompts ---------------------------------------------------------------------------------------
def test_prompt_set_is_deterministic_by_seed(tmp_path):
    outs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.jsonl"
        proc = run_kvd("prepare", "prompts", "--input", PROSE, "--out", out, "--count", 6, "--seed", seed,
                       "--passage-tokens", 30)
        assert proc.returncode == 0, proc.stderr
        outs[name] = out.read_bytes()
    assert outs["a"] == outs["b"] and outs["a"] != outs["c"]
    prose_words = set(PROSE.read_text().split())
    lines = [json.loads(l) for l in outs["a"].decode().splitlines()]
    assert [l["id"] for l in lines] == [f"p{k}" for k in range(6)]
    for l in lines:
        instr, passage = l["prompt"].split("\n\n", 1)
        assert instr.endswith(":")
        words = passage.split()
        assert 15 <= len(words) <= 30 and set(words) <= prose_words
    # In model tokens: at most --passage-tokens of them.
    out = tmp_path / "tok.jsonl"
    proc = run_kvd("prepare", "prompts", "--input", PROSE, "--out", out, "--count", 4, "--passage-tokens", 25,
                   "--model", MODEL_DIR)
    assert proc.returncode == 0, proc.stderr
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    for l in out.read_text().splitlines():
        passage = json.loads(l)["prompt"].split("\n\n", 1)[1]
        assert 10 <= len(tok.encode(passage).ids) <= 25
    assert_clean_error(run_kvd("prepare", "prompts", "--input", PROSE, "--out", out, "--count", 100000),
                       "fewer than --count 100000")


# ---- training from a responses file -------------------------------------------------------------------------
def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def is_val(seed, prompt_ids, fraction):
    data = np.asarray(prompt_ids, dtype="<i4").tobytes()
    h = mix64(seed) ^ 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return ((mix64(h ^ len(data)) >> 11) * 2.0 ** -53) < fraction


def test_train_two_steps_on_responses_counts_only_response_tokens(made, tmp_path):
    d, prompts, out = made
    with h5py.File(out, "r") as f:
        po, ro, pt = f["prompt_offsets"][:], f["response_offsets"][:], f["prompt_tokens"][:]
    seed, fraction = 0, 0.3
    val = [is_val(seed, pt[po[i]:po[i + 1]], fraction) for i in range(4)]
    train_resp = [int(ro[i + 1] - ro[i]) for i in range(4) if not val[i]]
    lens = [int(po[i + 1] - po[i] + ro[i + 1] - ro[i]) for i in range(4) if not val[i]]
    assert all(l <= 128 for l in lens) and train_resp
    # Greedy packing in file order into sequences of 128 tokens.
    seqs, cur = [], 0
    for l in lens:
        if cur + l > 128:
            seqs.append(cur)
            cur = 0
        cur += l
    seqs.append(cur)
    cfg = tmp_path / "r.yaml"
    run_dir = tmp_path / "run"
    cfg.write_text("\n".join([
        f"model: {{dir: {MODEL_DIR}}}",
        f"data: {{train: {out}, seq_len: 128, val_fraction: {fraction}}}",
        "component: {kind: retention_gate, budget: 16, hidden: 16}",
        "loss: {kl: 1.0, ce: 0.1, capacity: 0.5, block: 64}",
        "train:", f"  out_dir: {run_dir}", "  device: cpu", "  steps: 2", f"  batch_size: {len(seqs)}",
        "  warmup: 1", "  save_every: 0", "  progress: lines", ""]))
    r = subprocess.run([KVD_BIN, "train", "--config", str(cfg)], capture_output=True, text=True, timeout=300,
                       env=train_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 2
    # Completion-only: the labelled positions are exactly the response tokens of the train samples.
    for s in steps:
        assert s["tokens"] == sum(train_resp), (s, train_resp)
        assert np.isfinite(s["loss"]) and s["kl"] > -1e-6  # KL >= 0 up to rounding
