//! LoRA adapters (Hu et al. 2021, as PEFT implements them) on any Linear picked by module path:
//! y = W·x + (α/r)·B(A·x), A (r, in) and B (out, r) trainable, W frozen. The model reads the
//! adapter pair beside each targeted weight (`<module>.lora_A.weight`, `<module>.lora_B.weight`);
//! this module says which modules, builds and merges the pairs, and `peft` reads and writes
//! them in PEFT's layout.

mod dropout;
mod peft;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::params::Params;
use crate::{msg, Error, Result};

pub use dropout::DropoutKeys;
pub use peft::{load_adapter, save_adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// Which Linear layers get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Modules whose path is one of these names or ends in `.` + one of them (PEFT's list).
    Names(Vec<String>),
    /// Every Linear but the output head (PEFT's `"all-linear"`).
    AllLinear,
}

impl Targets {
    /// As PEFT writes `target_modules`: a list of names, or `"all-linear"`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Targets::Names(n) => serde_json::json!(n),
            Targets::AllLinear => serde_json::json!("all-linear"),
        }
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(n) => write!(f, "{n:?}"),
            Targets::AllLinear => write!(f, "\"all-linear\""),
        }
    }
}

/// The adapter's shape and scale, as PEFT's `LoraConfig` (the options implemented here).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub targets: Targets,
    /// Dropout on the adapter's input in training (PEFT's `lora_dropout`); no effect on
    /// loading, merging or inference.
    pub dropout: f64,
    /// Scale α/√r instead of α/r (rank-stabilised LoRA).
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The factor on B(A·x).
    pub fn scaling(&self) -> f64 {
        match self.use_rslora {
            true => self.alpha / (self.r as f64).sqrt(),
            false => self.alpha / self.r as f64,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Config("lora.r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "lora.dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        if let Targets::Names(n) = &self.targets {
            if n.is_empty() {
                return Err(Error::Config("lora.target_modules is empty".into()));
            }
        }
        Ok(())
    }

    /// Whether the Linear at `module` (a path without `.weight`) gets an adapter; `head`: it
    /// is the model's output projection.
    pub fn targets_module(&self, module: &str, head: bool) -> bool {
        match &self.targets {
            Targets::AllLinear => !head,
            Targets::Names(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        }
    }
}

/// The adapter on one Linear: its module path and the weight's (out, in).
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub module: String,
    pub out_features: usize,
    pub in_features: usize,
}

impl Site {
    pub fn a_name(&self) -> String {
        format!("{}.lora_A.weight", self.module)
    }
    pub fn b_name(&self) -> String {
        format!("{}.lora_B.weight", self.module)
    }
}

/// A model's adapters: the config (its scale) and where they sit. Models keep one to add
/// (α/r)·B(A·x) to each adapted projection.
#[derive(Clone, Debug)]
pub struct Adapters {
    pub cfg: LoraConfig,
    pub sites: Vec<Site>,
}

impl Adapters {
    /// The pair's names and the scale for the Linear whose weight is `weight`, if adapted.
    pub fn pair(&self, weight: &str) -> Option<(String, String, f64)> {
        let module = weight.strip_suffix(".weight")?;
        let s = self.sites.iter().find(|s| s.module == module)?;
        Some((s.a_name(), s.b_name(), self.cfg.scaling()))
    }

    /// `y` plus the adapter's term for the Linear with weight `weight` applied to `x`.
    pub fn add_term(
        &self,
        p: &Params,
        weight: &str,
        x: &Tensor,
        y: Tensor,
        k: colossal_kernels::Kernels,
    ) -> Result<Tensor> {
        Ok(match self.pair(weight) {
            Some((a, b, scaling)) => {
                let low = k.linear(&k.linear(x, p.get(&a)?)?, p.get(&b)?)?;
                (y + (low * scaling)?)?
            }
            None => y,
        })
    }
}

/// The adapter sites of a model whose Linear weights are `linears` (name ending in `.weight`,
/// shape (out, in), whether it is the output head). An error if nothing matches.
pub fn sites(cfg: &LoraConfig, linears: &[(String, Vec<usize>, bool)]) -> Result<Vec<Site>> {
    let sites: Vec<Site> = linears
        .iter()
        .filter_map(|(name, shape, head)| {
            let module = name.strip_suffix(".weight")?;
            (shape.len() == 2 && cfg.targets_module(module, *head)).then(|| Site {
                module: module.to_string(),
                out_features: shape[0],
                in_features: shape[1],
            })
        })
        .collect();
    if sites.is_empty() {
        return Err(Error::Config(format!(
            "lora.target_modules {} matches no Linear layer of the model",
            cfg.targets
        )));
    }
    Ok(sites)
}

/// The frozen Linear weights among `linears` (as `sites` takes them) but the output head:
/// what QLoRA keeps quantised.
pub fn frozen_linears(linears: &[(String, Vec<usize>, bool)], params: &Params) -> Vec<String> {
    linears
        .iter()
        .filter(|(n, _, head)| !head && params.is_frozen(n))
        .map(|(n, _, _)| n.clone())
        .collect()
}

/// Fresh adapters of rank `r` as PEFT initialises them: A uniform in ±1/√in (Kaiming-uniform
/// with a = √5), B zero, so the adapted model starts equal to the base. Every other parameter
/// in `params` is frozen; only the adapters are trainable.
pub fn add_fresh(params: &mut Params, r: usize, sites: &[Site], seed: u64) -> Result<()> {
    params.freeze_all();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for s in sites {
        if params.contains(&s.a_name()) {
            return Err(msg!("{} already has an adapter", s.module));
        }
        let base = params.get(&format!("{}.weight", s.module))?;
        let (dtype, device) = (base.dtype(), base.device().clone());
        let i = s.in_features;
        let bound = 1.0 / (i as f64).sqrt();
        let a: Vec<f32> = (0..r * i)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (r, i), &device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((s.out_features, r), dtype, &device)?;
        params.insert(s.a_name(), Var::from_tensor(&a)?);
        params.insert(s.b_name(), Var::from_tensor(&b)?);
    }
    Ok(())
}

/// The base weights with each adapter folded in, W + (α/r)·B·A, and no adapter tensors: a
/// plain model (PEFT's `merge_and_unload`). Every parameter of the result is trainable again.
pub fn merge(params: &Params, cfg: &LoraConfig, sites: &[Site]) -> Result<Params> {
    let adapter: std::collections::HashSet<String> = sites
        .iter()
        .flat_map(|s| [s.a_name(), s.b_name()])
        .collect();
    let mut folded = std::collections::HashMap::new();
    for s in sites {
        let w_name = format!("{}.weight", s.module);
        let w = params.get(&w_name)?;
        let (a, b) = (params.get(&s.a_name())?, params.get(&s.b_name())?);
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * cfg.scaling())?;
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        folded.insert(w_name, merged);
    }
    let mut out = Params::new();
    let frozen: Vec<(String, Tensor)> = params
        .frozen()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let all = params
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .chain(frozen);
    for (name, t) in all {
        if adapter.contains(&name) {
            continue;
        }
        let t = folded.remove(&name).unwrap_or(t);
        out.insert(name, Var::from_tensor(&t.detach())?);
    }
    Ok(out)
}
