//! Per-residue rigid frames as tensors: unit quaternions (R, 4) with their rotation matrices
//! (R, 3, 3), and translations (R, 3). Points are rows: `apply` is x·Rᵀ + t, `invert_apply`
//! (x − t)·R.

use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Frames {
    /// (R, 4), real part first, unit norm.
    pub quat: Tensor,
    pub rot: Tensor,
    pub trans: Tensor,
}

/// Rotation matrices (R, 3, 3) of unit quaternions (R, 4).
pub fn quat_to_rot(q: &Tensor) -> Result<Tensor> {
    let r = q.dim(0)?;
    let c = |i: usize| q.narrow(1, i, 1);
    let (a, b, cc, d) = (c(0)?, c(1)?, c(2)?, c(3)?);
    let sq = |x: &Tensor| x.sqr();
    let two = |x: Tensor| x * 2.0;
    let entries = [
        ((sq(&a)? + sq(&b)?)? - sq(&cc)? - sq(&d)?)?,
        two(((&b * &cc)? - (&a * &d)?)?)?,
        two(((&b * &d)? + (&a * &cc)?)?)?,
        two(((&b * &cc)? + (&a * &d)?)?)?,
        ((sq(&a)? - sq(&b)?)? + sq(&cc)? - sq(&d)?)?,
        two(((&cc * &d)? - (&a * &b)?)?)?,
        two(((&b * &d)? - (&a * &cc)?)?)?,
        two(((&cc * &d)? + (&a * &b)?)?)?,
        ((sq(&a)? - sq(&b)?)? - sq(&cc)? + sq(&d)?)?,
    ];
    Tensor::cat(&entries, 1)?.reshape((r, 3, 3))
}

impl Frames {
    /// Identity frames for `r` residues.
    pub fn identity(r: usize, like: &Tensor) -> Result<Self> {
        let mut q = vec![0f32; r * 4];
        for i in 0..r {
            q[i * 4] = 1.0;
        }
        let quat = Tensor::from_vec(q, (r, 4), like.device())?.to_dtype(like.dtype())?;
        Ok(Self {
            rot: quat_to_rot(&quat)?,
            quat,
            trans: Tensor::zeros((r, 3), like.dtype(), like.device())?,
        })
    }

    /// Points (R, …, 3), each residue's through its frame.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let r = dims[0];
        let flat = x.reshape((r, (), 3))?;
        let y = flat
            .matmul(&self.rot.transpose(1, 2)?)?
            .broadcast_add(&self.trans.unsqueeze(1)?)?;
        y.reshape(dims)
    }

    /// Points (R, …, 3) into each residue's frame.
    pub fn invert_apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let r = dims[0];
        let flat = x
            .reshape((r, (), 3))?
            .broadcast_sub(&self.trans.unsqueeze(1)?)?;
        flat.matmul(&self.rot)?.reshape(dims)
    }

    /// The update of the backbone (Algorithm 23): `u` (R, 6) = quaternion vector part (b, c, d)
    /// and translation; q ← normalise(q · (1, b, c, d)), t ← t + R·t_u.
    pub fn compose_update(&self, u: &Tensor) -> Result<Self> {
        let (bcd, tu) = (u.narrow(1, 0, 3)?, u.narrow(1, 3, 3)?);
        let q = &self.quat;
        let c = |t: &Tensor, i: usize| t.narrow(1, i, 1);
        let (a, b, cc, d) = (c(q, 0)?, c(q, 1)?, c(q, 2)?, c(q, 3)?);
        let (x, y, z) = (c(&bcd, 0)?, c(&bcd, 1)?, c(&bcd, 2)?);
        // q ⊗ (0, x, y, z)
        let prod = Tensor::cat(
            &[
                (((&b * &x)? + (&cc * &y)?)? + (&d * &z)?)?.neg()?,
                (((&a * &x)? + (&cc * &z)?)? - (&d * &y)?)?,
                (((&a * &y)? - (&b * &z)?)? + (&d * &x)?)?,
                (((&a * &z)? + (&b * &y)?)? - (&cc * &x)?)?,
            ],
            1,
        )?;
        let nq = (q + prod)?;
        let nq = nq.broadcast_div(&nq.sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let trans = (&self.trans
            + tu.unsqueeze(1)?
                .matmul(&self.rot.transpose(1, 2)?)?
                .squeeze(1)?)?;
        Ok(Self {
            rot: quat_to_rot(&nq)?,
            quat: nq,
            trans,
        })
    }

    /// The same frames with no gradient through their rotations (between structure layers).
    pub fn stop_rot_gradient(&self) -> Self {
        Self {
            quat: self.quat.detach(),
            rot: self.rot.detach(),
            trans: self.trans.clone(),
        }
    }

    pub fn scale_translation(&self, f: f64) -> Result<Self> {
        Ok(Self {
            quat: self.quat.clone(),
            rot: self.rot.clone(),
            trans: (&self.trans * f)?,
        })
    }
}
