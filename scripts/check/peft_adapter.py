"""Checks that PEFT reads an adapter this project saved (a `[lora]` checkpoint's `adapter/`):
loads the base with transformers, the adapter with `PeftModel.from_pretrained`, and compares
its logits on a few ids with `colossal forward` on `colossal merge-lora`'s output (both
computed here). Needs torch, transformers and peft (an optional venv; not used by the tests).

    python scripts/check/peft_adapter.py CHECKPOINT_DIR [COLOSSAL_BIN]
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ckpt = sys.argv[1]
colossal = sys.argv[2] if len(sys.argv) > 2 else "target/release/colossal"
adapter = os.path.join(ckpt, "adapter")
base = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter).eval()
ids = [[1, 15, 27, 99, 4, 61, 7, 300]]
with torch.no_grad():
    peft_logits = model(torch.tensor(ids)).logits
with tempfile.TemporaryDirectory() as tmp:
    merged = os.path.join(tmp, "merged")
    subprocess.run([colossal, "merge-lora", "--base", ckpt, "--adapter", adapter, "--out", merged], check=True)
    inp = os.path.join(tmp, "ids.json")
    json.dump({"input_ids": ids}, open(inp, "w"))
    out = os.path.join(tmp, "logits.safetensors")
    subprocess.run([colossal, "forward", "--model", merged, "--input", inp, "--out", out], check=True)
    ours = load_file(out)["logits"]
diff = (ours - peft_logits).abs().max().item()
scale = peft_logits.abs().max().item()
trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
print(json.dumps({"lora_parameters": trainable, "max_abs_diff": diff, "max_abs_logit": scale}))
assert diff <= 1e-4 * max(scale, 1.0), diff
