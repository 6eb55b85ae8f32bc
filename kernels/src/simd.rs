//! Run-time choice of vector width, and the element functions the kernels share.
//!
//! A kernel body is written once as plain loops over slices; [`simd_fn!`] compiles it three
//! times — AVX-512, AVX2+FMA, and the baseline — and picks the widest the CPU has, so one
//! binary is fast on every x86-64 machine without `-C target-cpu`. Everything a body calls
//! must be `#[inline(always)]` to be compiled for the chosen width.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest instruction set this CPU has (detected once).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Defines `fn name(args) -> ret` whose body is compiled for AVX-512, AVX2+FMA and the
/// baseline, dispatched on [`level`].
#[macro_export]
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? { imp($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? { imp($($a),*) }
                match $crate::simd::level() {
                    // SAFETY: the CPU has these features (detected at run time).
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($a),*) },
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            imp($($a),*)
        }
    };
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that n·ln2 is subtracted without rounding error (Cody–Waite).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// e^x to about 1 ulp, branch-free so loops over it vectorise: x = n·ln2 + r with
/// |r| ≤ ln2/2, e^r by its degree-7 Taylor polynomial (truncation < 3e-9 relative), 2^n through
/// the exponent bits. Below −87.3 it is 0 (as e^x underflows), above 88 it saturates at e^88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let c = x.clamp(-87.3, 88.0);
    let n = (c * LOG2E + 0.5).floor();
    let r = c - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// 1 / (1 + e^−x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Rows per parallel task so each task has about `grain` elements.
pub fn rows_per_task(rows: usize, width: usize, grain: usize) -> usize {
    (grain / width.max(1)).clamp(1, rows.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
