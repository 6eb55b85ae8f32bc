//! Block bookkeeping for the paged cache: reference counts, a free list, and a prefix cache
//! that maps a full block of prompt tokens (with everything before it) to the block already
//! holding its keys and values, so identical prefixes are computed and stored once.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    /// Free blocks, least recently freed first; a freed block keeps its prefix-cache entry
    /// until it is handed out for other tokens.
    free: VecDeque<u32>,
    /// Prefix hash → block, for full blocks whose contents are known.
    cached: HashMap<u64, u32>,
    /// Per block: its prefix hash and tokens, when registered.
    key: Vec<Option<(u64, Vec<u32>)>>,
    pub hits: usize,
}

/// The hash of a block given the hash of everything before it (0 for the first block).
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
            cached: HashMap::new(),
            key: vec![None; num_blocks],
            hits: 0,
        }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// A fresh block (its old prefix-cache entry, if any, dropped), or `None` when none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop_front()?;
        if let Some((h, _)) = self.key[b as usize].take() {
            self.cached.remove(&h);
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference to each block; blocks nobody holds go back to the free list.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r == 0 {
                self.free.push_back(b);
            }
        }
    }

    /// The blocks already holding `tokens`' leading full blocks, at most `max_blocks` of them,
    /// each with one more reference taken.
    pub fn match_prefix(&mut self, tokens: &[u32], max_blocks: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut parent = 0u64;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = chain_hash(parent, chunk);
            let Some(&b) = self.cached.get(&h) else { break };
            if self.key[b as usize]
                .as_ref()
                .is_none_or(|(_, t)| t != chunk)
            {
                break;
            }
            if self.refs[b as usize] == 0 {
                let at = self
                    .free
                    .iter()
                    .position(|&f| f == b)
                    .expect("unheld blocks are free");
                self.free.remove(at);
            }
            self.refs[b as usize] += 1;
            out.push(b);
            parent = h;
        }
        self.hits += out.len();
        out
    }

    /// Registers block `b`, now full with `tokens` after the prefix hashed `parent`; returns
    /// its own hash. A block with the same contents already registered stays the one found.
    pub fn register(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let h = chain_hash(parent, tokens);
        if self.key[b as usize].is_none() && !self.cached.contains_key(&h) {
            self.cached.insert(h, b);
            self.key[b as usize] = Some((h, tokens.to_vec()));
        }
        h
    }
}
