//! Reading custom-op arguments and the vector reductions the row kernels share.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Error, Layout, Result};

/// The contiguous f32 data of a custom op's argument.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(Error::Msg(format!(
            "{op}: fused kernel takes f32, got {:?}",
            s.dtype()
        )));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: fused kernel takes contiguous inputs")))?;
    Ok(&v[a..b])
}

const LANES: usize = 16;

/// Σ a·b with 16 independent accumulators (the order a vector unit sums in).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let c = a.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for i in 0..LANES {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + r.iter().sum::<f32>()
}

#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = a.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for i in 0..LANES {
            acc[i] = if x[i] > acc[i] { x[i] } else { acc[i] };
        }
    }
    let m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    r.iter().fold(m, |m, &v| if v > m { v } else { m })
}

/// A zeroless output buffer of `n` f32s: every kernel writes each element before reading it.
#[allow(clippy::uninit_vec)]
pub(crate) fn output(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and the caller overwrites all n elements
    // before the vector is read.
    unsafe { v.set_len(n) };
    v
}
