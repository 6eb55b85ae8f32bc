//! A pixel-space model (`model.pixel_space`): a fresh UNet trains on the images themselves,
//! the exported pipeline folder has no VAE (`"vae": [null, null]`, as diffusers marks a missing
//! component), and sampling from it returns the UNet's output as the image, at the UNet's
//! sample size.

mod common;

use candle_core::Device;
use colossal_core::config::parse_config;
use common::{shared, tiny_data};
use diffusion::pipeline::{Pipeline, SampleOptions};
use diffusion::train::{train, DiffusionConfig};

const UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 3, "out_channels": 3,
  "block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
  "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 4
}"#;

fn config(dir: &std::path::Path, unet: Option<&str>) -> Result<DiffusionConfig, String> {
    let unet_line = unet.map_or(String::new(), |u| format!("unet_config = \"{u}\""));
    let text = format!(
        r#"
[model]
pretrained = "{}"
{unet_line}
pixel_space = true
[data]
path = "{}"
resolution = 8
[diffusion]
sample_prompts = ["red heart"]
sample_steps = 2
[train]
out_dir = "{}"
batch_size = 2
micro_batch_size = 1
max_steps = 2
lr = 1e-3
schedule = "constant"
eval_every = 2
save_every = 2
"#,
        shared().join("fixtures/sd_tiny").display(),
        dir.join("data").display(),
        dir.join("out").display()
    );
    let cfg: DiffusionConfig = parse_config(&text, "test", &[]).map_err(|e| e.to_string())?;
    cfg.validate().map(|_| cfg)
}

#[test]
fn a_pixel_space_model_trains_exports_without_a_vae_and_samples_images() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_data(&tmp.path().join("data"), 4);
    let e = config(tmp.path(), None).unwrap_err();
    assert!(
        e.contains("model.pixel_space needs model.unet_config"),
        "{e}"
    );
    let unet = tmp.path().join("unet.json");
    std::fs::write(&unet, UNET).unwrap();
    let run = train(
        config(tmp.path(), Some(unet.to_str().unwrap())).unwrap(),
        None,
        None,
    )
    .unwrap();
    let losses = run.series("loss");
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().all(|l| l.is_finite()));
    let folder = tmp.path().join("out/pipeline");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["vae"], serde_json::json!([null, null]));
    assert!(!folder.join("vae").exists(), "no VAE folder");
    let mut pipe = Pipeline::load(&folder, None, &Device::Cpu).unwrap();
    assert!(pipe.space.is_pixels());
    assert_eq!(pipe.latent_scale(), 1);
    let opts = SampleOptions {
        steps: 2,
        guidance: 1.0,
        height: 8,
        width: 8,
        seed: 0,
    };
    let (images, x) = pipe
        .generate(&["red heart".to_string()], &opts, None)
        .unwrap();
    assert_eq!(images.dims(), [1, 3, 8, 8]);
    // The image is the UNet's last output mapped from [−1, 1] to [0, 1].
    let want = x.affine(0.5, 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    let d: f32 = (images - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0);
}
