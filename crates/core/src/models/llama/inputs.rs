//! Per-batch attention inputs: RoPE tables for the batch's positions and the attention mask
//! (causal ∧ key padding ∧, for boundary-aware packing, same document).

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use super::{LlamaConfig, Rope};
use crate::Result;
use colossal_kernels::CausalMask;

/// Everything attention needs besides the weights, built once per (micro-)batch.
#[derive(Clone)]
pub struct AttnInputs {
    /// (B, T, head_dim) each.
    pub cos: Tensor,
    pub sin: Tensor,
    /// The mask as the fused attention kernel reads it (causal, key padding, documents;
    /// linear in T), where the queries are in order.
    pub mask: Option<CausalMask>,
    /// The dense form of the mask, made the first time eager attention asks for it (so a
    /// run on the fused kernel never holds a T × T matrix).
    bias: Arc<OnceLock<Tensor>>,
    device: Device,
    /// LoRA dropout's masks, in a training micro-batch only (`None`: no dropout).
    pub lora_dropout: Option<Arc<crate::lora::DropoutKeys>>,
    /// 1 for each of this rank's query tokens that is not padding, where the mask describes
    /// other rows (a sequence-parallel rank's part of the sequence).
    pub query_valid: Option<Arc<Vec<f32>>>,
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
        // Rows of other lengths (the dense bias reads only the keys it needs) keep the
        // reference path.
        let kv_rows = key_valid.is_none_or(|r| r.iter().all(|x| x.len() == tk));
        let seg_rows = segments.is_none_or(|r| r.iter().all(|x| x.len() == t));
        let cos = Tensor::from_vec(cos, (b, t, d), device)?;
        let sin = Tensor::from_vec(sin, (b, t, d), device)?;
        if kv_rows && seg_rows {
            let mask = CausalMask {
                past_len,
                key_valid: key_valid.map(|kv| Arc::new(kv.concat())),
                segments: segments.map(|s| Arc::new(s.concat())),
            };
            return Ok(Self {
                cos,
                sin,
                mask: Some(mask),
                bias: Arc::default(),
                device: device.clone(),
                lora_dropout: None,
                query_valid: None,
            });
        }
        let lookup = |bi: usize, k: usize| key_valid.is_none_or(|kv| kv[bi][k] != 0);
        let same = |bi: usize, q: usize, k: usize| {
            segments.is_none_or(|s| k >= past_len && s[bi][k - past_len] == s[bi][q])
        };
        let bias = dense_bias(b, t, past_len, lookup, same, device)?;
        Ok(Self::with_bias(cos, sin, bias))
    }

    /// Inputs whose mask is only the dense `bias` (B, 1, T, T_past + T) (rows reordered, as
    /// sequence parallelism gathers them).
    pub fn with_bias(cos: Tensor, sin: Tensor, bias: Tensor) -> Self {
        let device = cos.device().clone();
        Self {
            cos,
            sin,
            mask: None,
            bias: Arc::new(OnceLock::from(bias)),
            device,
            lora_dropout: None,
            query_valid: None,
        }
    }

    /// (B, 1, T, T_past + T), f32, added to the attention scores as HF's eager attention does:
    /// 0 where a query may attend, the most negative f32 where it may not.
    pub fn bias(&self) -> Result<Tensor> {
        if let Some(b) = self.bias.get() {
            return Ok(b.clone());
        }
        let m = self.mask.as_ref().expect("inputs hold a mask or a bias");
        let (b, t) = (self.cos.dim(0)?, self.cos.dim(1)?);
        let tk = m.past_len + t;
        let lookup =
            |bi: usize, k: usize| m.key_valid.as_ref().is_none_or(|kv| kv[bi * tk + k] != 0);
        let same = |bi: usize, q: usize, k: usize| {
            m.segments
                .as_ref()
                .is_none_or(|s| k >= m.past_len && s[bi * t + k - m.past_len] == s[bi * t + q])
        };
        let bias = dense_bias(b, t, m.past_len, lookup, same, &self.device)?;
        Ok(self.bias.get_or_init(|| bias).clone())
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

    /// 1 for each of the `n` query tokens (row-major) that is not padding, 0 for padding:
    /// the weights of Mixtral's load-balancing loss (HF's attention mask).
    pub fn token_valid(&self, n: usize) -> Result<Vec<f32>> {
        if let Some(v) = &self.query_valid {
            if v.len() != n {
                return Err(crate::msg!(
                    "padding mask of {} tokens for {n} routed tokens",
                    v.len()
                ));
            }
            return Ok(v.to_vec());
        }
        let m = self.mask.as_ref().filter(|m| m.past_len == 0).ok_or_else(|| {
            crate::msg!("the load-balancing loss needs a batch's padding mask (a batch without past keys)")
        })?;
        Ok(match &m.key_valid {
            Some(kv) if kv.len() == n => kv.iter().map(|&v| (v != 0) as u8 as f32).collect(),
            Some(kv) => {
                return Err(crate::msg!(
                    "padding mask of {} tokens for {n} routed tokens",
                    kv.len()
                ))
            }
            None => vec![1.0; n],
        })
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_dtype(dtype)?,
            sin: self.sin.to_dtype(dtype)?,
            mask: self.mask.clone(),
            bias: self.bias.clone(),
            device: self.device.clone(),
            lora_dropout: self.lora_dropout.clone(),
            query_valid: self.query_valid.clone(),
        })
    }
}

/// 0 where query q of batch row b may see key k (causal, `valid` key, `same` document), the
/// most negative f32 elsewhere.
fn dense_bias(
    b: usize,
    t: usize,
    past_len: usize,
    valid: impl Fn(usize, usize) -> bool,
    same: impl Fn(usize, usize, usize) -> bool,
    device: &Device,
) -> Result<Tensor> {
    let tk = past_len + t;
    let mut bias = vec![f32::MIN; b * t * tk];
    for bi in 0..b {
        for q in 0..t {
            for k in 0..=(past_len + q) {
                if valid(bi, k) && same(bi, q, k) {
                    bias[(bi * t + q) * tk + k] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, tk), device)?)
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
