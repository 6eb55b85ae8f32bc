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

use colossal_core::models::{init_all, ModelFamily};
use colossal_core::train::{launch_ranks, Engine, Origin};
use colossal_session::{run_session, Plan, Summary};

use crate::pipeline::Pipeline;
use crate::unet::{UNet, UNetConfig, TEXT_PREFIX};

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
        let origin = match resume {
            Some(dir) => Origin::Resume(dir),
            None => start(&cfg, &pipe).map_err(err)?,
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

/// Where training starts without a checkpoint: the folder's UNet, or a fresh one from
/// `model.unet_config`; with `model.train_text_encoder`, the folder's text encoder joins it
/// (its weights named `text_encoder.…`) and a fresh UNet is initialised here, as the engine
/// would from the same seed.
fn start<'a>(cfg: &DiffusionConfig, pipe: &Pipeline) -> crate::Result<Origin<'a, UNet>> {
    let joint = cfg.model.train_text_encoder;
    let (unet, mut params) = match &cfg.model.unet_config {
        Some(path) => {
            let unet = UNet::new(UNetConfig::from_file(path)?)?;
            if !joint {
                let seed = cfg.model.init_seed;
                return Ok(Origin::Fresh { model: unet, seed });
            }
            let params = init_all(&unet.param_specs(), cfg.model.init_seed, &pipe.device)?;
            (unet, params)
        }
        None => (pipe.unet.clone(), pipe.unet_params.clone()),
    };
    if !joint {
        return Ok(Origin::Whole {
            model: unet,
            params,
        });
    }
    for (name, v) in pipe.text_params.iter() {
        params.insert(format!("{TEXT_PREFIX}{name}"), v.clone());
    }
    Ok(Origin::Whole {
        model: unet.with_text_encoder(pipe.text.clone()),
        params,
    })
}
