//! AdamW exactly as `torch.optim.AdamW(foreach=False)`: decoupled decay, bias correction,
//! eps added outside the square root, first moment by `lerp`.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use colossal_kernels::adamw::AdamWUpdate;
use serde::{Deserialize, Serialize};

use crate::params::{Grads, Params};
use crate::Result;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Parameters whose name contains any of these get no weight decay.
    pub no_decay: Vec<String>,
}

/// Per-parameter moments (f32, on the host) and the step count.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub m: HashMap<String, Vec<f32>>,
    pub v: HashMap<String, Vec<f32>>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    pub fn decays(&self, name: &str) -> bool {
        !self.cfg.no_decay.iter().any(|p| name.contains(p.as_str()))
    }

    /// The multiplier `1 − lr·wd` of decoupled weight decay for `name` (1 in no-decay groups).
    pub fn decay_factor(&self, name: &str, lr: f64) -> f32 {
        if self.decays(name) {
            (1.0 - lr * self.cfg.weight_decay) as f32
        } else {
            1.0
        }
    }

    /// One update of every parameter that has a gradient: in the parameter's own storage
    /// where it is f32 on the CPU (the kernels crate's fused update), else by copy.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let k = AdamWKernel::new(&self.cfg, self.step, lr);
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let decay = self.decay_factor(name, lr);
            let n = var.elem_count();
            let m = self
                .m
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; n]);
            let v = self
                .v
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; n]);
            if k.with_decay(decay)
                .apply_in_place(var.as_tensor(), g, m, v)?
            {
                continue;
            }
            let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let dtype = var.dtype();
            let mut p: Vec<f32> = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            k.update(&mut p, &g, m, v, decay);
            let t = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(dtype)?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// The per-element AdamW update for one step, with its step-dependent constants (the kernels
/// crate's fused update: multi-threaded, vectorised, bit-identical to the scalar loop).
pub struct AdamWKernel(AdamWUpdate);

impl AdamWKernel {
    pub fn new(c: &AdamWConfig, step: u64, lr: f64) -> Self {
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(step as i32)).sqrt();
        Self(AdamWUpdate {
            step_size: -(lr / bc1) as f32,
            lerp_w: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            one_minus_b2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bc2_sqrt as f32,
            eps: c.eps as f32,
            decay: 1.0,
        })
    }

    fn with_decay(&self, decay: f32) -> AdamWUpdate {
        AdamWUpdate { decay, ..self.0 }
    }

    /// Updates `p`, `m`, `v` in place from gradient `g`; `decay` = 1 − lr·wd (1 for no decay).
    pub fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: f32) {
        self.with_decay(decay).apply(p, g, m, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn no_decay_group_skips_weight_decay() {
        let mut params = Params::new();
        for name in ["layer.weight", "layer.norm.weight"] {
            params.insert(name, Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap());
        }
        let mut grads = Grads::new();
        for name in params.names().to_vec() {
            grads.set(&name, Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap());
        }
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
            no_decay: vec!["norm".into()],
        };
        let mut opt = AdamW::new(cfg);
        opt.step(&params, &grads, 0.1).unwrap();
        // Zero gradient: only decoupled decay moves the weights, p *= 1 - lr * wd.
        let decayed: Vec<f32> = params.get("layer.weight").unwrap().to_vec1().unwrap();
        assert_eq!(decayed, vec![0.95, -1.9]);
        let kept: Vec<f32> = params.get("layer.norm.weight").unwrap().to_vec1().unwrap();
        assert_eq!(kept, vec![1.0, -2.0]);
    }
}
