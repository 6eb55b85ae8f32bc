//! `fold bench`: peak resident memory and time of one inference forward pass of the tiny model
//! against the number of residues, for the whole computation, chunked computation, and dynamic
//! axial parallelism over 2 and 4 local ranks (threads of one process: their peak RSS is the
//! process's, all ranks together). Each (setup, length) runs in a child process, whose peak RSS
//! (VmHWM) is its own; the table goes to JSON.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use colossal_core::dist::{run_local, Communicator, Group};
use colossal_core::models::{init_all, ModelFamily};
use fold::model::dap::Dap;
use fold::model::{FoldConfig, FoldCtx, FoldModel};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Residue counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
    pub lengths: Vec<usize>,
    /// MSA depth.
    #[arg(long, default_value_t = 8)]
    pub msa_depth: usize,
    /// Rows per chunk in the chunked setups.
    #[arg(long, default_value_t = 16)]
    pub chunk_size: usize,
    /// Only these setups (whole, chunked, dap2, dap4, dap4_chunked); default all.
    #[arg(long, value_delimiter = ',')]
    pub setups: Vec<String>,
    #[arg(long, default_value = "fold-bench.json")]
    pub out: PathBuf,
    /// Internal: run one setup at one length and print its figures.
    #[arg(long, hide = true)]
    pub setup: Option<String>,
    #[arg(long, hide = true)]
    pub length: Option<usize>,
}

/// Setup name → (chunk size, DAP ranks).
fn setups(a: &BenchArgs) -> Vec<(&'static str, Option<usize>, usize)> {
    vec![
        ("whole", None, 1),
        ("chunked", Some(a.chunk_size), 1),
        ("dap2", None, 2),
        ("dap4", None, 4),
        ("dap4_chunked", Some(a.chunk_size), 4),
    ]
}

/// Random inputs of an example with `s` sequences of `r` residues.
fn inputs(s: usize, r: usize) -> Result<FoldCtx> {
    let dev = Device::Cpu;
    Ok(FoldCtx {
        target_feat: Tensor::rand(0f32, 1.0, (r, 22), &dev)?,
        msa_feat: Tensor::rand(0f32, 1.0, (s, r, 49), &dev)?,
        residue_index: Tensor::from_vec((0..r as u32).collect::<Vec<_>>(), r, &dev)?,
        msa_mask: Tensor::ones((s, r), DType::F32, &dev)?,
        pair_mask: Tensor::ones((r, r), DType::F32, &dev)?,
        aatype: (0..r as u32).map(|i| i % 20).collect(),
        seq_mask: Tensor::ones(r, DType::F32, &dev)?,
        prev: None,
    })
}

fn run_setup(a: &BenchArgs, name: &str, r: usize) -> Result<()> {
    let Some((_, chunk, ranks)) = setups(a).into_iter().find(|(n, _, _)| *n == name) else {
        bail!("--setup {name}: unknown");
    };
    let mut model = FoldModel::new(FoldConfig::tiny()).map_err(anyhow::Error::msg)?;
    model.chunk_size = chunk;
    let mut params = init_all(&model.param_specs(), 0, &Device::Cpu)?;
    // Inference: no gradient bookkeeping.
    params.freeze_all();
    let ctx = inputs(a.msa_depth, r)?;
    let started = Instant::now();
    if ranks == 1 {
        model.forward(&params, &ctx)?;
    } else {
        run_local(ranks, Duration::from_secs(3600), |comm| {
            let group = Group::new(Box::new(comm) as Box<dyn Communicator>);
            let m = FoldModel {
                dap: Some(Dap { group }),
                ..model.clone()
            };
            m.forward(&params, &ctx).map(|_| ())
        })?;
    }
    let secs = started.elapsed().as_secs_f64();
    let rss = colossal_core::runtime::peak_rss_bytes().context("no VmHWM in /proc/self/status")?;
    println!(
        "{}",
        json!({"setup": name, "residues": r, "forward_s": secs, "peak_rss_bytes": rss})
    );
    Ok(())
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if let (Some(name), Some(r)) = (&a.setup, a.length) {
        return run_setup(a, name, r);
    }
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    println!(
        "{:<14} {:>8} {:>12} {:>10}",
        "setup", "residues", "peak RSS MiB", "forward s"
    );
    for &r in &a.lengths {
        let wanted = |n: &str| a.setups.is_empty() || a.setups.iter().any(|s| s == n);
        for (name, _, _) in setups(a).into_iter().filter(|(n, _, _)| wanted(n)) {
            let out = Command::new(&exe)
                .args(["bench", "--setup", name, "--length", &r.to_string()])
                .args(["--msa-depth", &a.msa_depth.to_string()])
                .args(["--chunk-size", &a.chunk_size.to_string()])
                .env("RUST_LOG", "warn")
                .output()?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .to_string();
                println!("{name:<14} {r:>8}  failed: {last}");
                rows.push(json!({"setup": name, "residues": r, "failed": last}));
                continue;
            }
            let row: serde_json::Value = serde_json::from_slice(
                out.stdout
                    .rsplit(|&b| b == b'\n')
                    .find(|l| !l.is_empty())
                    .unwrap_or(b"{}"),
            )?;
            println!(
                "{name:<14} {r:>8} {:>12.1} {:>10.2}",
                row["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                row["forward_s"].as_f64().unwrap_or(0.0)
            );
            rows.push(row);
        }
    }
    let doc = json!({"msa_depth": a.msa_depth, "chunk_size": a.chunk_size, "model": "tiny", "rows": rows});
    std::fs::write(&a.out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("{}", a.out.display());
    Ok(())
}
