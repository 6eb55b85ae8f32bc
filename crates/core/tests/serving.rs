//! The serving engine: paged KV cache with continuous batching gives the ids of one request
//! at a time, and the `llama_tiny` fixture's greedy ids; prefix sharing, preemption, seeded
//! sampling, StreamingLLM and tensor parallelism keep to that.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use candle_core::{DType, Device};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::dist::{run_local, Communicator, Group};
use colossal_core::infer::{self, Engine, EngineConfig, Request, SamplingParams, StreamingConfig};
use colossal_core::models::llama::{generate, GenerateOptions, Llama, Sampling};
use colossal_core::parallel::tensor;
use colossal_core::params::Params;
use common::{fixture, greedy_ids, ids_1d};

fn tiny() -> (Llama, Params) {
    load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap()
}

fn fixture_greedy() -> (Vec<u32>, Vec<u32>) {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama_tiny/reference.json")).unwrap(),
    )
    .unwrap();
    let g = &r["generation"];
    (ids_1d(&g["prompt_ids"]), ids_1d(&g["new_token_ids"]))
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

fn req(prompt: &[u32], params: SamplingParams) -> Request {
    Request {
        prompt: prompt.to_vec(),
        params,
        keep_logits: false,
    }
}

/// Prompts of mixed lengths (the fixture's first), deterministic.
fn prompts() -> Vec<Vec<u32>> {
    let (fixture_prompt, _) = fixture_greedy();
    let mut out = vec![fixture_prompt];
    for (n, len) in [3usize, 17, 40, 9, 33, 1, 26].into_iter().enumerate() {
        out.push(
            (0..len)
                .map(|i| ((i * 37 + n * 101 + 5) % 509 + 3) as u32)
                .collect(),
        );
    }
    out
}

/// Each prompt alone through the engine.
fn one_at_a_time(
    model: &Llama,
    params: &Params,
    cfg: &EngineConfig,
    p: &[SamplingParams],
) -> Vec<Vec<u32>> {
    prompts()
        .iter()
        .zip(p)
        .map(|(pr, sp)| {
            let mut e =
                Engine::new(model.clone(), params.clone(), cfg.clone(), &Device::Cpu).unwrap();
            e.add_request(req(pr, sp.clone())).unwrap();
            e.run_to_end().unwrap().into_values().next().unwrap()
        })
        .collect()
}

/// All prompts through one engine, half of them arriving while the first half runs.
fn mid_batch(engine: &mut Engine, p: &[SamplingParams]) -> Vec<Vec<u32>> {
    let all = prompts();
    let mut ids = Vec::new();
    let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut joined_while_running = 0;
    for (i, (pr, sp)) in all.iter().zip(p).enumerate() {
        if i >= all.len() / 2 {
            // A few steps between arrivals: the newcomer joins a batch mid-generation.
            for _ in 0..3 {
                for o in engine.step().unwrap() {
                    out.entry(o.id).or_default().push(o.token);
                }
            }
            joined_while_running += (engine.num_running() > 0) as usize;
        }
        ids.push(engine.add_request(req(pr, sp.clone())).unwrap());
    }
    assert!(joined_while_running >= 3, "requests must arrive mid-batch");
    for (id, toks) in engine.run_to_end().unwrap() {
        out.entry(id).or_default().extend(toks);
    }
    ids.iter().map(|id| out[id].clone()).collect()
}

#[test]
fn paged_continuous_batching_gives_one_at_a_time_and_fixture_ids() {
    let (model, params) = tiny();
    let (_, want) = fixture_greedy();
    let sp: Vec<SamplingParams> = (0..prompts().len()).map(|i| greedy(10 + 3 * i)).collect();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 256,
        max_num_seqs: 8,
        max_batched_tokens: 24,
        streaming: None,
    };
    let alone = one_at_a_time(&model, &params, &cfg, &sp);
    // The contiguous-cache generator, prompt by prompt.
    for (pr, (a, s)) in prompts().iter().zip(alone.iter().zip(&sp)) {
        let g = greedy_ids(&model, &params, pr, s.max_tokens);
        assert_eq!(
            &g,
            a,
            "prompt of {} tokens: engine vs contiguous generate",
            pr.len()
        );
    }
    assert_eq!(alone[0][..want.len()], want[..], "the fixture's greedy ids");
    let mut engine = Engine::new(model, params, cfg, &Device::Cpu).unwrap();
    let batched = mid_batch(&mut engine, &sp);
    let st = engine.stats().clone();
    println!(
        "{} requests, {} steps, {} tokens generated, {} prompt tokens computed, peak {} blocks",
        sp.len(),
        st.steps,
        st.generated_tokens,
        st.prompt_tokens_computed,
        st.peak_blocks
    );
    assert_eq!(batched, alone);
    assert_eq!(batched[0][..want.len()], want[..]);
    assert!(
        st.steps < batched.iter().map(Vec::len).sum::<usize>(),
        "batched steps"
    );
    assert_eq!(
        engine.cache_usage().0,
        0,
        "every block returns to the free list"
    );
}

fn run_alone(model: &Llama, params: &Params, cfg: &EngineConfig, r: Request) -> Vec<u32> {
    let mut e = Engine::new(model.clone(), params.clone(), cfg.clone(), &Device::Cpu).unwrap();
    e.add_request(r).unwrap();
    e.run_to_end().unwrap().into_values().next().unwrap()
}

#[test]
fn shared_prefixes_and_preemption_keep_the_ids() {
    let (model, params) = tiny();
    let cfg = |num_blocks| EngineConfig {
        block_size: 4,
        num_blocks,
        max_num_seqs: 8,
        max_batched_tokens: 64,
        streaming: None,
    };
    // A 22-token "system prompt" shared by every request: 5 full blocks of 4.
    let system: Vec<u32> = (0..22).map(|i| (i * 13 + 7) % 500 + 3).collect();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|n| {
            let mut p = system.clone();
            p.extend((0..3 + n).map(|i| ((i * 29 + n * 71) % 500 + 3) as u32));
            p
        })
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_alone(&model, &params, &cfg(64), req(p, greedy(20))))
        .collect();
    let mut e = Engine::new(model.clone(), params.clone(), cfg(64), &Device::Cpu).unwrap();
    let first = e.add_request(req(&prompts[0], greedy(20))).unwrap();
    let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for o in e.step().unwrap() {
        out.entry(o.id).or_default().push(o.token);
    }
    let ids: Vec<u64> = std::iter::once(first)
        .chain(
            prompts[1..]
                .iter()
                .map(|p| e.add_request(req(p, greedy(20))).unwrap()),
        )
        .collect();
    for (id, t) in e.run_to_end().unwrap() {
        out.entry(id).or_default().extend(t);
    }
    let got: Vec<Vec<u32>> = ids.iter().map(|id| out[id].clone()).collect();
    let st = e.stats();
    println!(
        "prefix sharing: {} blocks reused, {} prompt tokens computed of {}",
        st.prefix_blocks_reused,
        st.prompt_tokens_computed,
        prompts.iter().map(Vec::len).sum::<usize>()
    );
    assert_eq!(got, alone);
    assert_eq!(
        st.prefix_blocks_reused,
        5 * 5,
        "five later requests reuse five blocks each"
    );

    // A pool of one context's worth (32 blocks of 4 = 128 slots) for six requests of up to
    // 47 tokens: sequences are preempted and recomputed, and the ids stay.
    let mut e = Engine::new(model, params, cfg(32), &Device::Cpu).unwrap();
    let long: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| p.iter().rev().copied().collect())
        .collect();
    let ids: Vec<u64> = long
        .iter()
        .map(|p| e.add_request(req(p, greedy(20))).unwrap())
        .collect();
    let out = e.run_to_end().unwrap();
    println!(
        "small pool: {} preemptions, peak {} blocks",
        e.stats().preemptions,
        e.stats().peak_blocks
    );
    assert!(e.stats().preemptions > 0);
    for (p, id) in long.iter().zip(ids) {
        assert_eq!(
            out[&id],
            run_alone(e.model(), &tiny().1, &cfg(64), req(p, greedy(20)))
        );
    }
}

#[test]
fn sampling_is_per_request_and_follows_hf_rules() {
    let (model, params) = tiny();
    let cfg = EngineConfig {
        block_size: 8,
        num_blocks: 64,
        ..Default::default()
    };
    let sp: Vec<SamplingParams> = (0..prompts().len())
        .map(|i| SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            top_p: Some(0.95),
            seed: 1000 + i as u64,
            max_tokens: 12,
            ..Default::default()
        })
        .collect();
    let alone = one_at_a_time(&model, &params, &cfg, &sp);
    let mut e = Engine::new(model.clone(), params.clone(), cfg.clone(), &Device::Cpu).unwrap();
    assert_eq!(
        mid_batch(&mut e, &sp),
        alone,
        "a seeded request samples alike in any batch"
    );
    assert_ne!(alone[1], alone[2]);

    // Repetition penalty as HF applies it, against a whole-sequence forward by hand.
    let prompt = prompts()[3].clone();
    let rp = SamplingParams {
        repetition_penalty: 0.2,
        max_tokens: 8,
        ..Default::default()
    };
    let got = run_alone(&model, &params, &cfg, req(&prompt, rp));
    let mut seq = prompt.clone();
    for _ in 0..8 {
        let ids = candle_core::Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let inp = colossal_core::models::llama::AttnInputs::causal(
            &model.cfg,
            &model.rope,
            1,
            seq.len(),
            None,
            &Device::Cpu,
        )
        .unwrap();
        let logits = model.forward(&params, &ids, &inp).unwrap();
        let mut row: Vec<f32> = logits
            .get(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut seen = seq.clone();
        seen.sort();
        seen.dedup();
        for t in seen {
            let x = &mut row[t as usize];
            *x = if *x > 0.0 { *x / 0.2 } else { *x * 0.2 };
        }
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        seq.push(best as u32);
    }
    assert_eq!(got, seq[prompt.len()..]);
    let plain = run_alone(&model, &params, &cfg, req(&prompt, greedy(8)));
    assert_ne!(
        got, plain,
        "a penalty below 1 favours seen ids: the continuation changes"
    );

    // Stop ids end a request with the id kept; `max_tokens` ends it as Length.
    let (fp, want) = fixture_greedy();
    let mut e = Engine::new(model, params, cfg, &Device::Cpu).unwrap();
    let stop = SamplingParams {
        stop_ids: vec![want[3]],
        max_tokens: 10,
        ..Default::default()
    };
    e.add_request(req(&fp, stop)).unwrap();
    e.add_request(req(&fp, greedy(2))).unwrap();
    let mut finals = Vec::new();
    while e.has_work() {
        for o in e.step().unwrap() {
            if let Some(f) = o.finish {
                finals.push((o.id, f, o.completion_tokens, o.prompt_tokens));
            }
        }
    }
    use colossal_core::infer::FinishReason::{Length, Stop};
    assert_eq!(
        finals,
        vec![(1, Length, 2, fp.len()), (0, Stop, 4, fp.len())]
    );
}

#[test]
fn tensor_parallel_engine_gives_one_ranks_ids() {
    let (model, params) = tiny();
    let sp: Vec<SamplingParams> = (0..prompts().len()).map(|i| greedy(6 + i)).collect();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 96,
        max_batched_tokens: 32,
        ..Default::default()
    };
    let mut e = Engine::new(model.clone(), params.clone(), cfg.clone(), &Device::Cpu).unwrap();
    let want = mid_batch(&mut e, &sp);
    let per_rank = run_local(2, Duration::from_secs(60), |comm| {
        let rank = comm.rank();
        let local = tensor::shard_params(&params, &model.tp_plan(), rank, 2)?;
        let group = Group::new(Box::new(comm));
        let mut e = infer::tensor_parallel(&model, local, group, cfg.clone(), &Device::Cpu)?;
        Ok(mid_batch(&mut e, &sp))
    })
    .unwrap();
    for (rank, got) in per_rank.iter().enumerate() {
        assert_eq!(got, &want, "rank {rank}");
    }
}

/// StreamingLLM by hand on contiguous caches: before each token, if the cache would pass
/// `sinks + window`, cut the oldest tokens after the sinks and turn the kept keys back with
/// the model's own rotary op; positions are places in the cache. Teacher-forced with `feed`.
fn streaming_reference(
    model: &Llama,
    params: &Params,
    prompt: &[u32],
    feed: &[u32],
    st: StreamingConfig,
) -> Vec<Vec<f32>> {
    use candle_core::Tensor;
    use colossal_core::models::llama::AttnInputs;
    let dev = Device::Cpu;
    let cap = st.sinks + st.window;
    let inv_freq = model.rope.inv_freq(cap);
    let mut caches = model.empty_caches();
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for step in 0..=feed.len() {
        let len = caches[0].len();
        let over = (len + next.len()).saturating_sub(cap);
        if over > 0 {
            let angles: Vec<f32> = inv_freq.iter().map(|f| -(over as f32) * f).collect();
            let keep = len - st.sinks - over;
            let table = |f: fn(f32) -> f32| {
                let row: Vec<f32> = angles.iter().chain(&angles).map(|a| f(*a)).collect();
                Tensor::from_vec(row.repeat(keep), (1, keep, angles.len() * 2), &dev).unwrap()
            };
            let (cos, sin) = (table(f32::cos), table(f32::sin));
            for c in caches.iter_mut() {
                let cut = |t: &Tensor, turn: bool| {
                    let tail = t
                        .narrow(2, st.sinks + over, keep)
                        .unwrap()
                        .contiguous()
                        .unwrap();
                    let tail = if turn {
                        model.kernels.rotary(&tail, &cos, &sin).unwrap()
                    } else {
                        tail
                    };
                    Tensor::cat(&[&t.narrow(2, 0, st.sinks).unwrap(), &tail], 2).unwrap()
                };
                c.k = Some(cut(c.k.as_ref().unwrap(), true));
                c.v = Some(cut(c.v.as_ref().unwrap(), false));
            }
        }
        let len = caches[0].len();
        let positions = vec![(len as u32..(len + next.len()) as u32).collect::<Vec<_>>()];
        let inp =
            AttnInputs::new(&model.cfg, &model.rope, &positions, len, None, None, &dev).unwrap();
        let ids = Tensor::from_vec(next.clone(), (1, next.len()), &dev).unwrap();
        let logits = model
            .forward_cached(params, &ids, &inp, &mut caches)
            .unwrap();
        out.push(
            logits
                .get(0)
                .unwrap()
                .get(next.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        if step < feed.len() {
            next = vec![feed[step]];
        }
    }
    out
}

#[test]
fn streaming_llm_runs_four_contexts_in_bounded_memory() {
    let (model, params) = tiny();
    let (prompt, _) = fixture_greedy();
    let ctx = model.cfg.max_position_embeddings;
    let st = StreamingConfig {
        sinks: 4,
        window: 60,
    };
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 40,
        streaming: Some(st),
        ..Default::default()
    };
    let n = 4 * ctx;
    let mut e = Engine::new(model.clone(), params.clone(), cfg, &Device::Cpu).unwrap();
    e.add_request(Request {
        prompt: prompt.clone(),
        params: SamplingParams {
            temperature: 0.8,
            seed: 3,
            max_tokens: n,
            ..Default::default()
        },
        keep_logits: true,
    })
    .unwrap();
    let (mut ids, mut logits) = (Vec::new(), Vec::new());
    while e.has_work() {
        for o in e.step().unwrap() {
            ids.push(o.token);
            logits.push(o.logits.unwrap());
        }
    }
    let (peak, block_bytes) = (e.stats().peak_blocks, e.cache_usage().1);
    println!(
        "StreamingLLM: {} tokens ({}× the context of {ctx}) through a cache of at most {peak} blocks \
         = {} KiB (sinks {} + window {}; a plain cache would need {} KiB and stops at {ctx})",
        prompt.len() + n,
        (prompt.len() + n) / ctx,
        peak * block_bytes / 1024,
        st.sinks,
        st.window,
        (prompt.len() + n).div_ceil(4) * block_bytes / 1024,
    );
    assert_eq!(ids.len(), n);
    assert!(
        peak <= (st.sinks + st.window).div_ceil(4) + 1,
        "peak {peak} blocks"
    );

    // Within the window: plain attention's logits (the contiguous generator, same tokens).
    let within = st.sinks + st.window - prompt.len() + 1;
    let plain_opts = GenerateOptions {
        max_new_tokens: within,
        sampling: Sampling::Sample {
            temperature: 0.8,
            top_k: None,
            top_p: None,
            seed: 3,
        },
        stop_ids: vec![],
        pad_id: 0,
    };
    let (plain_ids, plain_logits) = generate(
        &model,
        &params,
        std::slice::from_ref(&prompt),
        &plain_opts,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(plain_ids[0], ids[..within]);
    let worst = plain_logits
        .iter()
        .zip(&logits)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    println!(
        "within the window ({within} steps): largest logit difference to plain attention {worst:e}"
    );
    assert!(worst < 1e-4, "{worst}");

    // Past it: the hand-made contiguous StreamingLLM, fed the same tokens.
    let reference = streaming_reference(&model, &params, &prompt, &ids[..n - 1], st);
    let worst = reference
        .iter()
        .zip(&logits)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    println!("all {n} steps: largest logit difference to the contiguous StreamingLLM {worst:e}");
    assert!(worst < 1e-3, "{worst}");
}

#[test]
fn the_engine_serves_mixtral() {
    let dir = fixture("mixtral_tiny");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |k: &str| ids_1d(&r[k]);
    let (model, params) = load_llama(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_batched_tokens: 16,
        ..Default::default()
    };
    let sp: Vec<SamplingParams> = (0..prompts().len()).map(|i| greedy(10 + i)).collect();
    let mut all = prompts();
    all[0] = ids("prompt_ids");
    let alone: Vec<Vec<u32>> = all
        .iter()
        .zip(&sp)
        .map(|(p, s)| run_alone(&model, &params, &cfg, req(p, s.clone())))
        .collect();
    assert_eq!(alone[0], ids("greedy_ids"), "transformers' greedy ids");
    let mut e = Engine::new(model, params, cfg, &Device::Cpu).unwrap();
    let got: Vec<u64> = all
        .iter()
        .zip(&sp)
        .map(|(p, s)| e.add_request(req(p, s.clone())).unwrap())
        .collect();
    let out = e.run_to_end().unwrap();
    for (id, want) in got.iter().zip(&alone) {
        assert_eq!(&out[id], want);
    }
}
