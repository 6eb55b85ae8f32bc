//! Rollouts for PPO and GRPO: prompts continued by the current policy (batched, KV cache),
//! laid out as right-padded prompt + response rows, with helpers to move per-token values
//! between the (B, T − 1) next-token grid and per-response lists.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use colossal_core::models::llama::{generate, AttnInputs, GenerateOptions, Llama, Sampling};
use colossal_core::params::Params;
use colossal_core::train::Trainer;
use colossal_data::chat::prep::Record;

use crate::config::GenerationSection;
use crate::data::trainer_inputs_in;

pub struct Rollout {
    /// Prompt followed by response, unpadded.
    pub rows: Vec<Vec<u32>>,
    pub prompt_lens: Vec<usize>,
    pub response_lens: Vec<usize>,
    /// The reference answer of each row's prompt (verifiable rewards).
    pub answers: Vec<Option<String>>,
}

pub fn sampling(g: &GenerationSection, seed: u64) -> Sampling {
    if g.temperature <= 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            seed,
        }
    }
}

/// Continues each prompt `repeat` times (GRPO's group), sampling with `seed`.
#[allow(clippy::too_many_arguments)]
pub fn rollout(
    model: &Llama,
    params: &Params,
    prompts: &[&Record],
    repeat: usize,
    gen: &GenerationSection,
    pad: u32,
    seed: u64,
    device: &Device,
) -> Result<Rollout> {
    let mut ids = Vec::new();
    let mut answers = Vec::new();
    for p in prompts {
        for _ in 0..repeat {
            ids.push(p.ids("input_ids"));
            answers.push(p.texts.get("answer").cloned().flatten());
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: gen.max_new_tokens.max(1),
        sampling: sampling(gen, seed),
        stop_ids: model.cfg.eos_ids(),
        pad_id: pad,
    };
    let (responses, _) = generate(model, params, &ids, &opts, device)?;
    let prompt_lens = ids.iter().map(Vec::len).collect();
    let response_lens = responses.iter().map(Vec::len).collect();
    let rows = ids
        .into_iter()
        .zip(responses)
        .map(|(mut p, r)| {
            p.extend(r);
            p
        })
        .collect();
    Ok(Rollout {
        rows,
        prompt_lens,
        response_lens,
        answers,
    })
}

/// This rank's rollouts of a step: one per micro-batch of prompts, each seeded by the step and
/// its global micro-batch index, so any number of ranks samples the same responses. The
/// policy's whole weights are gathered onto every rank first (generation runs unsplit, as
/// hybrid engines reshard training weights for inference).
pub fn my_rollouts(
    policy: &Trainer,
    mine: &[&[&Record]],
    repeat: usize,
    gen: &GenerationSection,
    pad: u32,
    seed: u64,
) -> Result<Vec<Rollout>> {
    let (rank, ranks, step) = (policy.rank(), policy.ranks(), policy.state.step);
    let params = policy.replica_params()?;
    let model = policy.plain_model()?;
    mine.iter()
        .enumerate()
        .map(|(i, prompts)| {
            let g = (rank + i * ranks) as u64;
            let seed = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (g << 40);
            rollout(
                &model,
                &params,
                prompts,
                repeat,
                gen,
                pad,
                seed,
                policy.device(),
            )
        })
        .collect()
}

impl Rollout {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows as `trainer`'s inputs (its model and sequence split) in `dtype`.
    pub fn inputs(
        &self,
        trainer: &Trainer,
        pad: u32,
        dtype: DType,
    ) -> Result<(Tensor, AttnInputs)> {
        trainer_inputs_in(trainer, &self.rows, pad, dtype)
    }

    /// Position of each row's last token (where a reward model reads its score).
    pub fn last_index(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.len() - 1).collect()
    }

    /// In the (B, T − 1) grid, response token j of row b is predicted at prompt_len − 1 + j.
    fn start(&self, b: usize) -> usize {
        self.prompt_lens[b] - 1
    }

    /// Values of each row's response tokens out of a (B, T − 1) grid.
    pub fn gather(&self, grid: &Tensor) -> Result<Vec<Vec<f32>>> {
        let g: Vec<Vec<f32>> = grid.to_dtype(DType::F32)?.to_vec2()?;
        Ok((0..self.len())
            .map(|b| g[b][self.start(b)..self.start(b) + self.response_lens[b]].to_vec())
            .collect())
    }

    /// Per-response lists into a (B, T − 1) grid (zeros elsewhere).
    pub fn scatter(&self, per_row: &[Vec<f32>], t: usize, device: &Device) -> Result<Tensor> {
        let mut g = vec![0f32; self.len() * (t - 1)];
        for (b, v) in per_row.iter().enumerate() {
            let s = b * (t - 1) + self.start(b);
            g[s..s + v.len()].copy_from_slice(v);
        }
        Ok(Tensor::from_vec(g, (self.len(), t - 1), device)?)
    }

    /// 1 on response positions of the (B, T − 1) grid.
    pub fn mask(&self, t: usize, device: &Device) -> Result<Tensor> {
        let ones: Vec<Vec<f32>> = self.response_lens.iter().map(|&n| vec![1.0; n]).collect();
        self.scatter(&ones, t, device)
    }

    pub fn response_tokens(&self) -> usize {
        self.response_lens.iter().sum()
    }
}

/// GSM8K's verifiable reward: 1 when the last number in `text` equals `answer`, else 0.
pub fn gsm8k_reward(text: &str, answer: &str) -> f32 {
    let tail = text.rsplit_once("####").map_or(text, |(_, t)| t);
    let mut last = None;
    let mut cur = String::new();
    for c in tail.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || c == '.' || (c == '-' && cur.is_empty()) {
            cur.push(c);
        } else if c == ',' && !cur.is_empty() {
            continue;
        } else {
            let n = cur.trim_end_matches('.');
            if n.parse::<f64>().is_ok() {
                last = Some(n.to_string());
            }
            cur.clear();
        }
    }
    match (
        last.and_then(|l| l.parse::<f64>().ok()),
        answer.parse::<f64>(),
    ) {
        (Some(a), Ok(b)) if (a - b).abs() < 1e-6 => 1.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_reward_reads_the_last_number() {
        assert_eq!(
            gsm8k_reward("She sells 9 eggs so 9 * 2 = 18.\n#### 18", "18"),
            1.0
        );
        assert_eq!(gsm8k_reward("The answer is 1,234.", "1234"), 1.0);
        assert_eq!(gsm8k_reward("3 apples and 4 pears: 7", "7"), 1.0);
        assert_eq!(gsm8k_reward("about 7 or 8", "7"), 0.0);
        assert_eq!(gsm8k_reward("no numbers", "7"), 0.0);
        assert_eq!(gsm8k_reward("it is -5", "-5"), 1.0);
    }
}
