use serde_json::{json, Map, Value};

use super::*;

fn dict(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn read(theta: Option<f64>, scaling: Option<Value>, params: Option<Value>) -> RopeParameters {
    try_read(theta, scaling, params).unwrap()
}

fn try_read(
    theta: Option<f64>,
    scaling: Option<Value>,
    params: Option<Value>,
) -> Result<RopeParameters, String> {
    let s = scaling.map(dict);
    let p = params.map(dict);
    RopeParameters::from_config(theta, s.as_ref(), p.as_ref(), 256)
}

fn assert_all_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs(), "[{i}] {g} vs {w}");
    }
}

#[test]
fn transformers_4_and_5_spellings_read_the_same() {
    let v4 = read(
        Some(500000.0),
        Some(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        ),
        None,
    );
    let v5 = read(
        None,
        None,
        Some(
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32}),
        ),
    );
    assert_eq!(v4, v5);
    assert_eq!(v5.theta, 500000.0);
    // Nothing said: theta 1e4, no scaling.
    let none = read(None, None, None);
    assert_eq!((none.theta, none.rope_type), (10000.0, RopeType::Default));
    // 4.x's `type` spelling.
    let linear = read(
        Some(1e4),
        Some(json!({"type": "linear", "factor": 2.0})),
        None,
    );
    assert_eq!(linear.rope_type, RopeType::Linear { factor: 2.0 });
}

#[test]
fn rope_scaling_wins_theta_fills_in_and_original_length_defaults() {
    let p = read(
        Some(20000.0),
        Some(json!({"rope_type": "linear", "factor": 2.0})),
        Some(json!({"rope_type": "default", "rope_theta": 30000.0})),
    );
    assert_eq!(p.rope_type, RopeType::Linear { factor: 2.0 });
    assert_eq!(p.theta, 20000.0);
    // The dict's own theta beats the top-level one.
    let p = read(Some(20000.0), None, Some(json!({"rope_theta": 30000.0})));
    assert_eq!(p.theta, 30000.0);
    // llama3 without original_max_position_embeddings takes max_position_embeddings (256).
    let p = read(
        None,
        None,
        Some(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0}),
        ),
    );
    match p.rope_type {
        RopeType::Llama3 {
            original_max_position_embeddings,
            ..
        } => assert_eq!(original_max_position_embeddings, 256),
        other => panic!("{other:?}"),
    }
}

#[test]
fn what_we_do_not_implement_is_an_error_naming_it() {
    let e = try_read(
        None,
        None,
        Some(json!({"rope_type": "longrope", "factor": 2.0})),
    )
    .unwrap_err();
    assert!(e.contains("rope_parameters.rope_type `longrope`"), "{e}");
    let e = try_read(
        None,
        Some(json!({"rope_type": "linear", "factor": 2.0, "beta_fast": 4})),
        None,
    )
    .unwrap_err();
    assert!(e.contains("rope_scaling.beta_fast"), "{e}");
    let e = try_read(None, None, Some(json!({"partial_rotary_factor": 0.5}))).unwrap_err();
    assert!(e.contains("partial_rotary_factor"), "{e}");
    let e = try_read(None, None, Some(json!({"rope_type": "linear"}))).unwrap_err();
    assert!(e.contains("rope_parameters.factor is required"), "{e}");
}

#[test]
fn llama3_keeps_high_and_divides_low_frequencies() {
    let base = Rope::new(read(Some(500000.0), None, None), 64, 256).inv_freq(1);
    let p = read(
        Some(500000.0),
        Some(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        ),
        None,
    );
    let scaled = Rope::new(p, 64, 256).inv_freq(1);
    // Highest frequency (wavelength 2π) is untouched; the lowest is divided by the factor.
    assert_eq!(scaled[0], base[0]);
    let last = base.len() - 1;
    assert!((scaled[last] - base[last] / 8.0).abs() < 1e-12);
    for (s, b) in scaled.iter().zip(&base) {
        assert!(*s <= *b && *s >= b / 8.0 - 1e-12);
    }
}

// Expected values: transformers' formulas in float32 (numpy), theta 1e4, head_dim 16.
#[test]
fn yarn_ramps_from_extrapolation_to_interpolation_and_scales_cos_sin() {
    let p = read(
        Some(10000.0),
        None,
        Some(json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    );
    let rope = Rope::new(p, 16, 256);
    // Correction range [floor(-1.60), ceil(1.41)] = [0, 2]: dim 0 extrapolates, dim 1 is half
    // way, the rest interpolate (= base / 4).
    let want = [
        1.0,
        0.197_642_36,
        0.025,
        0.007_905_695,
        0.0025,
        0.000_790_569_5,
        0.000_25,
        7.905_695e-5,
    ];
    assert_all_close(&rope.inv_freq(1), &want, 1e-6);
    assert!((rope.attention_scaling() - 1.138_629_4).abs() < 1e-6);
    // mscale / mscale_all_dim (DeepSeek's spelling): equal ones cancel.
    let p = read(
        Some(10000.0),
        None,
        Some(
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "mscale": 1.0, "mscale_all_dim": 1.0}),
        ),
    );
    assert_eq!(Rope::new(p, 16, 256).attention_scaling(), 1.0);
}

#[test]
fn dynamic_ntk_grows_the_base_past_the_trained_length() {
    let p = read(
        Some(10000.0),
        Some(json!({"rope_type": "dynamic", "factor": 2.0})),
        None,
    );
    let rope = Rope::new(p, 16, 32);
    let base = Rope::new(read(Some(10000.0), None, None), 16, 32).inv_freq(1);
    assert_eq!(rope.inv_freq(32), base);
    // 48 > 32: base' = 1e4 · (2·48/32 − 1)^(16/14) = 22081.79.
    let want = [
        1.0,
        0.286_414_95,
        0.082_033_53,
        0.023_495_633,
        0.006_729_501_8,
        0.001_927_429_8,
        0.000_552_044_8,
        0.000_158_113_9,
    ];
    assert_all_close(&rope.inv_freq(48), &want, 2e-6);
}
