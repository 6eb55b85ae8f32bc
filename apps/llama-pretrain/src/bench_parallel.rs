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
    #[command(flatten)]
    pub run: BenchRun,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub micro: usize,
    /// `none` or `disk` (ZeRO state in memory-mapped files; stages ≥ 1).
    #[arg(long, default_value = "none")]
    pub offload: String,
    #[arg(long, default_value = "bench_parallel.json")]
    pub out: PathBuf,
}

/// The model's size and the run's length, shared by the multi-rank benchmarks.
#[derive(clap::Args, Debug)]
pub struct BenchRun {
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
}

impl BenchRun {
    /// A fresh directory under the system's temporary one holding synthetic data: a warm-up
    /// and `steps` global batches, and one for validation.
    pub fn data_dir(&self, bench: &str) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("colossal-{bench}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let rows = self.batch * (self.steps + 1);
        synthetic_data(&dir, self.seq, self.vocab, rows, self.batch)?;
        Ok(dir)
    }

    /// `steps` timed steps (after the caller's warm-up step): the median step time and the
    /// bytes this rank sent in each.
    pub fn timed_steps(&self, t: &mut Trainer) -> colossal_core::Result<(f64, Vec<u64>)> {
        let (mut times, mut sent) = (Vec::new(), Vec::new());
        for _ in 0..self.steps {
            let t0 = Instant::now();
            t.train_step()?;
            times.push(t0.elapsed().as_secs_f64());
            sent.push(t.last_step_comm_bytes);
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], sent))
    }
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

pub fn run(args: &BenchParallelArgs) -> Result<()> {
    let a = &args.run;
    let tmp = a.data_dir("bench-parallel")?;
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
        args.micro
    );
    let mut rows = Vec::new();
    println!(
        "{:>5} {:>5} {:>10} {:>14} {:>14} {:>14} {:>14}",
        "ranks", "zero", "step_s", "params_B", "grads_B", "optim_B", "sent_B/step"
    );
    for &n in &args.nproc {
        for &stage in &args.stages {
            if stage == 0 && args.offload != "none" {
                continue;
            }
            let ov = [
                format!("parallel.zero_stage={stage}"),
                format!("parallel.offload={:?}", args.offload),
            ];
            let cfg: TrainConfig = parse_config(&text, "bench-parallel", &ov)?;
            let per_rank = run_local(n, Duration::from_secs(600), |comm| {
                let comm: Box<dyn Communicator> = Box::new(comm);
                let mut t =
                    Trainer::new_rank(cfg.clone(), None, Device::Cpu, (n > 1).then_some(comm))?;
                t.train_step()?;
                let (step_s, sent) = a.timed_steps(&mut t)?;
                let last = sent.last().copied().unwrap_or(0);
                Ok((step_s, t.memory_bytes(), last, t.offloaded_bytes()))
            })?;
            let (step_s, (p, g, o), sent, disk) = per_rank[0];
            println!("{n:>5} {stage:>5} {step_s:>10.3} {p:>14} {g:>14} {o:>14} {sent:>14}");
            rows.push(serde_json::json!({
                "ranks": n, "zero_stage": stage, "step_s_median": step_s,
                "params_bytes": p, "grads_bytes": g, "optim_bytes": o, "bytes_sent_per_step": sent,
                "offloaded_bytes": disk, "offload": args.offload,
            }));
        }
    }
    let report = serde_json::json!({
        "model": {"dim": a.dim, "layers": a.layers, "seq": a.seq, "global_batch": a.batch, "vocab": a.vocab},
        "backend": "local (threads, one process)",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rows": rows,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    std::fs::remove_dir_all(&tmp).ok();
    println!("wrote {}", args.out.display());
    Ok(())
}
