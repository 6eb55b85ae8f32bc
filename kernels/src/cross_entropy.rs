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

/// Σ e^(x − m) over a row, in 16 independent sums (so it vectorises).
#[inline(always)]
fn sum_exp(xr: &[f32], m: f32) -> f32 {
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
    acc.iter().sum::<f32>() + tail
}

simd_fn! {
    /// log Σ e^x of each row of width `v`.
    fn lse_rows(x: &[f32], v: usize, lse: &mut [f32]) {
        for (xr, l) in x.chunks_exact(v).zip(lse.iter_mut()) {
            let m = max(xr);
            *l = m + sum_exp(xr, m).ln();
        }
    }
}

simd_fn! {
    /// The max of each row of width `v`.
    fn max_rows(x: &[f32], v: usize, out: &mut [f32]) {
        for (xr, o) in x.chunks_exact(v).zip(out.iter_mut()) {
            *o = max(xr);
        }
    }
}

simd_fn! {
    /// Σ e^(x − m) of each row of width `v`, with its own m.
    fn sum_exp_rows(x: &[f32], v: usize, m: &[f32], out: &mut [f32]) {
        for ((xr, o), &mr) in x.chunks_exact(v).zip(out.iter_mut()).zip(m) {
            *o = sum_exp(xr, mr);
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

/// Logits split by vocabulary over a group of ranks (tensor parallelism): this rank holds
/// columns `start..start + V_local`, and the row statistics are completed over the group
/// with the two reductions (in place, elementwise, the same on every rank).
pub struct VocabSplit {
    pub start: usize,
    pub all_max: Reduce,
    pub all_sum: Reduce,
}

/// An in-place elementwise reduction over a group of ranks.
pub type Reduce = Box<dyn Fn(&mut [f32]) -> Result<()> + Send + Sync>;

pub(crate) struct CrossEntropy {
    pub targets: Arc<Vec<i64>>,
    pub ignore: i64,
    pub split: Option<Arc<VocabSplit>>,
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
        // Under a vocabulary split the other ranks hold the rest of the classes.
        let classes = if self.split.is_some() { usize::MAX } else { v };
        match self
            .targets
            .iter()
            .position(|&t| t != self.ignore && (t < 0 || t as usize >= classes))
        {
            Some(i) => Err(Error::Msg(format!(
                "cross-entropy: target {} at row {i} is outside the {v} classes",
                self.targets[i]
            ))),
            None => Ok(()),
        }
    }

    /// This rank's column of target `t`, if it holds it.
    fn local(&self, t: i64, v: usize) -> Option<usize> {
        let start = self.split.as_ref().map_or(0, |s| s.start) as i64;
        (t != self.ignore && (start..start + v as i64).contains(&t)).then(|| (t - start) as usize)
    }

    /// Per row: log Σ e^x over the whole vocabulary, and the target's logit (0 where no
    /// target or, split, on another rank) summed over the group.
    fn stats(&self, x: &[f32], v: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = x.len() / v;
        let mut picked: Vec<f32> = (0..rows)
            .map(|r| match self.local(self.targets[r], v) {
                Some(c) => x[r * v + c],
                None => 0.0,
            })
            .collect();
        let Some(split) = &self.split else {
            return Ok((Self::lse(x, v), picked));
        };
        let per = rows_per_task(rows, v, GRAIN);
        let mut m = output(rows);
        m.par_chunks_mut(per)
            .zip(x.par_chunks(per * v))
            .for_each(|(m, x)| max_rows(x, v, m));
        (split.all_max)(&mut m)?;
        let mut both = output(2 * rows);
        let (s, p) = both.split_at_mut(rows);
        s.par_chunks_mut(per)
            .zip(x.par_chunks(per * v).zip(m.par_chunks(per)))
            .for_each(|(s, (x, m))| sum_exp_rows(x, v, m, s));
        p.copy_from_slice(&picked);
        (split.all_sum)(&mut both)?;
        let (s, p) = both.split_at(rows);
        picked.copy_from_slice(p);
        let lse = m.iter().zip(s).map(|(m, s)| m + s.ln()).collect();
        Ok((lse, picked))
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

    cuda_fwd!(|self, s, l| {
        let (rows, v) = l.shape().dims2()?;
        self.check(rows, v)?;
        let Some(split) = &self.split else {
            return crate::cuda::cross_entropy::forward(&self.targets, self.ignore, s, l);
        };
        let local: Vec<i64> = self
            .targets
            .iter()
            .map(|&t| column(self.local(t, v)))
            .collect();
        let counted: Vec<bool> = self.targets.iter().map(|&t| t != self.ignore).collect();
        let (out, shape, lse) =
            crate::cuda::cross_entropy::split_forward(&local, &counted, split, s, l)?;
        *self.lse.lock().expect("lse lock") = lse;
        Ok((out, shape))
    });

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (rows, v) = l.shape().dims2()?;
        self.check(rows, v)?;
        if rows == 0 {
            return Ok((CpuStorage::F32(vec![0.0]), Shape::from(())));
        }
        let (lse, picked) = self.stats(x, v)?;
        let mut total = 0f64;
        for (r, &t) in self.targets.iter().enumerate() {
            if t != self.ignore {
                total += (lse[r] - picked[r]) as f64;
            }
        }
        *self.lse.lock().expect("lse lock") = lse;
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let lse = std::mem::take(&mut *self.lse.lock().expect("lse lock"));
        let (rows, v) = x.dims2()?;
        // The GPU kernel recomputes each row's log-sum-exp; the CPU one kept them.
        if lse.len() != rows && x.device().is_cpu() {
            return Err(candle_core::Error::Msg(
                "fused-cross-entropy: backward without forward".into(),
            ));
        }
        let local = self.targets.iter().map(|&t| self.local(t, v)).collect();
        let grad = CrossEntropyGrad {
            targets: self.targets.clone(),
            ignore: self.ignore,
            split: self.split.is_some(),
            local,
            lse,
            g,
        };
        Ok(Some(x.contiguous()?.apply_op1_no_bwd(&grad)?))
    }
}

struct CrossEntropyGrad {
    targets: Arc<Vec<i64>>,
    ignore: i64,
    /// Logits split by vocabulary: `lse` holds the group's log-sum-exps (the GPU kernel reads
    /// this; the CPU one always has them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    split: bool,
    /// Each row's target column on this rank, if here.
    local: Vec<Option<usize>>,
    /// The forward pass's log-sum-exps (over the whole vocabulary).
    lse: Vec<f32>,
    g: f32,
}

impl CrossEntropyGrad {
    /// Each row's factor: g, or 0 where the target is ignored.
    fn scale(&self) -> Vec<f32> {
        let g = self.g;
        let ignore = self.ignore;
        self.targets
            .iter()
            .map(|&t| if t == ignore { 0.0 } else { g })
            .collect()
    }
}

/// A local target column as the CUDA kernels take it: −1 where the row has none here.
#[cfg(feature = "cuda")]
fn column(c: Option<usize>) -> i64 {
    c.map_or(-1, |c| c as i64)
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    cuda_fwd!(|self, s, l| {
        if !self.split {
            return crate::cuda::cross_entropy::grad(&self.targets, self.ignore, self.g, s, l);
        }
        let local: Vec<i64> = self.local.iter().map(|&c| column(c)).collect();
        crate::cuda::cross_entropy::split_grad(&local, &self.lse, &self.scale(), s, l)
    });

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (rows, v) = l.shape().dims2()?;
        let lse = &self.lse;
        let scale = self.scale();
        let mut dx = output(x.len());
        if rows > 0 {
            let per = rows_per_task(rows, v, GRAIN);
            dx.par_chunks_mut(per * v)
                .zip(x.par_chunks(per * v))
                .zip(lse.par_chunks(per).zip(scale.par_chunks(per)))
                .for_each(|((dx, x), (l, s))| grad_rows(x, l, s, v, dx));
        }
        for (r, c) in self.local.iter().enumerate() {
            if let Some(c) = c {
                dx[r * v + c] -= self.g;
            }
        }
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}
