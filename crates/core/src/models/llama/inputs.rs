//! Per-batch attention inputs: RoPE tables for the batch's positions and the attention mask
//! (causal ∧ key padding ∧, for boundary-aware packing, same document).

use candle_core::{DType, Device, Tensor};

use super::{LlamaConfig, Rope};
use crate::Result;

/// Everything attention needs besides the weights, built once per (micro-)batch.
#[derive(Clone)]
pub struct AttnInputs {
    /// (B, T, head_dim) each.
    pub cos: Tensor,
    pub sin: Tensor,
    /// (B, 1, T, T_past + T), f32, added to the attention scores as HF's eager attention does:
    /// 0 where a query may attend, the most negative f32 where it may not.
    pub bias: Tensor,
}

impl AttnInputs {
    /// Builds the tables for a batch.
    ///
    /// * `positions[b][t]`: position id of each query token.
    /// * `key_valid[b][k]`: over past + current keys; `None` = all valid.
    /// * `segments[b][t]`: document id of each token (current tokens only, no cache);
    ///   tokens attend only within their document. `None` = one document per row.
    pub fn new(
        cfg: &LlamaConfig,
        rope: &Rope,
        positions: &[Vec<u32>],
        past_len: usize,
        key_valid: Option<&[Vec<u8>]>,
        segments: Option<&[Vec<u32>]>,
        device: &Device,
    ) -> Result<Self> {
        let b = positions.len();
        let t = positions.first().map_or(0, |p| p.len());
        // transformers' length for dynamic RoPE: the largest position id in the batch, plus one.
        let seq_len = positions
            .iter()
            .flatten()
            .max()
            .map_or(0, |&p| p as usize + 1);
        let inv_freq = rope.inv_freq(seq_len);
        let scale = rope.attention_scaling();
        let half = inv_freq.len();
        let d = cfg.head_dim();
        let mut cos = Vec::with_capacity(b * t * d);
        let mut sin = Vec::with_capacity(b * t * d);
        for row in positions {
            for &p in row {
                let freqs: Vec<f32> = inv_freq.iter().map(|f| f * p as f32).collect();
                for _ in 0..2 {
                    cos.extend(freqs.iter().map(|x| x.cos() * scale));
                    sin.extend(freqs.iter().map(|x| x.sin() * scale));
                }
            }
        }
        debug_assert_eq!(half * 2, d);
        let tk = past_len + t;
        let mut bias = vec![f32::MIN; b * t * tk];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..=(past_len + q) {
                    let valid = key_valid.is_none_or(|kv| kv[bi][k] != 0);
                    let same_doc =
                        segments.is_none_or(|s| k >= past_len && s[bi][k - past_len] == s[bi][q]);
                    if valid && same_doc {
                        bias[(bi * t + q) * tk + k] = 0.0;
                    }
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (b, t, d), device)?,
            sin: Tensor::from_vec(sin, (b, t, d), device)?,
            bias: Tensor::from_vec(bias, (b, 1, t, tk), device)?,
        })
    }

    /// Plain causal batch with optional right/left padding (`attention_mask` as HF).
    pub fn causal(
        cfg: &LlamaConfig,
        rope: &Rope,
        batch: usize,
        len: usize,
        attention_mask: Option<&[Vec<u8>]>,
        device: &Device,
    ) -> Result<Self> {
        let positions: Vec<Vec<u32>> = (0..batch).map(|_| (0..len as u32).collect()).collect();
        Self::new(cfg, rope, &positions, 0, attention_mask, None, device)
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_dtype(dtype)?,
            sin: self.sin.to_dtype(dtype)?,
            bias: self.bias.clone(),
        })
    }
}

/// Keys and values of the tokens seen so far, one per layer.
#[derive(Clone, Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
