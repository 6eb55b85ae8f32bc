"""Checks that diffusers reads a LoRA `diffusion dreambooth` exported: loads the pipeline folder,
`load_lora_weights(folder)`, and compares the LoRA weights and scale diffusers put into the UNet
(keys `unet.…`) and the text encoder (keys `text_encoder.…`) with the file.
Needs diffusers and peft (an optional venv; not used by the tests).

    python scripts/check/diffusers_lora.py OUT_DIR/pipeline
"""
import json
import sys

from diffusers import StableDiffusionPipeline
from safetensors import safe_open

folder = sys.argv[1]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
pipe.load_lora_weights(folder)
models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
path = f"{folder}/pytorch_lora_weights.safetensors"
report = {}
with safe_open(path, "pt") as f:
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
    for key in f.keys():
        model, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        which = "lora_A" if part.startswith("A") else "lora_B"
        # transformers 5's CLIPTextModel has no `text_model` level (4.x's, and the key names).
        try:
            layer = models[model].get_submodule(module)
        except AttributeError:
            layer = models[model].get_submodule(module.removeprefix("text_model."))
        loaded = getattr(layer, which)["default_0"].weight
        r = report.setdefault(model, {"tensors": 0, "largest_difference": 0.0})
        r["tensors"] += 1
        r["largest_difference"] = max(r["largest_difference"], (loaded - f.get_tensor(key)).abs().max().item())
for model, r in report.items():
    scaling = {m.scaling["default_0"] for _, m in models[model].named_modules()
               if hasattr(m, "scaling") and "default_0" in m.scaling}
    r["scalings"] = sorted(scaling)
    r["alpha_over_r"] = meta[f"{model}.lora_alpha"] / meta[f"{model}.r"]
    assert r["largest_difference"] == 0.0 and scaling == {r["alpha_over_r"]}, (model, r)
print(json.dumps(report))
