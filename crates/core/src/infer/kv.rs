//! The paged KV pool: every layer's keys and values in fixed-size blocks of token slots, and
//! attention that reads a sequence's keys through its block table (vLLM's PagedAttention, on
//! the CPU).
//!
//! Layout of one layer's keys (values alike): `[block][slot in block][kv head][head_dim]`, so
//! a token's keys for all heads are contiguous and a block is one contiguous range.

use rayon::prelude::*;

/// Keys and values of every layer, `num_blocks` blocks of `block_size` token slots each.
pub struct KvPool {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Where one query token reads: its sequence's block table and how many cached tokens (its
/// own included) it may attend to.
pub struct QueryPlace<'a> {
    pub table: &'a [u32],
    pub context: usize,
}

impl KvPool {
    pub fn new(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let n = num_blocks * block_size * kv_heads * head_dim;
        Self {
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
            k: (0..layers).map(|_| vec![0.0; n]).collect(),
            v: (0..layers).map(|_| vec![0.0; n]).collect(),
        }
    }

    /// Bytes of keys and values one block holds over all layers.
    pub fn block_bytes(&self) -> usize {
        2 * self.k.len() * self.block_size * self.kv_heads * self.head_dim * 4
    }

    fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Global slot index of the `i`-th cached token of the sequence with block table `table`.
    pub fn slot(&self, table: &[u32], i: usize) -> usize {
        table[i / self.block_size] as usize * self.block_size + i % self.block_size
    }

    /// Writes layer `l`'s keys and values of N new tokens (each `[kv head][d]`, token-major,
    /// as `k`, `v` hold them) into `slots`.
    pub fn write(&mut self, l: usize, slots: &[usize], k: &[f32], v: &[f32]) {
        let row = self.row();
        for (i, &s) in slots.iter().enumerate() {
            self.k[l][s * row..(s + 1) * row].copy_from_slice(&k[i * row..(i + 1) * row]);
            self.v[l][s * row..(s + 1) * row].copy_from_slice(&v[i * row..(i + 1) * row]);
        }
    }

    /// Attention of N query tokens (`q`: `[token][q head][d]`, already scaled) over their
    /// sequences' cached keys; the output has `q`'s layout. Query heads share kv heads in
    /// groups (GQA), as the model's `repeat_kv` does.
    pub fn attend(&self, l: usize, q: &[f32], heads: usize, places: &[QueryPlace<'_>]) -> Vec<f32> {
        let d = self.head_dim;
        let group = heads / self.kv_heads;
        let row = self.row();
        let (keys, values) = (&self.k[l], &self.v[l]);
        let mut out = vec![0.0f32; q.len()];
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(t, out_t)| {
                let place = &places[t];
                let mut scores = vec![0.0f32; place.context];
                for h in 0..heads {
                    let qh = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
                    let off = (h / group) * d;
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let base = self.slot(place.table, j) * row + off;
                        *s = dot(qh, &keys[base..base + d]);
                        max = max.max(*s);
                    }
                    let mut z = 0.0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        z += *s;
                    }
                    let o = &mut out_t[h * d..(h + 1) * d];
                    for (j, s) in scores.iter().enumerate() {
                        let base = self.slot(place.table, j) * row + off;
                        let p = s / z;
                        for (x, y) in o.iter_mut().zip(&values[base..base + d]) {
                            *x += p * y;
                        }
                    }
                }
            });
        out
    }

    /// Moves the cached tokens `from..from + n` of a sequence to `to..to + n` (`to < from`), in
    /// every layer, turning each key back by `from - to` positions (StreamingLLM: the kept
    /// tokens' positions are their places in the cache). `inv_freq` are the rotary
    /// frequencies; keys were rotated HF's way (`rotate_half`: pairs `i`, `i + d/2`).
    pub fn shift_back(
        &mut self,
        table: &[u32],
        from: usize,
        to: usize,
        n: usize,
        inv_freq: &[f32],
    ) {
        let (row, d, half) = (self.row(), self.head_dim, self.head_dim / 2);
        let delta = (from - to) as f64;
        let turn: Vec<(f32, f32)> = inv_freq
            .iter()
            .map(|f| {
                let a = -delta * *f as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for l in 0..self.k.len() {
            for i in 0..n {
                let (src, dst) = (self.slot(table, from + i), self.slot(table, to + i));
                self.v[l].copy_within(src * row..(src + 1) * row, dst * row);
                self.k[l].copy_within(src * row..(src + 1) * row, dst * row);
                let keys = &mut self.k[l][dst * row..(dst + 1) * row];
                for head in keys.chunks_mut(d) {
                    for (j, &(c, s)) in turn.iter().enumerate().take(half) {
                        let (x1, x2) = (head[j], head[j + half]);
                        head[j] = x1 * c - x2 * s;
                        head[j + half] = x2 * c + x1 * s;
                    }
                }
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
