//! KV-cache generation: greedy or sampled (temperature, top-k, top-p), batched with left padding.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::{AttnInputs, Llama};
use crate::params::Params;
use crate::Result;

#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    Greedy,
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation of a row stops at any of these ids (the id is kept).
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
}

/// New ids of each row, and the raw logits of each step for row 0.
pub type Generated = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// Generates continuations of `prompts` (unequal lengths are left-padded).
pub fn generate(
    model: &Llama,
    params: &Params,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    device: &Device,
) -> Result<Generated> {
    generate_with(model, params, prompts, opts, device, &mut |_| Ok(()))
}

/// One prompt's continuation, handing each new id to `on_token` as soon as it is chosen
/// (a chat streams its reply).
pub fn generate_stream(
    model: &Llama,
    params: &Params,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &Device,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let (mut out, _) = generate_with(model, params, &[prompt.to_vec()], opts, device, on_token)?;
    Ok(out.swap_remove(0))
}

fn generate_with(
    model: &Llama,
    params: &Params,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    device: &Device,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Generated> {
    let b = prompts.len();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut key_valid: Vec<Vec<u8>> = Vec::with_capacity(b);
    let mut positions: Vec<Vec<u32>> = Vec::with_capacity(b);
    let mut flat = Vec::with_capacity(b * max_len);
    for p in prompts {
        let pad = max_len - p.len();
        flat.extend(std::iter::repeat_n(opts.pad_id, pad).chain(p.iter().copied()));
        key_valid.push((0..max_len).map(|i| (i >= pad) as u8).collect());
        // HF: position_ids = cumsum(attention_mask) - 1, padding positions set to 1.
        positions.push(
            (0..max_len)
                .map(|i| if i >= pad { (i - pad) as u32 } else { 1 })
                .collect(),
        );
    }
    let mut caches = model.empty_caches();
    let mut rng = match &opts.sampling {
        Sampling::Sample { seed, .. } => rand_chacha::ChaCha8Rng::seed_from_u64(*seed),
        Sampling::Greedy => rand_chacha::ChaCha8Rng::seed_from_u64(0),
    };
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    let mut step_logits = Vec::new();
    let mut ids = Tensor::from_vec(flat, (b, max_len), device)?;
    let mut past = 0usize;
    for _ in 0..opts.max_new_tokens {
        let inp = AttnInputs::new(
            &model.cfg,
            &model.rope,
            &positions,
            past,
            Some(&key_valid),
            None,
            device,
        )?;
        let t = ids.dim(1)?;
        let logits = model.forward_cached(params, &ids, &inp, &mut caches)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?;
        let rows: Vec<Vec<f32>> = last.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        step_logits.push(rows[0].clone());
        past += t;
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            let id = if done[r] {
                opts.pad_id
            } else {
                pick(row, &opts.sampling, &mut rng)
            };
            if !done[r] {
                out[r].push(id);
                if r == 0 {
                    on_token(id)?;
                }
                done[r] = opts.stop_ids.contains(&id);
            }
            next.push(id);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        for (r, pos) in positions.iter_mut().enumerate() {
            let p = pos.last().copied().unwrap_or(0);
            let valid_before = key_valid[r].iter().any(|v| *v != 0);
            *pos = vec![if valid_before { p + 1 } else { 0 }];
            key_valid[r].push(1);
        }
        ids = Tensor::from_vec(next, (b, 1), device)?;
    }
    Ok((out, step_logits))
}

pub(crate) fn pick(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            if *temperature <= 0.0 {
                return argmax(logits);
            }
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            if let Some(k) = top_k {
                idx.truncate((*k).max(1));
            }
            let m = logits[idx[0]] as f64;
            let mut probs: Vec<f64> = idx
                .iter()
                .map(|&i| ((logits[i] as f64 - m) / temperature).exp())
                .collect();
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
            if let Some(top_p) = top_p {
                let mut acc = 0.0;
                let mut keep = probs.len();
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if acc >= *top_p {
                        keep = i + 1;
                        break;
                    }
                }
                probs.truncate(keep);
                idx.truncate(keep);
            }
            let z: f64 = probs.iter().sum();
            let mut u = rng.random::<f64>() * z;
            for (i, p) in probs.iter().enumerate() {
                if u < *p {
                    return idx[i] as u32;
                }
                u -= p;
            }
            idx[probs.len() - 1] as u32
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
