//! `bench-serve`: N concurrent clients stream completions of a fixed prompt set from a
//! running server; requests/s, tokens/s, time to first token and per-token latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::client::stream_sse;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// "host:port".
    pub addr: String,
    pub model: String,
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another.
    pub requests_per_client: usize,
    pub max_tokens: usize,
    pub prompts: Vec<String>,
}

/// The fixed prompt set (`scripts/bench_prompts.txt`, which the transformers comparison reads
/// too): short English openings of different lengths.
pub fn default_prompts() -> Vec<String> {
    include_str!("../../../scripts/bench_prompts.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

struct Record {
    ttft: Duration,
    /// Between consecutive content events.
    gaps: Vec<Duration>,
    /// (last - first) / (tokens - 1).
    tpot: Option<Duration>,
    tokens: usize,
}

/// One streamed completion.
async fn one(opts: &BenchOptions, prompt: &str) -> Result<Record> {
    let body = json!({"model": opts.model, "prompt": prompt, "max_tokens": opts.max_tokens,
        "temperature": 0.0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}});
    let start = Instant::now();
    let mut times: Vec<Instant> = Vec::new();
    let mut tokens = 0usize;
    stream_sse(
        &opts.addr,
        "/v1/completions",
        body.to_string().as_bytes(),
        &mut |data, at| {
            if data == "[DONE]" {
                return Ok(());
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(e) = v.get("error") {
                bail!("server error: {e}");
            }
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                times.push(at);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            Ok(())
        },
    )
    .await?;
    let Some(first) = times.first().copied() else {
        bail!("no text came back for {prompt:?}");
    };
    let last = *times.last().expect("non-empty");
    Ok(Record {
        ttft: first - start,
        gaps: times.windows(2).map(|w| w[1] - w[0]).collect(),
        tpot: (tokens > 1).then(|| (last - first) / (tokens as u32 - 1)),
        tokens,
    })
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One row per concurrency level.
pub async fn run(opts: BenchOptions) -> Result<Value> {
    if opts.prompts.is_empty() || opts.clients.is_empty() || opts.requests_per_client == 0 {
        bail!("bench-serve: prompts, --clients and --requests-per-client must not be empty or 0");
    }
    let opts = Arc::new(opts);
    let mut rows = Vec::new();
    for &c in &opts.clients {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..c {
            let o = opts.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for r in 0..o.requests_per_client {
                    let p = &o.prompts[(client * o.requests_per_client + r) % o.prompts.len()];
                    out.push(one(&o, p).await?);
                }
                anyhow::Ok(out)
            }));
        }
        let mut recs = Vec::new();
        for t in tasks {
            recs.extend(t.await??);
        }
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = recs.iter().map(|r| r.tokens).sum();
        let mut ttft: Vec<f64> = recs.iter().map(|r| ms(r.ttft)).collect();
        let mut tpot: Vec<f64> = recs.iter().filter_map(|r| r.tpot.map(ms)).collect();
        let mut itl: Vec<f64> = recs
            .iter()
            .flat_map(|r| r.gaps.iter().copied().map(ms))
            .collect();
        let row = json!({
            "clients": c, "requests": recs.len(), "seconds": wall,
            "requests_per_s": recs.len() as f64 / wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens as f64 / wall,
            "ttft_ms": {"p50": pct(&mut ttft, 0.5), "p90": pct(&mut ttft, 0.9), "p99": pct(&mut ttft, 0.99)},
            "tpot_ms": {"p50": pct(&mut tpot, 0.5), "p90": pct(&mut tpot, 0.9), "p99": pct(&mut tpot, 0.99)},
            "itl_ms": {"p50": pct(&mut itl, 0.5), "p90": pct(&mut itl, 0.9), "p99": pct(&mut itl, 0.99)},
        });
        eprintln!(
            "{c:>3} clients: {:.2} req/s, {:.1} tokens/s, TTFT p50 {:.0} ms, per-token p50 {:.1} ms",
            row["requests_per_s"].as_f64().unwrap_or(0.0),
            row["output_tokens_per_s"].as_f64().unwrap_or(0.0),
            row["ttft_ms"]["p50"].as_f64().unwrap_or(0.0),
            row["tpot_ms"]["p50"].as_f64().unwrap_or(0.0),
        );
        rows.push(row);
    }
    Ok(json!({"model": opts.model, "max_tokens": opts.max_tokens,
              "requests_per_client": opts.requests_per_client, "runs": rows}))
}
