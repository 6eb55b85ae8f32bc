//! The layers every module is made of, read from the parameters by OpenFold's names: Linear
//! (`<prefix>.weight`, `<prefix>.bias` when it has one), LayerNorm, and OpenFold's `Attention`
//! (q, k, v without bias, scaled queries, any number of additive biases, a sigmoid gate from
//! the queries, output projection). All ops have a backward (our kernels).

use candle_core::{Result, Tensor, D};
use colossal_core::params::Params;
use colossal_kernels::Kernels;

/// Where a module reads its weights, and how it runs.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub p: &'a Params,
    pub k: Kernels,
    /// Run attention, transitions and the outer product mean over at most this many rows at
    /// a time (inference on long chains: memory for the chunk, not the whole row set).
    pub chunk: Option<usize>,
}

/// `f` over row ranges of `n` rows (`chunk` at a time, or all at once), outputs concatenated
/// along the first dimension.
pub fn chunked(
    n: usize,
    chunk: Option<usize>,
    f: impl Fn(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    match chunk.filter(|&c| c > 0 && c < n) {
        None => f(0, n),
        Some(c) => {
            let parts = (0..n)
                .step_by(c)
                .map(|start| f(start, c.min(n - start)))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        }
    }
}

fn get<'a>(p: &'a Params, name: &str) -> Result<&'a Tensor> {
    p.get(name)
        .map_err(|_| candle_core::Error::Msg(format!("parameter `{name}` is missing")))
}

impl Ctx<'_> {
    /// A parameter by name.
    pub fn param(&self, name: &str) -> Result<&Tensor> {
        get(self.p, name)
    }

    /// `x · Wᵀ (+ b)`; the bias is used when the parameters have one.
    pub fn linear(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let y = self
            .k
            .linear(x, get(self.p, &format!("{prefix}.weight"))?)?;
        let bias = format!("{prefix}.bias");
        match self.p.contains(&bias) {
            true => y.broadcast_add(get(self.p, &bias)?),
            false => Ok(y),
        }
    }

    pub fn layer_norm(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let w = get(self.p, &format!("{prefix}.weight"))?;
        let b = get(self.p, &format!("{prefix}.bias"))?;
        self.k.layer_norm(x, w, b, 1e-5)
    }

    /// OpenFold's `Attention`: `q_x` (B, Q, C), `kv_x` (B, K, C), `biases` broadcasting to
    /// (B, H, Q, K); (B, Q, C).
    pub fn attention(
        &self,
        prefix: &str,
        q_x: &Tensor,
        kv_x: &Tensor,
        biases: &[&Tensor],
        heads: usize,
        c_hidden: usize,
    ) -> Result<Tensor> {
        let b = q_x.dim(0)?;
        chunked(b, self.chunk, |start, len| {
            let part = |t: &Tensor| match t.dim(0) {
                Ok(d) if d == b && b > 1 => t.narrow(0, start, len),
                _ => Ok(t.clone()),
            };
            let biases = biases.iter().map(|t| part(t)).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = biases.iter().collect();
            self.attention_all(prefix, &part(q_x)?, &part(kv_x)?, &refs, heads, c_hidden)
        })
    }

    fn attention_all(
        &self,
        prefix: &str,
        q_x: &Tensor,
        kv_x: &Tensor,
        biases: &[&Tensor],
        heads: usize,
        c_hidden: usize,
    ) -> Result<Tensor> {
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, n, _) = t.dims3()?;
            t.reshape((b, n, heads, c_hidden))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.linear(&format!("{prefix}.linear_q"), q_x)?)?;
        let q = (q / (c_hidden as f64).sqrt())?;
        let k = split(self.linear(&format!("{prefix}.linear_k"), kv_x)?)?;
        let v = split(self.linear(&format!("{prefix}.linear_v"), kv_x)?)?;
        let mut s = q.matmul(&k.t()?.contiguous()?)?;
        for b in biases {
            s = s.broadcast_add(b)?;
        }
        let a = self.k.softmax(&s)?;
        let o = a.matmul(&v)?.transpose(1, 2)?; // (B, Q, H, c)
        let g = self.linear(&format!("{prefix}.linear_g"), q_x)?;
        let g = sigmoid(&g)?;
        let (b, n, _, _) = o.dims4()?;
        let o = (o.reshape((b, n, heads * c_hidden))? * g)?;
        self.linear(&format!("{prefix}.linear_o"), &o)
    }
}

/// 1 / (1 + e^(−x)), from ops that have a backward.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// The additive attention bias of a key mask (…, K): 0 where kept, −inf where masked.
pub fn mask_bias(mask: &Tensor, inf: f64) -> Result<Tensor> {
    (mask - 1.0)? * inf
}

/// Softmax cross-entropy of `logits` (…, C) against one-hot `targets` (…, C), per position.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    (targets * logp)?.sum(D::Minus1)?.neg()
}
