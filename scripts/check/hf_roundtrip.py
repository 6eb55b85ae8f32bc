#!/usr/bin/env python3
"""Checks that transformers loads a model directory colossal-rs saved and computes the same
logits as `colossal forward` (optional: needs torch + transformers, not used by the tests).

    .venv/bin/python scripts/check/hf_roundtrip.py runs/quickstart/checkpoints/step-0000200
"""
import json
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1]
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/colossal"
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
torch.manual_seed(0)
vocab = model.config.vocab_size
ids = torch.randint(3, vocab, (2, 24))
ids[:, 0] = 1
mask = torch.ones_like(ids)
mask[1, 18:] = 0
with tempfile.TemporaryDirectory() as tmp:
    with open(f"{tmp}/ids.json", "w") as f:
        json.dump({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}, f)
    subprocess.run([binary, "forward", "--model", model_dir, "--input", f"{tmp}/ids.json",
                    "--out", f"{tmp}/logits.safetensors"], check=True)
    ours = load_file(f"{tmp}/logits.safetensors")["logits"]
with torch.no_grad():
    theirs = model(input_ids=ids, attention_mask=mask).logits
valid = mask.bool()
diff = (ours[valid] - theirs[valid]).abs().max().item()
scale = theirs[valid].abs().max().item()
print(json.dumps({"model": model_dir, "max_abs_diff": diff, "max_abs_logit": scale,
                  "relative": diff / max(1.0, scale)}))
sys.exit(0 if diff <= 1e-4 * max(1.0, scale) else 1)
