"""Makes apps/fold/tests/data/structure_module.safetensors with OpenFold's own StructureModule:
random weights under OpenFold's names, a single representation, a pair stream, residue types and
a mask, and OpenFold's per-layer backbone frames (quaternion and translation, Å), final torsion
angles and final N, CA, C, O positions. The Rust test `structure_module_equals_openfolds` must
give the same from the same weights.

    git -C OPENFOLD_REPO archive HEAD openfold | tar -x -C /tmp/of
    python scripts/check/openfold_structure.py /tmp/of apps/fold/tests/data/structure_module.safetensors
"""
import sys
import types

import torch
from safetensors.torch import save_file

of_root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, of_root)
sys.modules["attn_core_inplace_cuda"] = types.ModuleType("attn_core_inplace_cuda")
# openfold.utils.feats imports openfold.np.protein (Biopython, modelcif) for file I/O that the
# structure module never uses.
sys.modules["openfold.np.protein"] = types.ModuleType("openfold.np.protein")
from openfold.model.structure_module import StructureModule  # noqa: E402

torch.manual_seed(1)
sm = StructureModule(c_s=16, c_z=8, c_ipa=8, c_resnet=8, no_heads_ipa=2, no_qk_points=4, no_v_points=4,
                     dropout_rate=0.0, no_blocks=4, no_transition_layers=1, no_resnet_blocks=1, no_angles=7,
                     trans_scale_factor=10, epsilon=1e-8, inf=1e5).eval()
state = {k: torch.randn_like(v) * 0.2 for k, v in sm.state_dict().items()}
sm.load_state_dict(state, strict=True)
R = 9
single = torch.randn(R, 16)
pair = torch.randn(R, R, 8)
aatype = torch.randint(0, 20, (R,))
mask = torch.ones(R)
mask[7] = 0.0
with torch.no_grad():
    o = sm({"single": single, "pair": pair}, aatype, mask)
tensors = {f"structure_module.{k}": v.contiguous() for k, v in state.items()}
tensors.update({"input.single": single, "input.pair": pair, "input.aatype": aatype.to(torch.int64),
                "input.mask": mask, "output.frames": o["frames"].contiguous(),
                "output.angles": o["angles"][-1].contiguous(),
                "output.unnormalized_angles": o["unnormalized_angles"][-1].contiguous(),
                # atom14 slots 0-3 are N, CA, C, O for every residue type
                "output.backbone": o["positions"][-1][:, :4].contiguous()})
save_file(tensors, out, metadata={"made_by": "openfold StructureModule", "torch": torch.__version__})
print(f"{len(tensors)} tensors; frames {tuple(o['frames'].shape)}; wrote {out}")
