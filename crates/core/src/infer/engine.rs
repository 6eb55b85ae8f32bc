//! The engine: requests in, one batched model step at a time, tokens out.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};

use super::blocks::BlockManager;
use super::kv::{KvPool, QueryPlace};
use super::sampler::Sampler;
use super::types::{EngineConfig, EngineStats, FinishReason, Output, Request};
use crate::models::llama::{AttnInputs, Llama};
use crate::params::Params;
use crate::{Error, Result};

pub(super) struct Seq {
    pub id: u64,
    /// Prompt, then output.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens fed through the model so far.
    pub consumed: usize,
    /// Entries in the cache (fewer than `consumed` once StreamingLLM evicted some).
    pub cache_len: usize,
    pub table: Vec<u32>,
    /// Full blocks registered in the prefix cache, and the hash of their chain.
    pub registered: usize,
    pub parent_hash: u64,
    pub sampler: Sampler,
    pub keep_logits: bool,
}

impl Seq {
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.consumed
    }
}

type Gather = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send>;

pub struct Engine {
    pub(super) model: Llama,
    params: Params,
    device: Device,
    pub(super) cfg: EngineConfig,
    pub(super) pool: KvPool,
    pub(super) blocks: BlockManager,
    pub(super) waiting: VecDeque<Seq>,
    pub(super) running: Vec<Seq>,
    next_id: u64,
    q_heads: usize,
    gather: Option<Gather>,
    pub(super) stats: EngineStats,
}

impl Engine {
    /// An engine for `model` with weights `params` (under tensor parallelism: this rank's
    /// slices; the pool then holds this rank's kv heads).
    pub fn new(model: Llama, params: Params, cfg: EngineConfig, device: &Device) -> Result<Self> {
        let c = &model.cfg;
        let hd = c.head_dim();
        let q_heads = params
            .get("model.layers.0.self_attn.q_proj.weight")?
            .dim(0)?
            / hd;
        let kv_heads = params
            .get("model.layers.0.self_attn.k_proj.weight")?
            .dim(0)?
            / hd;
        let bad = |field: &str, why: String| Err(Error::Config(format!("engine.{field}: {why}")));
        if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_batched_tokens == 0 {
            return bad(
                "block_size",
                "block_size, max_num_seqs and max_batched_tokens must be ≥ 1".into(),
            );
        }
        let slots = cfg.num_blocks * cfg.block_size;
        match cfg.streaming {
            Some(s) => {
                if s.window == 0 {
                    return bad("streaming.window", "must be ≥ 1".into());
                }
                if s.sinks + s.window > c.max_position_embeddings {
                    return bad(
                        "streaming",
                        format!(
                            "sinks + window = {} exceeds the model's max_position_embeddings {}",
                            s.sinks + s.window,
                            c.max_position_embeddings
                        ),
                    );
                }
                if s.sinks + s.window + cfg.block_size > slots {
                    return bad(
                        "num_blocks",
                        format!("{slots} slots cannot hold one stream of sinks + window + a block"),
                    );
                }
            }
            None if slots < c.max_position_embeddings => {
                return bad(
                    "num_blocks",
                    format!(
                        "{} blocks of {} slots cannot hold one sequence of the model's \
                         max_position_embeddings {}",
                        cfg.num_blocks, cfg.block_size, c.max_position_embeddings
                    ),
                );
            }
            None => {}
        }
        let pool = KvPool::new(
            c.num_hidden_layers,
            cfg.num_blocks,
            cfg.block_size,
            kv_heads,
            hd,
        );
        Ok(Self {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size),
            model,
            params,
            device: device.clone(),
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            q_heads,
            gather: None,
            stats: EngineStats::default(),
        })
    }

    /// Gathers this rank's slice of the logits (S, V / tp) into whole rows (tensor parallelism).
    pub fn with_logits_gather(mut self, gather: Gather) -> Self {
        self.gather = Some(gather);
        self
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Blocks in use now, and bytes one block takes.
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.blocks.num_used(), self.pool.block_bytes())
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Queues a request; its id names it in every [`Output`].
    pub fn add_request(&mut self, req: Request) -> Result<u64> {
        req.params.validate()?;
        let c = &self.model.cfg;
        if req.prompt.is_empty() {
            return Err(Error::Config("prompt: at least one token is needed".into()));
        }
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Config(format!(
                "prompt: id {bad} is outside the model's vocab_size {}",
                c.vocab_size
            )));
        }
        if self.cfg.streaming.is_none() && req.prompt.len() >= c.max_position_embeddings {
            return Err(Error::Config(format!(
                "prompt: {} tokens leave no room in the model's context of {}",
                req.prompt.len(),
                c.max_position_embeddings
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Seq {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            consumed: 0,
            cache_len: 0,
            table: Vec::new(),
            registered: 0,
            parent_hash: 0,
            sampler: Sampler::new(req.params),
            keep_logits: req.keep_logits,
        });
        Ok(id)
    }

    /// Drops a request wherever it is; `false` if it is unknown or already finished.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let s = self.waiting.remove(i).expect("found");
            self.blocks.release(&s.table);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.blocks.release(&s.table);
            return true;
        }
        false
    }

    /// One model step over the scheduled tokens of every running sequence.
    pub fn step(&mut self) -> Result<Vec<Output>> {
        let plan = self.schedule()?;
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        self.stats.steps += 1;
        self.stats.peak_blocks = self.stats.peak_blocks.max(self.blocks.num_used());
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut owner = Vec::new();
        let mut sample_rows = Vec::new();
        for &(si, take) in &plan {
            let s = &self.running[si];
            for i in 0..take {
                tokens.push(s.tokens[s.consumed + i]);
                positions.push((s.cache_len + i) as u32);
                slots.push(self.pool.slot(&s.table, s.cache_len + i));
                owner.push(si);
            }
            if s.consumed + take == s.tokens.len() {
                sample_rows.push((si, tokens.len() as u32 - 1));
            }
            if s.consumed < s.prompt_len {
                self.stats.prompt_tokens_computed += take.min(s.prompt_len - s.consumed);
            }
        }
        let logits = self.forward(&tokens, &positions, &slots, &owner)?;
        for &(si, take) in &plan {
            let s = &mut self.running[si];
            s.consumed += take;
            s.cache_len += take;
        }
        self.register_full_blocks();
        self.sample(logits, &sample_rows)
    }

    /// Runs the flat batch; returns the final hidden states' logits for every token position
    /// as a closure over rows (only sampled rows go through the head).
    fn forward(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        slots: &[usize],
        owner: &[usize],
    ) -> Result<Hidden> {
        let n = tokens.len();
        let (model, p, dev) = (&self.model, &self.params, &self.device);
        let ids = Tensor::from_vec(tokens.to_vec(), (1, n), dev)?;
        let mut inp = AttnInputs::new(
            &model.cfg,
            &model.rope,
            &[positions.to_vec()],
            0,
            None,
            None,
            dev,
        )?;
        let mut x = model.embed(p, &ids)?;
        if x.dtype() != DType::F32 {
            inp = inp.to_dtype(x.dtype())?;
        }
        let places: Vec<QueryPlace<'_>> = positions
            .iter()
            .zip(owner)
            .map(|(&pos, &si)| QueryPlace {
                table: &self.running[si].table,
                context: pos as usize + 1,
            })
            .collect();
        let (pool, heads) = (&mut self.pool, self.q_heads);
        for l in 0..model.cfg.num_hidden_layers {
            x = model.layer_with(l, p, &x, &inp, &mut |q, k, v| {
                let flat = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.squeeze(0)?
                        .transpose(0, 1)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?)
                };
                pool.write(l, slots, &flat(k)?, &flat(v)?);
                let out = pool.attend(l, &flat(q)?, heads, &places);
                let d = model.cfg.head_dim();
                Ok(Tensor::from_vec(out, (n, heads, d), dev)?
                    .to_dtype(q.dtype())?
                    .transpose(0, 1)?
                    .unsqueeze(0)?)
            })?;
        }
        Ok(Hidden(x))
    }

    /// Logits of the sampled rows, gathered to whole rows under tensor parallelism.
    fn logits(&self, hidden: Hidden, rows: &[u32]) -> Result<Vec<Vec<f32>>> {
        let idx = Tensor::new(rows, &self.device)?;
        let last = hidden.0.index_select(&idx, 1)?;
        let mut logits = self.model.head(&self.params, &last)?.squeeze(0)?;
        if let Some(g) = &self.gather {
            logits = g(&logits)?;
        }
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    fn sample(&mut self, hidden: Hidden, rows: &[(usize, u32)]) -> Result<Vec<Output>> {
        let idx: Vec<u32> = rows.iter().map(|r| r.1).collect();
        let logits = if idx.is_empty() {
            Vec::new()
        } else {
            self.logits(hidden, &idx)?
        };
        let max_pos = self.model.cfg.max_position_embeddings;
        let streaming = self.cfg.streaming.is_some();
        let mut outputs = Vec::with_capacity(rows.len());
        let mut finished = Vec::new();
        for (&(si, _), mut row) in rows.iter().zip(logits) {
            let s = &mut self.running[si];
            let kept = s.keep_logits.then(|| row.clone());
            let token = s.sampler.next(&mut row, &s.tokens);
            s.tokens.push(token);
            self.stats.generated_tokens += 1;
            let completion = s.tokens.len() - s.prompt_len;
            let params = s.sampler.params();
            let finish = if params.stop_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if completion >= params.max_tokens || (!streaming && s.tokens.len() >= max_pos) {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finish.is_some() {
                finished.push(s.id);
            }
            outputs.push(Output {
                id: s.id,
                token,
                finish,
                prompt_tokens: s.prompt_len,
                completion_tokens: completion,
                logits: kept,
            });
        }
        for id in finished {
            self.abort(id);
        }
        Ok(outputs)
    }

    /// Runs steps until every queued request is done; the ids each produced, by request id.
    pub fn run_to_end(&mut self) -> Result<std::collections::BTreeMap<u64, Vec<u32>>> {
        let mut out = std::collections::BTreeMap::<u64, Vec<u32>>::new();
        while self.has_work() {
            for o in self.step()? {
                out.entry(o.id).or_default().push(o.token);
            }
        }
        Ok(out)
    }
}

/// Final hidden states of a step, (1, N, H).
struct Hidden(Tensor);
