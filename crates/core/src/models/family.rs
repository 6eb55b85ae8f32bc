//! What a model family tells the engine beyond its blocks: its parameters (HF names, shapes,
//! initialisation, in checkpoint order), which are read by several blocks (tied), and its
//! tensor-parallel plan. Initialisation, ZeRO-3's streamed init, pipeline tie handling and
//! tensor parallelism read a model through this.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use colossal_kernels::Kernels;

use crate::dist::Group;
use crate::exec::{Acts, BlockModel};
use crate::lora::{LoraConfig, Site};
use crate::parallel::expert::ExpertParallel;
use crate::parallel::plan::TpPlan;
use crate::parallel::sequence::SpMode as SeqSplit;
use crate::parallel::weight_grad::WeightGradStash;
use crate::params::Params;
use crate::{Error, Result};

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
    /// uniform(−bound, bound), as torch's default Linear/Conv init (kaiming-uniform with
    /// a = √5 gives bound = 1/√fan_in for weights and biases alike).
    Uniform {
        bound: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// A model family: everything the engine needs to build, split, train and checkpoint it
/// without knowing what it computes. The parallel hooks default to a clear error, so a family
/// states which parallel styles it supports by implementing them.
pub trait ModelFamily: BlockModel + Sized {
    /// The family's name, for errors ("llama").
    fn family(&self) -> &'static str;
    /// Every parameter, in checkpoint order.
    fn param_specs(&self) -> Vec<ParamSpec>;
    /// Parameters more than one block reads (tied input and output embeddings): their
    /// gradient is complete only after the first block's backward, and pipeline stages
    /// holding copies sum theirs.
    fn tied_params(&self) -> Vec<String>;
    /// How each parameter splits under tensor parallelism.
    fn tp_plan(&self) -> TpPlan;

    /// The model described by the config file(s) in a checkpoint directory.
    fn read_config(dir: &Path) -> Result<Self>;
    /// Writes the config file(s) of a checkpoint directory (weights stored as `dtype`).
    fn write_config(&self, dir: &Path, dtype: DType) -> Result<()>;

    /// Config and weights (as `dtype`) from a checkpoint directory: safetensors, sharded or
    /// not, under the names of [`Self::param_specs`].
    fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, Params)> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "model directory not found"));
        }
        let model = Self::read_config(dir)?;
        let shapes = model.param_shapes();
        let mut tensors = crate::checkpoint::hf::load_expected(dir, &shapes, dtype, device)?;
        let mut params = Params::new();
        for (name, _) in &shapes {
            let t = tensors.remove(name).expect("loaded");
            params.insert(name.clone(), Var::from_tensor(&t)?);
        }
        Ok((model, params))
    }

    /// Writes config and weights into `dir` (weights above `max_shard_bytes` sharded, with
    /// the index transformers writes).
    fn save(&self, dir: &Path, params: &Params, max_shard_bytes: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<_> = self
            .param_specs()
            .into_iter()
            .map(|s| Ok((s.name.clone(), params.get(&s.name)?.clone())))
            .collect::<Result<_>>()?;
        let dtype = tensors.first().map_or(DType::F32, |(_, t)| t.dtype());
        self.write_config(dir, dtype)?;
        crate::checkpoint::hf::save_model_named(dir, self.weights_stem(), &tensors, max_shard_bytes)
    }

    /// The weight files' stem: `model` (transformers) or `diffusion_pytorch_model` (diffusers).
    fn weights_stem(&self) -> &'static str {
        "model"
    }

    /// (name, shape) of every parameter, in checkpoint order.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.param_specs()
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect()
    }

    /// The blocks of each of `stages` pipeline stages (`per_stage`: the user's counts of
    /// blocks, or whatever unit the family's config counts). By default every block counts
    /// alike and earlier stages take the remainder.
    fn pipeline_stages(
        &self,
        stages: usize,
        per_stage: Option<&[usize]>,
    ) -> Result<Vec<Range<usize>>> {
        crate::parallel::pipeline::partition_blocks(self.num_blocks(), stages, per_stage)
    }

    /// Whether the model splits over `tp` ranks (what the plan's shapes cannot tell, such as
    /// whole attention heads), naming the config field that does not. Checked before any
    /// weight is cut; a family implementing [`Self::tensor_parallel`] implements this too.
    fn check_tensor_parallel(&self, _tp: usize) -> Result<()> {
        Err(self.unsupported("tensor parallelism (parallel.tp > 1)"))
    }

    /// This model with its activations exchanged over a tensor-parallel group as its plan's
    /// styles say (`sequence_parallel`: Megatron-SP between the regions).
    fn tensor_parallel(&self, _group: Group, _sequence_parallel: bool) -> Result<Self> {
        Err(self.unsupported("tensor parallelism (parallel.tp > 1)"))
    }

    /// This model with its sequence split over a group (Ulysses or ring attention).
    fn sequence_parallel(&self, _group: Group, _mode: SeqSplit) -> Result<Self> {
        Err(self.unsupported("sequence parallelism (parallel.sp > 1)"))
    }

    /// This model with its experts split over `group` (it then runs only its share, and
    /// exchanges tokens with the group's other ranks), and the split.
    fn expert_parallel(&self, _group: Group) -> Result<(Self, Arc<ExpertParallel>)> {
        Err(self.unsupported("expert parallelism (parallel.ep > 1)"))
    }

    /// The whole model a rank under expert parallelism is part of (what a checkpoint holds).
    fn without_expert_parallel(&self) -> Option<Self> {
        None
    }

    /// This model with its weight gradients deferred to a zero-bubble schedule's W pass, and
    /// the stash the schedule drives.
    fn defer_weight_grads(&self) -> Result<(Self, Arc<WeightGradStash>)> {
        Err(self.unsupported("parallel.pp_schedule = \"zbh1\""))
    }

    /// This model running its ops as `kernels` says. A family without a choice runs the
    /// default and refuses the other.
    fn with_kernels(self, kernels: Kernels) -> Result<Self> {
        match kernels == Kernels::default() {
            true => Ok(self),
            false => Err(self.unsupported(&format!("train.kernels = \"{kernels}\""))),
        }
    }

    /// The input and output embeddings (what `train.freeze = "non_embedding"` keeps training).
    fn embedding_params(&self) -> Vec<String> {
        Vec::new()
    }

    /// Its Linear weights (name, (out, in), whether it is the output head): where LoRA adapters
    /// may go. Empty: the family takes none.
    fn linear_layers(&self) -> Vec<(String, Vec<usize>, bool)> {
        Vec::new()
    }

    /// This model computing W·x + (α/r)·B(A·x) at `sites` (the pairs are in the parameters).
    fn with_lora(self, _cfg: &LoraConfig, _sites: Vec<Site>) -> Result<Self> {
        Err(self.unsupported("LoRA (`[lora]`)"))
    }

    /// Whether the trainer can train this model as configured (an error names what it lacks).
    fn check_trainable(&self) -> Result<()> {
        Ok(())
    }

    /// A loss term the model itself asks for (a mixture of experts' load balancing), from
    /// the last block's outputs, already weighted; the engine adds it to each micro-batch's
    /// loss, averaged over the global batch's micro-batches.
    fn aux_loss(&self, _out: &Acts) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Running totals the model keeps (this rank's), for the metrics record.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// A training micro-batch's context from its plain one (`inputs`: the micro-batch's block
    /// inputs; `key`: the step's): what only training does, such as LoRA dropout's masks.
    /// Evaluation and generation keep the plain context.
    fn training_ctx(&self, _inputs: &Acts, ctx: Self::Ctx, _key: u64) -> Result<Self::Ctx> {
        Ok(ctx)
    }

    /// Its LoRA adapters, if it has any (a checkpoint saves them in PEFT's layout).
    fn adapters(&self) -> Option<(&LoraConfig, &[Site])> {
        None
    }

    /// The error for a parallel style or setting this family does not implement.
    fn unsupported(&self, what: &str) -> Error {
        Error::Config(format!(
            "{what} is not implemented for the {} model family",
            self.family()
        ))
    }
}

/// Receives one parameter: name, shape, values.
pub type ParamSink<'a> = dyn FnMut(&str, &[usize], Vec<f32>) -> Result<()> + 'a;

/// The values of a fresh model, handed to `f` one parameter at a time in checkpoint order
/// from one random stream seeded by `seed` (only random draws consume it), so a sharded owner
/// can keep its slice and drop the rest and get what a whole initialisation gives.
pub fn init_each(specs: &[ParamSpec], seed: u64, f: &mut ParamSink) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for spec in specs {
        let numel: usize = spec.shape.iter().product();
        let data = match spec.init {
            Init::Ones => vec![1.0; numel],
            Init::Zeros => vec![0.0; numel],
            Init::Uniform { bound } => {
                let u = rand_distr::Uniform::new_inclusive(-bound, bound).expect("bound ≥ 0");
                (0..numel).map(|_| u.sample(&mut rng)).collect()
            }
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
