//! Every fused op against its reference formulation — forward and the gradients of every
//! input — on odd shapes, with masks and ignored targets, and against central finite
//! differences of its own forward.

mod common;

use candle_core::{Device, Result, Tensor, Var};
use colossal_kernels::Kernels::{self, Fused, Reference};
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The op's output and the gradients of Σ y·R (R fixed random) for each input.
type Op = dyn Fn(Kernels, &[Tensor]) -> Result<Tensor>;

fn run(op: &Op, k: Kernels, inputs: &[Tensor]) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(k, &ts).unwrap();
    let r = random(y.dims(), 99, 1.0);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
        })
        .collect();
    (y, grads)
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    let (d, n) = (d.to_scalar::<f32>().unwrap(), n.to_scalar::<f32>().unwrap());
    (d / n.max(1e-30)).sqrt()
}

/// Fused equals reference (forward and the gradient of each input marked in `with_grad`)
/// within `tol`, and that fused gradient equals central differences at a few coordinates.
/// Unmarked inputs are constants of the op (rotary tables): the fused op gives them none.
fn check(what: &str, op: &Op, inputs: &[Tensor], with_grad: &[bool], tol: f32) {
    let (yf, gf) = run(op, Fused, inputs);
    let (yr, gr) = run(op, Reference, inputs);
    let e = rel(&yf, &yr);
    println!("{what}: forward relative difference {e:e}");
    assert!(e <= tol, "{what} forward: {e:e}");
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        if !with_grad[i] {
            let none = a
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(none, 0.0, "{what} input {i} is a constant");
            continue;
        }
        let e = rel(a, b);
        println!("{what}: input {i} gradient relative difference {e:e}");
        assert!(e <= tol, "{what} input {i} gradient: {e:e}");
        if with_grad[i] {
            let n = b
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{what} input {i}: zero gradient");
            finite_differences(what, op, inputs, i, a);
        }
    }
}

fn finite_differences(what: &str, op: &Op, inputs: &[Tensor], i: usize, grad: &Tensor) {
    let f = |x: &Tensor| -> f64 {
        let mut ins = inputs.to_vec();
        ins[i] = x.clone();
        let y = op(Fused, &ins).unwrap();
        let r = random(y.dims(), 99, 1.0);
        let v = (y.to_dtype(candle_core::DType::F64).unwrap()
            * r.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap();
        v.sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let x = inputs[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = g.iter().fold(0f32, |m, v| m.max(v.abs()));
    let h = 1e-2f32;
    for k in (0..x.len()).step_by((x.len() / 7).max(1)) {
        let at = |d: f32| {
            let mut v = x.clone();
            v[k] += d;
            f(&Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap())
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        let err = (fd - g[k] as f64).abs() / scale.max(1e-6) as f64;
        assert!(
            err < 2e-2,
            "{what} input {i}[{k}]: finite difference {fd} vs {}",
            g[k]
        );
    }
}

#[test]
fn rms_norm_matches_reference_and_finite_differences() {
    let op = |k: Kernels, t: &[Tensor]| k.rms_norm(&t[0], &t[1], 1e-5);
    for (rows, d) in [(1, 3), (7, 37), (3, 5), (33, 256)] {
        let x = random(&[rows, d], 1, 2.0);
        let w = random(&[d], 2, 1.5);
        check(
            &format!("rms_norm {rows}x{d}"),
            &op,
            &[x, w],
            &[true, true],
            2e-5,
        );
    }
    // Three dimensions, as in a model: (B, T, D).
    let x = random(&[2, 9, 24], 3, 1.0);
    check(
        "rms_norm 2x9x24",
        &op,
        &[x, random(&[24], 4, 1.0)],
        &[true, true],
        2e-5,
    );
}

#[test]
fn softmax_matches_reference_with_masks() {
    let op = |k: Kernels, t: &[Tensor]| k.softmax(&t[0]);
    for (rows, d) in [(1, 2), (5, 3), (13, 67), (4, 300)] {
        check(
            &format!("softmax {rows}x{d}"),
            &op,
            &[random(&[rows, d], 5, 4.0)],
            &[true],
            2e-5,
        );
    }
    // Masked positions as the attention bias writes them: −inf and large negatives.
    let mut x = random(&[6, 19], 6, 3.0).to_vec2::<f32>().unwrap();
    for (r, row) in x.iter_mut().enumerate() {
        for v in row.iter_mut().skip(r + 1) {
            *v = if r % 2 == 0 { f32::NEG_INFINITY } else { -1e9 };
        }
    }
    let x = Tensor::new(x, &Device::Cpu).unwrap();
    let (yf, _) = run(&op, Fused, std::slice::from_ref(&x));
    let (yr, _) = run(&op, Reference, std::slice::from_ref(&x));
    assert!(rel(&yf, &yr) < 2e-6, "masked softmax: {:e}", rel(&yf, &yr));
    let masked = yf.to_vec2::<f32>().unwrap();
    assert_eq!(
        masked[0][1..].iter().sum::<f32>(),
        0.0,
        "masked entries are exactly 0"
    );
}

#[test]
fn swiglu_matches_reference_and_finite_differences() {
    let op = |k: Kernels, t: &[Tensor]| k.swiglu(&t[0], &t[1]);
    for shape in [&[1usize][..], &[7, 13], &[2, 5, 49]] {
        let (a, b) = (random(shape, 7, 4.0), random(shape, 8, 2.0));
        check(
            &format!("swiglu {shape:?}"),
            &op,
            &[a, b],
            &[true, true],
            2e-6,
        );
    }
}

#[test]
fn rotary_matches_reference_and_finite_differences() {
    let op = |k: Kernels, t: &[Tensor]| k.rotary(&t[0], &t[1], &t[2]);
    for (b, h, t, d, tb) in [(1, 1, 1, 2, 1), (2, 3, 5, 6, 2), (3, 2, 7, 10, 1)] {
        let x = random(&[b, h, t, d], 9, 2.0);
        let (cos, sin) = (random(&[tb, t, d], 10, 1.0), random(&[tb, t, d], 11, 1.0));
        let what = format!("rotary {b}x{h}x{t}x{d}, tables of batch {tb}");
        check(&what, &op, &[x, cos, sin], &[true, false, false], 2e-6);
    }
}

#[test]
fn cross_entropy_matches_reference_with_ignored_targets() {
    let ignore = -100;
    for (rows, v) in [(1, 2), (9, 31), (17, 300)] {
        let targets: Vec<i64> = (0..rows)
            .map(|r| {
                if r % 4 == 3 {
                    ignore
                } else {
                    ((r * 7) % v) as i64
                }
            })
            .collect();
        let op = move |k: Kernels, t: &[Tensor]| -> Result<Tensor> {
            let (sum, n) = k.cross_entropy_sum(&t[0], &targets, ignore)?;
            assert_eq!(n, targets.iter().filter(|&&t| t != ignore).count());
            sum.reshape(1)
        };
        let logits = random(&[rows, v], 12, 6.0);
        check(
            &format!("cross-entropy {rows}x{v}"),
            &op,
            &[logits],
            &[true],
            2e-6,
        );
    }
    let logits = random(&[2, 5], 13, 1.0);
    let e = Fused
        .cross_entropy_sum(&logits, &[1, 5], ignore)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target 5 at row 1") && e.contains("5 classes"),
        "{e}"
    );
}

#[test]
fn other_dtypes_run_the_reference() {
    let x = random(&[3, 8], 14, 1.0)
        .to_dtype(candle_core::DType::BF16)
        .unwrap();
    let w = random(&[8], 15, 1.0)
        .to_dtype(candle_core::DType::BF16)
        .unwrap();
    let a = Fused.rms_norm(&x, &w, 1e-5).unwrap();
    let b = Reference.rms_norm(&x, &w, 1e-5).unwrap();
    assert_eq!(a.dtype(), candle_core::DType::BF16);
    let d = (a.to_dtype(candle_core::DType::F32).unwrap()
        - b.to_dtype(candle_core::DType::F32).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn fused_adamw_is_bit_identical_to_the_scalar_loop_and_updates_in_place() {
    use colossal_kernels::adamw::AdamWUpdate;
    let n = 100_003; // several parallel chunks and a vector tail
    let k = AdamWUpdate {
        step_size: -1e-3 / (1.0 - 0.9f32.powi(3)),
        lerp_w: 0.1,
        b2: 0.95,
        one_minus_b2: 0.05,
        bc2_sqrt: (1.0 - 0.95f32.powi(3)).sqrt(),
        eps: 1e-8,
        decay: 1.0 - 1e-4,
    };
    let vec = |seed, scale| random(&[n], seed, scale).to_vec1::<f32>().unwrap();
    let (p0, g, m0, v0) = (vec(20, 1.0), vec(21, 0.1), vec(22, 0.01), vec(23, 1e-4));
    let v0: Vec<f32> = v0.iter().map(|x| x.abs()).collect();
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    k.apply_scalar(&mut p, &g, &mut m, &mut v);
    let (mut pf, mut mf, mut vf) = (p0.clone(), m0.clone(), v0.clone());
    k.apply(&mut pf, &g, &mut mf, &mut vf);
    assert!(
        p == pf && m == mf && v == vf,
        "fused differs from the scalar loop"
    );
    assert!(p != p0, "the update moved the parameters");
    let param = Tensor::new(p0.as_slice(), &Device::Cpu).unwrap();
    let grad = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
    let (mut mi, mut vi) = (m0, v0);
    assert!(k.apply_in_place(&param, &grad, &mut mi, &mut vi).unwrap());
    assert_eq!(
        param.to_vec1::<f32>().unwrap(),
        p,
        "in-place update of the tensor"
    );
    assert!(mi == m && vi == v);
    let bf16 = param.to_dtype(candle_core::DType::BF16).unwrap();
    assert!(
        !k.apply_in_place(&bf16, &grad, &mut mi, &mut vi).unwrap(),
        "f32 only"
    );
}

/// The dense additive bias of a [`CausalMask`] as the reference formulation takes it (the
/// most negative f32 where a query may not look), and which query rows see any key.
fn dense_bias(m: &colossal_kernels::CausalMask, b: usize, t: usize) -> (Tensor, Tensor) {
    let tk = m.past_len + t;
    let mut bias = vec![f32::MIN; b * t * tk];
    let mut seen = vec![0f32; b * t];
    for bi in 0..b {
        for q in 0..t {
            for k in 0..=(m.past_len + q) {
                let valid = m.key_valid.as_ref().is_none_or(|kv| kv[bi * tk + k] != 0);
                let same = m
                    .segments
                    .as_ref()
                    .is_none_or(|s| k >= m.past_len && s[bi * t + k - m.past_len] == s[bi * t + q]);
                if valid && same {
                    bias[(bi * t + q) * tk + k] = 0.0;
                    seen[bi * t + q] = 1.0;
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, 1, t, tk), &Device::Cpu).unwrap();
    (
        bias,
        Tensor::from_vec(seen, (b, 1, t, 1), &Device::Cpu).unwrap(),
    )
}

fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, rep, t, d))?
        .reshape((b, h * rep, t, d))
}

#[test]
fn attention_matches_reference_with_gqa_padding_documents_and_a_cache() {
    use colossal_kernels::CausalMask;
    use std::sync::Arc;
    let (b, h, hkv, d) = (2, 4, 2, 8);
    // 70 queries: two query blocks, the second partial.
    let t = 70;
    let mut key_valid = vec![1u8; b * t];
    key_valid[t..t + 5].fill(0); // batch 1 left-padded by 5
    let segments: Vec<u32> = (0..b * t).map(|i| ((i % t) / 23) as u32).collect();
    let cases = [
        ("causal", CausalMask::default(), t),
        (
            "padding + documents",
            CausalMask {
                past_len: 0,
                key_valid: Some(Arc::new(key_valid)),
                segments: Some(Arc::new(segments)),
            },
            t,
        ),
        (
            "KV cache of 3",
            CausalMask {
                past_len: 3,
                ..Default::default()
            },
            9,
        ),
    ];
    for (what, mask, t) in cases {
        let (bias, seen) = dense_bias(&mask, b, t);
        let tk = mask.past_len + t;
        let op = move |k: Kernels, x: &[Tensor]| -> Result<Tensor> {
            let y = match k.attention(&x[0], &x[1], &x[2], &mask)? {
                Some(y) => y,
                None => {
                    let (kk, vv) = (repeat_kv(&x[1], h / hkv)?, repeat_kv(&x[2], h / hkv)?);
                    let s = x[0].matmul(&kk.t()?)?.broadcast_add(&bias)?;
                    colossal_kernels::reference::softmax(&s)?.matmul(&vv)?
                }
            };
            // Queries that see no key are padding: compared as zeros.
            y.broadcast_mul(&seen)
        };
        let (q, kt, vt) = (
            random(&[b, h, t, d], 30, 1.0),
            random(&[b, hkv, tk, d], 31, 1.0),
            random(&[b, hkv, tk, d], 32, 1.0),
        );
        check(
            &format!("attention, {what}"),
            &op,
            &[q, kt, vt],
            &[true, true, true],
            2e-5,
        );
    }
    let shape = Fused.attention(
        &random(&[1, 3, 4, 8], 1, 1.0),
        &random(&[1, 2, 4, 8], 1, 1.0),
        &random(&[1, 2, 4, 8], 1, 1.0),
        &CausalMask::default(),
    );
    assert!(shape.unwrap_err().to_string().contains("Hkv dividing H"));
}

#[test]
fn linear_matches_reference_and_finite_differences() {
    let op = |k: Kernels, t: &[Tensor]| k.linear(&t[0], &t[1]);
    for (x, w) in [
        (&[1usize, 3][..], [2usize, 3]),
        (&[5, 7], [11, 7]),
        (&[2, 9, 33], [65, 33]),
    ] {
        let what = format!("linear {x:?} x {w:?}^T");
        check(
            &what,
            &op,
            &[random(x, 40, 1.0), random(&w, 41, 1.0)],
            &[true, true],
            2e-6,
        );
    }
}

#[test]
fn conv2d_as_im2col_and_gemm_matches_candle_and_finite_differences() {
    // Reference = candle's conv2d (its input gradient by conv_transpose2d). Strides 1 and 2
    // (odd sizes: the forward's stride drops rows the backward must give back), padding 0 and
    // 1, kernels 3 and 1. candle's backward takes the dropped rows of the height for the width
    // too, so a non-square stride-2 input is checked against finite differences only.
    let op = |p: usize, s: usize| {
        move |kk: Kernels, t: &[Tensor]| match kk {
            Reference => t[0].conv2d(&t[1], p, s, 1, 1),
            Fused => kk.conv2d(&t[0], &t[1], p, s),
        }
    };
    let cases = [
        (3, 1, 1, 9, 7),
        (3, 1, 2, 9, 9),
        (3, 0, 2, 10, 10),
        (1, 0, 1, 5, 6),
        (3, 0, 1, 6, 6),
        (3, 2, 1, 5, 5),
        (5, 2, 2, 9, 9),
    ];
    for (i, (k, p, s, h, w)) in cases.into_iter().enumerate() {
        let x = random(&[2, 3, h, w], 40 + i as u64, 1.0);
        let wt = random(&[4, 3, k, k], 50 + i as u64, 0.5);
        let what = format!("conv2d k{k} p{p} s{s} {h}x{w}");
        check(&what, &op(p, s), &[x, wt], &[true, true], 1e-5);
    }
    let (x, wt) = (
        random(&[2, 3, 9, 8], 60, 1.0),
        random(&[4, 3, 3, 3], 61, 0.5),
    );
    let (y, grads) = run(&op(1, 2), Fused, &[x.clone(), wt.clone()]);
    assert_eq!(y.dims(), [2, 4, 5, 4]);
    assert_eq!(
        grads[0].dims(),
        [2, 3, 9, 8],
        "the input gradient has the input's shape"
    );
    for (i, g) in grads.iter().enumerate() {
        finite_differences(
            "conv2d k3 p1 s2 9x8",
            &op(1, 2),
            &[x.clone(), wt.clone()],
            i,
            g,
        );
    }
}

#[test]
fn layer_and_group_norm_match_reference_and_finite_differences() {
    let op = |k: Kernels, t: &[Tensor]| k.layer_norm(&t[0], &t[1], &t[2], 1e-5);
    for (rows, d) in [(1, 3), (7, 37), (2, 130)] {
        let ins = [
            random(&[rows, d], 50, 2.0),
            random(&[d], 51, 1.0),
            random(&[d], 52, 1.0),
        ];
        check(
            &format!("layer_norm {rows}x{d}"),
            &op,
            &ins,
            &[true, true, true],
            2e-5,
        );
    }
    for (shape, groups) in [
        (&[2usize, 6, 5][..], 3),
        (&[3, 8, 4, 3], 2),
        (&[1, 4, 7, 5], 4),
    ] {
        let c = shape[1];
        let op = move |k: Kernels, t: &[Tensor]| k.group_norm(&t[0], groups, &t[1], &t[2], 1e-5);
        let ins = [
            random(shape, 53, 2.0),
            random(&[c], 54, 1.0),
            random(&[c], 55, 1.0),
        ];
        let what = format!("group_norm {shape:?} in {groups} groups");
        check(&what, &op, &ins, &[true, true, true], 2e-5);
    }
    let e = Fused
        .group_norm(
            &random(&[2, 6, 3], 1, 1.0),
            4,
            &random(&[6], 1, 1.0),
            &random(&[6], 1, 1.0),
            1e-5,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("divisible by 4 groups"), "{e}");
}

/// An in-process stand-in for a group's all-reduce: each rank posts its buffer, all wait,
/// each folds every rank's buffer.
#[test]
fn vocabulary_split_cross_entropy_equals_the_whole() {
    let (rows, v, ranks, ignore) = (9, 40, 2, -100);
    let targets: Vec<i64> = (0..rows)
        .map(|r| {
            if r == 4 {
                ignore
            } else {
                ((r * 13) % v) as i64
            }
        })
        .collect();
    let logits = random(&[rows, v], 60, 5.0);
    let whole = Var::from_tensor(&logits).unwrap();
    let (sum, _) = Reference
        .cross_entropy_sum(whole.as_tensor(), &targets, ignore)
        .unwrap();
    let want_grad = sum
        .backward()
        .unwrap()
        .get(whole.as_tensor())
        .unwrap()
        .clone();
    let want = sum.to_scalar::<f32>().unwrap();
    let results = common::split_cross_entropy(&logits, &targets, ignore, ranks);
    for (r, (loss, _)) in results.iter().enumerate() {
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "rank {r}: {loss} vs {want}"
        );
    }
    let grads: Vec<Tensor> = results.into_iter().map(|(_, g)| g).collect();
    let got = Tensor::cat(&grads, 1).unwrap();
    let e = rel(&got, &want_grad);
    println!("split cross-entropy: loss {want}, gradient relative difference {e:e}");
    assert!(e <= 2e-6, "gradient {e:e}");
}
