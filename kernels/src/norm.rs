//! LayerNorm and GroupNorm with affine weight and bias, one kernel for both: rows of M
//! elements are normalised (mean and biased variance, two passes for accuracy), and element j
//! of row r takes the weight and bias of channel `(r mod G)·C/G + j / S` — LayerNorm is one
//! group of D channels with S = 1; GroupNorm over (N, C, spatial…) has rows (n, g) of C/G · S
//! elements. Backward: dx per row in one pass from its Σ dx̂ and Σ dx̂·x̂; dw, db as per-thread
//! partial sums over rows.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32s, output, sum};
use crate::simd::rows_per_task;

const GRAIN: usize = 1 << 14;

/// How rows map to channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grouping {
    /// Groups G (rows cycle through them).
    pub groups: usize,
    /// Channels per group C/G.
    pub per_group: usize,
    /// Elements per channel within a row (spatial size S).
    pub spatial: usize,
    pub eps: f32,
}

impl Grouping {
    fn row_len(&self) -> usize {
        self.per_group * self.spatial
    }

    fn channels(&self) -> usize {
        self.groups * self.per_group
    }

    /// Mean and 1/std of a row.
    #[inline]
    fn stats(&self, x: &[f32]) -> (f32, f32) {
        let m = x.len() as f32;
        let mean = sum(x) / m;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / m;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    /// Rows `first..` (`x`, `y` holding whole rows): y = x̂ · w + b.
    fn forward(&self, first: usize, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
        let (m, s) = (self.row_len(), self.spatial);
        for (i, (xr, yr)) in x.chunks_exact(m).zip(y.chunks_exact_mut(m)).enumerate() {
            let (mean, rstd) = self.stats(xr);
            let c0 = ((first + i) % self.groups) * self.per_group;
            for (c, (xc, yc)) in xr.chunks_exact(s).zip(yr.chunks_exact_mut(s)).enumerate() {
                let (wc, bc) = (w[c0 + c] * rstd, b[c0 + c]);
                for k in 0..s {
                    yc[k] = (xc[k] - mean) * wc + bc;
                }
            }
        }
    }

    /// dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)), dx̂ = g · w.
    fn dx(&self, first: usize, x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32]) {
        let (m, s) = (self.row_len(), self.spatial);
        for (i, ((xr, gr), dr)) in x
            .chunks_exact(m)
            .zip(g.chunks_exact(m))
            .zip(dx.chunks_exact_mut(m))
            .enumerate()
        {
            let (mean, rstd) = self.stats(xr);
            let c0 = ((first + i) % self.groups) * self.per_group;
            let (mut a, mut bsum) = (0f32, 0f32);
            for c in 0..self.per_group {
                let wc = w[c0 + c];
                for k in c * s..(c + 1) * s {
                    let dxh = gr[k] * wc;
                    dr[k] = dxh;
                    a += dxh;
                    bsum += dxh * (xr[k] - mean) * rstd;
                }
            }
            let (a, bsum) = (a / m as f32, bsum / m as f32);
            for k in 0..m {
                let xh = (xr[k] - mean) * rstd;
                dr[k] = rstd * (dr[k] - a - xh * bsum);
            }
        }
    }

    /// Adds rows' Σ g · x̂ to dw and Σ g to db, per channel.
    fn dwdb(&self, first: usize, x: &[f32], g: &[f32], dw: &mut [f32], db: &mut [f32]) {
        let (m, s) = (self.row_len(), self.spatial);
        for (i, (xr, gr)) in x.chunks_exact(m).zip(g.chunks_exact(m)).enumerate() {
            let (mean, rstd) = self.stats(xr);
            let c0 = ((first + i) % self.groups) * self.per_group;
            for c in 0..self.per_group {
                let (mut w, mut b) = (0f32, 0f32);
                for k in c * s..(c + 1) * s {
                    w += gr[k] * (xr[k] - mean) * rstd;
                    b += gr[k];
                }
                dw[c0 + c] += w;
                db[c0 + c] += b;
            }
        }
    }

    fn chunk_rows(&self, len: usize) -> usize {
        rows_per_task(len / self.row_len().max(1), self.row_len(), GRAIN)
    }
}

pub(crate) struct Norm(pub Grouping);

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    cuda_fwd!(|self, a, al, b, bl, c, cl| {
        crate::cuda::norm::forward(&self.0, a, al, b, bl, c, cl)
    });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (x, w, b) = (f32s(xs, xl, n)?, f32s(ws, wl, n)?, f32s(bs, bl, n)?);
        let g = self.0;
        let mut y = output(x.len());
        let rows = g.chunk_rows(x.len());
        let chunk = rows * g.row_len();
        if chunk > 0 {
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .enumerate()
                .for_each(|(t, (y, x))| g.forward(t * rows, x, w, b, y));
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &NormDx(self.0))?;
        let both = x.apply_op2_no_bwd(&g, &NormDwDb(self.0))?;
        // The GPU kernel sums dw and db in f32 whatever the weight's dtype.
        let (shape, dtype) = (w.shape(), w.dtype());
        Ok((
            Some(dx),
            Some(both.get(0)?.reshape(shape)?.to_dtype(dtype)?),
            Some(both.get(1)?.reshape(shape)?.to_dtype(dtype)?),
        ))
    }
}

struct NormDx(Grouping);

impl CustomOp3 for NormDx {
    fn name(&self) -> &'static str {
        "fused-norm-dx"
    }

    cuda_fwd!(|self, a, al, b, bl, c, cl| { crate::cuda::norm::dx(&self.0, a, al, b, bl, c, cl) });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (x, w, g) = (f32s(xs, xl, n)?, f32s(ws, wl, n)?, f32s(gs, gl, n)?);
        let gr = self.0;
        let mut dx = output(x.len());
        let rows = gr.chunk_rows(x.len());
        let chunk = rows * gr.row_len();
        if chunk > 0 {
            dx.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .enumerate()
                .for_each(|(t, (dx, (x, g)))| gr.dx(t * rows, x, w, g, dx));
        }
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

struct NormDwDb(Grouping);

impl CustomOp2 for NormDwDb {
    fn name(&self) -> &'static str {
        "fused-norm-dwdb"
    }

    cuda_fwd!(|self, a, al, b, bl| { crate::cuda::norm::dw_db(&self.0, a, al, b, bl) });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(xs, xl, self.name())?, f32s(gs, gl, self.name())?);
        let gr = self.0;
        let c = gr.channels();
        let rows = gr.chunk_rows(x.len());
        let chunk = (rows * gr.row_len()).max(1);
        let both = x
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .enumerate()
            .fold(
                || vec![0f32; 2 * c],
                |mut acc, (t, (x, g))| {
                    let (dw, db) = acc.split_at_mut(c);
                    gr.dwdb(t * rows, x, g, dw, db);
                    acc
                },
            )
            .reduce(
                || vec![0f32; 2 * c],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(both), Shape::from((2, c))))
    }
}
