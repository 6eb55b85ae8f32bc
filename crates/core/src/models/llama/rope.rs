//! Rotary position tables, including HF's `linear` and `llama3` frequency scaling.

use super::LlamaConfig;

/// `inv_freq[i] = 1 / theta^(2i/d)` in f32 as transformers computes it, then scaled.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim();
    let theta = cfg.rope_theta as f32;
    let base: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / d as f32))
        .collect();
    let Some(rs) = &cfg.rope_scaling else {
        return base;
    };
    let factor = rs.factor.unwrap_or(1.0) as f32;
    match rs.rope_type.as_str() {
        "linear" => base.iter().map(|f| f / factor).collect(),
        "llama3" => {
            let low = rs.low_freq_factor.unwrap_or(1.0) as f32;
            let high = rs.high_freq_factor.unwrap_or(4.0) as f32;
            let old_ctx = rs.original_max_position_embeddings.unwrap_or(8192) as f32;
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
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: Option<super::super::RopeScaling>) -> LlamaConfig {
        let mut v = serde_json::json!({
            "vocab_size": 8, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "rope_theta": 500000.0
        });
        if let Some(s) = scaling {
            v["rope_scaling"] = serde_json::to_value(s).unwrap();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let base = inv_freq(&cfg(None));
        let scaling: super::super::RopeScaling = serde_json::from_value(serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        }))
        .unwrap();
        let scaled = inv_freq(&cfg(Some(scaling)));
        // Highest frequency (wavelength 2π) is untouched; the lowest is divided by the factor.
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert!((scaled[last] - base[last] / 8.0).abs() < 1e-12);
        // Frequencies in the medium band land between the two.
        for (s, b) in scaled.iter().zip(&base) {
            assert!(*s <= *b && *s >= b / 8.0 - 1e-12);
        }
    }
}
