//! LoRA dropout (PEFT's `lora_dropout`): in training the adapter reads `dropout(x)`, every
//! element kept with probability 1 − p and scaled by 1/(1 − p); evaluation and generation read
//! `x`. A mask element is a hash of (the step's key, the row's tokens, the module, the element's
//! place in the whole row: position · features + feature), not a draw from a generator's state,
//! so every data-parallel, pipeline, tensor-parallel (a rank's slice of the features) and
//! sequence-parallel (a rank's positions) layout, an activation-checkpointing recompute and a
//! resumed run drop the same elements of the same tokens, as one rank would.

use candle_core::Tensor;

use crate::{msg, Result};

/// The masks of one training micro-batch: the drop probability, a key per row, and the
/// positions in the whole row of the ones this rank holds (`None`: all, in order).
#[derive(Clone, Debug)]
pub struct DropoutKeys {
    p: f64,
    rows: Vec<u64>,
    positions: Option<Vec<usize>>,
}

impl DropoutKeys {
    /// Keys for the whole rows `ids` (B, T) in the step keyed `key`, for a rank holding the
    /// rows' `positions` (`None`: all of them).
    pub fn new(p: f64, key: u64, ids: &Tensor, positions: Option<Vec<usize>>) -> Result<Self> {
        let ids = ids.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?;
        let rows = ids
            .iter()
            .map(|row| {
                let tokens = row.iter().fold(mix(key), |h, &t| mix(h ^ t as u64));
                mix(tokens ^ row.len() as u64)
            })
            .collect();
        Ok(Self { p, rows, positions })
    }

    /// `x` (B, T, n) as the adapter of `module` reads it in training; `x` holds features
    /// `features.0 ..` of `features.1` (a tensor-parallel slice, or all of them).
    pub fn apply(&self, module: &str, x: &Tensor, features: (usize, usize)) -> Result<Tensor> {
        let (b, t, n) = x.dims3()?;
        if b != self.rows.len() {
            return Err(msg!(
                "lora dropout: {b} rows for a batch of {}",
                self.rows.len()
            ));
        }
        if self.positions.as_ref().is_some_and(|p| p.len() != t) {
            return Err(msg!(
                "lora dropout: {t} positions for a sequence part of {:?}",
                self.positions.as_ref().map(Vec::len)
            ));
        }
        let (offset, whole) = features;
        let module = module
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, c| mix(h ^ c as u64));
        let keep = 1.0 / (1.0 - self.p) as f32;
        // Compare the top 24 bits of each hash with p: exact enough for any p a user sets.
        let cut = (self.p * (1u64 << 24) as f64) as u64;
        let mut mask = Vec::with_capacity(b * t * n);
        for &row in &self.rows {
            let base = mix(row ^ module);
            for tl in 0..t {
                let pos = self.positions.as_ref().map_or(tl, |p| p[tl]);
                for f in 0..n {
                    let i = (pos * whole + offset + f) as u64;
                    let h = mix(base ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    mask.push(if h >> 40 >= cut { keep } else { 0.0 });
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, t, n), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// SplitMix64's finaliser: every input bit moves every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn masks_drop_p_scale_the_rest_and_depend_on_tokens_module_and_step() {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [1, 2, 3, 5]], &dev).unwrap();
        let x = Tensor::ones((2, 4, 4096), candle_core::DType::F32, &dev).unwrap();
        let keys = DropoutKeys::new(0.25, 7, &ids, None).unwrap();
        let y = keys.apply("q_proj", &x, (0, 4096)).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let dropped = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(v.iter().all(|&e| e == 0.0 || (e - 4.0 / 3.0).abs() < 1e-6));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        // The same row, module and step: the same mask (a recompute, another layout).
        let again = DropoutKeys::new(0.25, 7, &ids.narrow(0, 0, 1).unwrap(), None).unwrap();
        let row0 = again
            .apply("q_proj", &x.narrow(0, 0, 1).unwrap(), (0, 4096))
            .unwrap();
        let same = (row0 - y.narrow(0, 0, 1).unwrap()).unwrap().abs().unwrap();
        assert_eq!(same.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // Another row, module or step: another mask.
        let differ = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().sum_all().unwrap();
            d.to_scalar::<f32>().unwrap() > 0.0
        };
        assert!(differ(&y.get(0).unwrap(), &y.get(1).unwrap()));
        assert!(differ(&y, &keys.apply("k_proj", &x, (0, 4096)).unwrap()));
        let next = DropoutKeys::new(0.25, 8, &ids, None).unwrap();
        assert!(differ(&y, &next.apply("q_proj", &x, (0, 4096)).unwrap()));
    }
}
