"""Checks that diffusers loads the text encoder `diffusion dreambooth` trained
(`model.train_text_encoder`): every tensor of `PIPELINE/text_encoder/model.safetensors` as
diffusers' pipeline holds it, and how far training moved it from the base folder's.
Needs diffusers (an optional venv; not used by the tests).

    python scripts/check/diffusers_text_encoder.py OUT_DIR/pipeline BASE/text_encoder
"""
import json
import sys

from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

folder, base_dir = sys.argv[1], sys.argv[2]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
held = pipe.text_encoder.state_dict()
saved = load_file(f"{folder}/text_encoder/model.safetensors")
base = load_file(f"{base_dir}/model.safetensors")
# transformers 5's CLIPTextModel has no `text_model` level; 4.x's (and the file's) names do.
loaded = {k: held.get(k, held.get(k.removeprefix("text_model."))) for k in saved}
missing = [k for k, v in loaded.items() if v is None]
assert not missing, missing
worst = max((loaded[k] - v).abs().max().item() for k, v in saved.items())
moved = max((v - base[k]).abs().max().item() for k, v in saved.items())
print(json.dumps({"tensors": len(saved), "largest_difference": worst, "moved_from_base": moved}))
assert worst == 0.0 and moved > 0.0
