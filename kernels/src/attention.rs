//! Causal attention without the probability matrix: for each (batch, head) and block of
//! `BQ` queries, S = q·kᵀ over the keys the block can see, masked, softmax, O = P·v — only O
//! and one log-sum-exp per query are kept. Backward recomputes each block's P from its
//! log-sum-exp (FlashAttention's scheme) and accumulates dk, dv per key-value head, so
//! memory grows with the sequence, not its square. Grouped-query heads read their shared
//! key-value head in place (no repeat). Matrix products go to `gemm` single-threaded inside
//! one task per plane; the planes run in parallel.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Error, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::{dot, f32s, max, output, sum};
use crate::matmul::{matmul, Operand};
use crate::simd::exp;
use crate::simd_fn;

/// Query rows per block: one block's scores (BQ × keys) stay in cache-sized scratch.
const BQ: usize = 64;

/// Which keys each query may attend to: causal (key j ≤ past_len + i for query i), valid keys
/// only, and with `segments` only keys of the same document (no past keys) — what the dense
/// additive bias of the reference formulation encodes.
#[derive(Clone, Debug, Default)]
pub struct CausalMask {
    /// Keys before the first query (a KV cache).
    pub past_len: usize,
    /// (B × (past_len + T)): 0 where a key is padding.
    pub key_valid: Option<Arc<Vec<u8>>>,
    /// (B × T): document id of each token.
    pub segments: Option<Arc<Vec<u32>>>,
}

struct Dims {
    heads: usize,
    rep: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl CausalMask {
    /// Masks row `i` (query i of batch `b`) of scores over keys 0..s.len() with −∞.
    fn apply(&self, b: usize, i: usize, dims: &Dims, s: &mut [f32]) {
        let causal_end = (self.past_len + i + 1).min(s.len());
        s[causal_end..].fill(f32::NEG_INFINITY);
        if let Some(kv) = &self.key_valid {
            let row = &kv[b * dims.tk..(b + 1) * dims.tk];
            for (j, x) in s[..causal_end].iter_mut().enumerate() {
                if row[j] == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(seg) = &self.segments {
            let row = &seg[b * dims.tq..(b + 1) * dims.tq];
            for (j, x) in s[..causal_end].iter_mut().enumerate() {
                if j < self.past_len || row[j - self.past_len] != row[i] {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Products inside one plane's task (the planes already run in parallel).
fn mm(
    dims: (usize, usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
) {
    matmul(dims, c, ldc, accumulate, a, b, false)
}

pub(crate) struct Attention {
    pub mask: CausalMask,
    /// Per (b, h, query): log Σ e^s, +∞ for a query with no visible key (its output is 0).
    pub lse: Mutex<Vec<f32>>,
}

fn dims(q: &[usize], k: &[usize], v: &[usize], past_len: usize) -> Result<Dims> {
    let bad = || {
        Error::Msg(format!(
            "attention: q {q:?}, k {k:?}, v {v:?} (past {past_len}) must be (B, H, T, D), (B, Hkv, past + T, D) twice with Hkv dividing H"
        ))
    };
    let [b, heads, tq, d] = <[usize; 4]>::try_from(q).map_err(|_| bad())?;
    let [kb, hkv, tk, kd] = <[usize; 4]>::try_from(k).map_err(|_| bad())?;
    if k != v || kb != b || kd != d || hkv == 0 || heads % hkv != 0 || tk != past_len + tq {
        return Err(bad());
    }
    Ok(Dims {
        heads,
        rep: heads / hkv,
        tq,
        tk,
        d,
    })
}

impl Attention {
    /// One (b, h) plane: o (tq × d) and lse (tq) from q (tq × d), k, v (tk × d).
    #[allow(clippy::too_many_arguments)]
    fn forward_plane(
        &self,
        b: usize,
        dims: &Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &mut [f32],
        lse: &mut [f32],
    ) {
        let d = dims.d;
        let mut s = vec![0f32; BQ * dims.tk];
        for q0 in (0..dims.tq).step_by(BQ) {
            let bq = BQ.min(dims.tq - q0);
            let kmax = (self.mask.past_len + q0 + bq).min(dims.tk);
            let s = &mut s[..bq * kmax];
            mm(
                (bq, kmax, d),
                s,
                kmax,
                false,
                (&q[q0 * d..], d, 1),
                (k, 1, d),
            );
            for r in 0..bq {
                let row = &mut s[r * kmax..(r + 1) * kmax];
                self.mask.apply(b, q0 + r, dims, row);
                lse[q0 + r] = softmax_row(row);
            }
            mm(
                (bq, d, kmax),
                &mut o[q0 * d..],
                d,
                false,
                (s, kmax, 1),
                (v, d, 1),
            );
        }
    }

    /// Gradients of one (b, kv head) group: dq for its `rep` query heads, dk and dv.
    #[allow(clippy::too_many_arguments)]
    fn backward_group(
        &self,
        b: usize,
        dims: &Dims,
        (q, o, dout, lse): (&[f32], &[f32], &[f32], &[f32]),
        (k, v): (&[f32], &[f32]),
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (d, plane) = (dims.d, dims.tq * dims.d);
        dk.fill(0.0);
        dv.fill(0.0);
        let mut p = vec![0f32; BQ * dims.tk];
        let mut dp = vec![0f32; BQ * dims.tk];
        for h in 0..dims.rep {
            let hp = h * plane..(h + 1) * plane;
            let (q, o, dout) = (&q[hp.clone()], &o[hp.clone()], &dout[hp]);
            let lse = &lse[h * dims.tq..(h + 1) * dims.tq];
            let dq = &mut dq[h * plane..(h + 1) * plane];
            for q0 in (0..dims.tq).step_by(BQ) {
                let bq = BQ.min(dims.tq - q0);
                let kmax = (self.mask.past_len + q0 + bq).min(dims.tk);
                let (p, dp) = (&mut p[..bq * kmax], &mut dp[..bq * kmax]);
                let rows = q0 * d..;
                mm(
                    (bq, kmax, d),
                    p,
                    kmax,
                    false,
                    (&q[rows.clone()], d, 1),
                    (k, 1, d),
                );
                mm(
                    (bq, kmax, d),
                    dp,
                    kmax,
                    false,
                    (&dout[rows.clone()], d, 1),
                    (v, 1, d),
                );
                for r in 0..bq {
                    let i = q0 + r;
                    let (pr, dpr) = (
                        &mut p[r * kmax..(r + 1) * kmax],
                        &mut dp[r * kmax..(r + 1) * kmax],
                    );
                    self.mask.apply(b, i, dims, pr);
                    let delta = dot(&dout[i * d..(i + 1) * d], &o[i * d..(i + 1) * d]);
                    grad_row(pr, dpr, lse[i], delta);
                }
                // dp now holds dS; p holds P.
                mm(
                    (bq, d, kmax),
                    &mut dq[q0 * d..],
                    d,
                    false,
                    (dp, kmax, 1),
                    (k, d, 1),
                );
                mm(
                    (kmax, d, bq),
                    dk,
                    d,
                    true,
                    (dp, 1, kmax),
                    (&q[rows.clone()], d, 1),
                );
                mm(
                    (kmax, d, bq),
                    dv,
                    d,
                    true,
                    (p, 1, kmax),
                    (&dout[rows], d, 1),
                );
            }
        }
    }
}

simd_fn! {
    /// Softmax of a masked score row in place; its log-sum-exp (+∞ when every key is masked,
    /// the row then all zeros).
    fn softmax_row(s: &mut [f32]) -> f32 {
        let m = max(s);
        if m == f32::NEG_INFINITY {
            s.fill(0.0);
            return f32::INFINITY;
        }
        for x in s.iter_mut() {
            *x = exp(*x - m);
        }
        let l = sum(s);
        let inv = 1.0 / l;
        s.iter_mut().for_each(|x| *x *= inv);
        m + l.ln()
    }
}

simd_fn! {
    /// From masked scores `p` and dP `dp`: p ← P = e^(s − lse), dp ← dS = P · (dP − δ).
    fn grad_row(p: &mut [f32], dp: &mut [f32], lse: f32, delta: f32) {
        for (x, g) in p.iter_mut().zip(dp.iter_mut()) {
            *x = exp(*x - lse);
            *g = *x * (*g - delta);
        }
    }
}

#[cfg(feature = "cuda")]
fn shape4(q: &[usize], d: &Dims) -> crate::cuda::attention::Shape4 {
    crate::cuda::attention::Shape4 {
        b: q[0],
        heads: d.heads,
        rep: d.rep,
        tq: d.tq,
        tk: d.tk,
        d: d.d,
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    cuda_fwd!(|self, qs, ql, ks, kl, vs, vl| {
        let dims = dims(ql.dims(), kl.dims(), vl.dims(), self.mask.past_len)?;
        let s = shape4(ql.dims(), &dims);
        crate::cuda::attention::forward(&self.mask, s, qs, ql, ks, kl, vs, vl)
    });

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (q, k, v) = (f32s(qs, ql, n)?, f32s(ks, kl, n)?, f32s(vs, vl, n)?);
        let dims = dims(ql.dims(), kl.dims(), vl.dims(), self.mask.past_len)?;
        let (plane, kv_plane) = (dims.tq * dims.d, dims.tk * dims.d);
        let mut o = output(q.len());
        let mut lse = output(q.len() / dims.d.max(1));
        if plane > 0 {
            o.par_chunks_mut(plane)
                .zip(lse.par_chunks_mut(dims.tq))
                .enumerate()
                .for_each(|(bh, (o, lse))| {
                    let (b, h) = (bh / dims.heads, bh % dims.heads);
                    let g = b * (dims.heads / dims.rep) + h / dims.rep;
                    let kv = g * kv_plane..(g + 1) * kv_plane;
                    let qp = &q[bh * plane..(bh + 1) * plane];
                    self.forward_plane(b, &dims, qp, &k[kv.clone()], &v[kv], o, lse);
                });
        }
        *self.lse.lock().expect("lse lock") = lse;
        Ok((CpuStorage::F32(o), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let lse = std::mem::take(&mut *self.lse.lock().expect("lse lock"));
        let dims = dims(q.dims(), k.dims(), v.dims(), self.mask.past_len)?;
        // On a GPU the backward kernels recompute each row's log-sum-exp.
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let s = shape4(q.dims(), &dims);
            let (dq, dk, dv) =
                crate::cuda::attention::backward(&self.mask, s, [q, k, v, o, &dout])?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        if lse.len() != q.elem_count() / dims.d.max(1) {
            return Err(Error::Msg(
                "fused-attention: backward without forward".into(),
            ));
        }
        let shapes = [q.shape().clone(), k.shape().clone(), v.shape().clone()];
        let device = q.device().clone();
        let guards = [q, k, v, o, &dout].map(|t| t.storage_and_layout());
        let mut data = Vec::new();
        for (s, l) in &guards {
            let Storage::Cpu(c) = &**s else {
                return Err(Error::Msg("fused-attention: CPU tensors only".into()));
            };
            data.push(f32s(c, l, self.name())?);
        }
        let [q, k, v, o, dout] = [data[0], data[1], data[2], data[3], data[4]];
        let (plane, kv_plane) = (dims.tq * dims.d, dims.tk * dims.d);
        let (mut dq, mut dk, mut dv) = (output(q.len()), output(k.len()), output(v.len()));
        let group = dims.rep * plane;
        if plane > 0 && kv_plane > 0 {
            dq.par_chunks_mut(group)
                .zip(dk.par_chunks_mut(kv_plane).zip(dv.par_chunks_mut(kv_plane)))
                .enumerate()
                .for_each(|(g, (dq, (dk, dv)))| {
                    let b = g / (dims.heads / dims.rep);
                    let qs = g * group..(g + 1) * group;
                    let ls = g * dims.rep * dims.tq..(g + 1) * dims.rep * dims.tq;
                    let kv = g * kv_plane..(g + 1) * kv_plane;
                    let ours = (&q[qs.clone()], &o[qs.clone()], &dout[qs], &lse[ls]);
                    self.backward_group(b, &dims, ours, (&k[kv.clone()], &v[kv]), dq, dk, dv);
                });
        } else {
            dk.fill(0.0);
            dv.fill(0.0);
            dq.fill(0.0);
        }
        drop(guards);
        let t = |x: Vec<f32>, shape: &Shape| Tensor::from_vec(x, shape, &device);
        Ok((
            Some(t(dq, &shapes[0])?),
            Some(t(dk, &shapes[1])?),
            Some(t(dv, &shapes[2])?),
        ))
    }
}
