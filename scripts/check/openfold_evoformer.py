"""Makes apps/fold/tests/data/evoformer_block.safetensors with OpenFold's own EvoformerBlock:
random weights under OpenFold's parameter names (prefixed `evoformer.blocks.0.`), a small MSA
stream, pair stream and masks (some entries masked), and OpenFold's output streams. The Rust
test `evoformer_parity` loads the weights by the same names and must give the same outputs.
`load_state_dict(strict=True)` failing would mean our names or shapes differ from OpenFold's.

Needs torch and scipy, and an OpenFold source tree (no build: its CUDA kernels are not used):

    git -C OPENFOLD_REPO archive HEAD openfold | tar -x -C /tmp/of
    python scripts/check/openfold_evoformer.py /tmp/of apps/fold/tests/data/evoformer_block.safetensors
"""
import os
import sys
import tempfile
import types

import torch
from safetensors.torch import save_file

of_root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, of_root)
# OpenFold imports its fused CUDA attention at module load; the plain PyTorch path never calls it.
sys.modules["attn_core_inplace_cuda"] = types.ModuleType("attn_core_inplace_cuda")
from openfold.model.evoformer import EvoformerBlock  # noqa: E402

torch.manual_seed(0)
cfg = dict(c_m=16, c_z=8, c_hidden_msa_att=8, c_hidden_opm=4, c_hidden_mul=8, c_hidden_pair_att=8,
           no_heads_msa=2, no_heads_pair=2, transition_n=2, msa_dropout=0.0, pair_dropout=0.0,
           no_column_attention=False, opm_first=False, fuse_projection_weights=False, inf=1e9, eps=1e-10)
block = EvoformerBlock(**cfg).eval()
# Random weights everywhere (AlphaFold's zero inits would hide mistakes behind identities).
state = {k: torch.randn_like(v) * 0.3 for k, v in block.state_dict().items()}
block.load_state_dict(state, strict=True)

S, R = 5, 11
m = torch.randn(S, R, cfg["c_m"])
z = torch.randn(R, R, cfg["c_z"])
msa_mask = torch.ones(S, R)
msa_mask[4, 7:] = 0.0
msa_mask[2, 3] = 0.0
pair_mask = torch.ones(R, R)
# Not symmetric: a transposed mask would show.
pair_mask[10, :] = 0.0
pair_mask[3, 5] = 0.0
pair_mask[:8, 9] = 0.0
with torch.no_grad():
    m_out, z_out = block(m.clone(), z.clone(), msa_mask, pair_mask, chunk_size=None)
tensors = {f"evoformer.blocks.0.{k}": v.contiguous() for k, v in state.items()}
tensors.update({"input.m": m, "input.z": z, "input.msa_mask": msa_mask, "input.pair_mask": pair_mask,
                "output.m": m_out.contiguous(), "output.z": z_out.contiguous()})
save_file(tensors, out, metadata={"made_by": "openfold EvoformerBlock", "torch": torch.__version__})
print(f"{len(state)} parameters; wrote {out}")
