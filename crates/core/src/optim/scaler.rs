//! Dynamic loss scaling for fp16 (DeepSpeed / Megatron semantics): start at 2^16, halve on
//! overflow once `hysteresis` overflows have been absorbed, double after `growth_interval`
//! clean steps. Every step with an inf/nan gradient is skipped.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: u64,
    pub hysteresis: u32,
    /// Overflows still absorbed before the next halving.
    pub hysteresis_left: u32,
    /// Clean steps since the last overflow or growth.
    pub clean_steps: u64,
    pub min_scale: f64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_interval: 1000,
            hysteresis: 2,
            hysteresis_left: 2,
            clean_steps: 0,
            min_scale: 1.0,
        }
    }
}

impl LossScaler {
    /// Records a step's outcome; returns whether the optimizer may step.
    pub fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            self.clean_steps = 0;
            if self.hysteresis_left <= 1 {
                self.scale = (self.scale * 0.5).max(self.min_scale);
                self.hysteresis_left = self.hysteresis;
            } else {
                self.hysteresis_left -= 1;
            }
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.clean_steps = 0;
            self.hysteresis_left = self.hysteresis;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_then_halving_then_growth() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..Default::default()
        };
        assert!(!s.update(true));
        assert_eq!(
            s.scale, 65536.0,
            "first overflow is absorbed by hysteresis 2"
        );
        assert!(!s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(false) && s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(false));
        assert_eq!(
            s.scale, 65536.0,
            "doubles after growth_interval clean steps"
        );
    }
}
