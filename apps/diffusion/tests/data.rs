//! Training images as the fixtures and datasets define them: the emoji PNG composited on
//! white and scaled to [−1, 1] equals the SD fixture's VAE input; MNIST digits pair with their
//! labels.

mod common;

use candle_core::{Device, Tensor};
use common::{max_abs, shared};
use diffusion::data;

#[test]
fn an_emoji_becomes_the_fixtures_vae_input() {
    let dir = shared().join("data/t2i_images/noto_emoji_32px");
    let img = image::open(dir.join("images/emoji_u1f601.png")).unwrap();
    let ours = data::to_tensor(img, 32).unwrap().unsqueeze(0).unwrap();
    let t = candle_core::safetensors::load(
        shared().join("fixtures/sd_tiny/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want: &Tensor = &t["vae.image"];
    let d: f32 = max_abs(&(&ours - want).unwrap());
    // Below one 8-bit level (2/255): the compositing rounds every pixel as the fixture did.
    assert!(d < 1e-5, "image differs by {d}");
}

#[test]
fn mnist_digits_come_with_their_labels() {
    let ex = data::load(&shared().join("data/t2i_images/mnist_t10k"), 32, 5).unwrap();
    let captions: Vec<&str> = ex.iter().map(|e| e.caption.as_str()).collect();
    // The first labels of MNIST's test set.
    assert_eq!(
        captions,
        [7, 2, 1, 0, 4].map(|d| format!("a handwritten digit {d}"))
    );
    let x = &ex[0].image;
    assert_eq!(x.dims(), [3, 32, 32]);
    let (lo, hi): (f32, f32) = (
        x.min_all().unwrap().to_scalar().unwrap(),
        x.max_all().unwrap().to_scalar().unwrap(),
    );
    assert!(lo == -1.0 && hi > 0.9, "white digit on black: {lo}..{hi}");
}
