"""Shared fixtures for the pytest suites that drive build/kvdistill."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

KVD_BIN = os.environ.get("KVD_BIN", str(Path(__file__).resolve().parents[2] / "build" / "kvdistill"))
MODEL_DIR = Path(os.environ.get("KVD_MODEL_DIR", Path(__file__).resolve().parents[2] / ".cache/models/SmolLM2-135M-Instruct"))
GGUF = Path(os.environ.get("KVD_GGUF", Path(__file__).resolve().parents[2] / ".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"))


def torch_threads():
    """Intra-op threads for the in-process references (transformers, kvpress): OMP_NUM_THREADS where the caller
    set it (scripts/test.sh sets 1, as ctest runs a test per core), else 2."""
    return int(os.environ.get("OMP_NUM_THREADS", "2"))


def run_kvd(*args, timeout=600, env=None):
    """Runs kvdistill (env: variables set on top of this process's); returns CompletedProcess with text output."""
    return subprocess.run([KVD_BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama made by transformers, with SmolLM2's tokenizer files (same vocab size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, d / name)
    return d


def assert_clean_error(proc, *needles):
    """A bad input's contract: exit > 0 (not a signal), exactly one stderr line, containing every needle."""
    assert proc.returncode > 0, f"expected a clean non-zero exit, got {proc.returncode}\n{proc.stderr}"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in: {lines[0]}"
    return lines[0]


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst
