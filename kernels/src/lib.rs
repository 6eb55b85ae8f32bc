//! Fused training ops with backward for candle.
//!
//! Each op is a candle custom op whose CPU forward and backward are single multi-threaded
//! passes, vectorised for the widest instruction set the CPU has (AVX-512, AVX2+FMA, or the
//! baseline; chosen at run time), writing outputs without zero-filling them first. With the
//! `cuda` feature, RMSNorm, LayerNorm, GroupNorm, softmax, SwiGLU, rotary, causal attention and
//! cross-entropy (not vocabulary-split) also run on GPU tensors (f32 or bf16) through CUDA kernels compiled
//! at run time by NVRTC (`kernels/cuda`), as does AdamW's update. Where no fused kernel
//! applies — another dtype, or a GPU op without a CUDA kernel yet — the op runs its reference
//! formulation ([`reference`]), which is also what the kernels are tested against.
//!
//! [`Kernels`] is the switch a model holds: `Fused` (the default) or `Reference`.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

pub use attention::CausalMask;
pub use cross_entropy::{Reduce, VocabSplit};

/// A custom op's `cuda_fwd` (feature `cuda`): the storages and layouts, named as given, handed
/// to a GPU body in `cuda/`. One signature per arity, written once.
macro_rules! cuda_fwd {
    (|$s:ident, $a:ident, $al:ident| $body:block) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &$s,
            $a: &candle_core::CudaStorage,
            $al: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> $body
    };
    (|$s:ident, $a:ident, $al:ident, $b:ident, $bl:ident| $body:block) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &$s,
            $a: &candle_core::CudaStorage,
            $al: &candle_core::Layout,
            $b: &candle_core::CudaStorage,
            $bl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> $body
    };
    (|$s:ident, $a:ident, $al:ident, $b:ident, $bl:ident, $c:ident, $cl:ident| $body:block) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &$s,
            $a: &candle_core::CudaStorage,
            $al: &candle_core::Layout,
            $b: &candle_core::CudaStorage,
            $bl: &candle_core::Layout,
            $c: &candle_core::CudaStorage,
            $cl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> $body
    };
}

pub mod adamw;
mod attention;
mod conv;
mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod linear;
mod matmul;
mod norm;
pub mod reference;
mod rms_norm;
mod rotary;
pub mod simd;
mod softmax;
mod swiglu;

/// Which implementation of the ops a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// This crate's fused kernels where they apply, the reference elsewhere.
    #[default]
    Fused,
    /// The reference formulations only (for comparison).
    Reference,
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernels::Fused => "fused",
            Kernels::Reference => "reference",
        })
    }
}

impl Kernels {
    /// Whether the fused kernel runs on these tensors.
    fn fused_on(self, xs: &[&Tensor]) -> bool {
        self == Kernels::Fused
            && xs
                .iter()
                .all(|x| x.dtype() == DType::F32 && x.device().is_cpu())
    }

    /// Whether an op with a CUDA kernel runs it on these tensors: all on one GPU, of one dtype
    /// the kernels take (f32 or bf16). Always false without the `cuda` feature.
    fn fused_on_gpu(self, xs: &[&Tensor]) -> bool {
        #[cfg(feature = "cuda")]
        {
            let first = xs[0];
            self == Kernels::Fused
                && first.device().is_cuda()
                && cuda::takes(first.dtype())
                && xs
                    .iter()
                    .all(|x| x.dtype() == first.dtype() && x.device().same_device(first.device()))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = xs;
            false
        }
    }

    /// Either kernel set, CPU or GPU, for an op that has both.
    fn fused_anywhere(self, xs: &[&Tensor]) -> bool {
        self.fused_on(xs) || self.fused_on_gpu(xs)
    }

    /// RMSNorm over the last dimension with weight `w` (HF LlamaRMSNorm).
    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let d = x.dims().last().copied().unwrap_or(0);
        if !self.fused_anywhere(&[x, w]) || w.dims() != [d] {
            return reference::rms_norm(x, w, eps);
        }
        let op = rms_norm::RmsNorm { eps: eps as f32 };
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    }

    /// x (…, K) · wᵀ for w (N, K).
    pub fn linear(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let fits = w.rank() == 2 && x.rank() >= 1 && x.dims().last() == w.dims().get(1);
        if !self.fused_on(&[x, w]) || !fits {
            return reference::linear(x, w);
        }
        x.contiguous()?.apply_op2(&w.contiguous()?, linear::Linear)
    }

    /// LayerNorm over the last dimension with weight and bias (D), as `torch.nn.LayerNorm`.
    pub fn layer_norm(self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let d = x.dims().last().copied().unwrap_or(0);
        let fits = w.dims() == [d] && b.dims() == [d] && d > 0;
        if !self.fused_anywhere(&[x, w, b]) || !fits {
            return reference::layer_norm(x, w, b, eps);
        }
        let g = norm::Grouping {
            groups: 1,
            per_group: d,
            spatial: 1,
            eps: eps as f32,
        };
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, norm::Norm(g))
    }

    /// GroupNorm of x (N, C, spatial…) over `groups` groups of channels, with per-channel
    /// weight and bias (C), as `torch.nn.GroupNorm`.
    pub fn group_norm(
        self,
        x: &Tensor,
        groups: usize,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
            return Err(candle_core::Error::Msg(format!(
                "group_norm: x {dims:?} needs (N, C, …) with C divisible by {groups} groups"
            )));
        }
        let c = dims[1];
        let fits = w.dims() == [c] && b.dims() == [c];
        if !self.fused_anywhere(&[x, w, b]) || !fits {
            return reference::group_norm(x, groups, w, b, eps);
        }
        let g = norm::Grouping {
            groups,
            per_group: c / groups,
            spatial: dims[2..].iter().product(),
            eps: eps as f32,
        };
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, norm::Norm(g))
    }

    /// 2-D convolution of x (B, C, H, W) by w (O, C, kh, kw) (groups 1, dilation 1), as
    /// `Tensor::conv2d`: im2col + gemm per image, forward and backward (see `conv.rs`).
    pub fn conv2d(self, x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        let op = conv::Conv2d { padding, stride };
        if !self.fused_on(&[x, w]) || !op.fits(x, w) {
            return x.conv2d(w, padding, stride, 1, 1);
        }
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    }

    /// Softmax over the last dimension.
    pub fn softmax(self, x: &Tensor) -> Result<Tensor> {
        if !self.fused_anywhere(&[x]) {
            return reference::softmax(x);
        }
        x.contiguous()?.apply_op1(softmax::Softmax)
    }

    /// silu(gate) · up.
    pub fn swiglu(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if !self.fused_anywhere(&[gate, up]) || gate.shape() != up.shape() {
            return reference::swiglu(gate, up);
        }
        gate.contiguous()?
            .apply_op2(&up.contiguous()?, swiglu::SwiGlu)
    }

    /// Rotary embedding of x (B, H, T, D) with tables cos, sin (B or 1, T, D).
    pub fn rotary(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if !self.fused_anywhere(&[x, cos, sin]) {
            return reference::rotary(x, cos, sin);
        }
        let op = rotary::Rotary { inverse: false };
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
    }

    /// Causal attention of q (B, H, T, D), already scaled, over k, v (B, Hkv, past + T, D)
    /// with `mask`, without keeping the (T × T) probabilities. `None` where no fused kernel
    /// applies (not f32 on the CPU, or `Reference`): the caller runs its reference.
    pub fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &CausalMask,
    ) -> Result<Option<Tensor>> {
        // The CUDA kernel holds up to 512 columns of a head per block.
        let gpu = self.fused_on_gpu(&[q, k, v]) && q.dims().last().is_some_and(|&d| d <= 512);
        if !self.fused_on(&[q, k, v]) && !gpu {
            return Ok(None);
        }
        let op = attention::Attention {
            mask: mask.clone(),
            lse: Mutex::new(Vec::new()),
        };
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        Ok(Some(q.apply_op3(&k, &v, op)?))
    }

    /// Sum of the cross-entropies of rows `logits` (N, V) against `targets` (N) other than
    /// `ignore`, and how many there are.
    pub fn cross_entropy_sum(
        self,
        logits: &Tensor,
        targets: &[i64],
        ignore: i64,
    ) -> Result<(Tensor, usize)> {
        if !self.fused_anywhere(&[logits]) {
            return reference::cross_entropy_sum(logits, targets, ignore);
        }
        let count = targets.iter().filter(|&&t| t != ignore).count();
        let op = cross_entropy::CrossEntropy {
            targets: Arc::new(targets.to_vec()),
            ignore,
            split: None,
            lse: Mutex::new(Vec::new()),
        };
        Ok((logits.contiguous()?.apply_op1(op)?, count))
    }

    /// [`Self::cross_entropy_sum`] of logits split by vocabulary over a group of ranks
    /// (`split` completes the row statistics); every rank gets the same sum and the gradient
    /// of its own columns. `None` where no fused kernel applies.
    pub fn cross_entropy_sum_split(
        self,
        logits: &Tensor,
        targets: &[i64],
        ignore: i64,
        split: VocabSplit,
    ) -> Result<Option<(Tensor, usize)>> {
        if !self.fused_anywhere(&[logits]) {
            return Ok(None);
        }
        let count = targets.iter().filter(|&&t| t != ignore).count();
        let op = cross_entropy::CrossEntropy {
            targets: Arc::new(targets.to_vec()),
            ignore,
            split: Some(Arc::new(split)),
            lse: Mutex::new(Vec::new()),
        };
        Ok(Some((logits.contiguous()?.apply_op1(op)?, count)))
    }
}
