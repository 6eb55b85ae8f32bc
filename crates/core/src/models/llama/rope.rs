//! Rotary position embeddings as transformers computes them: the RoPE settings of a config
//! (4.x `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`) read into one typed value, and
//! the inverse frequencies and cos/sin scaling of each `rope_type` we implement.

use serde_json::{Map, Value};

/// How the base frequencies are rescaled (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeType {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware base that grows once a sequence is longer than `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation/extrapolation ramp, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
}

/// The RoPE settings of a model, read once from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    pub theta: f64,
    pub rope_type: RopeType,
}

/// Keys of a RoPE dict that each type reads (`None`: a type not implemented here); anything
/// else in the dict is an error, since it would change the model's math in transformers.
fn known_keys(rope_type: &str) -> Option<&'static [&'static str]> {
    Some(match rope_type {
        "default" => &[],
        "linear" | "dynamic" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        _ => return None,
    })
}

impl RopeParameters {
    /// Standardises the config's RoPE keys as transformers 5 does (`rope_scaling` wins over
    /// `rope_parameters`; `rope_theta` fills a dict without one; llama3/yarn default
    /// `original_max_position_embeddings` to `max_position_embeddings`). `field` names what was
    /// read, for errors.
    pub fn from_config(
        rope_theta: Option<f64>,
        rope_scaling: Option<&Map<String, Value>>,
        rope_parameters: Option<&Map<String, Value>>,
        max_position_embeddings: usize,
    ) -> Result<Self, String> {
        let (field, dict) = match (rope_scaling, rope_parameters) {
            (Some(d), _) if !d.is_empty() => ("rope_scaling", d.clone()),
            (_, Some(d)) => ("rope_parameters", d.clone()),
            _ => ("rope_scaling", Map::new()),
        };
        let num = |k: &str| -> Result<Option<f64>, String> {
            match dict.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("{field}.{k} must be a number, got {v}")),
            }
        };
        let need = |k: &str, rt: &str| -> Result<f64, String> {
            num(k)?.ok_or_else(|| format!("{field}.{k} is required for rope_type `{rt}`"))
        };
        let theta = num("rope_theta")?.or(rope_theta).unwrap_or(10000.0);
        if theta <= 1.0 {
            return Err(format!("{field}.rope_theta must be > 1, got {theta}"));
        }
        let rt = match dict.get("rope_type").or_else(|| dict.get("type")) {
            None | Some(Value::Null) => "default".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(format!("{field}.rope_type must be a string, got {v}")),
        };
        if let Some(f) = num("partial_rotary_factor")? {
            if f != 1.0 {
                return Err(format!(
                    "{field}.partial_rotary_factor = {f}: LLaMA rotates the whole head (1.0 only)"
                ));
            }
        }
        let Some(allowed) = known_keys(&rt) else {
            return Err(format!(
                "{field}.rope_type `{rt}` is not implemented (default, linear, dynamic, llama3, yarn)"
            ));
        };
        let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
        for k in dict.keys() {
            if !common.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
                return Err(format!(
                    "{field}.{k} is not read by rope_type `{rt}` here; it would change the model"
                ));
            }
        }
        let original = |rt: &str| -> Result<usize, String> {
            match num("original_max_position_embeddings")? {
                Some(v) if v >= 1.0 && v.fract() == 0.0 => Ok(v as usize),
                Some(v) => Err(format!(
                    "{field}.original_max_position_embeddings must be a positive integer, got {v} ({rt})"
                )),
                None => Ok(max_position_embeddings),
            }
        };
        let rope_type = match rt.as_str() {
            "default" => RopeType::Default,
            "linear" => RopeType::Linear {
                factor: need("factor", &rt)?,
            },
            "dynamic" => RopeType::Dynamic {
                factor: need("factor", &rt)?,
            },
            "llama3" => RopeType::Llama3 {
                factor: need("factor", &rt)?,
                low_freq_factor: need("low_freq_factor", &rt)?,
                high_freq_factor: need("high_freq_factor", &rt)?,
                original_max_position_embeddings: original(&rt)?,
            },
            "yarn" => {
                let original = original(&rt)?;
                let factor =
                    num("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a,
                    None => match (num("mscale")?, num("mscale_all_dim")?) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            mscale(factor, m) / mscale(factor, a)
                        }
                        _ => mscale(factor, 1.0),
                    },
                };
                let truncate = match dict.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => return Err(format!("{field}.truncate must be a bool, got {v}")),
                };
                RopeType::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor,
                    // transformers takes `or 32` / `or 1`: a 0 means the default too.
                    beta_fast: num("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    truncate,
                }
            }
            other => unreachable!("rope_type `{other}` was checked above"),
        };
        if let RopeType::Linear { factor }
        | RopeType::Dynamic { factor }
        | RopeType::Llama3 { factor, .. }
        | RopeType::Yarn { factor, .. } = &rope_type
        {
            if *factor <= 0.0 {
                return Err(format!("{field}.factor must be > 0, got {factor}"));
            }
        }
        Ok(Self { theta, rope_type })
    }
}

/// The rotary tables of one model: base inverse frequencies and how they change with the
/// sequence length (dynamic NTK) and scale cos/sin (YaRN).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    params: RopeParameters,
    head_dim: usize,
    max_position_embeddings: usize,
    inv_freq: Vec<f32>,
}

fn base_inv_freq(theta: f32, d: usize) -> Vec<f32> {
    (0..d)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / d as f32))
        .collect()
}

impl Rope {
    pub fn new(params: RopeParameters, head_dim: usize, max_position_embeddings: usize) -> Self {
        let d = head_dim;
        let base = || base_inv_freq(params.theta as f32, d);
        let inv_freq = match &params.rope_type {
            RopeType::Default | RopeType::Dynamic { .. } => base(),
            RopeType::Linear { factor } => base().iter().map(|f| f / *factor as f32).collect(),
            RopeType::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => llama3(
                &base(),
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            ),
            RopeType::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let dim = d as f64;
                let theta = params.theta;
                let correction = |rot: f64| {
                    dim * (*original_max_position_embeddings as f64
                        / (rot * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let (factor, theta) = (*factor as f32, theta as f32);
                (0..d)
                    .step_by(2)
                    .enumerate()
                    .map(|(i, j)| {
                        let pos_freq = theta.powf(j as f32 / d as f32);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        let (extrapolated, interpolated) =
                            (1.0 / pos_freq, 1.0 / (factor * pos_freq));
                        interpolated * (1.0 - keep) + extrapolated * keep
                    })
                    .collect()
            }
        };
        Self {
            params,
            head_dim,
            max_position_embeddings,
            inv_freq,
        }
    }

    pub fn params(&self) -> &RopeParameters {
        &self.params
    }

    /// The inverse frequencies for a forward whose largest position id is `seq_len - 1`
    /// (only dynamic NTK depends on it: past `max_position_embeddings` its base grows).
    /// transformers keeps the largest length seen in the module's state; here each forward
    /// uses its own, which is the same for a fresh model and for cached generation.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        match &self.params.rope_type {
            RopeType::Dynamic { factor } if seq_len > self.max_position_embeddings => {
                // transformers computes this path in float32 (a tensor of the position ids).
                let d = self.head_dim as f32;
                let factor = *factor as f32;
                let grow =
                    factor * seq_len as f32 / self.max_position_embeddings as f32 - (factor - 1.0);
                let theta = self.params.theta as f32 * grow.powf(d / (d - 2.0));
                base_inv_freq(theta, self.head_dim)
            }
            _ => self.inv_freq.clone(),
        }
    }

    /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    pub fn attention_scaling(&self) -> f32 {
        match &self.params.rope_type {
            RopeType::Yarn {
                attention_factor, ..
            } => *attention_factor as f32,
            _ => 1.0,
        }
    }
}

fn llama3(base: &[f32], factor: f32, low: f32, high: f32, old_ctx: f32) -> Vec<f32> {
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "rope_tests.rs"]
mod tests;
