//! AdamW exactly as `torch.optim.AdamW(foreach=False)`: decoupled decay, bias correction,
//! eps added outside the square root, first moment by `lerp`.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
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

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = -(lr / bc1) as f32;
        let lerp_w = (1.0 - c.beta1) as f32;
        let (b2, one_minus_b2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let (bc2_sqrt, eps) = (bc2_sqrt as f32, c.eps as f32);
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let decay = if self.decays(name) {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let dtype = var.dtype();
            let mut p: Vec<f32> = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let m = self
                .m
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; p.len()]);
            let v = self
                .v
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; p.len()]);
            for i in 0..p.len() {
                p[i] *= decay;
                m[i] = lerp(m[i], g[i], lerp_w);
                v[i] = v[i] * b2 + one_minus_b2 * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] += step_size * (m[i] / denom);
            }
            let t = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(dtype)?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// torch's `lerp`: `a + w (b - a)` for w < 0.5, else `b - (b - a)(1 - w)`.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
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
