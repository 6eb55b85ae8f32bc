//! `llama-pretrain bench-capacity`: at a fixed memory budget, the largest LLaMA (width × depth)
//! that trains without offload (one rank, fp32 AdamW: 16 bytes per parameter resident) and with
//! ZeRO-3 disk offload (parameter chunks and moments in memory-mapped files, one block gathered
//! at a time), and the ratio of their parameter counts.
//!
//! "Trains" is measured, not predicted: each candidate runs one full training step (forward,
//! backward, AdamW) in a child process, which reports its peak resident set (VmHWM); a candidate
//! fits when that peak is within the budget. Depth is searched by doubling then bisection at each
//! width. Disk offload is bounded by `--disk-limit` (the bytes of state allowed on disk), not by
//! memory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use colossal_core::config::parse_config;
use colossal_core::train::parse_bytes;
use colossal_core::train::{TrainConfig, Trainer};

#[derive(clap::Args, Debug)]
pub struct BenchCapacityArgs {
    /// Peak resident memory allowed (e.g. 1GiB, 2GiB).
    #[arg(long, default_value = "1GiB")]
    pub budget: String,
    /// Most offloaded state allowed on disk in the offload search.
    #[arg(long, default_value = "8GiB")]
    pub disk_limit: String,
    /// Hidden sizes to try (heads of 64 dims each).
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    pub widths: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_layers: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 2048)]
    pub vocab: usize,
    /// Where the offload files go (needs `--disk-limit` free).
    #[arg(long, default_value = "bench_capacity_offload")]
    pub offload_dir: PathBuf,
    #[arg(long, default_value = "bench_capacity.json")]
    pub out: PathBuf,
    /// Internal: run one candidate `MODE:WIDTH:LAYERS` and print its peak RSS.
    #[arg(long, hide = true)]
    pub trial: Option<String>,
}

fn config_text(a: &BenchCapacityArgs, data: &Path, dim: usize, layers: usize) -> String {
    format!(
        "[model.config]\nvocab_size = {}\nhidden_size = {dim}\nintermediate_size = {}\n\
         num_hidden_layers = {layers}\nnum_attention_heads = {}\n[data]\npath = {:?}\n[train]\n\
         out_dir = {:?}\nbatch_size = 1\nmicro_batch_size = 1\nmax_steps = 10\nlr = 1e-4\n",
        a.vocab,
        dim * 11 / 4,
        (dim / 64).max(1),
        data.display().to_string(),
        data.join("out").display().to_string(),
    )
}

fn num_params(a: &BenchCapacityArgs, dim: usize, layers: usize) -> Result<u64> {
    let cfg: TrainConfig = parse_config(
        &config_text(a, Path::new("."), dim, layers),
        "capacity",
        &[],
    )?;
    Ok(cfg.model.config.expect("from-scratch config").num_params() as u64)
}

fn peak_rss() -> Result<u64> {
    colossal_core::runtime::peak_rss_bytes().context("no VmHWM in /proc/self/status")
}

/// Child side: one training step of the candidate, then its peak RSS as JSON on stdout.
fn trial(a: &BenchCapacityArgs, spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [mode, dim, layers] = parts[..] else {
        bail!("--trial {spec}: expected MODE:WIDTH:LAYERS");
    };
    let (dim, layers): (usize, usize) = (dim.parse()?, layers.parse()?);
    let data = std::env::temp_dir().join(format!("colossal-capacity-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    crate::bench_parallel::synthetic_data(&data, a.seq, a.vocab, 4, 1)?;
    let ov = match mode {
        "none" => vec![],
        "disk" => vec![
            "parallel.zero_stage=3".to_string(),
            "parallel.offload=\"disk\"".to_string(),
            format!(
                "parallel.offload_dir={:?}",
                a.offload_dir.display().to_string()
            ),
        ],
        other => bail!("--trial mode `{other}`: expected none or disk"),
    };
    let cfg: TrainConfig = parse_config(&config_text(a, &data, dim, layers), "capacity", &ov)?;
    let mut t = Trainer::new(cfg, None, Device::Cpu)?;
    t.train_step()?;
    let disk = t.offloaded_bytes();
    drop(t);
    std::fs::remove_dir_all(&data).ok();
    std::fs::remove_dir_all(&a.offload_dir).ok();
    println!(
        "{}",
        serde_json::json!({"peak_rss": peak_rss()?, "offloaded_bytes": disk})
    );
    Ok(())
}

struct Outcome {
    fits: bool,
    peak_rss: Option<u64>,
}

fn run_trial(
    a: &BenchCapacityArgs,
    mode: &str,
    dim: usize,
    layers: usize,
    budget: u64,
) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let started = std::time::Instant::now();
    let out = Command::new(exe)
        .args([
            "bench-capacity",
            "--trial",
            &format!("{mode}:{dim}:{layers}"),
        ])
        .args(["--seq", &a.seq.to_string(), "--vocab", &a.vocab.to_string()])
        .arg("--offload-dir")
        .arg(&a.offload_dir)
        .env("RUST_LOG", "warn")
        .output()?;
    let peak = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["peak_rss"].as_u64());
    let fits = out.status.success() && peak.is_some_and(|p| p <= budget);
    println!(
        "  {mode:>4} width {dim:>5} layers {layers:>3}: {:>7.1}M params, peak RSS {:>8} → {} ({:.0} s)",
        num_params(a, dim, layers)? as f64 / 1e6,
        peak.map_or("failed".into(), |p| format!("{} MiB", p >> 20)),
        if fits { "fits" } else { "over" },
        started.elapsed().as_secs_f64()
    );
    Ok(Outcome {
        fits,
        peak_rss: peak,
    })
}

/// Largest depth ≤ `cap` whose trial fits, with its peak RSS.
fn deepest(
    a: &BenchCapacityArgs,
    mode: &str,
    dim: usize,
    cap: usize,
    budget: u64,
) -> Result<Option<(usize, u64)>> {
    if cap == 0 {
        return Ok(None);
    }
    let mut good: Option<(usize, u64)> = None;
    let mut bad = cap + 1;
    let mut l = 1;
    while l <= cap {
        let o = run_trial(a, mode, dim, l, budget)?;
        if !o.fits {
            bad = l;
            break;
        }
        good = Some((l, o.peak_rss.unwrap_or(0)));
        if l == cap {
            break;
        }
        l = (l * 2).min(cap);
    }
    let Some((mut lo, mut lo_rss)) = good else {
        return Ok(None);
    };
    while bad - lo > 1 {
        let mid = (lo + bad) / 2;
        let o = run_trial(a, mode, dim, mid, budget)?;
        if o.fits {
            (lo, lo_rss) = (mid, o.peak_rss.unwrap_or(0));
        } else {
            bad = mid;
        }
    }
    Ok(Some((lo, lo_rss)))
}

pub fn run(a: &BenchCapacityArgs) -> Result<()> {
    if let Some(spec) = &a.trial {
        return trial(a, spec);
    }
    let budget = parse_bytes(&a.budget).with_context(|| format!("--budget {}", a.budget))?;
    let disk_limit =
        parse_bytes(&a.disk_limit).with_context(|| format!("--disk-limit {}", a.disk_limit))?;
    println!(
        "capacity at a {} budget (peak RSS of one training step; seq {}, vocab {}); disk offload allowed {} on disk",
        a.budget, a.seq, a.vocab, a.disk_limit
    );
    let mut best = serde_json::Map::new();
    let mut rows = Vec::new();
    for mode in ["none", "disk"] {
        let mut top: Option<(u64, usize, usize, u64)> = None;
        for &dim in &a.widths {
            // Disk offload keeps 16 bytes per parameter on disk (chunks, moments, gradients).
            let cap = if mode == "disk" {
                (1..=a.max_layers)
                    .take_while(|&l| num_params(a, dim, l).is_ok_and(|p| 16 * p <= disk_limit))
                    .last()
                    .unwrap_or(0)
            } else {
                a.max_layers
            };
            if let Some((layers, rss)) = deepest(a, mode, dim, cap, budget)? {
                let p = num_params(a, dim, layers)?;
                rows.push(serde_json::json!({"offload": mode, "width": dim, "layers": layers, "params": p, "peak_rss": rss}));
                if top.is_none_or(|t| p > t.0) {
                    top = Some((p, dim, layers, rss));
                }
            }
        }
        let (p, dim, layers, rss) = top.context("no candidate fits the budget")?;
        println!(
            "largest with offload = {mode}: width {dim}, {layers} layers, {:.1}M params (peak RSS {} MiB)",
            p as f64 / 1e6,
            rss >> 20
        );
        best.insert(
            mode.into(),
            serde_json::json!({"width": dim, "layers": layers, "params": p, "peak_rss": rss}),
        );
    }
    let ratio = best["disk"]["params"].as_f64().unwrap_or(0.0)
        / best["none"]["params"].as_f64().unwrap_or(1.0);
    println!("capacity ratio (disk offload / none): {ratio:.1}×");
    let report = serde_json::json!({
        "budget_bytes": budget, "disk_limit_bytes": disk_limit, "seq": a.seq, "vocab": a.vocab,
        "best": best, "capacity_ratio": ratio, "trials": rows,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
