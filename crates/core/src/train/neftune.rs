//! NEFTune (Jain et al., 2023): while training, the token embeddings get uniform noise of
//! scale α/√(L·d) (L tokens per sequence, d hidden size); evaluation sees them clean. Applied
//! as a wrapper around the model's embedding region, seeded per step so a resumed run draws
//! the same noise.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::models::llama::{Llama, Regions};
use crate::Result;

pub struct Neftune {
    inner: Arc<dyn Regions>,
    alpha: f64,
    /// `Some` while a training step runs.
    rng: Mutex<Option<ChaCha8Rng>>,
}

impl std::fmt::Debug for Neftune {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Neftune(α = {}, {:?})", self.alpha, self.inner)
    }
}

impl Neftune {
    /// `model` with NEFTune around its embedding; the returned handle switches it on and off.
    pub fn wrap(model: &Llama, alpha: f64) -> (Llama, Arc<Neftune>) {
        let n = Arc::new(Neftune {
            inner: model.regions.clone(),
            alpha,
            rng: Mutex::new(None),
        });
        (model.with_regions(n.clone()), n)
    }

    /// Noise on from here, drawn from `seed`.
    pub fn start(&self, seed: u64) {
        *self.rng.lock().expect("neftune lock") = Some(ChaCha8Rng::seed_from_u64(seed));
    }

    pub fn stop(&self) {
        *self.rng.lock().expect("neftune lock") = None;
    }
}

impl Regions for Neftune {
    fn inner(&self) -> Option<&dyn Regions> {
        Some(self.inner.as_ref())
    }

    fn embed(&self, name: &str, w: &Tensor, ids: &Tensor, pad: Option<u32>) -> Result<Tensor> {
        let e = self.inner.embed(name, w, ids, pad)?;
        let mut guard = self.rng.lock().expect("neftune lock");
        let Some(rng) = guard.as_mut() else {
            return Ok(e);
        };
        let (l, d) = (e.dim(1)?, e.dim(2)?);
        let scale = self.alpha / ((l * d) as f64).sqrt();
        let noise: Vec<f32> = (0..e.elem_count())
            .map(|_| (rng.random_range(-1.0f64..1.0) * scale) as f32)
            .collect();
        let noise = Tensor::from_vec(noise, e.dims(), e.device())?.to_dtype(e.dtype())?;
        Ok((e + noise)?)
    }
}

/// NEFTune noise on while alive.
pub(super) struct NoiseOn<'a>(Option<&'a Neftune>);

impl<'a> NoiseOn<'a> {
    pub(super) fn start(n: Option<&'a Neftune>, seed: u64) -> Self {
        if let Some(n) = n {
            n.start(seed);
        }
        Self(n)
    }
}

impl Drop for NoiseOn<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.stop();
        }
    }
}
