//! What the model-parallel tests share beyond `common`: the config of a layout.

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
