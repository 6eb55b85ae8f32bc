//! What the library-level model-parallel tests share: the optimizer, copies of parameters, and
//! the relative error they compare with.

use candle_core::{Tensor, Var};
use colossal_core::optim::{AdamW, AdamWConfig};
use colossal_core::params::Params;

pub fn adamw() -> AdamW {
    AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        no_decay: vec!["norm".into()],
    })
}

/// Fresh copies of the parameters `keep` accepts (the optimizer updates variables in place).
pub fn copy_where(p: &Params, keep: impl Fn(&str) -> bool) -> Params {
    let mut out = Params::new();
    for (name, var) in p.iter().filter(|(n, _)| keep(n)) {
        out.insert(
            name,
            Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap(),
        );
    }
    out
}

/// ‖a − b‖ / ‖b‖ (Frobenius).
pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
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

/// Every parameter of `want` is in `got` under the same name, with as many elements, and
/// within `tol` (relative, Frobenius); `got` has no others.
pub fn assert_same_params(what: &str, got: &Params, want: &Params, tol: f32) {
    let mut names: Vec<&str> = got.iter().map(|(n, _)| n).collect();
    let mut expected: Vec<&str> = want.iter().map(|(n, _)| n).collect();
    names.sort_unstable();
    expected.sort_unstable();
    assert_eq!(names, expected, "{what}: parameter names");
    let mut worst = 0f32;
    for (name, var) in want.iter() {
        let g = got.get(name).unwrap();
        assert_eq!(g.elem_count(), var.elem_count(), "{what}: {name} length");
        let e = rel(g, var.as_tensor());
        assert!(e <= tol, "{what}: {name} differs by {e:e}");
        worst = worst.max(e);
    }
    println!(
        "{what}: {} parameters, worst relative difference {worst:e}",
        want.len()
    );
}
