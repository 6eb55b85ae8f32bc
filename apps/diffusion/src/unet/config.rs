//! `unet/config.json` of `UNet2DConditionModel`, validated once: the SD 1.x/2.x layouts are
//! implemented; a setting that changes the math and is not (class or addition embeddings,
//! scale-shift time conditioning, dual cross-attention, …) is an error naming it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nn::Activation;
use crate::{Error, Result};

/// An int for every block, or one per block.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(n) => *n,
            PerBlock::Each(v) => v[i],
        }
    }

    fn len_ok(&self, n: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownKind {
    CrossAttn,
    Plain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpKind {
    CrossAttn,
    Plain,
}

fn d_eps() -> f64 {
    1e-5
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_scale() -> f64 {
    1.0
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "crate::config_keys::defaults::one")]
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// diffusers' legacy naming: the number of heads (head size = channels / this).
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "crate::config_keys::defaults::groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "crate::config_keys::defaults::silu")]
    pub act_fn: String,
    #[serde(default = "crate::config_keys::defaults::yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_one_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "crate::config_keys::defaults::one")]
    pub downsample_padding: usize,
    #[serde(default = "d_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub upcast_attention: bool,
}

fn d_sample() -> usize {
    64
}
fn d_one_block() -> PerBlock {
    PerBlock::One(1)
}

/// Keys that must hold diffusers' default (null/false/…) because what they switch on is not
/// implemented, with the value accepted.
const FIXED: [(&str, &str); 23] = [
    ("dropout", "0.0"),
    ("addition_embed_type", "null"),
    ("class_embed_type", "null"),
    ("num_class_embeds", "null"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("time_cond_proj_dim", "null"),
    ("time_embedding_dim", "null"),
    ("time_embedding_act_fn", "null"),
    ("timestep_post_act", "null"),
    ("cross_attention_norm", "null"),
    ("reverse_transformer_layers_per_block", "null"),
    ("dual_cross_attention", "false"),
    ("only_cross_attention", "false"),
    ("center_input_sample", "false"),
    ("resnet_skip_time_act", "false"),
    ("resnet_time_scale_shift", "\"default\""),
    ("time_embedding_type", "\"positional\""),
    ("attention_type", "\"default\""),
    ("mid_block_type", "\"UNetMidBlock2DCrossAttn\""),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("resnet_out_scale_factor", "1.0"),
];

/// Keys with no effect on the math of what we implement (they qualify switches that must be
/// off, or are training-only and zero here).
const INERT: [&str; 8] = [
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "class_embeddings_concat",
    "projection_class_embeddings_input_dim",
    "mid_block_only_cross_attention",
];

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::config_keys::read(path, Self::from_json)
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let known: Vec<&str> = INERT.iter().chain(&FIELDS).copied().collect();
        let v = crate::config_keys::checked(text, "UNet2DConditionModel", &known, &FIXED)?;
        let cfg: Self = serde_json::from_value(Value::Object(v)).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have one entry per level",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        self.down_kinds()?;
        self.up_kinds()?;
        Activation::parse(&self.act_fn, "act_fn")?;
        for (field, pb) in [
            ("attention_head_dim", &self.attention_head_dim),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block,
            ),
        ] {
            if !pb.len_ok(n) {
                return Err(format!("{field}: one value, or one per block ({n})"));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if !c.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
            let heads = self.heads(i);
            if heads == 0 || !c.is_multiple_of(heads) {
                return Err(format!(
                    "block {i}: {c} channels do not split into {heads} heads"
                ));
            }
        }
        Ok(())
    }

    pub fn down_kinds(&self) -> std::result::Result<Vec<DownKind>, String> {
        self.down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownKind::CrossAttn),
                "DownBlock2D" => Ok(DownKind::Plain),
                other => Err(format!("down_block_types: `{other}` is not implemented")),
            })
            .collect()
    }

    pub fn up_kinds(&self) -> std::result::Result<Vec<UpKind>, String> {
        self.up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpKind::CrossAttn),
                "UpBlock2D" => Ok(UpKind::Plain),
                other => Err(format!("up_block_types: `{other}` is not implemented")),
            })
            .collect()
    }

    /// The `config.json` diffusers reads back (keys left out take diffusers' defaults, which
    /// are the values this model implements).
    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        let obj = v.as_object_mut().expect("a struct serialises to an object");
        obj.insert("_class_name".into(), "UNet2DConditionModel".into());
        obj.insert("_diffusers_version".into(), "0.35.2".into());
        Ok(serde_json::to_string_pretty(&v).expect("json"))
    }

    /// Heads of level `i`'s attention (`num_attention_heads`, else the legacy
    /// `attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// Time embedding width: 4 × the first level's channels.
    pub fn time_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }
}

/// The struct's own keys (for the unknown-key check).
const FIELDS: [&str; 20] = [
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "norm_num_groups",
    "norm_eps",
    "act_fn",
    "flip_sin_to_cos",
    "freq_shift",
    "use_linear_projection",
    "transformer_layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "upcast_attention",
];
