//! What a model family tells the engine beyond its blocks: its parameters (HF names, shapes,
//! initialisation, in checkpoint order), which are read by several blocks (tied), and its
//! tensor-parallel plan. Initialisation, ZeRO-3's streamed init, pipeline tie handling and
//! tensor parallelism read a model through this.

use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::exec::BlockModel;
use crate::parallel::plan::TpPlan;
use crate::params::Params;
use crate::Result;

/// How a parameter starts when training from scratch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// normal(0, std); `zero_row` (an embedding's padding row) set to 0 after drawing.
    Normal {
        std: f32,
        zero_row: Option<usize>,
    },
    Ones,
    Zeros,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

pub trait ModelFamily: BlockModel {
    /// Every parameter, in checkpoint order.
    fn param_specs(&self) -> Vec<ParamSpec>;
    /// Parameters more than one block reads (tied input and output embeddings): their
    /// gradient is complete only after the first block's backward, and pipeline stages
    /// holding copies sum theirs.
    fn tied_params(&self) -> Vec<String>;
    /// How each parameter splits under tensor parallelism.
    fn tp_plan(&self) -> TpPlan;
}

/// Receives one parameter: name, shape, values.
pub type ParamSink<'a> = dyn FnMut(&str, &[usize], Vec<f32>) -> Result<()> + 'a;

/// The values of a fresh model, handed to `f` one parameter at a time in checkpoint order
/// from one random stream seeded by `seed` (only normal draws consume it), so a sharded owner
/// can keep its slice and drop the rest and get what a whole initialisation gives.
pub fn init_each(specs: &[ParamSpec], seed: u64, f: &mut ParamSink) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for spec in specs {
        let numel: usize = spec.shape.iter().product();
        let data = match spec.init {
            Init::Ones => vec![1.0; numel],
            Init::Zeros => vec![0.0; numel],
            Init::Normal { std, zero_row } => {
                let normal = Normal::new(0.0f32, std).expect("valid std");
                let mut data: Vec<f32> = (0..numel).map(|_| normal.sample(&mut rng)).collect();
                if let Some(row) = zero_row.filter(|&r| r < spec.shape[0]) {
                    let width = numel / spec.shape[0];
                    data[row * width..(row + 1) * width].fill(0.0);
                }
                data
            }
        };
        f(&spec.name, &spec.shape, data)?;
    }
    Ok(())
}

/// [`init_each`] into variables on `device`.
pub fn init_all(specs: &[ParamSpec], seed: u64, device: &Device) -> Result<Params> {
    let mut params = Params::new();
    init_each(specs, seed, &mut |name, shape, data| {
        let t = Tensor::from_vec(data, shape, device)?;
        params.insert(name, Var::from_tensor(&t)?);
        Ok(())
    })?;
    Ok(params)
}
