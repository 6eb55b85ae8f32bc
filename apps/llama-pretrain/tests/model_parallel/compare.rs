//! What the model-parallel tests compare: whole parameters as flat vectors, and ‖a − b‖ / ‖b‖.

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
