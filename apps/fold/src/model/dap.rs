//! Dynamic axial parallelism (FastFold): over a group of N ranks, the MSA stream is split along
//! its sequences (or, for column-wise work, its residues) and the pair stream along its rows
//! (or columns); all-to-all switches the axis between row- and column-wise operations, and the
//! small pair-derived attention biases and projections a rank needs whole are all-gathered.
//! Every exchange has its adjoint in the backward (the core's autograd collectives). With no
//! group every helper is the identity, so one code path serves both.

use candle_core::{Result, Tensor};
use colossal_core::dist::autograd;
use colossal_core::dist::Group;

#[derive(Clone)]
pub struct Dap {
    pub group: Group,
}

impl std::fmt::Debug for Dap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dap(rank {} of {})",
            self.group.rank(),
            self.group.size()
        )
    }
}

fn candle(e: colossal_core::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// This rank's chunk of `dim` (a plain slice: its gradient is zero elsewhere, so ranks that
/// computed the whole tensor alike sum to the whole gradient).
pub fn local(d: Option<&Dap>, x: &Tensor, dim: usize) -> Result<Tensor> {
    match d {
        None => Ok(x.clone()),
        Some(d) => {
            let (n, r) = (d.group.size(), d.group.rank());
            let len = x.dim(dim)? / n;
            x.narrow(dim, r * len, len)
        }
    }
}

/// The whole tensor from every rank's chunk of `dim` (all-gather; reduce-scatter backward).
pub fn gather(d: Option<&Dap>, x: &Tensor, dim: usize) -> Result<Tensor> {
    match d {
        None => Ok(x.clone()),
        Some(d) => autograd::gather_from(x, dim, &d.group).map_err(candle),
    }
}

/// Split along `scatter` instead of `gather` (all-to-all; the inverse backward).
pub fn switch(d: Option<&Dap>, x: &Tensor, scatter: usize, gather: usize) -> Result<Tensor> {
    match d {
        None => Ok(x.clone()),
        Some(d) => autograd::all_to_all(x, scatter, gather, &d.group).map_err(candle),
    }
}

/// Partial sums from every rank, summed and split along `dim` (reduce-scatter; all-gather
/// backward).
pub fn reduce_scatter(d: Option<&Dap>, x: &Tensor, dim: usize) -> Result<Tensor> {
    match d {
        None => Ok(x.clone()),
        Some(d) => autograd::scatter_reduce(x, dim, &d.group).map_err(candle),
    }
}

/// Checks that the streams split evenly.
pub fn check(d: Option<&Dap>, seqs: usize, residues: usize) -> Result<()> {
    if let Some(d) = d {
        let n = d.group.size();
        if !seqs.is_multiple_of(n) || !residues.is_multiple_of(n) {
            return Err(candle_core::Error::Msg(format!(
                "parallel.sp = {n} (dap) must divide the MSA depth ({seqs}) and the residue count ({residues}): crop or pad the example"
            )));
        }
    }
    Ok(())
}
