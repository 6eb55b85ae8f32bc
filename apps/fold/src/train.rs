//! `fold train`: AlphaFold-style training on the engine (every `[parallel]` layout it offers) on
//! chains with their MSAs, with a loss curve, the structure metrics of each evaluation (Cα RMSD,
//! TM-score, lDDT-Cα against the true chain) and resumable checkpoints.

use std::path::{Path, PathBuf};

use colossal_core::train::{
    launch_ranks, Engine, Origin, ParallelConfig, TrainConfig, TrainSection,
};
use colossal_session::{run_session, Plan, Record, Summary};
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::json;

use crate::example::{Example, LossWeights, Recipe};

use crate::model::{FoldConfig, FoldModel};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldTrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub loss: LossWeights,
    pub train: TrainSection,
    #[serde(default)]
    pub parallel: ParallelConfig,
}

/// The model's sizes: a preset or a JSON file of `FoldConfig`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default)]
    pub preset: Option<Preset>,
    #[serde(default)]
    pub config: Option<PathBuf>,
    #[serde(default)]
    pub init_seed: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The whole architecture at narrow widths (`FoldConfig::tiny`).
    Tiny,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub examples: Vec<ExampleSpec>,
    #[serde(default = "max_msa_seqs")]
    pub max_msa_seqs: usize,
    #[serde(default = "masked_fraction")]
    pub masked_msa_fraction: f64,
    /// Each step runs 0 to this many recycling passes first (uniformly drawn, as AlphaFold
    /// trains); evaluations recycle this many times.
    #[serde(default = "max_recycles")]
    pub max_recycles: usize,
    /// Train on random contiguous crops of this many residues (longer chains); evaluation
    /// predicts whole chains.
    #[serde(default)]
    pub crop_size: Option<usize>,
}

fn max_recycles() -> usize {
    3
}

fn max_msa_seqs() -> usize {
    Recipe::default().max_msa_seqs
}
fn masked_fraction() -> f64 {
    Recipe::default().masked_msa_fraction
}

/// A chain of a PDB or mmCIF file and the MSA (`.a3m` / `.sto`) built for its sequence.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleSpec {
    pub structure: PathBuf,
    pub chain: String,
    pub msa: PathBuf,
}

impl FoldTrainConfig {
    pub fn model_config(&self) -> Result<FoldConfig, String> {
        let cfg = match (&self.model.preset, &self.model.config) {
            (Some(Preset::Tiny), None) => FoldConfig::tiny(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            _ => return Err("[model]: give one of preset and config".into()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.data.examples.is_empty() {
            return Err("data.examples is empty".into());
        }
        if !(0.0..1.0).contains(&self.data.masked_msa_fraction) {
            return Err(format!(
                "data.masked_msa_fraction = {}: in [0, 1)",
                self.data.masked_msa_fraction
            ));
        }
        if self.data.crop_size == Some(0) {
            return Err("data.crop_size must be positive".into());
        }
        if self.data.max_msa_seqs == 0 {
            return Err("data.max_msa_seqs must be positive".into());
        }
        self.model_config().map(|_| ())
    }

    fn recipe(&self) -> Recipe {
        Recipe {
            max_msa_seqs: self.data.max_msa_seqs,
            masked_msa_fraction: self.data.masked_msa_fraction,
            loss: self.loss.clone(),
        }
    }
}

pub struct FoldTask {
    pub engine: Engine<FoldModel>,
    examples: Vec<Example>,
    recipe: Recipe,
    /// Examples per step (one per micro-batch).
    batch: usize,
    /// Ranks computing each example together (dynamic axial parallelism): each gives 1/N of
    /// its loss.
    dap: usize,
    max_recycles: usize,
    crop_size: Option<usize>,
    seed: u64,
}

impl FoldTask {
    fn metrics(&self) -> colossal_core::Result<Option<Record>> {
        let p = self.engine.full_params()?;
        if !self.engine.is_main() {
            return Ok(None);
        }
        // Rank 0 alone predicts: the whole model, without the axial split's exchanges.
        let model = FoldModel {
            dap: None,
            ..self.engine.model.clone()
        };
        let (mut rmsd, mut tm, mut lddt) = (0.0, 0.0, 0.0);
        for ex in &self.examples {
            let pred = crate::predict::predict(
                &model,
                &p,
                &ex.msa,
                self.recipe.max_msa_seqs,
                self.max_recycles,
            )?;
            let atoms = pred.backbone;
            let ca: Vec<_> = atoms.iter().map(|a| a[1]).collect();
            let r = crate::metrics::evaluate(&ca, &ex.ca)
                .map_err(|e| colossal_core::Error::Config(e.to_string()))?;
            rmsd += r.rmsd;
            tm += r.tm_score;
            lddt += r.lddt_ca;
        }
        let n = self.examples.len() as f64;
        let mut rec = Record::new();
        rec.insert("ca_rmsd".into(), json!(rmsd / n));
        rec.insert("tm_score".into(), json!(tm / n));
        rec.insert("lddt_ca".into(), json!(lddt / n));
        Ok(Some(rec))
    }
}

impl colossal_session::Task for FoldTask {
    fn position(&self) -> u64 {
        self.engine.state.step
    }

    fn is_main(&self) -> bool {
        self.engine.is_main()
    }

    fn step(&mut self) -> colossal_core::Result<Record> {
        let step = self.engine.state.step;
        let micro = self.batch;
        let mine: Vec<usize> = (self.engine.rank()..micro)
            .step_by(self.engine.ranks())
            .collect();
        let n = self.examples.len() as u64;
        let batches = mine
            .iter()
            .map(|&mb| {
                let pos = step * micro as u64 + mb as u64;
                let seed = self.seed ^ pos.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let ex = &self.examples[(pos % n) as usize];
                // A random contiguous crop (AlphaFold trains on crops of 256 residues).
                let r = ex.ca.len();
                let cropped = match self.crop_size.filter(|&c| c < r) {
                    Some(c) => {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
                        Some(ex.crop(rand::Rng::random_range(&mut rng, 0..=r - c), c)?)
                    }
                    None => None,
                };
                cropped.as_ref().unwrap_or(ex).micro_batch(
                    &self.engine.model,
                    &self.recipe,
                    seed,
                    micro * self.dap,
                    self.engine.device(),
                )
            })
            .collect::<crate::Result<Vec<_>>>()
            .map_err(|e| colossal_core::Error::Config(e.to_string()))?;
        // Recycling passes (the same number for the whole step, drawn from the step's seed)
        // run without gradient on the current whole weights.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407),
        );
        let recycles = rand::Rng::random_range(&mut rng, 0..=self.max_recycles);
        let mut batches = batches;
        if recycles > 0 {
            let full = self.engine.full_params()?;
            for mb in &mut batches {
                self.engine
                    .model
                    .recycle_into(&full, &mut mb.ctx, recycles)?;
            }
        }
        let mut batches = batches.into_iter();
        let (loss, grad_norm, lr) = self.engine.step(mine.len(), |_| {
            batches
                .next()
                .ok_or_else(|| colossal_core::msg!("no micro-batch left"))
        })?;
        self.engine.state.cursor += self.batch as u64;
        let mut rec = self.engine.last_step_metrics();
        rec.insert("loss".into(), json!(loss));
        rec.insert("grad_norm".into(), json!(grad_norm));
        rec.insert("lr".into(), json!(lr));
        rec.insert("recycles".into(), json!(recycles));
        Ok(rec)
    }

    fn evaluate(&mut self) -> colossal_core::Result<Record> {
        Ok(self.metrics()?.unwrap_or_default())
    }

    fn save(&mut self) -> colossal_core::Result<Option<PathBuf>> {
        self.engine.save_checkpoint()
    }

    fn progress_keys(&self) -> Vec<&'static str> {
        vec!["loss", "grad_norm"]
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![
            ("loss.png", vec!["loss"]),
            ("structure.png", vec!["ca_rmsd"]),
        ]
    }
}

/// Trains as configured on every rank (resuming from checkpoint `resume`); rank 0's summary.
pub fn train(
    cfg: FoldTrainConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> colossal_core::Result<Summary> {
    cfg.validate().map_err(colossal_core::Error::Config)?;
    let model_cfg = cfg.model_config().map_err(colossal_core::Error::Config)?;
    let examples: Vec<Example> = cfg
        .data
        .examples
        .iter()
        .map(|e| Example::load(&e.structure, &e.chain, &e.msa))
        .collect::<crate::Result<_>>()
        .map_err(|e| colossal_core::Error::Config(e.to_string()))?;
    let t = &cfg.train;
    if t.micro_batch_size != 1 {
        return Err(colossal_core::Error::Config(format!(
            "train.micro_batch_size = {}: one example per micro-batch (chains differ in length)",
            t.micro_batch_size
        )));
    }
    let engine_cfg = TrainConfig {
        model: Default::default(),
        data: Default::default(),
        train: cfg.train.clone(),
        sample: None,
        parallel: cfg.parallel.clone(),
        lora: None,
    };
    let examples = std::sync::Arc::new(examples);
    launch_ranks(&cfg.parallel, cfg.train.device, |setup| {
        let mut ecfg = engine_cfg.clone();
        ecfg.parallel = setup.parallel;
        let model = FoldModel::new(model_cfg.clone()).map_err(colossal_core::Error::Config)?;
        let origin = match resume {
            Some(dir) => Origin::Resume(dir),
            None => Origin::Fresh {
                model,
                seed: cfg.model.init_seed,
            },
        };
        let engine = Engine::new_rank(ecfg, origin, setup.device.clone(), setup.comm)?;
        let batch = cfg.train.batch_size;
        if !batch.is_multiple_of(engine.ranks()) {
            return Err(colossal_core::Error::Config(format!(
                "train.batch_size = {batch} must be a multiple of the {} data-parallel ranks",
                engine.ranks()
            )));
        }
        let mut task = FoldTask {
            engine,
            examples: examples.as_ref().clone(),
            recipe: cfg.recipe(),
            batch,
            dap: match cfg.parallel.sp_mode {
                colossal_core::train::SpMode::Dap => cfg.parallel.sp,
                _ => 1,
            },
            seed: cfg.train.seed,
            max_recycles: cfg.data.max_recycles,
            crop_size: cfg.data.crop_size,
        };
        run_session(&mut task, &Plan::of(&cfg.train, stop_at))
    })
}
