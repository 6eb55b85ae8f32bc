"""Checks that diffusers reads a LoRA `diffusion dreambooth` exported: loads the pipeline folder,
`load_lora_weights(folder)`, and compares the UNet's LoRA weights and scale with the file.
Needs diffusers and peft (an optional venv; not used by the tests).

    python scripts/check/diffusers_lora.py OUT_DIR/pipeline
"""
import json
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

folder = sys.argv[1]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
pipe.load_lora_weights(folder)
path = f"{folder}/pytorch_lora_weights.safetensors"
with safe_open(path, "pt") as f:
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
    keys = list(f.keys())
    worst = 0.0
    for key in keys:
        module, part = key[len("unet."):].rsplit(".lora_", 1)
        which = "lora_A" if part.startswith("A") else "lora_B"
        layer = pipe.unet.get_submodule(module)
        loaded = getattr(layer, which)["default_0"].weight
        worst = max(worst, (loaded - f.get_tensor(key)).abs().max().item())
    scaling = {m.scaling["default_0"] for _, m in pipe.unet.named_modules() if hasattr(m, "scaling") and "default_0" in m.scaling}
print(json.dumps({"tensors": len(keys), "largest_difference": worst, "scalings": sorted(scaling),
                  "alpha_over_r": meta["unet.lora_alpha"] / meta["unet.r"]}))
assert worst == 0.0 and scaling == {meta["unet.lora_alpha"] / meta["unet.r"]}
