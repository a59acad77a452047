"""The reference for bench_decoder: transformers on the same model directory, same sizes, same timing rules
(best of --repeat after one warm-up; CUDA synchronized; greedy decode with its KV cache)."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--prefill", type=int, default=4096)
p.add_argument("--decode", type=int, default=128)
p.add_argument("--repeat", type=int, default=3)
a = p.parse_args()

dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device).eval()
torch.manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, a.prefill)).to(a.device)


def sync():
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()


best_p = best_d = float("inf")
with torch.no_grad():
    for r in range(a.repeat + 1):
        sync(); t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync(); t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(a.decode):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync(); t2 = time.perf_counter()
        if r > 0:
            best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
print(json.dumps({"impl": "transformers", "device": a.device, "dtype": str(dtype).replace("torch.", ""),
                  "prefill_tokens": a.prefill, "prefill_tok_s": round(a.prefill / best_p, 1),
                  "decode_tokens": a.decode, "decode_tok_s": round(a.decode / best_d, 2)}))
