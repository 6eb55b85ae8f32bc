//! AdamW exactly as `torch.optim.AdamW(foreach=False)`: decoupled decay, bias correction,
//! eps added outside the square root, first moment by `lerp`.

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
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

/// One Adam moment (f32) of one parameter, where its parameter lives: on the host for a CPU
/// parameter (the fused kernel updates it in place), on the parameter's device otherwise
/// (updated there by tensor ops, so a GPU step has no host round trip).
#[derive(Clone, Debug)]
pub enum Moment {
    Host(Vec<f32>),
    Device(Tensor),
}

impl Moment {
    /// The values of moment `m` of a parameter of `len` elements on the host: zeros when it
    /// has none (not stepped yet), as AdamW starts them.
    pub fn host_or_zeros(m: Option<&Moment>, len: usize) -> Result<Vec<f32>> {
        Ok(match m {
            Some(m) => m.host()?.into_owned(),
            None => vec![0.0; len],
        })
    }

    /// Its values on the host (a copy when it lives on a device).
    pub fn host(&self) -> Result<Cow<'_, [f32]>> {
        Ok(match self {
            Moment::Host(v) => Cow::Borrowed(v),
            Moment::Device(t) => Cow::Owned(t.flatten_all()?.to_vec1()?),
        })
    }

    pub fn into_host(self) -> Result<Vec<f32>> {
        Ok(match self {
            Moment::Host(v) => v,
            Moment::Device(t) => t.flatten_all()?.to_vec1()?,
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Moment::Host(v) => v.len(),
            Moment::Device(t) => t.elem_count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// On `var`'s device, shaped as it (a moment loaded from a checkpoint starts on the host).
    fn on_device_of(&self, var: &Var) -> Result<Tensor> {
        Ok(match self {
            Moment::Device(t) => t.clone(),
            Moment::Host(v) => Tensor::from_slice(v, var.shape(), var.device())?,
        })
    }
}

impl From<Vec<f32>> for Moment {
    fn from(v: Vec<f32>) -> Self {
        Moment::Host(v)
    }
}

/// Per-parameter moments and the step count.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub m: HashMap<String, Moment>,
    pub v: HashMap<String, Moment>,
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

    /// One update of every parameter that has a gradient: a CPU parameter in its own storage
    /// where it is f32 (the kernels crate's fused update), else by copy; a parameter on a
    /// device by tensor ops on that device, its moments kept there.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let k = AdamWKernel::new(&self.cfg, self.step, lr);
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let decay = self.decay_factor(name, lr);
            if !var.device().is_cpu() {
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                let m = match self.m.get(name) {
                    Some(m) => m.on_device_of(var)?,
                    None => zeros()?,
                };
                let v = match self.v.get(name) {
                    Some(v) => v.on_device_of(var)?,
                    None => zeros()?,
                };
                let (m, v) = if k.update_on_device(var.as_tensor(), g, &m, &v, decay)? {
                    (m, v)
                } else {
                    k.update_tensors(var, g, m, v, decay)?
                };
                self.m.insert(name.to_string(), Moment::Device(m));
                self.v.insert(name.to_string(), Moment::Device(v));
                continue;
            }
            let n = var.elem_count();
            let host = |store: &mut HashMap<String, Moment>| -> Result<Vec<f32>> {
                match store.remove(name) {
                    Some(m) => m.into_host(),
                    None => Ok(vec![0.0; n]),
                }
            };
            let (mut m, mut v) = (host(&mut self.m)?, host(&mut self.v)?);
            if !k
                .with_decay(decay)
                .apply_in_place(var.as_tensor(), g, &mut m, &mut v)?
            {
                let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let dtype = var.dtype();
                let mut p: Vec<f32> = var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                k.update(&mut p, &g, &mut m, &mut v, decay);
                let t = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(dtype)?;
                var.set(&t)?;
            }
            self.m.insert(name.to_string(), Moment::Host(m));
            self.v.insert(name.to_string(), Moment::Host(v));
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

    /// The update in place by the kernels crate's CUDA kernel (one launch, no temporaries),
    /// where it applies: GPU tensors, f32 parameter and moments. `false`: nothing done, use
    /// [`Self::update_tensors`] / [`Self::update_values`].
    pub fn update_on_device(
        &self,
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        decay: f32,
    ) -> Result<bool> {
        Ok(self.with_decay(decay).apply_on_device(p, g, m, v)?)
    }

    /// The same update by tensor ops on the parameter's device, in torch's order of
    /// operations (the fused kernel's); returns the new moments.
    pub fn update_tensors(
        &self,
        var: &Var,
        g: &Tensor,
        m: Tensor,
        v: Tensor,
        decay: f32,
    ) -> Result<(Tensor, Tensor)> {
        let p = var.as_tensor().to_dtype(DType::F32)?;
        let (p, m, v) = self.update_values(&p, g, &m, &v, decay)?;
        var.set(&p.to_dtype(var.dtype())?)?;
        Ok((m, v))
    }

    /// [`Self::update_tensors`] on plain f32 tensors of one shape, wherever they live: returns
    /// the new (parameter, first moment, second moment).
    pub fn update_values(
        &self,
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        decay: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let k = self.with_decay(decay);
        let scalar = |x: f32| Tensor::new(x, p.device());
        let g = g.to_dtype(DType::F32)?;
        // torch's lerp(m, g, w) = m + w (g − m) for w < 0.5, else g − (g − m)(1 − w).
        let diff = (&g - m)?;
        let m = if k.lerp_w < 0.5 {
            (m + diff.affine(k.lerp_w as f64, 0.0)?)?
        } else {
            (&g - diff.affine((1.0 - k.lerp_w) as f64, 0.0)?)?
        };
        let v = (v.affine(k.b2 as f64, 0.0)? + (g.affine(k.one_minus_b2 as f64, 0.0)? * &g)?)?;
        let denom = v
            .sqrt()?
            .broadcast_div(&scalar(k.bc2_sqrt)?)?
            .affine(1.0, k.eps as f64)?;
        let step = (&m / denom)?.affine(k.step_size as f64, 0.0)?;
        let p = (p.affine(k.decay as f64, 0.0)? + step)?;
        Ok((p, m, v))
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

    /// The device path (tensor ops, used for GPU parameters) is the fused host update in
    /// another form: run both on the CPU over six steps, with decay, β1 and β2 all at work.
    #[test]
    fn the_device_update_tracks_the_fused_host_update() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            no_decay: vec![],
        };
        let n = 37;
        let init: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut p, mut m, mut v) = (init.clone(), vec![0.0; n], vec![0.0; n]);
        let var = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let zeros = || Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let (mut tm, mut tv) = (zeros(), zeros());
        for step in 1..=6u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i as f32 + step as f32) * 0.71).cos())
                .collect();
            let k = AdamWKernel::new(&cfg, step, 1e-2);
            k.update(&mut p, &g, &mut m, &mut v, 0.999);
            let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
            (tm, tv) = k.update_tensors(&var, &gt, tm, tv, 0.999).unwrap();
            let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            for (what, a, b) in [
                ("param", &got, &p),
                ("m", &tm.to_vec1().unwrap(), &m),
                ("v", &tv.to_vec1().unwrap(), &v),
            ] {
                for (x, y) in a.iter().zip(b.iter()) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                        "step {step} {what}: {x} vs {y}"
                    );
                }
            }
        }
    }
}
