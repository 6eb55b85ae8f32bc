//! `llama-pretrain bench-moe`: a Mixtral-style model trained on the same global batch at
//! expert-parallel degrees 1, 2, 4 (ep ranks, each also a data-parallel rank): median step
//! time, tokens/s, this rank's parameter bytes, and the bytes its expert group and all its
//! groups send per step; JSON written atomically.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use candle_core::Device;
use colossal_core::config::parse_config;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::{TrainConfig, Trainer};

use crate::bench_parallel::BenchRun;

#[derive(clap::Args, Debug)]
pub struct BenchMoeArgs {
    /// Expert-parallel degrees to compare (each runs that many local ranks).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub ep: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Each expert's intermediate size.
    #[arg(long, default_value_t = 512)]
    pub ffn: usize,
    #[command(flatten)]
    pub run: BenchRun,
    #[arg(long, default_value = "bench_moe.json")]
    pub out: PathBuf,
}

pub fn run(args: &BenchMoeArgs) -> Result<()> {
    let a = &args.run;
    let tmp = a.data_dir("bench-moe")?;
    let text = format!(
        "[model.config]\nvocab_size = {}\nhidden_size = {}\nintermediate_size = {}\n\
         num_hidden_layers = {}\nnum_attention_heads = 4\nnum_local_experts = {}\n\
         num_experts_per_tok = {}\nrouter_aux_loss_coef = 0.02\n[data]\npath = {:?}\n[train]\n\
         out_dir = {:?}\nbatch_size = {}\nmicro_batch_size = 1\nmax_steps = 1000\nlr = 1e-3\n\
         grad_clip = 1.0\neval_every = 100000\nsave_every = 100000\n",
        a.vocab,
        a.dim,
        args.ffn,
        a.layers,
        args.experts,
        args.top_k,
        tmp.display().to_string(),
        tmp.join("out").display().to_string(),
        a.batch,
    );
    println!(
        "{:>3} {:>10} {:>10} {:>14} {:>16} {:>16}",
        "ep", "step_s", "tokens/s", "params_B", "ep_sent_B/step", "all_sent_B/step"
    );
    let mut rows = Vec::new();
    for &ep in &args.ep {
        let ov = [format!("parallel.nproc={ep}"), format!("parallel.ep={ep}")];
        let cfg: TrainConfig = parse_config(&text, "bench-moe", &ov)?;
        let per_rank = run_local(ep, Duration::from_secs(600), |comm| {
            let comm: Box<dyn Communicator> = Box::new(comm);
            let mut t =
                Trainer::new_rank(cfg.clone(), None, Device::Cpu, (ep > 1).then_some(comm))?;
            let expert_bytes = |t: &Trainer| t.expert_traffic().map_or(0, |x| x.bytes_sent);
            t.train_step()?;
            let before = expert_bytes(&t);
            let (step_s, sent) = a.timed_steps(&mut t)?;
            let steps = a.steps as u64;
            let ep_sent = (expert_bytes(&t) - before) / steps;
            Ok((
                step_s,
                t.memory_bytes().0,
                ep_sent,
                sent.iter().sum::<u64>() / steps,
            ))
        })?;
        let (step_s, params, ep_sent, all_sent) = per_rank[0];
        let tokens_s = (a.batch * a.seq) as f64 / step_s;
        println!(
            "{ep:>3} {step_s:>10.3} {tokens_s:>10.0} {params:>14} {ep_sent:>16} {all_sent:>16}"
        );
        rows.push(serde_json::json!({
            "ep": ep, "ranks": ep, "step_s_median": step_s, "tokens_per_s": tokens_s,
            "params_bytes_rank0": params, "expert_bytes_sent_per_step_rank0": ep_sent,
            "bytes_sent_per_step_rank0": all_sent,
        }));
    }
    let report = serde_json::json!({
        "model": {"dim": a.dim, "ffn": args.ffn, "layers": a.layers, "experts": args.experts,
                  "top_k": args.top_k, "seq": a.seq, "global_batch": a.batch, "vocab": a.vocab},
        "backend": "local (threads, one process)",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rows": rows,
    });
    let json = serde_json::to_string_pretty(&report)?;
    colossal_core::checkpoint::atomic::write_file(&args.out, json.as_bytes())?;
    std::fs::remove_dir_all(&tmp).ok();
    println!("wrote {}", args.out.display());
    Ok(())
}
