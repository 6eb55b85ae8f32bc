//! Reward and value heads: `LlamaForSequenceClassification`'s score head read at the last
//! real token of each row (the reward), or at every response token (the critic's values).

use candle_core::{Device, Tensor};

/// transformers' pooling index: the rightmost position whose id is not `pad` (so the pad id
/// must not occur inside the text), or the last position when a row has no padding at all.
pub fn last_token_index(ids: &[Vec<u32>], pad: u32) -> Vec<usize> {
    ids.iter()
        .map(|row| row.iter().rposition(|&x| x != pad).unwrap_or(row.len() - 1))
        .collect()
}

/// Scores (B, T, L) read at `index[b]` for each row: (B, L).
pub fn pooled(scores: &Tensor, index: &[usize]) -> candle_core::Result<Tensor> {
    let (b, _, l) = scores.dims3()?;
    let idx: Vec<u32> = index.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, (b, 1, 1), scores.device())?.broadcast_as((b, 1, l))?;
    scores.gather(&idx.contiguous()?, 1)?.squeeze(1)
}

/// One reward per row: the single-label score at the row's last real token (B,).
pub fn rewards(scores: &Tensor, index: &[usize]) -> candle_core::Result<Tensor> {
    pooled(scores, index)?.narrow(1, 0, 1)?.squeeze(1)
}

/// Right-padded batch of rows as a (B, T) u32 tensor and its attention mask.
pub fn right_padded(
    rows: &[Vec<u32>],
    pad: u32,
    device: &Device,
) -> candle_core::Result<(Tensor, Vec<Vec<u8>>)> {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    right_padded_to(rows, pad, t, device)
}

/// [`right_padded`] to `t` columns (at least the longest row).
pub fn right_padded_to(
    rows: &[Vec<u32>],
    pad: u32,
    t: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Vec<Vec<u8>>)> {
    let t = t.max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let mut flat = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len());
    for r in rows {
        flat.extend(
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, t - r.len())),
        );
        mask.push((0..t).map(|i| (i < r.len()) as u8).collect());
    }
    Ok((Tensor::from_vec(flat, (rows.len(), t), device)?, mask))
}
