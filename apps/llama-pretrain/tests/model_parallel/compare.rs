//! What the model-parallel tests share: the config of a layout, whole parameters as flat
//! vectors, and ‖a − b‖ / ‖b‖.

pub type Flat = Vec<(String, Vec<f32>)>;

pub fn flat(params: &colossal_core::params::Params) -> Flat {
    params
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            (n.to_string(), t.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel(a: &[f32], b: &[f32]) -> f32 {
    let n = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x as f64 * x as f64).sum::<f64>().sqrt();
    (n(&mut a.iter().zip(b).map(|(x, y)| x - y)) / n(&mut b.iter().copied()).max(1e-30)) as f32
}

/// The shared test config with `model` overrides, `nproc` ranks and the layout's `extra` sets.
pub fn layout_config(
    data: &std::path::Path,
    out: &std::path::Path,
    model: &[&str],
    nproc: usize,
    extra: &[&str],
) -> colossal_core::train::TrainConfig {
    let nproc_set = format!("parallel.nproc={nproc}");
    let mut overrides: Vec<&str> = model.to_vec();
    overrides.push(&nproc_set);
    overrides.extend_from_slice(extra);
    super::common::config(data, out, &overrides)
}
