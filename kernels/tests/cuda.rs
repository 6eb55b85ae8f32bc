//! The CUDA kernels against the CPU ones (feature `cuda`, a GPU at ordinal 0; run by
//! scripts/gpu_check.sh): forward and every gradient of RMSNorm, LayerNorm, GroupNorm, softmax,
//! SwiGLU, rotary, attention (GQA, cache, padding, documents) and cross-entropy (with ignored
//! rows; whole and split by vocabulary over 2 ranks) in f32 (tight) and bf16 (to bf16's precision), and the in-place AdamW over several
//! steps.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use colossal_kernels::adamw::AdamWUpdate;
use colossal_kernels::Kernels;
use rand::{Rng, SeedableRng};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a GPU (scripts/gpu_check.sh runs them)")
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

type Op<'a> = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'a;

/// Output and the gradients of Σ output·probe, on the device and dtype given.
fn run(op: &Op<'_>, inputs: &[Tensor], grads: &[bool], dev: &Device, dtype: DType) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts).unwrap();
    let probe = random(y.dims(), 99)
        .to_device(dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let store = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut out = vec![y];
    for (v, &g) in vars.iter().zip(grads) {
        if g {
            out.push(store.get(v.as_tensor()).expect("gradient").clone());
        }
    }
    out.into_iter()
        .map(|t| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        })
        .collect()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    n(&(a - b).unwrap()) / n(b).max(1e-12)
}

/// GPU (f32 and bf16) against the CPU fused kernels in f32.
fn check(what: &str, op: &Op<'_>, inputs: &[Tensor], grads: &[bool]) {
    let want = run(op, inputs, grads, &Device::Cpu, DType::F32);
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let got = run(op, inputs, grads, &gpu(), dtype);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel(g, w);
            let part = if i == 0 {
                "output".to_string()
            } else {
                format!("gradient {i}")
            };
            println!("{what} {dtype:?} {part}: relative difference {e:e}");
            assert!(e <= tol, "{what} {dtype:?} {part}: {e:e} > {tol:e}");
        }
    }
}

const K: Kernels = Kernels::Fused;

#[test]
fn cuda_kernels_match_the_cpu_kernels() {
    let (rows, d) = (37, 300);
    let x = random(&[rows, d], 1);
    let w = random(&[d], 2);
    check(
        "rms_norm",
        &|t| K.rms_norm(&t[0], &t[1], 1e-5),
        &[x.clone(), w],
        &[true, true],
    );
    check(
        "softmax",
        &|t| K.softmax(&t[0]),
        std::slice::from_ref(&x),
        &[true],
    );
    let up = random(&[rows, d], 3);
    check(
        "swiglu",
        &|t| K.swiglu(&t[0], &t[1]),
        &[x, up],
        &[true, true],
    );
    let (wd, bias) = (random(&[d], 7), random(&[d], 8));
    let x = random(&[rows, d], 1);
    let ln = |t: &[Tensor]| K.layer_norm(&t[0], &t[1], &t[2], 1e-5);
    check("layer_norm", &ln, &[x, wd, bias], &[true, true, true]);
    let (n, c, hw) = (2, 12, 33);
    let img = random(&[n, c, hw], 9);
    let (wc, bc) = (random(&[c], 10), random(&[c], 11));
    let gn = |t: &[Tensor]| K.group_norm(&t[0], 4, &t[1], &t[2], 1e-5);
    check("group_norm", &gn, &[img, wc, bc], &[true, true, true]);
    let logits = random(&[rows, 1000], 12);
    let targets: Vec<i64> = (0..rows as i64)
        .map(|r| if r % 5 == 3 { -100 } else { r * 26 % 1000 })
        .collect();
    let ce = |t: &[Tensor]| Ok(K.cross_entropy_sum(&t[0], &targets, -100)?.0);
    check("cross_entropy", &ce, &[logits], &[true]);
    let (b, h, t, hd) = (2, 3, 17, 16);
    let q = random(&[b, h, t, hd], 4);
    let (cos, sin) = (random(&[1, t, hd], 5), random(&[1, t, hd], 6));
    check(
        "rotary",
        &|v| K.rotary(&v[0], &v[1], &v[2]),
        &[q, cos, sin],
        &[true, false, false],
    );
}

#[test]
fn cuda_split_cross_entropy_matches_the_cpu_kernel() {
    let (rows, v, ignore) = (37, 1000, -100);
    let logits = random(&[rows, v], 13);
    let targets: Vec<i64> = (0..rows as i64)
        .map(|r| if r % 5 == 3 { ignore } else { r * 26 % 1000 })
        .collect();
    let want = common::split_cross_entropy(&logits, &targets, ignore, 2);
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let on_gpu = logits.to_device(&gpu()).unwrap().to_dtype(dtype).unwrap();
        let got = common::split_cross_entropy(&on_gpu, &targets, ignore, 2);
        for (r, ((loss, g), (want_loss, want_g))) in got.iter().zip(&want).enumerate() {
            let g = g
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let (el, eg) = ((loss - want_loss).abs() / want_loss.abs(), rel(&g, want_g));
            println!("split cross_entropy {dtype:?} rank {r}: loss {el:e}, gradient {eg:e}");
            assert!(
                el <= tol && eg <= tol,
                "rank {r}: loss {el:e}, gradient {eg:e}"
            );
        }
    }
}

#[test]
fn cuda_attention_matches_the_cpu_kernel() {
    // GQA (4 query heads over 2), a KV cache of 3, padded keys; then documents without a cache.
    let (b, h, hkv, t, d) = (2, 4, 2, 19, 32);
    for (past, docs) in [(3, false), (0, true)] {
        let key_valid: Vec<u8> = (0..b * (past + t)).map(|i| u8::from(i % 7 != 5)).collect();
        let segments: Vec<u32> = (0..b * t).map(|i| ((i % t) / 6) as u32).collect();
        let mask = colossal_kernels::CausalMask {
            past_len: past,
            key_valid: (!docs).then(|| std::sync::Arc::new(key_valid)),
            segments: docs.then(|| std::sync::Arc::new(segments)),
        };
        let q = (random(&[b, h, t, d], 20) * 0.3).unwrap();
        let (k, v) = (
            random(&[b, hkv, past + t, d], 21),
            random(&[b, hkv, past + t, d], 22),
        );
        let attn = |x: &[Tensor]| Ok(K.attention(&x[0], &x[1], &x[2], &mask)?.expect("fused"));
        check(
            &format!("attention (past {past}, documents {docs})"),
            &attn,
            &[q, k, v],
            &[true; 3],
        );
    }
}

#[test]
fn cuda_adamw_tracks_the_cpu_kernel() {
    let k = AdamWUpdate {
        step_size: -1e-2,
        lerp_w: 0.1,
        b2: 0.95,
        one_minus_b2: 0.05,
        bc2_sqrt: 0.3,
        eps: 1e-8,
        decay: 0.999,
    };
    let n = 1000;
    let host = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
    let p0 = random(&[n], 7);
    let (mut p, mut m, mut v) = (host(&p0), vec![0f32; n], vec![0f32; n]);
    let dev = gpu();
    let pd = p0.to_device(&dev).unwrap();
    let zeros = || Tensor::zeros(n, DType::F32, &dev).unwrap();
    let (md, vd) = (zeros(), zeros());
    for step in 0..5 {
        let g = random(&[n], 10 + step);
        k.apply(&mut p, &host(&g), &mut m, &mut v);
        assert!(k
            .apply_on_device(&pd, &g.to_device(&dev).unwrap(), &md, &vd)
            .unwrap());
        for (what, got, want) in [("param", &pd, &p), ("m", &md, &m), ("v", &vd, &v)] {
            let got = host(got);
            let e = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("adamw step {step} {what}: max difference {e:e}");
            assert!(e <= 1e-5, "adamw step {step} {what}: {e:e}");
        }
    }
}
