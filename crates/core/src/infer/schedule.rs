//! Continuous batching: which tokens the next step feeds, within the token budget and the
//! free blocks; preemption when the cache runs out; StreamingLLM eviction; prefix-cache
//! registration of full blocks.

use super::engine::{Engine, Seq};
use crate::{Error, Result};

impl Engine {
    /// (index in `running`, tokens to feed) for every sequence in the next step. Running
    /// sequences come first (in admission order), then waiting ones are admitted while the
    /// budget, the batch size and the free blocks allow.
    pub(super) fn schedule(&mut self) -> Result<Vec<(usize, usize)>> {
        let mut budget = self.cfg.max_batched_tokens;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let take = self.chunk(&self.running[i], budget);
            self.evict_for(i, take);
            loop {
                let need = self.blocks_needed(&self.running[i], take);
                if need <= self.blocks.num_free() {
                    break;
                }
                // The latest admitted sequence gives way (it is recomputed when re-admitted).
                let last = self.running.len() - 1;
                if last == i && i == 0 {
                    return Err(Error::Msg(format!(
                        "the KV cache ({} blocks) cannot hold one sequence",
                        self.cfg.num_blocks
                    )));
                }
                self.preempt(last);
                if last == i {
                    break;
                }
            }
            if i >= self.running.len() {
                break;
            }
            self.grow(i, take);
            plan.push((i, take));
            budget -= take;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if self.cfg.streaming.is_none() && s.table.is_empty() {
                // Reuse the blocks of a prefix already cached; at least the last token is
                // computed, for its logits.
                let bs = self.cfg.block_size;
                let shared = self
                    .blocks
                    .match_prefix(&s.tokens, (s.tokens.len() - 1) / bs);
                self.stats.prefix_blocks_reused += shared.len();
                s.consumed = shared.len() * bs;
                s.cache_len = s.consumed;
                s.registered = shared.len();
                s.parent_hash = shared_hash(&s.tokens, shared.len(), bs);
                s.table = shared;
            }
            let take = self.chunk(&s, budget);
            if self.blocks_needed(&s, take) > self.blocks.num_free() {
                self.blocks.release(&s.table);
                reset(&mut s);
                self.waiting.push_front(s);
                break;
            }
            self.running.push(s);
            let at = self.running.len() - 1;
            self.grow(at, take);
            plan.push((at, take));
            budget -= take;
        }
        Ok(plan)
    }

    /// Tokens `s` may feed this step: what it has pending, within the budget and, streaming,
    /// within the window (the sinks stay).
    fn chunk(&self, s: &Seq, budget: usize) -> usize {
        let mut take = s.pending().min(budget);
        if let Some(st) = self.cfg.streaming {
            take = take.min(st.window);
        }
        take
    }

    fn blocks_needed(&self, s: &Seq, take: usize) -> usize {
        (s.cache_len + take)
            .div_ceil(self.cfg.block_size)
            .saturating_sub(s.table.len())
    }

    /// Appends fresh blocks to `running[i]` for `take` more tokens (the caller checked that
    /// enough are free).
    fn grow(&mut self, i: usize, take: usize) {
        let need = self.blocks_needed(&self.running[i], take);
        for _ in 0..need {
            let b = self.blocks.allocate().expect("checked free blocks");
            self.running[i].table.push(b);
        }
    }

    /// StreamingLLM: makes room for `take` tokens by dropping the oldest tokens after the sinks
    /// and moving the rest down, their keys turned back by the distance moved.
    fn evict_for(&mut self, i: usize, take: usize) {
        let Some(st) = self.cfg.streaming else { return };
        let s = &self.running[i];
        let over = (s.cache_len + take).saturating_sub(st.sinks + st.window);
        if over == 0 {
            return;
        }
        let inv_freq = self.model.rope.inv_freq(st.sinks + st.window);
        let keep = s.cache_len - st.sinks - over;
        self.pool
            .shift_back(&s.table, st.sinks + over, st.sinks, keep, &inv_freq);
        let s = &mut self.running[i];
        s.cache_len -= over;
        let blocks = s.cache_len.div_ceil(self.cfg.block_size);
        let spare = s.table.split_off(blocks);
        self.blocks.release(&spare);
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.blocks.release(&s.table);
        reset(&mut s);
        self.stats.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Puts every newly full block of a non-streaming sequence in the prefix cache.
    pub(super) fn register_full_blocks(&mut self) {
        if self.cfg.streaming.is_some() {
            return;
        }
        let bs = self.cfg.block_size;
        for s in &mut self.running {
            while (s.registered + 1) * bs <= s.cache_len {
                let r = s.registered;
                let toks = &s.tokens[r * bs..(r + 1) * bs];
                s.parent_hash = self.blocks.register(s.table[r], s.parent_hash, toks);
                s.registered += 1;
            }
        }
    }
}

/// Back to nothing computed (its blocks already released).
fn reset(s: &mut Seq) {
    s.table.clear();
    s.consumed = 0;
    s.cache_len = 0;
    s.registered = 0;
    s.parent_hash = 0;
}

/// The chain hash of the first `n` full blocks of `tokens`.
fn shared_hash(tokens: &[u32], n: usize, bs: usize) -> u64 {
    tokens
        .chunks_exact(bs)
        .take(n)
        .fold(0, super::blocks::chain_hash)
}
