//! `llama-pretrain bench-parallel`: step time, per-rank model-state bytes and bytes sent per
//! step for N local ranks × ZeRO stages, on the bench model with synthetic packed data.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::Device;
use colossal_core::config::parse_config;
use colossal_core::data::{Manifest, PackedSequence, ShardWriter, SplitInfo, MANIFEST};
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::{TrainConfig, Trainer};
use rand::{Rng, SeedableRng};

#[derive(clap::Args, Debug)]
pub struct BenchParallelArgs {
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub nproc: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3")]
    pub stages: Vec<u8>,
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Global batch (sequences per step).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 2048)]
    pub vocab: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub micro: usize,
    /// `none` or `disk` (ZeRO state in memory-mapped files; stages ≥ 1).
    #[arg(long, default_value = "none")]
    pub offload: String,
    #[arg(long, default_value = "bench_parallel.json")]
    pub out: PathBuf,
}

/// Random packed sequences (`train_rows` + `val_rows` of `seq` tokens) and their manifest.
pub fn synthetic_data(
    dir: &std::path::Path,
    seq: usize,
    vocab: usize,
    train_rows: usize,
    val_rows: usize,
) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut split = |name: &str, rows: usize| -> Result<SplitInfo> {
        let mut w = ShardWriter::new(dir, name, rows, vec![]);
        for _ in 0..rows {
            let ids = (0..seq)
                .map(|_| rng.random_range(3..vocab as u32))
                .collect();
            w.push(PackedSequence {
                input_ids: ids,
                doc_starts: vec![0],
            })?;
        }
        Ok(w.finish()?)
    };
    let train = split("train", train_rows)?;
    let validation = split("validation", val_rows)?;
    let m = Manifest {
        format: Manifest::FORMAT.into(),
        tokenizer: "synthetic".into(),
        tokenizer_sha256: String::new(),
        vocab_size: vocab,
        seq_len: seq,
        bos_id: None,
        eos_id: None,
        validation_fraction: 0.0,
        train,
        validation,
    };
    std::fs::write(dir.join(MANIFEST), serde_json::to_string_pretty(&m)?)?;
    Ok(())
}

pub fn run(a: &BenchParallelArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("colossal-bench-parallel-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    synthetic_data(&tmp, a.seq, a.vocab, a.batch * (a.steps + 1), a.batch)?;
    let text = format!(
        "[model.config]\nvocab_size = {}\nhidden_size = {}\nintermediate_size = {}\nnum_hidden_layers = {}\n\
         num_attention_heads = 4\n[data]\npath = {:?}\n[train]\nout_dir = {:?}\nbatch_size = {}\n\
         micro_batch_size = {}\nmax_steps = 1000\nlr = 1e-3\ngrad_clip = 1.0\n",
        a.vocab,
        a.dim,
        a.dim * 11 / 4,
        a.layers,
        tmp.display().to_string(),
        tmp.join("out").display().to_string(),
        a.batch,
        a.micro
    );
    let mut rows = Vec::new();
    println!(
        "{:>5} {:>5} {:>10} {:>14} {:>14} {:>14} {:>14}",
        "ranks", "zero", "step_s", "params_B", "grads_B", "optim_B", "sent_B/step"
    );
    for &n in &a.nproc {
        for &stage in &a.stages {
            if stage == 0 && a.offload != "none" {
                continue;
            }
            let ov = [
                format!("parallel.zero_stage={stage}"),
                format!("parallel.offload={:?}", a.offload),
            ];
            let cfg: TrainConfig = parse_config(&text, "bench-parallel", &ov)?;
            let per_rank = run_local(n, Duration::from_secs(600), |comm| {
                let comm: Box<dyn Communicator> = Box::new(comm);
                let mut t =
                    Trainer::new_rank(cfg.clone(), None, Device::Cpu, (n > 1).then_some(comm))?;
                t.train_step()?;
                let mut times = Vec::new();
                let mut sent = 0;
                for _ in 0..a.steps {
                    let t0 = Instant::now();
                    t.train_step()?;
                    times.push(t0.elapsed().as_secs_f64());
                    sent = t.last_step_comm_bytes;
                }
                times.sort_by(f64::total_cmp);
                Ok((
                    times[times.len() / 2],
                    t.memory_bytes(),
                    sent,
                    t.offloaded_bytes(),
                ))
            })?;
            let (step_s, (p, g, o), sent, disk) = per_rank[0];
            println!("{n:>5} {stage:>5} {step_s:>10.3} {p:>14} {g:>14} {o:>14} {sent:>14}");
            rows.push(serde_json::json!({
                "ranks": n, "zero_stage": stage, "step_s_median": step_s,
                "params_bytes": p, "grads_bytes": g, "optim_bytes": o, "bytes_sent_per_step": sent,
                "offloaded_bytes": disk, "offload": a.offload,
            }));
        }
    }
    let report = serde_json::json!({
        "model": {"dim": a.dim, "layers": a.layers, "seq": a.seq, "global_batch": a.batch, "vocab": a.vocab},
        "backend": "local (threads, one process)",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rows": rows,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)?;
    std::fs::remove_dir_all(&tmp).ok();
    println!("wrote {}", a.out.display());
    Ok(())
}
