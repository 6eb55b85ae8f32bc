//! The structure module (AlphaFold 2, Algorithm 20) as OpenFold computes it, backbone atoms:
//! from the single representation and the pair stream, layers with shared weights run
//! invariant point attention (Algorithm 22), a transition, and a backbone update of each
//! residue's frame (Algorithm 23; rotations stop their gradient between layers). N, Cα, C are
//! placed by each residue type's idealised backbone geometry (AlphaFold's
//! `rigid_group_atom_positions`), O by the torsion-angle ResNet's ψ (`torsion`). Not yet: side
//! chains.

use candle_core::{Result, Tensor, D};

use super::primitives::{mask_bias, Ctx};
use super::rigid::Frames;
use super::specs::{LinearInit, Specs};
use super::torsion;

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StructureConfig {
    pub c_s: usize,
    pub c_z: usize,
    pub c_ipa: usize,
    pub no_heads_ipa: usize,
    pub no_qk_points: usize,
    pub no_v_points: usize,
    pub no_blocks: usize,
    pub no_transition_layers: usize,
    /// Translations are in units of this many Å (OpenFold: 10).
    pub trans_scale_factor: f64,
    /// The torsion-angle ResNet's width and blocks (OpenFold: 128, 2).
    pub c_resnet: usize,
    pub no_resnet_blocks: usize,
    #[serde(default = "eps")]
    pub epsilon: f64,
    #[serde(default = "inf")]
    pub inf: f64,
}

fn eps() -> f64 {
    1e-8
}

fn inf() -> f64 {
    1e5
}

/// Idealised N and C positions in the backbone frame (Cα at the origin), by residue type in
/// `residues::STANDARD` order; from AlphaFold's `residue_constants` (Apache 2.0).
const BACKBONE: [[[f32; 3]; 2]; 20] = [
    [[-0.525, 1.363, 0.000], [1.526, -0.000, -0.000]], // ALA
    [[-0.524, 1.362, -0.000], [1.525, -0.000, -0.000]], // ARG
    [[-0.536, 1.357, 0.000], [1.526, -0.000, -0.000]], // ASN
    [[-0.525, 1.362, -0.000], [1.527, 0.000, -0.000]], // ASP
    [[-0.522, 1.362, -0.000], [1.524, 0.000, 0.000]],  // CYS
    [[-0.526, 1.361, -0.000], [1.526, 0.000, 0.000]],  // GLN
    [[-0.528, 1.361, 0.000], [1.526, -0.000, -0.000]], // GLU
    [[-0.572, 1.337, 0.000], [1.517, -0.000, -0.000]], // GLY
    [[-0.527, 1.360, 0.000], [1.525, 0.000, 0.000]],   // HIS
    [[-0.493, 1.373, -0.000], [1.527, -0.000, -0.000]], // ILE
    [[-0.520, 1.363, 0.000], [1.525, -0.000, -0.000]], // LEU
    [[-0.526, 1.362, -0.000], [1.526, 0.000, 0.000]],  // LYS
    [[-0.521, 1.364, -0.000], [1.525, 0.000, 0.000]],  // MET
    [[-0.518, 1.363, 0.000], [1.524, 0.000, -0.000]],  // PHE
    [[-0.566, 1.351, -0.000], [1.527, -0.000, 0.000]], // PRO
    [[-0.529, 1.360, -0.000], [1.525, -0.000, -0.000]], // SER
    [[-0.517, 1.364, 0.000], [1.526, 0.000, -0.000]],  // THR
    [[-0.521, 1.363, 0.000], [1.525, -0.000, 0.000]],  // TRP
    [[-0.522, 1.362, 0.000], [1.524, -0.000, -0.000]], // TYR
    [[-0.494, 1.373, -0.000], [1.527, -0.000, -0.000]], // VAL
];

/// What the structure module gives: each layer's frames (translations in Å) and the final
/// backbone atoms.
pub struct StructureOutput {
    /// (L, R, 3, 3) and (L, R, 3).
    pub rots: Tensor,
    pub trans: Tensor,
    /// (R, 4, 3): N, Cα, C, O of each residue, Å.
    pub backbone: Tensor,
    /// Torsion angles (R, 7, 2) as predicted (for the angle-norm loss) and normalised.
    pub unnormalized_angles: Tensor,
    pub angles: Tensor,
    /// The final single representation (R, c_s).
    pub single: Tensor,
}

/// `linear` output (R, H·P·3) as points (R, H, P, 3) in the local frame: OpenFold splits the
/// last dimension into x, y, z thirds.
fn points(x: &Tensor, heads: usize, pts: usize) -> Result<Tensor> {
    let r = x.dim(0)?;
    let n = heads * pts;
    let xyz = [
        x.narrow(1, 0, n)?,
        x.narrow(1, n, n)?,
        x.narrow(1, 2 * n, n)?,
    ];
    Tensor::stack(&xyz, 2)?.reshape((r, heads, pts, 3))
}

/// Invariant point attention: (R, c_s) update of the single representation.
fn ipa(
    c: &Ctx,
    cfg: &StructureConfig,
    s: &Tensor,
    z: &Tensor,
    f: &Frames,
    mask: &Tensor,
) -> Result<Tensor> {
    let p = "structure_module.ipa";
    let (h, ch, pq, pv) = (
        cfg.no_heads_ipa,
        cfg.c_ipa,
        cfg.no_qk_points,
        cfg.no_v_points,
    );
    let r = s.dim(0)?;
    let q = c.linear(&format!("{p}.linear_q"), s)?.reshape((r, h, ch))?;
    let kv = c
        .linear(&format!("{p}.linear_kv"), s)?
        .reshape((r, h, 2 * ch))?;
    let (k, v) = (kv.narrow(2, 0, ch)?, kv.narrow(2, ch, ch)?);
    let q_pts = f.apply(&points(
        &c.linear(&format!("{p}.linear_q_points.linear"), s)?,
        h,
        pq,
    )?)?;
    let kv_pts = f.apply(&points(
        &c.linear(&format!("{p}.linear_kv_points.linear"), s)?,
        h,
        pq + pv,
    )?)?;
    let (k_pts, v_pts) = (kv_pts.narrow(2, 0, pq)?, kv_pts.narrow(2, pq, pv)?);
    let b = c.linear(&format!("{p}.linear_b"), z)?; // (R, R, H)
    let qh = q.transpose(0, 1)?.contiguous()?; // (H, R, c)
    let kh = k.transpose(0, 1)?.contiguous()?;
    let a = (qh.matmul(&kh.t()?.contiguous()?)? * (1.0 / (3.0 * ch as f64)).sqrt())?;
    let a = (a + (b.permute((2, 0, 1))? * (1.0f64 / 3.0).sqrt())?)?;
    // Σ_p |q_pts_i − k_pts_j|² per head: (R_i, R_j, H).
    let diff = q_pts.unsqueeze(1)?.broadcast_sub(&k_pts.unsqueeze(0)?)?;
    let d2 = diff.sqr()?.sum(D::Minus1)?; // (R, R, H, Pq)
    let hw = softplus(c.param(&format!("{p}.head_weights"))?)?;
    let hw = (hw * (1.0 / (3.0 * (pq as f64 * 9.0 / 2.0))).sqrt())?;
    let pt = (d2
        .broadcast_mul(&hw.reshape((1, 1, h, 1))?)?
        .sum(D::Minus1)?
        * -0.5)?; // (R, R, H)
    let square = mask.unsqueeze(1)?.broadcast_mul(&mask.unsqueeze(0)?)?;
    let a =
        (a + pt.permute((2, 0, 1))?)?.broadcast_add(&mask_bias(&square, cfg.inf)?.unsqueeze(0)?)?;
    let a = c.k.softmax(&a.contiguous()?)?; // (H, R, R)
    let o = a
        .matmul(&v.transpose(0, 1)?.contiguous()?)?
        .transpose(0, 1)?
        .reshape((r, h * ch))?;
    // Σ_j a_hij v_pts_j (global), back into frame i.
    let vp = v_pts.permute((1, 0, 2, 3))?.reshape((h, r, pv * 3))?; // (H, R_j, Pv·3)
    let o_pt = a
        .matmul(&vp.contiguous()?)?
        .reshape((h, r, pv, 3))?
        .permute((1, 0, 2, 3))?; // (R, H, Pv, 3)
    let o_pt = f.invert_apply(&o_pt.contiguous()?)?;
    let norm = (o_pt.sqr()?.sum(D::Minus1)? + cfg.epsilon)?
        .sqrt()?
        .reshape((r, h * pv))?;
    let o_pt = o_pt.reshape((r, h * pv, 3))?;
    let (ox, oy, oz) = (
        o_pt.narrow(2, 0, 1)?.squeeze(2)?,
        o_pt.narrow(2, 1, 1)?.squeeze(2)?,
        o_pt.narrow(2, 2, 1)?.squeeze(2)?,
    );
    // Σ_j a_hij z_ij: (R, H, c_z).
    let o_pair = a
        .transpose(0, 1)?
        .contiguous()?
        .matmul(z)?
        .reshape((r, ()))?;
    let cat = Tensor::cat(&[&o, &ox, &oy, &oz, &norm, &o_pair], 1)?;
    c.linear(&format!("{p}.linear_out"), &cat)
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    (x.exp()? + 1.0)?.log()
}

/// The structure module on the single representation `s` (R, c_s) and pair stream `z`.
pub fn structure_module(
    c: &Ctx,
    cfg: &StructureConfig,
    s: &Tensor,
    z: &Tensor,
    aatype: &[u32],
    mask: &Tensor,
) -> Result<StructureOutput> {
    let p = "structure_module";
    let s = c.layer_norm(&format!("{p}.layer_norm_s"), s)?;
    let z = c.layer_norm(&format!("{p}.layer_norm_z"), z)?;
    let s0 = s.clone();
    let mut s = c.linear(&format!("{p}.linear_in"), &s)?;
    let mut f = Frames::identity(s.dim(0)?, &s)?;
    let (mut rots, mut trans) = (Vec::new(), Vec::new());
    let mut last = f.clone();
    for layer in 0..cfg.no_blocks {
        s = (&s + ipa(c, cfg, &s, &z, &f, mask)?)?;
        s = c.layer_norm(&format!("{p}.layer_norm_ipa"), &s)?;
        for l in 0..cfg.no_transition_layers {
            let t = format!("{p}.transition.layers.{l}");
            let h = c.linear(&format!("{t}.linear_1"), &s)?.relu()?;
            let h = c.linear(&format!("{t}.linear_2"), &h)?.relu()?;
            s = (&s + c.linear(&format!("{t}.linear_3"), &h)?)?;
        }
        s = c.layer_norm(&format!("{p}.transition.layer_norm"), &s)?;
        f = f.compose_update(&c.linear(&format!("{p}.bb_update.linear"), &s)?)?;
        let scaled = f.scale_translation(cfg.trans_scale_factor)?;
        rots.push(scaled.rot.clone());
        trans.push(scaled.trans.clone());
        last = scaled;
        if layer + 1 < cfg.no_blocks {
            f = f.stop_rot_gradient();
        }
    }
    let (raw, angles) = torsion::angle_resnet(c, cfg.no_resnet_blocks, &s, &s0, cfg.epsilon)?;
    let (n_lit, c_lit): (Vec<[f32; 3]>, Vec<[f32; 3]>) = aatype
        .iter()
        .map(|&a| {
            let [n, cc] = BACKBONE[(a as usize).min(19)];
            (n, cc)
        })
        .unzip();
    let lit: Vec<f32> = n_lit
        .iter()
        .zip(&c_lit)
        .flat_map(|(n, cc)| [*n, [0.0; 3], *cc].into_iter().flatten())
        .collect();
    let lit = Tensor::from_vec(lit, (aatype.len(), 3, 3), s.device())?.to_dtype(s.dtype())?;
    let o = torsion::oxygen(&last, &angles, aatype, &n_lit, &c_lit)?;
    let backbone = Tensor::cat(&[last.apply(&lit)?, o.unsqueeze(1)?], 1)?;
    Ok(StructureOutput {
        rots: Tensor::stack(&rots, 0)?,
        trans: Tensor::stack(&trans, 0)?,
        backbone,
        unnormalized_angles: raw,
        angles,
        single: s,
    })
}

pub fn structure_specs(sp: &mut Specs, cfg: &StructureConfig) {
    let p = "structure_module";
    let (cs, cz, h, ch) = (cfg.c_s, cfg.c_z, cfg.no_heads_ipa, cfg.c_ipa);
    sp.layer_norm(&format!("{p}.layer_norm_s"), cs);
    sp.layer_norm(&format!("{p}.layer_norm_z"), cz);
    sp.linear(&format!("{p}.linear_in"), cs, cs, true, LinearInit::Default);
    let i = format!("{p}.ipa");
    sp.linear(
        &format!("{i}.linear_q"),
        cs,
        h * ch,
        true,
        LinearInit::Default,
    );
    sp.linear(
        &format!("{i}.linear_q_points.linear"),
        cs,
        h * cfg.no_qk_points * 3,
        true,
        LinearInit::Default,
    );
    sp.linear(
        &format!("{i}.linear_kv"),
        cs,
        2 * h * ch,
        true,
        LinearInit::Default,
    );
    let kvp = h * (cfg.no_qk_points + cfg.no_v_points) * 3;
    sp.linear(
        &format!("{i}.linear_kv_points.linear"),
        cs,
        kvp,
        true,
        LinearInit::Default,
    );
    sp.linear(&format!("{i}.linear_b"), cz, h, true, LinearInit::Default);
    sp.push(
        &format!("{i}.head_weights"),
        vec![h],
        colossal_core::models::Init::Zeros,
    );
    let out = h * (cz + ch + cfg.no_v_points * 4);
    sp.linear(&format!("{i}.linear_out"), out, cs, true, LinearInit::Final);
    sp.layer_norm(&format!("{p}.layer_norm_ipa"), cs);
    for l in 0..cfg.no_transition_layers {
        let t = format!("{p}.transition.layers.{l}");
        sp.linear(&format!("{t}.linear_1"), cs, cs, true, LinearInit::Relu);
        sp.linear(&format!("{t}.linear_2"), cs, cs, true, LinearInit::Relu);
        sp.linear(&format!("{t}.linear_3"), cs, cs, true, LinearInit::Final);
    }
    sp.layer_norm(&format!("{p}.transition.layer_norm"), cs);
    sp.linear(
        &format!("{p}.bb_update.linear"),
        cs,
        6,
        true,
        LinearInit::Final,
    );
    torsion::specs(sp, cs, cfg.c_resnet, cfg.no_resnet_blocks);
}
