//! Text-to-image training of the UNet on the engine, as diffusers' `train_text_to_image.py`:
//! each example's VAE posterior and CLIP hidden states are computed once (both models are
//! frozen; the posterior is sampled afresh every time an example is drawn, so this equals
//! encoding on the fly), then every step draws latents, noise (with optional offset) and
//! uniform timesteps, noises the latents, and regresses the scheduler's target with an MSE
//! (optionally Min-SNR-γ weighted). Randomness is a function of (seed, step, example
//! position), so every parallel layout trains alike.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use colossal_core::exec::{Acts, LossFn};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::params::Params;
use colossal_core::train::Engine;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::cache::{self, Cached, Caption};
use super::config::DiffusionConfig;
use super::export;
use super::sets::TrainData;
use crate::data;
use crate::pipeline::{gaussian, Pipeline, SampleOptions};
use crate::scheduler::{Prediction, Scheduler};
use crate::unet::{Text, UNet, UNetCtx};
use crate::{Error, Result};

/// One stream of examples: the training images, or DreamBooth's class images.
struct Set {
    cached: Vec<Cached>,
    /// Weight of its loss terms (prior preservation's `prior_loss_weight`).
    weight: f32,
    /// The example order of the epoch in use.
    order: (u64, Vec<usize>),
}

impl Set {
    /// The example at stream position `pos`: epochs are seeded permutations.
    fn at(&mut self, pos: u64, seed: u64) -> usize {
        let n = self.cached.len() as u64;
        let epoch = pos / n;
        if self.order.0 != epoch {
            let mut idx: Vec<usize> = (0..self.cached.len()).collect();
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            idx.shuffle(&mut rng);
            self.order = (epoch, idx);
        }
        self.order.1[(pos % n) as usize]
    }
}

pub struct DiffusionTask {
    pub engine: Engine<UNet>,
    cfg: DiffusionConfig,
    pipe: Pipeline,
    noise: Scheduler,
    /// The training examples, then (prior preservation) the class examples.
    sets: Vec<Set>,
    pub ema: Option<Params>,
    /// Each micro-batch's loss per set (before the set's weight), written by its loss
    /// function (a recomputation overwrites with the same value), summed after the step.
    parts: Parts,
}

type Parts = Arc<Mutex<HashMap<usize, Vec<f64>>>>;

fn core(e: Error) -> colossal_core::Error {
    colossal_core::Error::Config(e.to_string())
}

impl DiffusionTask {
    pub fn new(
        cfg: DiffusionConfig,
        engine: Engine<UNet>,
        mut pipe: Pipeline,
        data: TrainData,
    ) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let t = &cfg.train;
        let per = t.micro_batch_size * engine.ranks();
        if t.micro_batch_size == 0 || !t.batch_size.is_multiple_of(per) {
            return Err(Error::Config(format!(
                "train.batch_size = {} must be a multiple of micro_batch_size ({}) × data-parallel ranks ({})",
                t.batch_size,
                t.micro_batch_size,
                engine.ranks()
            )));
        }
        pipe.unet = engine.model.clone();
        let u = &pipe.unet.cfg;
        if pipe.space.is_pixels() && (u.in_channels != 3 || u.out_channels != 3) {
            return Err(Error::Config(format!(
                "model.pixel_space: the UNet takes {} and gives {} channels; images have 3",
                u.in_channels, u.out_channels
            )));
        }
        tracing::info!(
            examples = data.examples.len(),
            class_examples = data.prior.as_ref().map_or(0, |p| p.0.len()),
            "encoding images and captions"
        );
        let flip = cfg.random_flip();
        let comm = engine.data_comm();
        let caption = match engine.model.text_encoder {
            Some(_) => Caption::Ids,
            None => Caption::Hidden,
        };
        let mut sets = vec![Set {
            cached: cache::encode_shared(&pipe, &data.examples, flip, caption, comm)?,
            weight: 1.0,
            order: (u64::MAX, Vec::new()),
        }];
        if let Some((class, w)) = &data.prior {
            sets.push(Set {
                cached: cache::encode_shared(&pipe, class, flip, caption, comm)?,
                weight: *w as f32,
                order: (u64::MAX, Vec::new()),
            });
        }
        let noise = Scheduler::from_dir(&cfg.model.pretrained.join("scheduler"))?;
        let ema = match cfg.diffusion.ema_decay > 0.0 {
            true => Some(engine.full_params()?).filter(|_| engine.is_main()),
            false => None,
        };
        // Its own storage: the engine's parameters may be these very variables.
        let ema = ema.map(|p| deep_copy(&p)).transpose()?;
        Ok(Self {
            engine,
            cfg,
            pipe,
            noise,
            sets,
            ema,
            parts: Default::default(),
        })
    }

    /// Micro-batch `mb` (global index) of the step starting at stream position `start`.
    fn micro_batch(
        &mut self,
        step: u64,
        start: u64,
        mb: usize,
    ) -> Result<MicroBatch<'static, UNetCtx>> {
        let t = &self.cfg.train;
        let (m, global) = (t.micro_batch_size, t.batch_size);
        let dev = self.engine.device().clone();
        let (mut zs, mut noises, mut texts, mut ts, mut set_w) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (seed, flip) = (self.cfg.train.seed, self.cfg.random_flip());
        for (k, set) in self.sets.iter_mut().enumerate() {
            for j in 0..m {
                let pos = start + (mb * m + j) as u64;
                let salt = (k as u64).wrapping_mul(0xA24B_AED4_963E_E407);
                let ex = set.at(pos, seed ^ salt);
                let mut rng = ChaCha8Rng::seed_from_u64(
                    seed ^ salt ^ step.rotate_left(32) ^ pos.wrapping_mul(0xD6E8_FEB8_6659_FD93),
                );
                let c = &set.cached[ex];
                set_w.push(set.weight);
                let (mean, std) = match (&c.flipped, flip && rng.random_bool(0.5)) {
                    (Some((fm, fs)), true) => (fm, fs),
                    _ => (&c.mean, &c.std),
                };
                let eps = gaussian(&mut rng, mean.dims(), &dev)?;
                let z = self.pipe.space.to_model(&(mean + (std * eps)?)?)?;
                let mut noise = gaussian(&mut rng, z.dims(), &dev)?;
                if self.cfg.diffusion.noise_offset != 0.0 {
                    let shape = [z.dim(0)?, 1, 1];
                    let off = gaussian(&mut rng, &shape, &dev)?
                        .affine(self.cfg.diffusion.noise_offset, 0.0)?;
                    noise = noise.broadcast_add(&off)?;
                }
                zs.push(z);
                noises.push(noise);
                texts.push(c.text.clone());
                ts.push(rng.random_range(0..self.noise.cfg.num_train_timesteps));
            }
        }
        let m = zs.len();
        let (z, noise) = (Tensor::stack(&zs, 0)?, Tensor::stack(&noises, 0)?);
        let noisy = self.noise.add_noise(&z, &noise, &ts)?;
        let target = self.noise.target(&z, &noise, &ts)?;
        let weights: Vec<f32> = match self.cfg.diffusion.snr_gamma {
            None => vec![1.0; m],
            Some(g) => self
                .noise
                .snr(&ts)?
                .into_iter()
                .map(|snr| {
                    let clipped = snr.min(g as f32);
                    match self.noise.cfg.prediction_type {
                        Prediction::VPrediction => clipped / (snr + 1.0),
                        _ => clipped / snr,
                    }
                })
                .collect(),
        };
        let snr_w = weights.clone();
        let weights: Vec<f32> = weights.iter().zip(&set_w).map(|(a, b)| a * b).collect();
        let w = Tensor::from_vec(weights, m, &dev)?;
        let (parts, sets, per_set) = (self.parts.clone(), self.sets.len(), m / self.sets.len());
        let per_elem = (target.elem_count() / m) as f64;
        // Mixed precision: the model computes in the compute dtype, the loss in f32.
        let dtype = self.cfg.parallel.compute_dtype();
        let loss_fn: Box<LossFn<'static>> = Box::new(move |out: &Acts| {
            let pred = out.get("pred")?.to_dtype(candle_core::DType::F32)?;
            let sq = (pred - &target)?.sqr()?.flatten_from(1)?.sum(1)?;
            let norm = per_elem * global as f64;
            let each: Vec<f32> = sq.detach().to_vec1()?;
            let mut part = vec![0.0; sets];
            for (i, (e, sw)) in each.iter().zip(&snr_w).enumerate() {
                part[i / per_set] += (e * sw) as f64 / norm;
            }
            parts.lock().expect("loss parts").insert(mb, part);
            Ok(((sq * &w)?.sum_all()? / norm)?)
        });
        let text = Tensor::stack(&texts, 0)?;
        let text = match self.engine.model.text_encoder {
            Some(_) => Text::Ids(text),
            None => Text::Hidden(text.to_dtype(dtype)?),
        };
        Ok(MicroBatch {
            inputs: Acts::one("x", noisy.to_dtype(dtype)?),
            ctx: UNetCtx {
                text,
                t: ts.iter().map(|&t| t as f64).collect(),
            },
            loss_fn,
        })
    }

    fn update_ema(&mut self) -> Result<()> {
        if self.cfg.diffusion.ema_decay <= 0.0 {
            return Ok(());
        }
        let full = self.engine.full_params()?;
        let step = self.engine.state.step as f64;
        let decay = self
            .cfg
            .diffusion
            .ema_decay
            .min((1.0 + step) / (10.0 + step));
        if let Some(ema) = &mut self.ema {
            for (name, v) in ema.iter() {
                let p = full.get(name)?;
                v.set(&(v.as_tensor().affine(decay, 0.0)? + p.affine(1.0 - decay, 0.0)?)?)?;
            }
        }
        Ok(())
    }

    /// The weights grids and exports use (the average when there is one). Collective.
    fn weights_for_output(&self) -> Result<Option<Params>> {
        let full = self.engine.full_params()?;
        Ok(self
            .engine
            .is_main()
            .then(|| self.ema.clone().unwrap_or(full)))
    }

    fn sample_grid(&mut self, weights: Params) -> Result<PathBuf> {
        let d = &self.cfg.diffusion;
        let mut sc = self.noise.cfg.clone();
        sc.kind = d.sample_scheduler.kind();
        if sc.kind != crate::scheduler::SchedulerKind::Ddpm {
            sc.variance_type = None;
        }
        self.pipe.scheduler = Scheduler::new(sc)?;
        // Sample with what trains: the UNet's adapters, and the text encoder when it trains
        // (its weights are in the same set, under its prefix).
        self.pipe.unet.lora = self.engine.model.lora.clone();
        if let Some(clip) = &self.engine.model.text_encoder {
            self.pipe.text = clip.clone();
            self.pipe.text_params = weights.clone();
        }
        self.pipe.unet_params = weights;
        let res = self.cfg.resolution();
        let opts = SampleOptions {
            steps: d.sample_steps,
            guidance: d.guidance,
            height: res,
            width: res,
            seed: d.sample_seed,
        };
        let (images, _) = self.pipe.generate(&d.sample_prompts, &opts, None)?;
        let dir = self.cfg.train.out_dir.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
        let path = dir.join(format!("step-{:06}.png", self.engine.state.step));
        let cols = (d.sample_prompts.len() as f64).sqrt().ceil() as usize;
        data::save_grid(&images, cols, &path)?;
        tracing::info!(path = %path.display(), "sample grid");
        Ok(path)
    }

    pub fn out_dir(&self) -> &Path {
        &self.cfg.train.out_dir
    }
}

impl colossal_session::Task for DiffusionTask {
    fn position(&self) -> u64 {
        self.engine.state.step
    }

    fn is_main(&self) -> bool {
        self.engine.is_main()
    }

    fn step(&mut self) -> colossal_core::Result<colossal_session::Record> {
        let t = &self.cfg.train;
        let (start, step) = (self.engine.state.cursor, self.engine.state.step);
        let micro = t.batch_size / t.micro_batch_size;
        let mine: Vec<usize> = (self.engine.rank()..micro)
            .step_by(self.engine.ranks())
            .collect();
        let batches = mine
            .iter()
            .map(|&mb| self.micro_batch(step, start, mb))
            .collect::<Result<Vec<_>>>()
            .map_err(core)?;
        let mut batches = batches.into_iter();
        let (loss, grad_norm, lr) = self.engine.step(mine.len(), |_| {
            batches
                .next()
                .ok_or_else(|| colossal_core::msg!("no micro-batch left"))
        })?;
        self.engine.state.cursor += self.cfg.train.batch_size as u64;
        let parts: Vec<f64> = {
            let mut map = self.parts.lock().expect("loss parts");
            let sums = map.values().fold(vec![0.0; self.sets.len()], |mut acc, p| {
                acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                acc
            });
            map.clear();
            sums
        };
        let parts = self.engine.sum_over_ranks(&parts)?;
        self.update_ema().map_err(core)?;
        let mut rec = self.engine.last_step_metrics();
        rec.insert("loss".into(), json!(loss));
        if parts.len() > 1 {
            // DreamBooth: loss = instance_loss + prior_loss_weight · prior_loss.
            rec.insert("instance_loss".into(), json!(parts[0]));
            rec.insert("prior_loss".into(), json!(parts[1]));
        }
        rec.insert("grad_norm".into(), json!(grad_norm));
        rec.insert("lr".into(), json!(lr));
        Ok(rec)
    }

    fn evaluate(&mut self) -> colossal_core::Result<colossal_session::Record> {
        // Every rank has the same prompts, so all skip the weight gather together.
        if self.cfg.diffusion.sample_prompts.is_empty() {
            return Ok(Default::default());
        }
        if let Some(w) = self.weights_for_output().map_err(core)? {
            self.sample_grid(w).map_err(core)?;
        }
        Ok(Default::default())
    }

    fn save(&mut self) -> colossal_core::Result<Option<PathBuf>> {
        let dir = self.engine.save_checkpoint()?;
        let weights = self.weights_for_output().map_err(core)?;
        if let (Some(dir), Some(w)) = (&dir, weights) {
            if let Some(ema) = &self.ema {
                export::save_ema(dir, &self.engine.model, ema).map_err(core)?;
            }
            let out = self.cfg.train.out_dir.join("pipeline");
            let pixels = self.pipe.space.is_pixels();
            export::pipeline_folder(
                &self.cfg.model.pretrained,
                &self.engine.model,
                &w,
                pixels,
                &out,
            )
            .map_err(core)?;
        }
        Ok(dir)
    }

    fn progress_keys(&self) -> Vec<&'static str> {
        vec!["loss", "grad_norm"]
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        match self.sets.len() {
            1 => vec![("loss.png", vec!["loss"])],
            _ => vec![("loss.png", vec!["loss", "instance_loss", "prior_loss"])],
        }
    }
}

/// Parameters with storage of their own.
fn deep_copy(p: &Params) -> Result<Params> {
    let mut out = Params::new();
    for (name, v) in p.iter() {
        out.insert(name, candle_core::Var::from_tensor(&v.as_tensor().copy()?)?);
    }
    Ok(out)
}
