"""transformers' `generate` on the prompts `colossal bench-serve` sends, for a side-by-side
figure: for each concurrency C, the C*R requests run as batches of C left-padded prompts,
greedy, exactly MAX new tokens each (EOS ignored, as bench-serve's `ignore_eos`).

    python scripts/check/hf_generate_bench.py MODEL_DIR TOKENIZER_DIR [--clients 1,8,32]
        [--requests-per-client 4] [--max-tokens 32] [--prompts scripts/bench_prompts.txt]
        [--threads 2]
Prints one JSON object (tokens/s and requests/s per concurrency). Needs torch + transformers.
"""
import argparse
import json
import time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("tokenizer")
ap.add_argument("--clients", default="1,8,32")
ap.add_argument("--requests-per-client", type=int, default=4)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--prompts", default="scripts/bench_prompts.txt")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.tokenizer)
if tok.pad_token is None:
    tok.pad_token = tok.convert_ids_to_tokens(0)
tok.padding_side = "left"
model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
prompts = [l for l in open(a.prompts).read().splitlines() if l.strip()]
runs = []
for c in [int(x) for x in a.clients.split(",")]:
    reqs = [prompts[(i * a.requests_per_client + r) % len(prompts)]
            for i in range(c) for r in range(a.requests_per_client)]
    # Request k of every client goes together, as the clients send them in turn.
    batches = [[reqs[i * a.requests_per_client + r] for i in range(c)] for r in range(a.requests_per_client)]
    t0 = time.time()
    new = 0
    with torch.inference_mode():
        for b in batches:
            enc = tok(b, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            new += (out.shape[1] - enc["input_ids"].shape[1]) * len(b)
    wall = time.time() - t0
    runs.append({"clients": c, "requests": len(reqs), "seconds": wall,
                 "requests_per_s": len(reqs) / wall, "output_tokens_per_s": new / wall})
print(json.dumps({"transformers_generate": runs, "torch": torch.__version__}, indent=1))
