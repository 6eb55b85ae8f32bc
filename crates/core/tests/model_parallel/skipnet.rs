//! The test model shaped like the next applications (see `multi_stream.rs`), and the same
//! model as a model family the engine trains.

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use colossal_core::exec::{Acts, BlockModel, LossFn};
use colossal_core::models::{Init, ModelFamily, ParamSpec};
use colossal_core::parallel::plan::TpPlan;
use colossal_core::params::Params;
use colossal_core::{Error, Result};

pub const D: usize = 8;
pub const ROWS: usize = 2;
pub const MICRO: usize = 4;
pub const STEPS: usize = 3;
pub const LR: f64 = 1e-2;
pub const MAX_NORM: f64 = 1.0;
pub const T: Duration = Duration::from_secs(60);

/// down0 → down1 → split into (msa, pair) → mix → up1 (+ skip1) → up0 (+ skip0).
#[derive(Clone, Debug)]
pub struct SkipNet;

const NAMES: [&[&str]; 6] = [
    &["down0.w"],
    &["down1.w"],
    &["split.msa", "split.pair"],
    &["mix.msa", "mix.pair"],
    &["up1.w"],
    &["up0.w", "up0.b"],
];

impl BlockModel for SkipNet {
    type Ctx = ();

    fn num_blocks(&self) -> usize {
        NAMES.len()
    }

    fn block_param_names(&self, block: usize) -> Vec<String> {
        NAMES[block].iter().map(|s| s.to_string()).collect()
    }

    fn block_forward(&self, block: usize, p: &Params, x: &Acts, _: &()) -> Result<Acts> {
        let cond = x.get("cond")?.clone();
        let mut out = x.clone();
        match block {
            0 => {
                let h = (x.get("x")?.matmul(p.get("down0.w")?)? + &cond)?.tanh()?;
                out.take("x")?;
                out.insert("skip.0", h.clone());
                out.insert("h", h);
            }
            1 => {
                let h = x.get("h")?.matmul(p.get("down1.w")?)?.tanh()?;
                out.insert("skip.1", h.clone());
                out.insert("h", h);
            }
            2 => {
                let h = out.take("h")?;
                out.insert("msa", h.matmul(p.get("split.msa")?)?.tanh()?);
                out.insert("pair", (h.matmul(p.get("split.pair")?)? * &cond)?);
            }
            3 => {
                let msa = (x.get("msa")? + x.get("pair")?.matmul(p.get("mix.msa")?)?.tanh()?)?;
                let pair = (x.get("pair")? + msa.matmul(p.get("mix.pair")?)?)?;
                out.insert("msa", msa);
                out.insert("pair", pair);
            }
            4 => {
                let both = (out.take("msa")? + out.take("pair")?)?;
                let h = (both.matmul(p.get("up1.w")?)?.tanh()? + out.take("skip.1")?)?;
                out.insert("h", h);
            }
            _ => {
                let h = (x.get("h")? + x.get("skip.0")?)?;
                let y = h.matmul(p.get("up0.w")?)?.broadcast_add(p.get("up0.b")?)?;
                out = Acts::one("y", y);
            }
        }
        Ok(out)
    }

    fn takes_grad(&self, name: &str) -> bool {
        !matches!(name, "x" | "cond")
    }
}

pub fn init() -> Params {
    let mut p = Params::new();
    for (i, name) in NAMES.iter().flat_map(|n| n.iter()).enumerate() {
        let shape: &[usize] = if *name == "up0.b" { &[D] } else { &[D, D] };
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|k| (((k * 37 + i * 101) % 97) as f32 / 97.0 - 0.5) * 0.9)
            .collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        p.insert(*name, Var::from_tensor(&t).unwrap());
    }
    p
}

fn tensor(seed: usize, f: impl Fn(usize) -> f32) -> Tensor {
    let v: Vec<f32> = (0..ROWS * D).map(|k| f(k * 13 + seed * 7)).collect();
    Tensor::from_vec(v, (ROWS, D), &Device::Cpu).unwrap()
}

/// Micro-batch `mb` of step `step`: inputs and regression target.
pub fn batch(step: usize, mb: usize) -> (Acts, Tensor) {
    let s = step * MICRO + mb;
    let x = tensor(s, |k| ((k % 11) as f32 / 11.0 - 0.5) * 2.0);
    let cond = tensor(s, |k| 1.0 + ((k % 5) as f32) * 0.1);
    let target = tensor(s, |k| (k % 7) as f32 / 7.0 - 0.5);
    (Acts::one("x", x).with("cond", cond), target)
}

pub fn loss_fn(target: Tensor) -> Box<LossFn<'static>> {
    let norm = (MICRO * ROWS * D) as f64;
    Box::new(move |out: &Acts| Ok(((out.get("y")? - &target)?.sqr()?.sum_all()? / norm)?))
}

impl ModelFamily for SkipNet {
    fn family(&self) -> &'static str {
        "skipnet"
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        NAMES
            .iter()
            .flat_map(|n| n.iter())
            .map(|name| {
                let (shape, init) = if *name == "up0.b" {
                    (vec![D], Init::Zeros)
                } else {
                    let std = 0.3;
                    (
                        vec![D, D],
                        Init::Normal {
                            std,
                            zero_row: None,
                        },
                    )
                };
                ParamSpec {
                    name: name.to_string(),
                    shape,
                    init,
                }
            })
            .collect()
    }

    fn tied_params(&self) -> Vec<String> {
        Vec::new()
    }

    fn tp_plan(&self) -> TpPlan {
        TpPlan::new(&[])
    }

    fn read_config(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        match text.contains("\"skipnet\"") {
            true => Ok(SkipNet),
            false => Err(Error::file(&path, "not a skipnet config")),
        }
    }

    fn write_config(&self, dir: &Path, _dtype: DType) -> Result<()> {
        let path = dir.join("config.json");
        std::fs::write(&path, "{\"model_type\": \"skipnet\"}").map_err(|e| Error::io(&path, e))
    }
}
