//! Deferred weight gradients, for zero-bubble pipeline schedules.
//!
//! A linear layer's backward is two matmuls: dX = dY·W, which the previous stage is waiting
//! for, and dW = dYᵀ·X, which nobody is. Candle's matmul backward always computes both, so
//! under a zero-bubble schedule the model's projections run as [`DeferredLinear`]: its
//! backward (the B pass) computes dX only and keeps (X, dY); the W pass computes dW later,
//! in what would otherwise be a bubble.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::models::llama::{Kernels, Regions};
use crate::Result;

/// A projection whose weight gradient is pending: weight name, its input X, its output's dY.
type Pending = (String, Tensor, Tensor);

/// The pending projections of each (chunk, micro-batch).
#[derive(Default)]
pub struct WeightGradStash {
    /// Where the projections of the backward now running file their pending work.
    current: Mutex<Option<(usize, usize)>>,
    pending: Mutex<HashMap<(usize, usize), Vec<Pending>>>,
}

impl WeightGradStash {
    /// Backward passes until [`Self::end`] defer their weight gradients under `key`.
    pub fn begin(&self, key: (usize, usize)) {
        *self.current.lock().expect("stash lock") = Some(key);
    }

    pub fn end(&self) {
        *self.current.lock().expect("stash lock") = None;
    }

    /// The weight gradients deferred under `key`: dW = dYᵀ·X summed over all rows, per name
    /// (a weight used twice, such as tied embeddings, gets the sum).
    pub fn take(&self, key: (usize, usize)) -> Result<Vec<(String, Tensor)>> {
        let work = self
            .pending
            .lock()
            .expect("stash lock")
            .remove(&key)
            .unwrap_or_default();
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (name, x, dy) in work {
            let (rows_in, rows_out) = (
                x.dim(candle_core::D::Minus1)?,
                dy.dim(candle_core::D::Minus1)?,
            );
            let x = x.reshape(((), rows_in))?;
            let dy = dy.reshape(((), rows_out))?;
            let dw = dy.t()?.matmul(&x)?;
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, acc)) => *acc = (&*acc + dw)?,
                None => out.push((name, dw)),
            }
        }
        Ok(out)
    }

    fn file(&self, name: &str, x: Tensor, dy: Tensor) -> bool {
        let Some(key) = *self.current.lock().expect("stash lock") else {
            return false;
        };
        let mut pending = self.pending.lock().expect("stash lock");
        pending
            .entry(key)
            .or_default()
            .push((name.to_string(), x, dy));
        true
    }
}

/// `x @ wᵀ` whose backward defers dW to the stash while a deferred backward is running.
struct DeferredLinear {
    name: String,
    stash: Arc<WeightGradStash>,
}

fn host_tensor(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let dev = &candle_core::Device::Cpu;
    let t = match s {
        CpuStorage::F32(v) => Tensor::from_slice(v, v.len(), dev)?,
        CpuStorage::BF16(v) => Tensor::from_slice(v, v.len(), dev)?,
        CpuStorage::F16(v) => Tensor::from_slice(v, v.len(), dev)?,
        _ => candle_core::bail!("deferred linear: only f32, bf16 and f16"),
    };
    // Rebuild the view the layout describes (offset and strides).
    let (start, _) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("deferred linear: input must be contiguous".into())
    })?;
    t.narrow(0, start, l.shape().elem_count())?
        .reshape(l.shape())
}

impl CustomOp2 for DeferredLinear {
    fn name(&self) -> &'static str {
        "deferred-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = host_tensor(s1, l1)?;
        let w = host_tensor(s2, l2)?;
        let y = crate::nn::linear(&x, &w, None)?;
        let flat = y.flatten_all()?;
        let storage = match y.dtype() {
            candle_core::DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            candle_core::DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
            candle_core::DType::F16 => CpuStorage::F16(flat.to_vec1()?),
            d => candle_core::bail!("deferred linear: unsupported dtype {d:?}"),
        };
        Ok((storage, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = crate::cuda_op::tensor_of(s1, l1)?;
        let w = crate::cuda_op::tensor_of(s2, l2)?;
        crate::cuda_op::storage_of(&crate::nn::linear(&x, &w, None)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad.broadcast_matmul(w)?;
        if self.stash.file(&self.name, x.detach(), grad.detach()) {
            return Ok((Some(dx), None));
        }
        let (n_in, n_out) = (
            x.dim(candle_core::D::Minus1)?,
            grad.dim(candle_core::D::Minus1)?,
        );
        let dw = grad
            .reshape(((), n_out))?
            .t()?
            .matmul(&x.reshape(((), n_in))?)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Another model's regions with every projection's weight gradient deferrable.
#[derive(Clone)]
pub struct DeferWeightGrads {
    pub inner: Arc<dyn Regions>,
    pub stash: Arc<WeightGradStash>,
}

impl std::fmt::Debug for DeferWeightGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeferWeightGrads({:?})", self.inner)
    }
}

impl Regions for DeferWeightGrads {
    fn inner(&self) -> Option<&dyn Regions> {
        Some(self.inner.as_ref())
    }

    fn linear(&self, name: &str, x: &Tensor, w: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if !(x.device().is_cpu() || cfg!(feature = "cuda") && x.device().is_cuda()) {
            // The custom op has CPU and CUDA bodies; elsewhere the weight gradient comes with B.
            return self.inner.linear(name, x, w, kernels);
        }
        let op = DeferredLinear {
            name: name.to_string(),
            stash: self.stash.clone(),
        };
        Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
    }
}

/// `model` with deferrable weight gradients, and the stash a zero-bubble schedule drives.
pub fn defer_weight_grads(
    model: &crate::models::llama::Llama,
) -> (crate::models::llama::Llama, Arc<WeightGradStash>) {
    let stash = Arc::new(WeightGradStash::default());
    let regions = DeferWeightGrads {
        inner: model.regions.clone(),
        stash: stash.clone(),
    };
    (model.with_regions(Arc::new(regions)), stash)
}
