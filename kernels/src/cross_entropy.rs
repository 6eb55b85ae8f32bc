//! Cross-entropy over logits with the log-softmax fused in: the sum over rows whose target is
//! not `ignore` of log Σ e^x − x[target]. Forward keeps one number per row (its log-sum-exp),
//! never a softmax; backward writes dx = g · (e^(x − lse) − onehot) in one pass.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32s, max, output};
use crate::simd::{exp, rows_per_task};
use crate::simd_fn;

const GRAIN: usize = 1 << 15;

simd_fn! {
    /// log Σ e^x of each row of width `v`.
    fn lse_rows(x: &[f32], v: usize, lse: &mut [f32]) {
        for (xr, l) in x.chunks_exact(v).zip(lse.iter_mut()) {
            let m = max(xr);
            let mut acc = [0f32; 16];
            let c = xr.chunks_exact(16);
            let mut tail = 0f32;
            for &t in c.remainder() {
                tail += exp(t - m);
            }
            for ch in c {
                for i in 0..16 {
                    acc[i] += exp(ch[i] - m);
                }
            }
            *l = m + (acc.iter().sum::<f32>() + tail).ln();
        }
    }
}

simd_fn! {
    fn grad_rows(x: &[f32], lse: &[f32], scale: &[f32], v: usize, dx: &mut [f32]) {
        for ((xr, dr), (&l, &s)) in x.chunks_exact(v).zip(dx.chunks_exact_mut(v)).zip(lse.iter().zip(scale)) {
            for i in 0..v {
                dr[i] = s * exp(xr[i] - l);
            }
        }
    }
}

pub(crate) struct CrossEntropy {
    pub targets: Arc<Vec<i64>>,
    pub ignore: i64,
    /// Each row's log-sum-exp from the forward pass, for backward.
    pub lse: Mutex<Vec<f32>>,
}

impl CrossEntropy {
    fn check(&self, rows: usize, v: usize) -> Result<()> {
        if self.targets.len() != rows {
            return Err(Error::Msg(format!(
                "cross-entropy: {} targets for {rows} rows of logits",
                self.targets.len()
            )));
        }
        match self
            .targets
            .iter()
            .position(|&t| t != self.ignore && (t < 0 || t as usize >= v))
        {
            Some(i) => Err(Error::Msg(format!(
                "cross-entropy: target {} at row {i} is outside the {v} classes",
                self.targets[i]
            ))),
            None => Ok(()),
        }
    }

    fn lse(x: &[f32], v: usize) -> Vec<f32> {
        let rows = x.len() / v;
        let mut lse = output(rows);
        let per = rows_per_task(rows, v, GRAIN);
        lse.par_chunks_mut(per)
            .zip(x.par_chunks(per * v))
            .for_each(|(l, x)| lse_rows(x, v, l));
        lse
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (rows, v) = l.shape().dims2()?;
        self.check(rows, v)?;
        if rows == 0 {
            return Ok((CpuStorage::F32(vec![0.0]), Shape::from(())));
        }
        let lse = Self::lse(x, v);
        let mut total = 0f64;
        for (r, &t) in self.targets.iter().enumerate() {
            if t != self.ignore {
                total += (lse[r] - x[r * v + t as usize]) as f64;
            }
        }
        *self.lse.lock().expect("lse lock") = lse;
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let lse = std::mem::take(&mut *self.lse.lock().expect("lse lock"));
        let grad = CrossEntropyGrad {
            targets: self.targets.clone(),
            ignore: self.ignore,
            lse,
            g,
        };
        Ok(Some(x.contiguous()?.apply_op1_no_bwd(&grad)?))
    }
}

struct CrossEntropyGrad {
    targets: Arc<Vec<i64>>,
    ignore: i64,
    /// The forward pass's log-sum-exps (recomputed when absent).
    lse: Vec<f32>,
    g: f32,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (rows, v) = l.shape().dims2()?;
        let fresh;
        let lse = if self.lse.len() == rows {
            &self.lse
        } else {
            fresh = CrossEntropy::lse(x, v);
            &fresh
        };
        let scale: Vec<f32> = self
            .targets
            .iter()
            .map(|&t| if t == self.ignore { 0.0 } else { self.g })
            .collect();
        let mut dx = output(x.len());
        if rows > 0 {
            let per = rows_per_task(rows, v, GRAIN);
            dx.par_chunks_mut(per * v)
                .zip(x.par_chunks(per * v))
                .zip(lse.par_chunks(per).zip(scale.par_chunks(per)))
                .for_each(|((dx, x), (l, s))| grad_rows(x, l, s, v, dx));
        }
        for (r, &t) in self.targets.iter().enumerate() {
            if t != self.ignore {
                dx[r * v + t as usize] -= self.g;
            }
        }
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}
