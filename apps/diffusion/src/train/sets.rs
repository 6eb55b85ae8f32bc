//! What a run trains on: captioned images (`[data]`), or DreamBooth's instance images under
//! one prompt plus, with prior preservation, class images the model itself generates (kept in
//! `class_dir`, so a rerun reuses them, as diffusers' script does).

use std::path::Path;

use candle_core::Device;

use super::config::{DataSection, DreamBoothSection};
use crate::data::{self, Example};
use crate::pipeline::{Pipeline, SampleOptions};
use crate::{Error, Result};

pub struct TrainData {
    pub examples: Vec<Example>,
    /// Class examples and the weight of their loss (prior preservation).
    pub prior: Option<(Vec<Example>, f64)>,
}

pub fn captioned(d: &DataSection) -> Result<TrainData> {
    Ok(TrainData {
        examples: data::load(&d.path, d.resolution, d.limit)?,
        prior: None,
    })
}

fn captioned_as(images: Vec<candle_core::Tensor>, prompt: &str) -> Vec<Example> {
    images
        .into_iter()
        .map(|image| Example {
            image,
            caption: prompt.to_string(),
        })
        .collect()
}

/// Generates class images into `db.class_dir` until there are `num_class_images`: image i from
/// seed i, so the set does not depend on how many runs made it.
pub fn ensure_class_images(db: &DreamBoothSection, pretrained: &Path) -> Result<()> {
    let (Some(dir), Some(prompt)) = (&db.class_dir, &db.class_prompt) else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let have = data::load_images(dir, db.resolution)?.len();
    if have >= db.num_class_images {
        return Ok(());
    }
    tracing::info!(have, want = db.num_class_images, dir = %dir.display(), "generating class images");
    let mut pipe = Pipeline::load(pretrained, None, &Device::Cpu)?;
    for i in have..db.num_class_images {
        let opts = SampleOptions {
            steps: db.class_sample_steps,
            guidance: db.class_guidance,
            height: db.resolution,
            width: db.resolution,
            seed: i as u64,
        };
        let (img, _) = pipe.generate(std::slice::from_ref(prompt), &opts, None)?;
        data::save_grid(&img, 1, &dir.join(format!("class-{i:05}.png")))?;
    }
    Ok(())
}

pub fn dreambooth(db: &DreamBoothSection) -> Result<TrainData> {
    let images = data::load_images(&db.instance_dir, db.resolution)?;
    if images.is_empty() {
        return Err(Error::file(&db.instance_dir, "no png or jpg images"));
    }
    let prior = match (&db.class_dir, &db.class_prompt, db.with_prior_preservation) {
        (Some(dir), Some(prompt), true) => {
            let mut class = data::load_images(dir, db.resolution)?;
            class.truncate(db.num_class_images);
            if class.len() < db.num_class_images {
                return Err(Error::file(
                    dir,
                    format!(
                        "{} class images, {} wanted",
                        class.len(),
                        db.num_class_images
                    ),
                ));
            }
            Some((captioned_as(class, prompt), db.prior_loss_weight))
        }
        _ => None,
    };
    Ok(TrainData {
        examples: captioned_as(images, &db.instance_prompt),
        prior,
    })
}
