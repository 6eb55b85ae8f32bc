//! Scoring with a causal LM: next-token logits at the end of each prompt (batched, right
//! padding, the LM head applied only where it is needed) and perplexity of a text.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use colossal_core::models::llama::{AttnInputs, Llama};
use colossal_core::nn::log_softmax;
use colossal_core::params::Params;

/// Log-probabilities of `candidates` as the next token after each prompt (ids, no padding).
pub fn next_token_logprobs(
    model: &Llama,
    params: &Params,
    prompts: &[Vec<u32>],
    candidates: &[u32],
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let dev = Device::Cpu;
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let len = chunk.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(chunk.len() * len);
        let mut mask = Vec::with_capacity(chunk.len());
        for p in chunk {
            ids.extend(
                p.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, len - p.len())),
            );
            mask.push((0..len).map(|i| u8::from(i < p.len())).collect::<Vec<u8>>());
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), len), &dev)?;
        let inp = AttnInputs::causal(&model.cfg, &model.rope, chunk.len(), len, Some(&mask), &dev)?;
        let mut x = model.embed(params, &ids)?;
        for l in 0..model.cfg.num_hidden_layers {
            x = model.layer(l, params, &x, &inp, None)?;
        }
        // Only each row's last real position goes through the (vocabulary-sized) head.
        let last: Vec<Tensor> = chunk
            .iter()
            .enumerate()
            .map(|(r, p)| x.get(r)?.narrow(0, p.len().max(1) - 1, 1))
            .collect::<candle_core::Result<_>>()?;
        let h = Tensor::stack(&last, 0)?;
        let logp = log_softmax(&model.head(params, &h)?.squeeze(1)?.to_dtype(DType::F32)?)?;
        let cand = Tensor::new(candidates, &dev)?;
        let picked = logp.index_select(&cand, 1)?.to_vec2::<f32>()?;
        out.extend(picked);
    }
    Ok(out)
}

/// Perplexity of `ids` in consecutive windows of `window` tokens: exp of the mean next-token
/// negative log-likelihood over every predicted token. Returns (ppl, predicted tokens).
pub fn perplexity(
    model: &Llama,
    params: &Params,
    ids: &[u32],
    window: usize,
    batch: usize,
) -> Result<(f64, usize)> {
    let dev = Device::Cpu;
    let windows: Vec<&[u32]> = ids.chunks(window).filter(|w| w.len() > 1).collect();
    let (mut nll, mut count) = (0f64, 0usize);
    for group in windows.chunks(batch.max(1)) {
        for w in group {
            let t = Tensor::new(*w, &dev)?.unsqueeze(0)?;
            let inp = AttnInputs::causal(&model.cfg, &model.rope, 1, w.len(), None, &dev)?;
            let logits = model.forward(params, &t, &inp)?.squeeze(0)?;
            let logp = log_softmax(&logits.narrow(0, 0, w.len() - 1)?.to_dtype(DType::F32)?)?;
            let next = Tensor::new(&w[1..], &dev)?.unsqueeze(1)?;
            let picked = logp.gather(&next, 1)?.sum_all()?.to_scalar::<f32>()?;
            nll -= picked as f64;
            count += w.len() - 1;
        }
    }
    Ok(((nll / count.max(1) as f64).exp(), count))
}
