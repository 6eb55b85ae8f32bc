//! Per-request sampling: greedy or temperature with top-k/top-p (the same rule as
//! [`crate::models::llama::generate`]), after HF's repetition penalty, from a generator
//! seeded by the request alone, so a request's tokens do not depend on what it was batched
//! with.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::models::llama::generate::pick;
use crate::models::llama::Sampling;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// HF's `repetition_penalty`: logits of ids already in the prompt or output are divided
    /// by it when positive, multiplied when negative. 1 = off.
    pub repetition_penalty: f64,
    pub seed: u64,
    pub max_tokens: usize,
    /// Generation stops after any of these ids (the id is part of the output).
    pub stop_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 16,
            stop_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks every field, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        self.invalid_field().map_or(Ok(()), |(field, why)| {
            Err(Error::Config(format!("{field}: {why}")))
        })
    }

    /// The first field out of range, and why (an HTTP server names it as the bad parameter).
    pub fn invalid_field(&self) -> Option<(&'static str, &'static str)> {
        let bad = |field, why| Some((field, why));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number ≥ 0");
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be ≥ 1");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be a finite number > 0");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be ≥ 1");
        }
        None
    }

    fn rule(&self) -> Sampling {
        if self.temperature > 0.0 {
            Sampling::Sample {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            }
        } else {
            Sampling::Greedy
        }
    }
}

/// A request's sampler: its parameters and its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rule: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rule: params.rule(),
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next id from `logits` (one vocabulary row), `seen` being the prompt and output so far.
    pub fn next(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let p = self.params.repetition_penalty as f32;
        if p != 1.0 {
            let mut done = vec![false; logits.len()];
            for &id in seen {
                let i = id as usize;
                if i < logits.len() && !std::mem::replace(&mut done[i], true) {
                    let x = &mut logits[i];
                    *x = if *x > 0.0 { *x / p } else { *x * p };
                }
            }
        }
        pick(logits, &self.rule, &mut self.rng)
    }
}
