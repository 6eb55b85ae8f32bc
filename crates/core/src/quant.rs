//! Frozen weights held in 8 or 4 bits, as QLoRA keeps a LoRA's base (Dettmers et al. 2023):
//! the values, flattened in row-major order, are cut into blocks of `block` that share one
//! absmax scale, and each value keeps the index of its nearest code in a fixed codebook of
//! values in [-1, 1]. A weight is dequantised (codebook[index] · absmax) only while its block
//! runs, on whatever device holds it, so a model's frozen Linear weights rest at about a
//! quarter (nf4) or half (int8) of bf16's bytes.
//!
//! Because the largest value of each block maps to the code ±1 and comes back as exactly
//! ±absmax, quantising a dequantised weight gives the same codes and scales again: a
//! checkpoint that stores the dequantised base resumes bit-exactly.

use candle_core::{DType, Device, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::{msg, Result};

/// The codebook a weight's values are rounded to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantKind {
    /// 255 evenly spaced codes i/127, i in -127..=127 (blockwise absmax int8).
    Int8,
    /// The 16 NormalFloat levels of the QLoRA paper, two indices a byte (bitsandbytes' `nf4`).
    Nf4,
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantKind::Int8 => "int8",
            QuantKind::Nf4 => "nf4",
        })
    }
}

/// bitsandbytes' NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Blocks of the QLoRA paper and bitsandbytes' default for 4 bits.
pub const DEFAULT_BLOCK: usize = 64;

impl QuantKind {
    /// The codes, ascending.
    pub fn codebook(self) -> Vec<f32> {
        match self {
            QuantKind::Int8 => (-127i32..=127).map(|i| i as f32 / 127.0).collect(),
            QuantKind::Nf4 => NF4.to_vec(),
        }
    }

    /// The index of the code nearest to `x` (in [-1, 1]) in `book`.
    fn nearest(self, book: &[f32], x: f32) -> u8 {
        match self {
            QuantKind::Int8 => ((x * 127.0).round().clamp(-127.0, 127.0) as i32 + 127) as u8,
            QuantKind::Nf4 => {
                // The first code whose upper midpoint lies above x.
                let i = book
                    .windows(2)
                    .position(|w| x < 0.5 * (w[0] + w[1]))
                    .unwrap_or(book.len() - 1);
                i as u8
            }
        }
    }

    /// What a block size must satisfy (nf4 packs indices in pairs).
    pub fn check_block(self, block: usize) -> std::result::Result<(), String> {
        match (self, block) {
            (_, 0) => Err("the block size must be at least 1".into()),
            (QuantKind::Nf4, b) if b % 2 == 1 => Err(format!(
                "nf4 packs two indices a byte: block size {b} is odd"
            )),
            _ => Ok(()),
        }
    }
}

/// One weight in its quantised form.
#[derive(Clone, Debug)]
pub struct Quantised {
    kind: QuantKind,
    shape: Shape,
    /// The dtype `dequantise` returns (the weight's, or the compute dtype after `with_dtype`).
    dtype: DType,
    block: usize,
    /// u8 indices into the codebook; for nf4 two a byte, the first in the high nibble.
    codes: Tensor,
    /// f32, one a block.
    absmax: Tensor,
    book: Tensor,
}

impl Quantised {
    /// `t` in `kind`'s codes with blocks of `block` (the last one zero-padded).
    pub fn new(t: &Tensor, kind: QuantKind, block: usize) -> Result<Self> {
        kind.check_block(block).map_err(|e| msg!("{e}"))?;
        let device = t.device().clone();
        let mut x = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        x.resize(x.len().div_ceil(block) * block, 0.0);
        let book = kind.codebook();
        let mut absmax = Vec::with_capacity(x.len() / block);
        let mut idx = Vec::with_capacity(x.len());
        for b in x.chunks(block) {
            let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            if !m.is_finite() {
                return Err(msg!("cannot quantise a weight holding {m}"));
            }
            absmax.push(m);
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            idx.extend(b.iter().map(|v| kind.nearest(&book, v * inv)));
        }
        let codes = match kind {
            QuantKind::Int8 => idx,
            QuantKind::Nf4 => idx.chunks(2).map(|p| (p[0] << 4) | p[1]).collect(),
        };
        let n_codes = codes.len();
        let n_blocks = absmax.len();
        Ok(Self {
            kind,
            shape: t.shape().clone(),
            dtype: t.dtype(),
            block,
            codes: Tensor::from_vec(codes, n_codes, &device)?,
            absmax: Tensor::from_vec(absmax, n_blocks, &device)?,
            book: Tensor::from_vec(book.clone(), book.len(), &device)?,
        })
    }

    /// The weight, codebook[index] · absmax, in `dtype()` on the codes' device.
    pub fn dequantise(&self) -> Result<Tensor> {
        let idx = match self.kind {
            QuantKind::Int8 => self.codes.to_dtype(DType::U32)?,
            QuantKind::Nf4 => {
                // Unpacked through f32 so that every backend can do it with plain tensor ops.
                let c = self.codes.to_dtype(DType::F32)?;
                let hi = (&c / 16.0)?.floor()?;
                let lo = (c - (&hi * 16.0)?)?;
                Tensor::stack(&[hi, lo], 1)?
                    .flatten_all()?
                    .to_dtype(DType::U32)?
            }
        };
        let n_blocks = self.absmax.dim(0)?;
        let values = self
            .book
            .index_select(&idx, 0)?
            .reshape((n_blocks, self.block))?
            .broadcast_mul(&self.absmax.unsqueeze(1)?)?
            .flatten_all()?
            .narrow(0, 0, self.shape.elem_count())?
            .reshape(self.shape.clone())?;
        Ok(values.to_dtype(self.dtype)?)
    }

    /// The same codes, dequantised to `dtype` (a low-precision compute copy shares them).
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            dtype,
            ..self.clone()
        }
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Bytes held: the codes and the scales.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.absmax.elem_count()
    }

    /// The codebook indices, one a value (unpacked), for checks.
    pub fn indices(&self) -> Result<Vec<u8>> {
        let c = self.codes.to_vec1::<u8>()?;
        Ok(match self.kind {
            QuantKind::Int8 => c,
            QuantKind::Nf4 => c.iter().flat_map(|b| [b >> 4, b & 15]).collect(),
        })
    }

    pub fn scales(&self) -> Result<Vec<f32>> {
        Ok(self.absmax.to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn weight(n: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        Tensor::from_vec(v, (n / 10, 10), &Device::Cpu).unwrap()
    }

    #[test]
    fn values_round_to_their_nearest_code_and_requantise_to_the_same_codes() {
        for kind in [QuantKind::Nf4, QuantKind::Int8] {
            // 1010 values: blocks of 64 with a padded last one.
            let w = weight(1010, 3);
            let q = Quantised::new(&w, kind, 64).unwrap();
            let back = q.dequantise().unwrap();
            assert_eq!(back.dims(), w.dims());
            let (x, y) = (
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let book = kind.codebook();
            let scales = q.scales().unwrap();
            assert_eq!(scales.len(), 16);
            let mut worst = 0f32;
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let m = scales[i / 64];
                // No code is nearer to a/m than the one chosen.
                let best = book
                    .iter()
                    .map(|c| (a / m - c).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!((a / m - b / m).abs() <= best + 1e-6, "{kind} value {i}");
                worst = worst.max((a - b).abs() / m);
            }
            // Half the widest gap between neighbouring codes (nf4: between -1 and the next).
            let bound = 0.5 * book.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
            assert!(worst <= bound + 1e-6, "{kind}: worst {worst} > {bound}");
            let again = Quantised::new(&back, kind, 64).unwrap();
            assert_eq!(again.indices().unwrap(), q.indices().unwrap(), "{kind}");
            assert_eq!(again.scales().unwrap(), scales, "{kind}");
        }
    }

    #[test]
    fn nf4_packs_two_indices_a_byte_high_nibble_first_and_keeps_zero_blocks() {
        let mut v = vec![0f32; 64];
        v.extend([-1.0f32, 1.0, 0.0, 0.1].repeat(16));
        let t = Tensor::from_vec(v, (2, 64), &Device::Cpu).unwrap();
        let q = Quantised::new(&t, QuantKind::Nf4, 64).unwrap();
        assert_eq!(q.bytes(), 64 + 2 * 4);
        let codes = q.codes.to_vec1::<u8>().unwrap();
        assert_eq!(codes[0], 0x77, "zeros are code 7");
        // -1 → 0, 1 → 15; 0 → 7, 0.1 → 8 (0.0796 is nearest).
        assert_eq!(&codes[32..34], &[0x0f, 0x78]);
        assert_eq!(q.scales().unwrap(), vec![0.0, 1.0]);
        let back = q.dequantise().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(&back[1][..4], &[-1.0, 1.0, 0.0, NF4[8]]);
        assert!(Quantised::new(&t, QuantKind::Nf4, 7).is_err());
        assert!(Quantised::new(&t, QuantKind::Int8, 7).is_ok());
    }
}
