//! `diffusion train`: text-to-image training of the UNet on the engine (every `[parallel]`
//! layout the engine offers), with sample grids, a loss curve, resumable checkpoints and a
//! diffusers pipeline folder.

mod cache;
mod config;
mod export;
mod sets;
mod task;

pub use config::{DiffusionConfig, DreamBoothSection, SampleScheduler};
pub use export::pipeline_folder;
pub use task::DiffusionTask;

use std::path::Path;

use colossal_core::train::{launch_ranks, Engine, Origin};
use colossal_session::{run_session, Plan, Summary};

use crate::pipeline::Pipeline;
use crate::unet::{UNet, UNetConfig};

/// Trains as configured on every rank (resuming from checkpoint `resume`); rank 0's summary.
/// With `[dreambooth]` and prior preservation, missing class images are generated first.
pub fn train(
    cfg: DiffusionConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> colossal_core::Result<Summary> {
    let err = |e: crate::Error| colossal_core::Error::Config(e.to_string());
    cfg.validate().map_err(colossal_core::Error::Config)?;
    if let Some(db) = cfg
        .dreambooth
        .as_ref()
        .filter(|d| d.with_prior_preservation)
    {
        sets::ensure_class_images(db, &cfg.model.pretrained).map_err(err)?;
    }
    let data = || match (&cfg.data, &cfg.dreambooth) {
        (Some(d), _) => sets::captioned(d),
        (_, Some(db)) => sets::dreambooth(db),
        _ => unreachable!("validated: one of [data] and [dreambooth]"),
    };
    let engine_cfg = cfg.engine_config();
    launch_ranks(&cfg.parallel, cfg.train.device, |setup| {
        let mut ecfg = engine_cfg.clone();
        ecfg.parallel = setup.parallel;
        // The pretrained UNet's weights are read only when training starts from them.
        let from_pretrained = resume.is_none() && cfg.model.unet_config.is_none();
        let mut pipe =
            Pipeline::load_with(&cfg.model.pretrained, None, &setup.device, from_pretrained)
                .map_err(err)?;
        if cfg.model.pixel_space {
            pipe.space = crate::space::Space::Pixels;
        }
        let origin = match (resume, &cfg.model.unet_config) {
            (Some(dir), _) => Origin::Resume(dir),
            (None, Some(path)) => Origin::Fresh {
                model: UNet::new(UNetConfig::from_file(path).map_err(err)?).map_err(err)?,
                seed: cfg.model.init_seed,
            },
            (None, None) => Origin::Whole {
                model: pipe.unet.clone(),
                params: pipe.unet_params.clone(),
            },
        };
        let engine = Engine::new_rank(ecfg, origin, setup.device.clone(), setup.comm)?;
        let mut task =
            DiffusionTask::new(cfg.clone(), engine, pipe, data().map_err(err)?).map_err(err)?;
        if let (Some(dir), true) = (resume, task.ema.is_some()) {
            task.ema = Some(export::load_ema(dir).map_err(err)?.ok_or_else(|| {
                colossal_core::Error::file(
                    dir,
                    "diffusion.ema_decay is set but this checkpoint has no ema/",
                )
            })?);
        }
        run_session(&mut task, &Plan::of(&cfg.train, stop_at))
    })
}
