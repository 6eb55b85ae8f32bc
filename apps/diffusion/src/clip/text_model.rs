//! `CLIPTextModel` (transformers): token + position embeddings, pre-LayerNorm transformer
//! layers with causal self-attention, a final LayerNorm; the pooled output is the hidden state
//! at each row's first end-of-text token. Parameter names are the checkpoint's
//! (`text_model.encoder.layers.{i}.self_attn.q_proj.weight`, …).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use colossal_core::lora::Adapters;
use colossal_core::params::Params;
use colossal_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::nn::{self, Activation};
use crate::{Error, Result};

/// The `config.json` of a `text_encoder/` folder.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClipTextConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "eos")]
    pub eos_token_id: u32,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn ln_eps() -> f64 {
    1e-5
}
fn eos() -> u32 {
    2
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::file(path, e))?;
        cfg.validate().map_err(|e| Error::file(path, e))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(a) = self.architectures.iter().find(|a| *a != "CLIPTextModel") {
            return Err(format!(
                "architectures: `{a}` is not implemented (CLIPTextModel)"
            ));
        }
        Activation::parse(&self.hidden_act, "hidden_act")?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    /// Every parameter's checkpoint name and shape, in checkpoint order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (
                "text_model.embeddings.token_embedding.weight".into(),
                vec![self.vocab_size, h],
            ),
            (
                "text_model.embeddings.position_embedding.weight".into(),
                vec![self.max_position_embeddings, h],
            ),
        ];
        for l in 0..self.num_hidden_layers {
            let n = |s: &str| format!("text_model.encoder.layers.{l}.{s}");
            for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
                out.push((n(&format!("self_attn.{proj}.weight")), vec![h, h]));
                out.push((n(&format!("self_attn.{proj}.bias")), vec![h]));
            }
            for (norm, _) in [("layer_norm1", 0), ("layer_norm2", 1)] {
                out.push((n(&format!("{norm}.weight")), vec![h]));
                out.push((n(&format!("{norm}.bias")), vec![h]));
            }
            out.push((n("mlp.fc1.weight"), vec![i, h]));
            out.push((n("mlp.fc1.bias"), vec![i]));
            out.push((n("mlp.fc2.weight"), vec![h, i]));
            out.push((n("mlp.fc2.bias"), vec![h]));
        }
        out.push(("text_model.final_layer_norm.weight".into(), vec![h]));
        out.push(("text_model.final_layer_norm.bias".into(), vec![h]));
        out
    }
}

#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub cfg: ClipTextConfig,
    act: Activation,
    pub kernels: Kernels,
    /// Put before every parameter name: `text_encoder.` when it trains in one parameter set
    /// with the UNet (its blocks are the first of the UNet family's).
    pub prefix: String,
    /// LoRA adapters on its linears (sites named with the prefix; pairs in the parameters).
    pub lora: Option<Arc<Adapters>>,
}

impl ClipTextModel {
    pub fn new(cfg: ClipTextConfig) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let act = Activation::parse(&cfg.hidden_act, "hidden_act").map_err(Error::Config)?;
        Ok(Self {
            cfg,
            act,
            kernels: Kernels::default(),
            prefix: String::new(),
            lora: None,
        })
    }

    /// The model and its weights from a `text_encoder/` folder (`config.json`,
    /// `model.safetensors`); every parameter must be there with its shape.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, Params)> {
        let read = |f: &Path| Self::new(ClipTextConfig::from_file(f)?);
        let shapes = |m: &Self| m.cfg.param_shapes();
        crate::weights::load_folder(dir, "model.safetensors", read, shapes, dtype, device)
    }

    /// Writes a `text_encoder/` folder: the config (`config_from`, as transformers wrote it)
    /// and `model.safetensors` with the checkpoint's names (this model's prefix removed).
    pub fn save(&self, dir: &Path, params: &Params, config_from: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let cfg = dir.join("config.json");
        std::fs::copy(config_from, &cfg).map_err(|e| Error::file(config_from, e))?;
        let tensors = self
            .cfg
            .param_shapes()
            .into_iter()
            .map(|(n, _)| Ok((n.clone(), params.get(&self.name(&n))?.clone())))
            .collect::<Result<Vec<_>>>()?;
        colossal_core::checkpoint::hf::save_model_named(dir, "model", &tensors, 10 << 30)?;
        Ok(())
    }

    /// Every parameter's name (with the prefix) and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let shapes = self.cfg.param_shapes();
        shapes
            .into_iter()
            .map(|(n, s)| (self.name(&n), s))
            .collect()
    }

    /// Its Linear weights (name with the prefix, (out, in)): where LoRA may go.
    pub fn linear_layers(&self) -> Vec<(String, Vec<usize>)> {
        self.param_shapes()
            .into_iter()
            .filter(|(n, s)| s.len() == 2 && n.contains(".encoder.layers."))
            .collect()
    }

    fn name(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }

    fn linear(&self, p: &Params, module: &str, x: &Tensor) -> Result<Tensor> {
        let y = nn::linear(p, module, x, self.kernels)?;
        Ok(match &self.lora {
            Some(l) => l.add_term(p, &format!("{module}.weight"), x, y, self.kernels)?,
            None => y,
        })
    }

    /// Token plus position embeddings (B, T, H) of token ids (B, T).
    pub fn embed(&self, p: &Params, ids: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t) = ids.dims2()?;
        if t > c.max_position_embeddings {
            return Err(Error::Config(format!(
                "{t} tokens: the text encoder takes at most {}",
                c.max_position_embeddings
            )));
        }
        let tok = p.get(&self.name("text_model.embeddings.token_embedding.weight"))?;
        let pos = p
            .get(&self.name("text_model.embeddings.position_embedding.weight"))?
            .narrow(0, 0, t)?;
        Ok(tok
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, c.hidden_size))?
            .broadcast_add(&pos)?)
    }

    /// Encoder layer `l`: causal self-attention then the MLP, each after a LayerNorm and added
    /// back.
    pub fn layer(&self, p: &Params, l: usize, x: &Tensor) -> Result<Tensor> {
        let (c, k) = (&self.cfg, self.kernels);
        let n = |s: &str| self.name(&format!("text_model.encoder.layers.{l}.{s}"));
        let heads = c.num_attention_heads;
        let scale = 1.0 / ((c.hidden_size / heads) as f64).sqrt();
        let h = nn::layer_norm(p, &n("layer_norm1"), x, c.layer_norm_eps, k)?;
        let q = self
            .linear(p, &n("self_attn.q_proj"), &h)?
            .affine(scale, 0.0)?;
        let kk = self.linear(p, &n("self_attn.k_proj"), &h)?;
        let v = self.linear(p, &n("self_attn.v_proj"), &h)?;
        let (q, kk, v) = (
            nn::split_heads(&q, heads)?,
            nn::split_heads(&kk, heads)?,
            nn::split_heads(&v, heads)?,
        );
        let o = nn::merge_heads(&nn::attention(&q, &kk, &v, true, k)?)?;
        let x = (x + self.linear(p, &n("self_attn.out_proj"), &o)?)?;
        let h = nn::layer_norm(p, &n("layer_norm2"), &x, c.layer_norm_eps, k)?;
        let h = self.act.apply(&self.linear(p, &n("mlp.fc1"), &h)?)?;
        Ok((&x + self.linear(p, &n("mlp.fc2"), &h)?)?)
    }

    /// The final LayerNorm: the last hidden state the UNet attends to.
    pub fn final_norm(&self, p: &Params, x: &Tensor) -> Result<Tensor> {
        let name = self.name("text_model.final_layer_norm");
        nn::layer_norm(p, &name, x, self.cfg.layer_norm_eps, self.kernels)
    }

    /// (last hidden state (B, T, H) after the final LayerNorm, pooled output (B, H)) for
    /// token ids (B, T).
    pub fn forward(&self, p: &Params, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.embed(p, ids)?;
        for l in 0..self.cfg.num_hidden_layers {
            x = self.layer(p, l, &x)?;
        }
        let last = self.final_norm(p, &x)?;
        let ids_host: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let rows = ids_host
            .iter()
            .enumerate()
            .map(|(i, row)| last.i((i, pooled_position(row, self.cfg.eos_token_id))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((last.clone(), Tensor::stack(&rows, 0)?))
    }
}

/// Where the pooled output is read: the first end-of-text token, or — for configs that say
/// `eos_token_id = 2`, as SD 1.x's do while their tokenizer's end token is the largest id —
/// the first position of the largest id (transformers' legacy rule).
fn pooled_position(row: &[u32], eos: u32) -> usize {
    if eos == 2 {
        let max = row.iter().copied().max().unwrap_or(0);
        return row.iter().position(|&id| id == max).unwrap_or(0);
    }
    row.iter()
        .position(|&id| id == eos)
        .unwrap_or(row.len().saturating_sub(1))
}
