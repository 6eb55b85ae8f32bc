//! Captioned images for text-to-image training, as `train_text_to_image.py` prepares them:
//! RGB in [−1, 1] at the training resolution (transparent pixels composited on white,
//! resized with a bilinear filter and centre-cropped to a square), each with its caption.
//!
//! Two layouts: a folder with `captions.jsonl` (`{"file": …, "caption": …}` per line, files
//! relative to the folder — the emoji set, DreamBooth-style folders), or an MNIST folder
//! (`t10k-images-idx3-ubyte.gz` + `t10k-labels-idx1-ubyte.gz`, captioned "a handwritten digit
//! N").

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, RgbImage, RgbaImage};

use crate::{Error, Result};

/// One training example.
#[derive(Clone, Debug)]
pub struct Example {
    /// (3, R, R) in [−1, 1].
    pub image: Tensor,
    pub caption: String,
}

/// `img` as (3, R, R) in [−1, 1]: alpha composited on white, shorter side resized to `res`,
/// centre crop.
pub fn to_tensor(img: DynamicImage, res: usize) -> Result<Tensor> {
    let rgba: RgbaImage = img.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (x, y, p) in rgba.enumerate_pixels() {
        let a = p[3] as f32 / 255.0;
        let c = |v: u8| (v as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        rgb.put_pixel(x, y, image::Rgb([c(p[0]), c(p[1]), c(p[2])]));
    }
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let rgb = if (w, h) != (res, res) {
        let scale = res as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(res as u32),
            ((h as f64 * scale).round() as u32).max(res as u32),
        );
        let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
        let (x0, y0) = ((nw - res as u32) / 2, (nh - res as u32) / 2);
        image::imageops::crop_imm(&resized, x0, y0, res as u32, res as u32).to_image()
    } else {
        rgb
    };
    let mut chw = vec![0f32; 3 * res * res];
    for (x, y, p) in rgb.enumerate_pixels() {
        for c in 0..3 {
            chw[c * res * res + y as usize * res + x as usize] = p[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(chw, (3, res, res), &Device::Cpu)?)
}

#[derive(serde::Deserialize)]
struct CaptionLine {
    file: String,
    caption: String,
}

/// Every example of a `captions.jsonl` folder, in file order.
fn captioned(dir: &Path, res: usize) -> Result<Vec<Example>> {
    let path = dir.join("captions.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: CaptionLine = serde_json::from_str(line)
            .map_err(|e| Error::file(&path, format!("line {}: {e}", n + 1)))?;
        let file = dir.join(&row.file);
        let img = image::open(&file).map_err(|e| Error::file(&file, e))?;
        out.push(Example {
            image: to_tensor(img, res)?,
            caption: row.caption,
        });
    }
    if out.is_empty() {
        return Err(Error::file(&path, "no examples"));
    }
    Ok(out)
}

fn gunzip(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|e| Error::file(path, e))?;
    Ok(out)
}

/// The first `limit` MNIST test digits, white on black as stored, captioned by label.
fn mnist(dir: &Path, res: usize, limit: usize) -> Result<Vec<Example>> {
    let (ip, lp): (PathBuf, PathBuf) = (
        dir.join("t10k-images-idx3-ubyte.gz"),
        dir.join("t10k-labels-idx1-ubyte.gz"),
    );
    let (images, labels) = (gunzip(&ip)?, gunzip(&lp)?);
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if images.len() < 16
        || be(&images[0..4]) != 2051
        || labels.len() < 8
        || be(&labels[0..4]) != 2049
    {
        return Err(Error::file(&ip, "not an MNIST idx image/label pair"));
    }
    let (n, rows, cols) = (be(&images[4..8]), be(&images[8..12]), be(&images[12..16]));
    let mut out = Vec::new();
    for i in 0..n.min(limit) {
        let px = &images[16 + i * rows * cols..16 + (i + 1) * rows * cols];
        let gray = image::GrayImage::from_raw(cols as u32, rows as u32, px.to_vec())
            .ok_or_else(|| Error::file(&ip, format!("image {i} is truncated")))?;
        out.push(Example {
            image: to_tensor(DynamicImage::ImageLuma8(gray), res)?,
            caption: format!("a handwritten digit {}", labels[8 + i]),
        });
    }
    Ok(out)
}

/// The examples under `dir` (either layout); MNIST keeps the first `limit`.
pub fn load(dir: &Path, res: usize, limit: usize) -> Result<Vec<Example>> {
    if dir.join("captions.jsonl").exists() {
        captioned(dir, res)
    } else if dir.join("t10k-images-idx3-ubyte.gz").exists() {
        mnist(dir, res, limit)
    } else {
        Err(Error::file(
            dir,
            "neither captions.jsonl nor MNIST's t10k-images-idx3-ubyte.gz is here",
        ))
    }
}

/// (B, 3, R, R) images of `examples` at `idx`.
pub fn batch_images(examples: &[Example], idx: &[usize]) -> Result<Tensor> {
    let imgs: Vec<&Tensor> = idx.iter().map(|&i| &examples[i].image).collect();
    Ok(Tensor::stack(&imgs, 0)?)
}

/// Writes images (B, 3, H, W) in [0, 1] as one PNG grid of `cols` columns.
pub fn save_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let (b, _, h, w) = images.dims4()?;
    let cols = cols.clamp(1, b.max(1));
    let rows = b.div_ceil(cols);
    let data: Vec<f32> = images.flatten_all()?.to_vec1()?;
    let mut grid = RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..b {
        let (gx, gy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let v = |c: usize| {
                    (data[((i * 3 + c) * h + y) * w + x].clamp(0.0, 1.0) * 255.0).round() as u8
                };
                grid.put_pixel(
                    (gx + x) as u32,
                    (gy + y) as u32,
                    image::Rgb([v(0), v(1), v(2)]),
                );
            }
        }
    }
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(grid)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::file(path, e))?;
    colossal_core::checkpoint::atomic::write_file(path, &bytes)?;
    Ok(())
}

/// Every png/jpg image directly in `dir`, by file name, as (3, R, R) in [−1, 1].
pub fn load_images(dir: &Path, res: usize) -> Result<Vec<Tensor>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| to_tensor(image::open(f).map_err(|e| Error::file(f, e))?, res))
        .collect()
}
