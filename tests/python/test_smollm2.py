"""Integration on the real trained model: SmolLM2-135M-Instruct converted from its GGUF by the
bootstrap (`kvdistill convert`). The references are transformers (logits of the converted directory)
and plain facts (Paris; a plausible perplexity)."""
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_DIR, run_kvd

ROOT = Path(__file__).resolve().parents[2]
PROSE = ROOT / "data/samples/prose.txt"


def test_generate_capital_of_france():
    proc = run_kvd("generate", "--model", MODEL_DIR, "--chat", "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout


def test_perplexity_is_plausible():
    proc = run_kvd("perplexity", "--model", MODEL_DIR, "--text", PROSE, "--ctx", "512")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"perplexity: ([0-9.]+)", last)
    assert m, last
    ppl = float(m.group(1))
    # A 135M instruct model on plain English prose: roughly 8-25. A wrong RoPE permutation gives hundreds.
    assert 3.0 < ppl < 40.0, ppl


def test_forward_matches_transformers(tmp_path):
    import torch
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).encode(PROSE.read_text()[:600]).ids
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, ids)))
    out = tmp_path / "logits.safetensors"
    proc = run_kvd("forward", "--model", MODEL_DIR, "--input-ids", f, "--out", out)
    assert proc.returncode == 0, proc.stderr
    ours = load_file(str(out))["logits"]
    assert ours.dtype == np.float32 and ours.shape == (len(ids), 49152)

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    diff = np.abs(ours - ref).max()
    # 30 layers in fp32 with different summation orders: observed ~1e-4; logits span ~[-20, 30].
    assert diff < 2e-3, diff
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_generate_on_cuda_bf16():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    proc = run_kvd("generate", "--model", MODEL_DIR, "--chat", "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "24", "--device", "cuda")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
