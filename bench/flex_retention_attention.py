"""flex_attention with the same TRIM-KV score_mod as our fused kernel, forward and forward + backward.

Run in the same device call as build/bench_retention_attention, on the same shapes (batch 1, H_kv = 3 for H = 9,
H / 4 otherwise, causal, score += (q_idx - k_idx) * key_rate[b, h // G, k_idx]), and given that program's CSV
(--ours-csv) it prints ours / flex ratios. flex_attention is Python only (torch.compile), hence this script.

  python3 bench/flex_retention_attention.py --seqs 8192,16384 --heads 9,32 --dims 64,128 --ours-csv bench.csv
"""
import argparse, csv, torch
from torch.nn.attention.flex_attention import flex_attention, create_block_mask

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="8192,16384")
ap.add_argument("--heads", default="9,32")
ap.add_argument("--dims", default="64,128")
ap.add_argument("--ours-csv", default="")
a = ap.parse_args()
ints = lambda s: [int(x) for x in s.split(",")]

def bench(fn, warm=3, rep=10):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]

ours = {}
if a.ours_csv:
    for r in csv.DictReader(open(a.ours_csv)):
        ours[(int(r["S"]), int(r["H"]), int(r["D"]))] = r

torch.manual_seed(0)
dev = "cuda"
flex = torch.compile(flex_attention)
print(f"{'S':>6} {'H':>3} {'Hkv':>4} {'D':>4} | {'flex fwd ms (TF/s)':>20} {'flex f+b ms (TF/s)':>20} | "
      f"{'ours/flex fwd':>13} {'ours/flex f+b':>13}", flush=True)
for D in ints(a.dims):
    for H in ints(a.heads):
        for T in ints(a.seqs):
            Hkv = 3 if H == 9 else max(1, H // 4); G = H // Hkv
            q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            rate = (-torch.exp(torch.randn(1, Hkv, T, device=dev) * 1.5 - 5.0)).requires_grad_()
            def score_mod(score, b, h, qi, ki):
                return score + rate[b, h // G, ki] * (qi - ki).to(torch.float32)
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, None, T, T, device=dev)
            go = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
            f = lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)
            def fb():
                f().backward(go)
            fl = 2.0 * H * T * T * D
            ms_f, ms_fb = bench(f), bench(fb)
            o = ours.get((T, H, D))
            rf = f"{float(o['ours_fwd_ms']) / ms_f:13.2f}" if o else f"{'-':>13}"
            rb = f"{float(o['ours_fb_ms']) / ms_fb:13.2f}" if o else f"{'-':>13}"
            print(f"{T:6d} {H:3d} {Hkv:4d} {D:4d} | {ms_f:9.3f} ({fl / ms_f / 1e9:6.0f})    "
                  f"{ms_fb:9.3f} ({3.5 * fl / ms_fb / 1e9:6.0f})    | {rf} {rb}", flush=True)
            del q, k, v, go, rate
