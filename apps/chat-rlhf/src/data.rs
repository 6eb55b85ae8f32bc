//! Prepared chat data (`colossal-data sft | preference | prompt`) and the batches built from
//! it: the global batch of a step (the same on every rank), this rank's micro-batches of it,
//! and right-padded model inputs.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use colossal_core::models::llama::{AttnInputs, Llama};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::encode::IGNORE;
use colossal_data::chat::prep::{read_records, Record};
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub struct ChatSet {
    pub train: Vec<Record>,
    pub validation: Vec<Record>,
    pub manifest: serde_json::Value,
}

impl ChatSet {
    /// Opens a prepared directory, checking it holds `kind` rows (sft, preference, prompt).
    pub fn open(dir: &Path, kind: &str) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&mpath)
                .with_context(|| format!("{}: cannot read (data.path)", mpath.display()))?,
        )
        .with_context(|| format!("{}: not JSON", mpath.display()))?;
        let found = manifest["kind"].as_str().unwrap_or("?");
        if found != kind {
            bail!(
                "{}: field `kind` is `{found}`, this trainer needs `{kind}` data (colossal-data {kind})",
                mpath.display()
            );
        }
        let train = read_records(&dir.join("train.parquet"))?;
        if train.is_empty() {
            bail!("{}: no training rows", dir.join("train.parquet").display());
        }
        let validation = read_records(&dir.join("validation.parquet"))?;
        Ok(Self {
            train,
            validation,
            manifest,
        })
    }
}

/// The `size` rows of the global batch starting at `cursor` rows into the run: epochs of a
/// seeded shuffle, one after another (so a resumed run sees the same rows).
pub fn global_batch(rows: &[Record], cursor: u64, size: usize, seed: u64) -> Vec<&Record> {
    let n = rows.len();
    let mut order: Option<(u64, Vec<usize>)> = None;
    (cursor..cursor + size as u64)
        .map(|k| {
            let (epoch, at) = (k / n as u64, (k % n as u64) as usize);
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut idx: Vec<usize> = (0..n).collect();
                let mut rng =
                    rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9));
                idx.shuffle(&mut rng);
                order = Some((epoch, idx));
            }
            &rows[order.as_ref().expect("set").1[at]]
        })
        .collect()
}

/// This rank's micro-batches: r, r + N, r + 2N, … of the global batch.
pub fn my_micro_batches<T>(batch: &[T], mbs: usize, rank: usize, ranks: usize) -> Vec<&[T]> {
    batch.chunks(mbs).skip(rank).step_by(ranks).collect()
}

/// This rank's micro-batches of `rows` for a pass all ranks make together (forwards are
/// collectives under ZeRO-3 and expert parallelism): then every rank runs as many rounds, one
/// past the end repeating the first micro-batch, marked uncounted (`false`).
pub fn lockstep_micro_batches<'a, T>(
    policy: &Trainer,
    rows: &'a [T],
    mbs: usize,
) -> Vec<(&'a [T], bool)> {
    let mine = my_micro_batches(rows, mbs, policy.rank(), policy.ranks());
    if !policy.forwards_in_lockstep() {
        return mine.into_iter().map(|c| (c, true)).collect();
    }
    let rounds = rows.len().div_ceil(mbs).div_ceil(policy.ranks());
    let first = &rows[..mbs.min(rows.len())];
    (0..rounds)
        .map(|r| mine.get(r).map_or((first, false), |c| (*c, true)))
        .collect()
}

/// Right-padded ids (B, T) and attention inputs (causal, padding keys masked); T is rounded up
/// to a multiple of `multiple` (sequence parallelism cuts rows into equal chunks).
pub fn padded(
    model: &Llama,
    rows: &[Vec<u32>],
    pad: u32,
    dtype: DType,
    device: &Device,
    multiple: usize,
) -> Result<(Tensor, AttnInputs)> {
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    let t = longest.div_ceil(multiple.max(1)) * multiple.max(1);
    let (ids, mask) = crate::reward::right_padded_to(rows, pad, t, device)?;
    let b = rows.len();
    let ctx = AttnInputs::causal(&model.cfg, &model.rope, b, t, Some(&mask), device)?;
    let ctx = if dtype == DType::F32 {
        ctx
    } else {
        ctx.to_dtype(dtype)?
    };
    Ok((ids, ctx))
}

/// [`padded`] rows for `trainer`: its model, compute precision and sequence split.
pub fn trainer_inputs(
    trainer: &Trainer,
    rows: &[Vec<u32>],
    pad: u32,
) -> Result<(Tensor, AttnInputs)> {
    trainer_inputs_in(trainer, rows, pad, trainer.cfg.parallel.compute_dtype())
}

/// [`trainer_inputs`] in `dtype` (f32 for inputs the frozen models share).
pub fn trainer_inputs_in(
    trainer: &Trainer,
    rows: &[Vec<u32>],
    pad: u32,
    dtype: DType,
) -> Result<(Tensor, AttnInputs)> {
    let multiple = trainer.output_layout().seq_multiple();
    padded(&trainer.model, rows, pad, dtype, trainer.device(), multiple)
}

/// Next-token targets of right-padded rows, flattened (B·(T − 1)): `labels[t + 1]`, IGNORE
/// past each row's end.
pub fn shifted_targets(labels: &[Vec<i64>], t: usize) -> Vec<i64> {
    labels
        .iter()
        .flat_map(|l| (1..t).map(move |i| l.get(i).copied().unwrap_or(IGNORE)))
        .collect()
}

/// 1.0 where the shifted target is learned, else 0.0: (B, T − 1).
pub fn shifted_mask(labels: &[Vec<i64>], t: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = shifted_targets(labels, t)
        .iter()
        .map(|&x| (x != IGNORE) as u8 as f32)
        .collect();
    Ok(Tensor::from_vec(m, (labels.len(), t - 1), device)?)
}

/// Learned targets in rows (what a loss over them is divided by).
pub fn count_learned(labels: &[Vec<i64>]) -> usize {
    labels
        .iter()
        .map(|l| l.iter().skip(1).filter(|&&x| x != IGNORE).count())
        .sum()
}

/// Runs this rank's share of `rows` forward, micro-batch by micro-batch as `make` builds them,
/// and returns the sum of their loss values (evaluation: the loss closures also tally, on the
/// ranks where the model's output is — see [`Trainer::sum_over_ranks`]).
pub fn forward_each<F>(policy: &Trainer, rows: &[Record], mut make: F) -> Result<f64>
where
    F: FnMut(&[&Record]) -> colossal_core::Result<MicroBatch<'static, AttnInputs>>,
{
    let rows: Vec<&Record> = rows.iter().collect();
    let mbs = policy.cfg.train.micro_batch_size;
    let mut sum = 0.0;
    for (chunk, counted) in lockstep_micro_batches(policy, &rows, mbs) {
        let mb = make(chunk)?;
        let ids = mb.inputs.get(colossal_core::exec::IDS)?;
        let loss = policy.forward_map(ids, &mb.ctx, |out| {
            if !counted {
                return Ok(Tensor::zeros(1, DType::F32, out.device())?);
            }
            let out = colossal_core::exec::Acts::one(colossal_core::exec::LOGITS, out.clone());
            Ok((mb.loss_fn)(&out)?.to_dtype(DType::F32)?)
        })?;
        sum += loss.flatten_all()?.to_vec1::<f32>()?[0] as f64;
    }
    Ok(sum)
}
