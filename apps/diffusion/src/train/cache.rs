//! Each example's frozen-model outputs, computed once before training: the VAE posterior
//! (mean and standard deviation; with random flips, of the mirrored image too) and the CLIP
//! hidden states of its caption (its token ids when the text encoder trains). Data-parallel
//! ranks each encode a share and all-gather.

use candle_core::Tensor;
use colossal_core::dist::Communicator;

use crate::data::Example;
use crate::pipeline::Pipeline;
use crate::{Error, Result};

/// What training reads of one example: its posterior (and its mirror's) and its text.
#[derive(Clone)]
pub(super) struct Cached {
    pub mean: Tensor,
    pub std: Tensor,
    pub flipped: Option<(Tensor, Tensor)>,
    /// The caption's CLIP hidden states (S, D), or its token ids (S) when the text encoder
    /// trains (`Text::Ids`).
    pub text: Tensor,
}

/// What of a caption is cached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Caption {
    Hidden,
    Ids,
}

/// [`encode`] split over the data-parallel ranks: each encodes its contiguous share
/// and the shares are all-gathered, so every rank holds every example's cache (any rank may
/// draw any example) for 1/N of the VAE and CLIP work.
pub(super) fn encode_shared(
    pipe: &Pipeline,
    raw: &[Example],
    flip: bool,
    caption: Caption,
    comm: Option<&dyn Communicator>,
) -> Result<Vec<Cached>> {
    let Some(c) = comm.filter(|c| c.size() > 1 && !raw.is_empty()) else {
        return encode(pipe, raw, flip, caption);
    };
    let (per, len) = (raw.len().div_ceil(c.size()), raw.len());
    let span = |r: usize| (r * per).min(len)..((r + 1) * per).min(len);
    let mine = encode(pipe, &raw[span(c.rank())], flip, caption)?;
    // Every field stacked (zero rows pad a short last share), gathered, and split back.
    let gather = |pick: &dyn Fn(&Cached) -> Tensor, like: &Tensor| -> Result<Vec<Tensor>> {
        let mut rows: Vec<Tensor> = mine.iter().map(pick).collect();
        while rows.len() < per {
            rows.push(like.zeros_like()?);
        }
        let all = c.all_gather(&Tensor::stack(&rows, 0)?)?;
        let mut out = Vec::with_capacity(len);
        for r in 0..c.size() {
            for i in 0..span(r).len() {
                out.push(all.get(r * per + i)?);
            }
        }
        Ok(out)
    };
    // Shapes for the padding rows: this share's first example (an empty last share encodes
    // the dataset's first).
    let probe = match mine.first() {
        Some(x) => x.clone(),
        None => encode(pipe, &raw[..1], flip, caption)?.remove(0),
    };
    let mean = gather(&|x| x.mean.clone(), &probe.mean)?;
    let std = gather(&|x| x.std.clone(), &probe.std)?;
    // Token ids cost nothing to compute: every rank makes all of them.
    let text = match caption {
        Caption::Hidden => gather(&|x| x.text.clone(), &probe.text)?,
        Caption::Ids => {
            let captions: Vec<String> = raw.iter().map(|e| e.caption.clone()).collect();
            let ids = pipe.token_ids(&captions)?;
            (0..len)
                .map(|i| ids.get(i))
                .collect::<candle_core::Result<_>>()?
        }
    };
    let flipped = match &probe.flipped {
        Some((fm, fs)) => {
            let m = gather(&|x| x.flipped.as_ref().expect("flip on").0.clone(), fm)?;
            let s = gather(&|x| x.flipped.as_ref().expect("flip on").1.clone(), fs)?;
            m.into_iter().zip(s).map(Some).collect()
        }
        None => vec![None; len],
    };
    Ok((0..len)
        .map(|i| Cached {
            mean: mean[i].clone(),
            std: std[i].clone(),
            flipped: flipped[i].clone(),
            text: text[i].clone(),
        })
        .collect())
}

pub(super) fn encode(
    pipe: &Pipeline,
    raw: &[Example],
    flip: bool,
    caption: Caption,
) -> Result<Vec<Cached>> {
    let mut out = Vec::with_capacity(raw.len());
    for chunk in raw.chunks(16) {
        let imgs = Tensor::stack(&chunk.iter().map(|e| &e.image).collect::<Vec<_>>(), 0)?
            .to_device(&pipe.device)?;
        let (mean, std) = pipe.space.encode(&imgs)?;
        let mirrored = match flip {
            true => Some(pipe.space.encode(&imgs.flip(&[3])?)?),
            false => None,
        };
        let captions: Vec<String> = chunk.iter().map(|e| e.caption.clone()).collect();
        let text = match caption {
            Caption::Hidden => pipe.encode_prompts(&captions)?,
            Caption::Ids => pipe.token_ids(&captions)?,
        };
        for i in 0..chunk.len() {
            out.push(Cached {
                mean: mean.get(i)?,
                std: std.get(i)?,
                flipped: mirrored
                    .as_ref()
                    .map(|(m, s)| Ok::<_, Error>((m.get(i)?, s.get(i)?)))
                    .transpose()?,
                text: text.get(i)?,
            });
        }
    }
    Ok(out)
}
