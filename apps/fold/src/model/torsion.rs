//! Torsion angles (AlphaFold 2, Algorithm 20 lines 11–14, and Algorithm 24): a small ResNet on
//! the structure module's single representation predicts 7 angles as (sin, cos) pairs
//! (pre-ω, φ, ψ, χ1–χ4); ψ turns the ψ frame that carries each residue's carbonyl O. OpenFold's
//! `angle_resnet` names; idealised positions from AlphaFold's `residue_constants` (Apache 2.0).

use candle_core::{Result, Tensor, D};

use super::primitives::Ctx;
use super::rigid::Frames;
use super::specs::{LinearInit, Specs};

/// O in each residue type's ψ frame (`residues::STANDARD` order).
const OXYGEN: [[f32; 3]; 20] = [
    [0.627, 1.062, 0.000],
    [0.626, 1.062, 0.000],
    [0.625, 1.062, 0.000],
    [0.626, 1.062, -0.000],
    [0.625, 1.062, -0.000],
    [0.626, 1.062, -0.000],
    [0.626, 1.062, 0.000],
    [0.626, 1.062, -0.000],
    [0.625, 1.063, 0.000],
    [0.627, 1.062, -0.000],
    [0.625, 1.063, -0.000],
    [0.626, 1.062, -0.000],
    [0.625, 1.062, -0.000],
    [0.626, 1.062, -0.000],
    [0.621, 1.066, 0.000],
    [0.626, 1.062, -0.000],
    [0.626, 1.062, 0.000],
    [0.627, 1.062, 0.000],
    [0.627, 1.062, -0.000],
    [0.627, 1.062, -0.000],
];

pub const NO_ANGLES: usize = 7;
const PSI: usize = 2;

/// (unnormalised, normalised) angles (R, 7, 2) from the single representation `s` and its
/// initial value `s0`.
pub fn angle_resnet(
    c: &Ctx,
    blocks: usize,
    s: &Tensor,
    s0: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let p = "structure_module.angle_resnet";
    let a = (c.linear(&format!("{p}.linear_in"), &s.relu()?)?
        + c.linear(&format!("{p}.linear_initial"), &s0.relu()?)?)?;
    let mut a = a;
    for l in 0..blocks {
        let h = c.linear(&format!("{p}.layers.{l}.linear_1"), &a.relu()?)?;
        a = (&a + c.linear(&format!("{p}.layers.{l}.linear_2"), &h.relu()?)?)?;
    }
    let r = s.dim(0)?;
    let raw = c
        .linear(&format!("{p}.linear_out"), &a.relu()?)?
        .reshape((r, NO_ANGLES, 2))?;
    let norm = raw
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(eps, f64::INFINITY)?
        .sqrt()?;
    let unit = raw.broadcast_div(&norm)?;
    Ok((raw, unit))
}

/// Each residue's carbonyl O (R, 3): its ψ frame — at the idealised C, x along C − Cα, y away
/// from N — turned about x by ψ, carried by the backbone frame. `n_lit`, `c_lit` (R, 3): the
/// idealised N and C in the backbone frame.
pub fn oxygen(
    frames: &Frames,
    angles: &Tensor,
    aatype: &[u32],
    n_lit: &[[f32; 3]],
    c_lit: &[[f32; 3]],
) -> Result<Tensor> {
    let r = aatype.len();
    let (dev, dtype) = (angles.device(), angles.dtype());
    let mut rot = Vec::with_capacity(r * 9);
    for (n, c) in n_lit.iter().zip(c_lit) {
        // x along C − Cα (Cα is the origin); y along Cα − N made perpendicular.
        let ln = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
        let ex = [c[0] / ln, c[1] / ln, c[2] / ln];
        let ey0 = [-n[0], -n[1], -n[2]];
        let d = ey0[0] * ex[0] + ey0[1] * ex[1] + ey0[2] * ex[2];
        let ey = [ey0[0] - d * ex[0], ey0[1] - d * ex[1], ey0[2] - d * ex[2]];
        let le = (ey[0] * ey[0] + ey[1] * ey[1] + ey[2] * ey[2]).sqrt();
        let ey = [ey[0] / le, ey[1] / le, ey[2] / le];
        let ez = [
            ex[1] * ey[2] - ex[2] * ey[1],
            ex[2] * ey[0] - ex[0] * ey[2],
            ex[0] * ey[1] - ex[1] * ey[0],
        ];
        for row in 0..3 {
            rot.extend([ex[row], ey[row], ez[row]]);
        }
    }
    let rot = Tensor::from_vec(rot, (r, 3, 3), dev)?.to_dtype(dtype)?;
    let t: Vec<f32> = c_lit.iter().flatten().copied().collect();
    let t = Tensor::from_vec(t, (r, 3), dev)?.to_dtype(dtype)?;
    let o: Vec<f32> = aatype
        .iter()
        .flat_map(|&a| OXYGEN[(a as usize).min(19)])
        .collect();
    let o = Tensor::from_vec(o, (r, 3), dev)?.to_dtype(dtype)?;
    let psi = angles.narrow(1, PSI, 1)?.squeeze(1)?; // (R, 2): sin, cos
    let (sin, cos) = (psi.narrow(1, 0, 1)?, psi.narrow(1, 1, 1)?);
    let (ox, oy, oz) = (o.narrow(1, 0, 1)?, o.narrow(1, 1, 1)?, o.narrow(1, 2, 1)?);
    // Rx(ψ)·o
    let turned = Tensor::cat(
        &[
            ox,
            ((&cos * &oy)? - (&sin * &oz)?)?,
            ((&sin * &oy)? + (&cos * &oz)?)?,
        ],
        1,
    )?;
    let local = (turned
        .unsqueeze(1)?
        .matmul(&rot.transpose(1, 2)?)?
        .squeeze(1)?
        + t)?;
    frames.apply(&local)
}

pub fn specs(sp: &mut Specs, c_s: usize, c_resnet: usize, blocks: usize) {
    let p = "structure_module.angle_resnet";
    sp.linear(
        &format!("{p}.linear_in"),
        c_s,
        c_resnet,
        true,
        LinearInit::Default,
    );
    sp.linear(
        &format!("{p}.linear_initial"),
        c_s,
        c_resnet,
        true,
        LinearInit::Default,
    );
    for l in 0..blocks {
        sp.linear(
            &format!("{p}.layers.{l}.linear_1"),
            c_resnet,
            c_resnet,
            true,
            LinearInit::Relu,
        );
        sp.linear(
            &format!("{p}.layers.{l}.linear_2"),
            c_resnet,
            c_resnet,
            true,
            LinearInit::Final,
        );
    }
    sp.linear(
        &format!("{p}.linear_out"),
        c_resnet,
        NO_ANGLES * 2,
        true,
        LinearInit::Default,
    );
}
