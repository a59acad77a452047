#!/usr/bin/env python3
"""Full-cache accuracy of a Hugging Face model on a task suite from `kvdistill prepare tasks` (data/tasks.h).

An independent reference for the C++ eval, with the same prompt protocol:
  text = chat_template([{"role": "user", "content": context + "\\n\\n" + question}], add_generation_prompt=True)
         + answer_prefix                       (the template's default system prompt is kept)
  tokens = tokenizer(text) without adding special tokens again
  greedy decoding of max_new_tokens (from the sample, default 32), stopping at eos (<|im_end|>)
  score per sample (RULER string match, in [0, 1]): for qa, 1 if any answer occurs in the output
  (case-insensitive substring); for every other task, the fraction of answers that occur.
  Task accuracy = 100 x mean.

Usage:
  python scripts/task_accuracy.py --model .cache/models/SmolLM2-135M-Instruct --tasks tasks.jsonl \
      [--limit-per-task K] [--device cpu] [--threads 1] [--out acc.json]
Prints a task x length table; --out writes it as JSON with every sample's output.
"""
import argparse
import collections
import json
import sys
import time

DEFAULT_MAX_NEW_TOKENS = 32


def score(task, answers, output):
    """RULER string match: the fraction of answers in the output (qa: any answer), case-insensitive."""
    out = output.lower()
    hits = [a.lower() in out for a in answers]
    if task == "qa":
        return 1.0 if any(hits) else 0.0
    return sum(hits) / len(hits)


def build_prompt(tokenizer, sample):
    user = sample["context"] + "\n\n" + sample["question"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    return text + sample.get("answer_prefix", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--tasks", required=True, help="task suite JSONL (kvdistill prepare tasks)")
    ap.add_argument("--limit-per-task", type=int, default=0,
                    help="score at most K samples per (task, length), in file order (0: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    ap.add_argument("--only", nargs="*", default=None, help="score only these tasks")
    ap.add_argument("--out", help="write the table and per-sample outputs as JSON")
    ap.add_argument("--verbose", action="store_true", help="print every sample's output")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = {eos, tokenizer.eos_token_id} - {None}

    samples, taken = [], collections.Counter()
    with open(args.tasks) as f:
        for line in f:
            s = json.loads(line)
            key = (s["task"], int(s["id"].rsplit("-", 2)[1]))  # the requested length, from the id
            if args.only and s["task"] not in args.only:
                continue
            if args.limit_per_task and taken[key] >= args.limit_per_task:
                continue
            taken[key] += 1
            samples.append((key, s))

    scores = collections.defaultdict(list)
    records = []
    t0 = time.time()
    for i, (key, s) in enumerate(samples):
        ids = tokenizer(build_prompt(tokenizer, s), add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids.to(args.device)  # (1, n)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=int(s.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                                 eos_token_id=sorted(eos_ids), pad_token_id=eos, temperature=None, top_p=None,
                                 top_k=None)
        new = gen[0, ids.shape[1]:].tolist()  # (new_tokens,)
        output = tokenizer.decode([t for t in new if t not in eos_ids], skip_special_tokens=False)
        sc = score(s["task"], s["answers"], output)
        scores[key].append(sc)
        records.append({"id": s["id"], "task": s["task"], "length": s["length"], "answers": s["answers"],
                        "output": output, "score": sc})
        if args.verbose:
            print(f"[{i + 1}/{len(samples)} {time.time() - t0:.0f}s] {s['id']} {sc:.2f} {s['answers']} -> {output!r}",
                  file=sys.stderr, flush=True)

    tasks = list(dict.fromkeys(k[0] for k, _ in samples))
    lengths = sorted({k[1] for k, _ in samples})
    table = {t: {str(l): 100.0 * sum(scores[(t, l)]) / len(scores[(t, l)]) for l in lengths if scores[(t, l)]}
             for t in tasks}
    counts = {t: {str(l): len(scores[(t, l)]) for l in lengths if scores[(t, l)]} for t in tasks}
    print(f"{'task':<18}" + "".join(f"{l:>10}" for l in lengths))
    for t in tasks:
        print(f"{t:<18}" + "".join(f"{table[t].get(str(l), float('nan')):>10.1f}" for l in lengths))
    print(f"({len(samples)} samples, {time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "tasks": args.tasks, "accuracy": table, "samples": counts,
                       "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
