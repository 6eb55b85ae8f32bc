//! The LLaMA computation, split at block boundaries: `embed`, `layer(i)`, `head`.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::regions::{Local, Regions};
use super::{inputs::KvCache, AttnInputs, LlamaConfig, Rope};
use crate::lora::{Adapters, DropoutKeys, LoraConfig, Site};
use crate::models::family::{ModelFamily, ParamSink};
use crate::parallel::expert::ExpertParallel;
use crate::params::Params;
use crate::Result;
pub use colossal_kernels::Kernels;

/// Attention over a layer's keys and values: (q scaled, k, v) → output, all (B, heads, T, d).
pub type Attend<'a> = dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a;

/// A LLaMA model description: config and rotary tables. Weights are passed in
/// (`Params`), so whoever runs the model decides where they live; `regions` is where a
/// parallel plan hooks in (the plain model: [`Local`]); `kernels` says whether its norms,
/// rotary, SwiGLU and softmax run fused or as reference compositions.
#[derive(Clone, Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub rope: Rope,
    pub regions: Arc<dyn Regions>,
    pub kernels: Kernels,
    /// LoRA adapters on some projections (their pairs are in the parameters); `None`: none.
    pub lora: Option<Arc<Adapters>>,
    /// Expert parallelism: this rank holds and runs only its share of each layer's experts.
    pub ep: Option<Arc<ExpertParallel>>,
    /// Slots routed and dropped (expert capacity) by its MoE layers.
    pub moe_counts: Arc<super::moe::MoeCounts>,
}

impl Llama {
    pub fn new(cfg: LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let rope = Rope::new(cfg.rope()?, cfg.head_dim(), cfg.max_position_embeddings);
        Ok(Self {
            cfg,
            rope,
            regions: Arc::new(Local),
            kernels: Kernels::default(),
            lora: None,
            ep: None,
            moe_counts: Arc::default(),
        })
    }

    /// This model with LoRA adapters at `sites`, scaled as `cfg` says.
    pub fn with_lora(&self, cfg: &LoraConfig, sites: Vec<Site>) -> Self {
        Self {
            lora: Some(Arc::new(Adapters {
                cfg: cfg.clone(),
                sites,
            })),
            ..self.clone()
        }
    }

    /// This model with its ops run by `kernels`.
    pub fn with_kernels(&self, kernels: Kernels) -> Self {
        Self {
            kernels,
            ..self.clone()
        }
    }

    /// This model with its regions computed by `regions` (a parallel plan).
    pub fn with_regions(&self, regions: Arc<dyn Regions>) -> Self {
        Self {
            regions,
            ..self.clone()
        }
    }

    pub const EMBED: &'static str = "model.embed_tokens.weight";
    pub const NORM: &'static str = "model.norm.weight";

    pub const SCORE: &'static str = "score.weight";

    /// The output projection: the score head of a sequence classifier, else the LM head
    /// (the embedding when tied).
    pub fn head_weight_name(&self) -> &'static str {
        if self.cfg.score_labels().is_some() {
            Self::SCORE
        } else if self.cfg.tie_word_embeddings {
            Self::EMBED
        } else {
            "lm_head.weight"
        }
    }

    /// Token embedding. Rows of `pad_token_id` get no gradient, as with torch's `padding_idx`.
    pub fn embed(&self, p: &Params, ids: &Tensor) -> Result<Tensor> {
        let pad = self
            .cfg
            .pad_token_id
            .filter(|&p| (p as usize) < self.cfg.vocab_size);
        self.regions
            .embed(Self::EMBED, p.get(Self::EMBED)?, ids, pad)
    }

    /// Decoder layer `l` on the residual stream `x` (B, T, H).
    pub fn layer(
        &self,
        l: usize,
        p: &Params,
        x: &Tensor,
        inp: &AttnInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match cache {
            None => self.layer_with(l, p, x, inp, &mut |q, k, v| {
                self.regions.attention(q, k, v, inp, self.kernels)
            }),
            Some(cache) => self.layer_with(l, p, x, inp, &mut |q, k, v| {
                let (k, v) = match (&cache.k, &cache.v) {
                    (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
                    _ => (k.clone(), v.clone()),
                };
                cache.k = Some(k.clone());
                cache.v = Some(v.clone());
                self.regions.attention(q, &k, &v, inp, self.kernels)
            }),
        }
    }

    /// Decoder layer `l` whose attention over the past is done by `attend` (a paged KV cache):
    /// it gets q (already scaled by 1/√d), k and v (B, heads, T, d), rotated by `inp`'s tables,
    /// and returns the attention output (B, q heads, T, d).
    pub fn layer_with(
        &self,
        l: usize,
        p: &Params,
        x: &Tensor,
        inp: &AttnInputs,
        attend: &mut Attend<'_>,
    ) -> Result<Tensor> {
        let h = self.rms_norm(p, &format!("model.layers.{l}.input_layernorm.weight"), x)?;
        let attn = self.attention(l, p, &h, inp, attend)?;
        Ok(self.mlp_residual(l, p, x, &attn, inp)?.0)
    }

    /// Whole forward without a cache that also returns every MoE layer's router logits
    /// (tokens, experts) — what Mixtral's load-balancing loss reads.
    pub fn forward_with_router(
        &self,
        p: &Params,
        ids: &Tensor,
        inp: &AttnInputs,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = self.embed(p, ids)?;
        let mut routers = Vec::new();
        for l in 0..self.cfg.num_hidden_layers {
            let (y, r) = self.layer_routed(l, p, &x, inp)?;
            routers.extend(r.map(|r| r.logits));
            x = y;
        }
        Ok((self.head(p, &x)?, routers))
    }

    /// RMSNorm of `x` with the weight named `w`.
    fn rms_norm(&self, p: &Params, w: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.param(p, w)?;
        Ok(self.kernels.rms_norm(x, &w, self.cfg.rms_norm_eps)?)
    }

    /// [`Self::layer`] without a cache, with the routing of an MoE layer (training).
    pub fn layer_routed(
        &self,
        l: usize,
        p: &Params,
        x: &Tensor,
        inp: &AttnInputs,
    ) -> Result<(Tensor, Option<super::moe::Routing>)> {
        let h = self.rms_norm(p, &format!("model.layers.{l}.input_layernorm.weight"), x)?;
        let attn = self.attention(l, p, &h, inp, &mut |q, k, v| {
            self.regions.attention(q, k, v, inp, self.kernels)
        })?;
        self.mlp_residual(l, p, x, &attn, inp)
    }

    /// `x + attn`, then the MLP (or MoE) sublayer with its residual; the routing of an MoE
    /// layer.
    fn mlp_residual(
        &self,
        l: usize,
        p: &Params,
        x: &Tensor,
        attn: &Tensor,
        inp: &AttnInputs,
    ) -> Result<(Tensor, Option<super::moe::Routing>)> {
        let c = &self.cfg;
        let n = |s: &str| format!("model.layers.{l}.{s}");
        let x = (x + attn)?;
        if c.num_local_experts.is_some() {
            let h = self.rms_norm(p, &n("post_attention_layernorm.weight"), &x)?;
            let (y, router) = self.moe(l, p, &h)?;
            return Ok(((x + y)?, Some(router)));
        }
        let (gate, up, down) = (
            n("mlp.gate_proj.weight"),
            n("mlp.up_proj.weight"),
            n("mlp.down_proj.weight"),
        );
        let h = self.rms_norm(p, &n("post_attention_layernorm.weight"), &x)?;
        let h = self.regions.input(&[&gate, &up], &h)?;
        let bias = |s: &str| c.mlp_bias.then(|| n(s));
        let drop = inp.lora_dropout.as_deref();
        let gate = self.proj(p, &gate, &h, bias("mlp.gate_proj.bias"), drop)?;
        let up = self.proj(p, &up, &h, bias("mlp.up_proj.bias"), drop)?;
        let act = self.kernels.swiglu(&gate, &up)?;
        let down = self.proj(p, &down, &act, bias("mlp.down_proj.bias"), drop)?;
        Ok(((x + down)?, None))
    }

    fn attention(
        &self,
        l: usize,
        p: &Params,
        x: &Tensor,
        inp: &AttnInputs,
        attend: &mut Attend<'_>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let n = |s: &str| format!("model.layers.{l}.self_attn.{s}");
        // Head counts from the weights: a tensor-parallel rank holds a slice of the heads.
        let hd = c.head_dim();
        let nh = p.get(&n("q_proj.weight"))?.dim(0)? / hd;
        let nkv = p.get(&n("k_proj.weight"))?.dim(0)? / hd;
        let bias = |s: &str| c.attention_bias.then(|| n(s));
        let (wq, wk, wv) = (n("q_proj.weight"), n("k_proj.weight"), n("v_proj.weight"));
        let x = &self.regions.input(&[&wq, &wk, &wv], x)?;
        let (b, t, _) = x.dims3()?;
        let drop = inp.lora_dropout.as_deref();
        let proj = |w: &str, bname: &str, heads: usize| -> Result<Tensor> {
            let y = self.proj(p, &n(w), x, bias(bname), drop)?;
            Ok(y.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = proj("q_proj.weight", "q_proj.bias", nh)?;
        let k = proj("k_proj.weight", "k_proj.bias", nkv)?;
        let v = proj("v_proj.weight", "v_proj.bias", nkv)?;
        let q = self.kernels.rotary(&q, &inp.cos, &inp.sin)?;
        let k = self.kernels.rotary(&k, &inp.cos, &inp.sin)?;
        // Scaling q (T·D elements) instead of the scores (T·T) saves a pass each way.
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let out = attend(&q, &k, &v)?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.proj(p, &n("o_proj.weight"), &out, bias("o_proj.bias"), drop)
    }

    /// Final RMSNorm.
    pub fn final_norm(&self, p: &Params, x: &Tensor) -> Result<Tensor> {
        let w = self.param(p, Self::NORM)?;
        Ok(self.kernels.rms_norm(x, &w, self.cfg.rms_norm_eps)?)
    }

    /// Final RMSNorm and LM head: logits (B, T, V) (under tensor parallelism, this rank's
    /// slice of the vocabulary); for a sequence classifier, scores of every position
    /// (B, T, num_labels).
    pub fn head(&self, p: &Params, x: &Tensor) -> Result<Tensor> {
        self.head_with(p, x, None)
    }

    /// [`Self::head`], an adapter on it reading its input through `drop` in training.
    pub fn head_with(&self, p: &Params, x: &Tensor, drop: Option<&DropoutKeys>) -> Result<Tensor> {
        let head = self.head_weight_name();
        let h = self.regions.input(&[head], &self.final_norm(p, x)?)?;
        self.proj(p, head, &h, None, drop)
    }

    /// `x @ W^T (+ b)` for the weight named `w` and the bias named `b`, through the regions
    /// (a parallel plan completes the output; a pipeline schedule may take over the weight
    /// gradient); a LoRA adapter beside it reads `x` through `drop` in training.
    pub(super) fn proj(
        &self,
        p: &Params,
        w: &str,
        x: &Tensor,
        b: Option<String>,
        drop: Option<&DropoutKeys>,
    ) -> Result<Tensor> {
        let y = self.regions.linear(w, x, p.get(w)?, self.kernels)?;
        let y = self.regions.output(w, &y)?;
        // LoRA: y + (α/r)·B(A·x), the low-rank path beside the frozen weight.
        let y = match self.lora.as_ref().and_then(|l| l.pair(w)) {
            Some((a, b, scaling)) => {
                let x = &match drop {
                    Some(d) => d.apply(w, x, self.regions.input_features(w, x.dim(2)?))?,
                    None => x.clone(),
                };
                let low = self
                    .regions
                    .lora(w, x, p.get(&a)?, p.get(&b)?, self.kernels)?;
                (y + (low * scaling)?)?
            }
            None => y,
        };
        Ok(match b {
            Some(b) => y.broadcast_add(&self.param(p, &b)?)?,
            None => y,
        })
    }

    /// Parameter `name` as this rank applies it outside a projection.
    fn param(&self, p: &Params, name: &str) -> Result<Tensor> {
        self.regions.param(name, p.get(name)?)
    }

    /// Whole forward (no cache): logits (B, T, V).
    pub fn forward(&self, p: &Params, ids: &Tensor, inp: &AttnInputs) -> Result<Tensor> {
        let mut x = self.embed(p, ids)?;
        for l in 0..self.cfg.num_hidden_layers {
            x = self.layer(l, &*self.dense_layer(l, p)?, &x, inp, None)?;
        }
        self.head(p, &x)
    }

    /// `p` with layer `l`'s weights that rest quantised dequantised (dense only while the
    /// layer runs).
    fn dense_layer<'a>(&self, l: usize, p: &'a Params) -> Result<Cow<'a, Params>> {
        Ok(match p.has_quantised() {
            true => Cow::Owned(p.dequantised(&self.layer_param_names(l))?),
            false => Cow::Borrowed(p),
        })
    }

    /// Forward with per-layer KV caches (generation).
    pub fn forward_cached(
        &self,
        p: &Params,
        ids: &Tensor,
        inp: &AttnInputs,
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let mut x = self.embed(p, ids)?;
        for (l, cache) in caches.iter_mut().enumerate() {
            x = self.layer(l, &*self.dense_layer(l, p)?, &x, inp, Some(cache))?;
        }
        self.head(p, &x)
    }

    pub fn empty_caches(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.cfg.num_hidden_layers]
    }
}

/// Fresh weights for training from scratch: HF init (normal(0, initializer_range) for
/// matrices, ones for norms, zero bias and zero padding row), deterministic in `seed`.
pub fn init_params(model: &Llama, seed: u64, device: &Device) -> Result<Params> {
    crate::models::family::init_all(&model.param_specs(), seed, device)
}

/// The values `init_params` gives, handed to `f` one parameter at a time (same order, same
/// random stream), so a sharded owner can keep its slice and drop the rest.
pub fn init_each_param(model: &Llama, seed: u64, f: &mut ParamSink) -> Result<()> {
    crate::models::family::init_each(&model.param_specs(), seed, f)
}
