//! What ZeRO does to its state buffers, for every placement: host buffers (memory or disk) by
//! slices and the fused AdamW kernel, exactly as before there were devices; device buffers by
//! tensor operations on their device, written back in place (`slice_set`), so a GPU step keeps
//! parameters, gradients and moments in the GPU's memory.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::offload::{Placement, StateBuf};
use crate::optim::AdamWKernel;
use crate::Result;

impl StateBuf {
    /// A buffer holding the 1-D f32 tensor `t`: kept as a tensor on a device placement, copied to
    /// the host (memory or disk) otherwise.
    pub fn from_tensor(placement: &Placement, name: &str, t: Tensor) -> Result<Self> {
        let t = t.to_dtype(DType::F32)?.flatten_all()?;
        match placement {
            Placement::Device(dev) => Ok(StateBuf::Dev(t.to_device(dev)?.contiguous()?)),
            _ => StateBuf::new(placement, name, t.to_vec1()?),
        }
    }

    /// The whole buffer as a 1-D f32 tensor where it lives (host buffers: a CPU copy, after
    /// which disk pages are released).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            StateBuf::Dev(t) => Ok(t.clone()),
            host => {
                let t = Tensor::from_slice(host.as_slice(), host.len(), &Device::Cpu)?;
                host.release()?;
                Ok(t)
            }
        }
    }

    /// Adds the 1-D tensor `t` to the elements from `offset` on.
    pub fn add_at(&mut self, offset: usize, t: &Tensor) -> Result<()> {
        let n = t.elem_count();
        match self {
            StateBuf::Dev(acc) => {
                let t = t.to_dtype(DType::F32)?.to_device(acc.device())?;
                let sum = (acc.narrow(0, offset, n)? + t)?;
                acc.slice_set(&sum, 0, offset)?;
            }
            host => {
                let t: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
                host.as_mut_slice()[offset..offset + n]
                    .iter_mut()
                    .zip(&t)
                    .for_each(|(a, b)| *a += b);
                host.release()?;
            }
        }
        Ok(())
    }

    /// Multiplies every element by `factor` (host: in f64, rounded once, as before).
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        match self {
            StateBuf::Dev(t) => *t = t.affine(factor, 0.0)?,
            host => {
                host.as_mut_slice()
                    .iter_mut()
                    .for_each(|x| *x = (*x as f64 * factor) as f32);
                host.release()?;
            }
        }
        Ok(())
    }

    /// Writes an inf into the first element (test hook for overflow handling); false when empty.
    pub fn poison(&mut self) -> Result<bool> {
        if self.is_empty() {
            return Ok(false);
        }
        match self {
            StateBuf::Dev(t) => {
                let inf = Tensor::new(&[f32::INFINITY], t.device())?;
                t.slice_set(&inf, 0, 0)?;
            }
            host => host.as_mut_slice()[0] = f32::INFINITY,
        }
        Ok(true)
    }
}

/// Σx² over buffer ranges, accumulated where each buffer lives and read back once (a device
/// buffer costs no host transfer until [`SqSum::total`]).
#[derive(Default)]
pub struct SqSum {
    host: f64,
    device: Option<Tensor>,
}

impl SqSum {
    /// Adds `weight`·Σx² over `range` of `buf`.
    pub fn add(&mut self, buf: &StateBuf, range: Range<usize>, weight: f64) -> Result<()> {
        match buf {
            StateBuf::Dev(t) => {
                let sq = t
                    .narrow(0, range.start, range.len())?
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .affine(weight, 0.0)?;
                self.device = Some(match self.device.take() {
                    Some(acc) => (acc + sq)?,
                    None => sq,
                });
            }
            host => {
                let sq: f64 = host.as_slice()[range]
                    .iter()
                    .map(|&x| x as f64 * x as f64)
                    .sum();
                host.release()?;
                self.host += weight * sq;
            }
        }
        Ok(())
    }

    /// Adds `weight`·Σx² over the whole buffer.
    pub fn add_all(&mut self, buf: &StateBuf, weight: f64) -> Result<()> {
        self.add(buf, 0..buf.len(), weight)
    }

    pub fn total(self) -> Result<f64> {
        Ok(match self.device {
            Some(t) => self.host + t.to_scalar::<f64>()?,
            None => self.host,
        })
    }
}

/// One AdamW step of elements `r` of parameter buffer `p` from gradient `g`, moments `m`, `v`:
/// the fused kernel in place on the host, tensor ops written back on a device. Disk pages stay
/// mapped: the caller releases each buffer once it is done with it.
pub fn adam_update(
    k: &AdamWKernel,
    decay: f32,
    r: Range<usize>,
    p: &mut StateBuf,
    g: &StateBuf,
    m: &mut StateBuf,
    v: &mut StateBuf,
) -> Result<()> {
    let on_device = [&*p, g, &*m, &*v].map(|b| matches!(b, StateBuf::Dev(_)));
    if let [StateBuf::Dev(pt), StateBuf::Dev(gt), StateBuf::Dev(mt), StateBuf::Dev(vt)] =
        [&*p, g, &*m, &*v]
    {
        let part = |t: &Tensor| t.narrow(0, r.start, r.len());
        let (pp, gp, mp, vp) = (part(pt)?, part(gt)?, part(mt)?, part(vt)?);
        // On a GPU one kernel updates the three views in place.
        if k.update_on_device(&pp, &gp, &mp, &vp, decay)? {
            return Ok(());
        }
        let (np, nm, nv) = k.update_values(&pp, &gp, &mp, &vp, decay)?;
        for (dst, src) in [(pt, np), (mt, nm), (vt, nv)] {
            dst.slice_set(&src, 0, r.start)?;
        }
    } else if on_device.contains(&true) {
        return Err(crate::msg!(
            "ZeRO: a parameter, its gradient and its moments must all be on the device or all on the host"
        ));
    } else {
        k.update(
            &mut p.as_mut_slice()[r.clone()],
            &g.as_slice()[r.clone()],
            &mut m.as_mut_slice()[r.clone()],
            &mut v.as_mut_slice()[r],
            decay,
        );
    }
    Ok(())
}
