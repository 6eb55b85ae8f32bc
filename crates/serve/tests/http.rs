//! The server over raw HTTP: completions and chat completions, streamed (SSE) and whole, with
//! usage counts; OpenAI-style 4xx errors after which it keeps serving; the concurrency limit;
//! graceful shutdown that lets a running stream finish.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use colossal_core::checkpoint::llama::save_llama;
use colossal_core::infer::{EngineConfig, StreamingConfig};
use colossal_core::models::llama::{init_params, Llama, LlamaConfig};
use colossal_data::tokenizer::LoadedTokenizer;
use colossal_serve::client::{request, stream_sse};
use colossal_serve::worker::Detokenizer;
use colossal_serve::{server, Limits, ServeOptions, Shared};
use serde_json::{json, Value};

fn shared() -> PathBuf {
    std::env::var("COLOSSAL_SHARED").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
        PathBuf::from,
    )
}

fn tokenizer() -> PathBuf {
    shared().join("data/tokenizers/llama2_32k/tokenizer.json")
}

fn options(model: PathBuf, max_concurrent: usize) -> ServeOptions {
    ServeOptions {
        model,
        tokenizer: Some(tokenizer()),
        chat_template: Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets/templates/llama2.jinja"),
        ),
        name: Some("tiny".into()),
        engine: EngineConfig {
            block_size: 16,
            num_blocks: 64,
            ..Default::default()
        },
        kv_cache_mb: 0,
        tp: 1,
        limits: Limits {
            max_body_bytes: 64 << 10,
            max_tokens: 120,
            max_concurrent,
            context: usize::MAX,
        },
    }
}

/// Starts a server on an ephemeral port; returns its address and the trigger that stops it.
async fn start(
    opts: ServeOptions,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Arc<Shared>,
) {
    let state = colossal_serve::start(&opts, &Device::Cpu).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = state.clone();
    let handle = tokio::spawn(async move {
        server::serve(s, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop, handle, state)
}

fn fixture_greedy() -> (Vec<u32>, Vec<u32>) {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/llama_tiny/reference.json")).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| {
        r["generation"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    (ids("prompt_ids"), ids("new_token_ids"))
}

async fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = request(addr, "POST", path, Some(body.to_string().as_bytes()))
        .await
        .unwrap();
    (r.status, r.json().unwrap())
}

/// Every `data:` payload of a streamed request, parsed (`[DONE]` as the string).
async fn sse(addr: &str, path: &str, body: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    stream_sse(addr, path, body.to_string().as_bytes(), &mut |d, _| {
        out.push(if d == "[DONE]" {
            json!("[DONE]")
        } else {
            serde_json::from_str(d)?
        });
        Ok(())
    })
    .await
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_stream_and_errors_over_raw_http() {
    let (addr, stop, handle, _) =
        start(options(shared().join("fixtures/llama_tiny/model"), 4)).await;
    let (prompt, want) = fixture_greedy();
    let tok = LoadedTokenizer::load(&tokenizer()).unwrap();
    let text_of = |ids: &[u32]| {
        let mut d = Detokenizer::default();
        let mut s: String = ids.iter().map(|&i| d.push(&tok, i)).collect();
        s.push_str(&d.flush(&tok));
        s
    };
    let want_text = text_of(&want);

    let r = request(&addr, "GET", "/health", None).await.unwrap();
    assert_eq!(
        (r.status, &r.json().unwrap()["status"]),
        (200, &json!("ok"))
    );
    let r = request(&addr, "GET", "/v1/models", None).await.unwrap();
    assert_eq!(r.json().unwrap()["data"][0]["id"], "tiny");
    let r = request(&addr, "GET", "/", None).await.unwrap();
    assert!(String::from_utf8_lossy(&r.body).contains("/v1/chat/completions"));

    // The fixture's greedy ids, as text, whole and streamed.
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0});
    let (status, v) = post(&addr, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want_text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15})
    );
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = sse(&addr, "/v1/completions", &streamed).await;
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want_text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let n = events.len();
    assert_eq!(events[n - 3]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[n - 2]["usage"]["completion_tokens"], 10);
    println!("streamed completion: {} events, text {text:?}", n);

    // Bad requests: 4xx with an OpenAI error body.
    let bad = |status: u16, body: &[u8], what: &'static str| {
        let addr = addr.clone();
        let body = body.to_vec();
        async move {
            let r = request(&addr, "POST", "/v1/completions", Some(&body))
                .await
                .unwrap();
            let v = r.json().unwrap();
            assert_eq!(r.status, status, "{what}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}: {v}"
            );
            assert!(v["error"]["type"].is_string(), "{what}: {v}");
            println!("{what}: {} {}", r.status, v["error"]);
            v
        }
    };
    // (status, body, what, error field, its value; "" = only that the body has a message).
    let cases: [(u16, &[u8], &str, &str, &str); 9] = [
        (
            400,
            b"{\"model\": \"tiny\", \"prompt\": ",
            "malformed JSON",
            "code",
            "invalid_json",
        ),
        (
            404,
            br#"{"model": "gpt-4", "prompt": "hi"}"#,
            "unknown model",
            "code",
            "model_not_found",
        ),
        (
            400,
            br#"{"model": "tiny", "prompt": [1, 2], "max_tokens": 5000}"#,
            "max_tokens over the limit",
            "param",
            "max_tokens",
        ),
        (
            400,
            br#"{"model": "tiny", "prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "max_tokens": 120}"#,
            "prompt + max_tokens past the context",
            "code",
            "context_length_exceeded",
        ),
        (
            400,
            br#"{"model": "tiny", "prompt": [1, 9999]}"#,
            "id outside the vocabulary",
            "param",
            "prompt",
        ),
        (
            400,
            br#"{"model": "tiny", "prompt": "hi", "n": 2}"#,
            "unsupported n",
            "param",
            "n",
        ),
        (
            400,
            br#"{"model": "tiny", "prompt": "hi", "temprature": 0.5}"#,
            "unknown field",
            "code",
            "invalid_request",
        ),
        (
            400,
            br#"{"model": "tiny", "prompt": [1, 2], "top_p": 1.5}"#,
            "top_p out of range",
            "param",
            "top_p",
        ),
        (
            400,
            br#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}"#,
            "chat body on /v1/completions",
            "param",
            "messages",
        ),
    ];
    for (status, body, what, field, value) in cases {
        let v = bad(status, body, what).await;
        assert_eq!(v["error"][field], value, "{what}: {v}");
    }
    let big = format!(
        r#"{{"model": "tiny", "prompt": "{}"}}"#,
        "a".repeat(100 << 10)
    );
    let v = bad(413, big.as_bytes(), "oversize body").await;
    assert_eq!(v["error"]["code"], "request_too_large");
    let (status, v) = post(&addr, "/v1/completions", &body).await;
    assert_eq!(
        (status, &v["choices"][0]["text"]),
        (200, &json!(want_text)),
        "still serving"
    );

    // Concurrent requests, batched by the engine, each get their own greedy text.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (addr, mut b) = (addr.clone(), body.clone());
        b["max_tokens"] = json!(4 + i);
        tasks.push(tokio::spawn(async move {
            post(&addr, "/v1/completions", &b).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200);
        let want_i = text_of(&want[..4 + i]);
        assert_eq!(v["choices"][0]["text"], want_i.as_str());
    }

    // Graceful shutdown: a running stream is finished, then the port closes.
    let mut long = streamed.clone();
    long["max_tokens"] = json!(100);
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let a = addr.clone();
    let running = tokio::spawn(async move {
        let mut out = Vec::new();
        stream_sse(
            &a,
            "/v1/completions",
            long.to_string().as_bytes(),
            &mut |d, _| {
                let _ = first_tx.send(());
                out.push(d.to_string());
                Ok(())
            },
        )
        .await
        .map(|_| out)
    });
    first_rx.recv().await.unwrap();
    stop.send(()).unwrap();
    let out = running.await.unwrap().unwrap();
    assert_eq!(out.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&out[out.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["completion_tokens"], 100,
        "the running request finished"
    );
    handle.await.unwrap();
    assert!(
        request(&addr, "GET", "/health", None).await.is_err(),
        "closed after shutdown"
    );
}

/// A random LLaMA with the llama2 tokenizer's 32000 ids, so chat templates tokenize.
fn random_chat_model(dir: &std::path::Path) -> PathBuf {
    let cfg: LlamaConfig = serde_json::from_value(json!({
        "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.5
    }))
    .unwrap();
    let model = Llama::new(cfg).unwrap();
    let params = init_params(&model, 1, &Device::Cpu).unwrap();
    let out = dir.join("chat-model");
    save_llama(&out, &model, &params, usize::MAX).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_stream_and_limit_concurrency() {
    let tmp = tempfile::tempdir().unwrap();
    let (addr, stop, handle, _) = start(options(random_chat_model(tmp.path()), 1)).await;
    let body = json!({"model": "tiny", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, whole) = post(&addr, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    let mut s = body.clone();
    s["stream"] = json!(true);
    let events = sse(&addr, "/v1/chat/completions", &s).await;
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        events[events.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "no usage unless asked"
    );

    // A stop string cuts the reply before it; the text does not contain it.
    let cut_at: String = text.chars().skip(3).take(2).collect();
    if !cut_at.trim().is_empty() {
        let mut b = body.clone();
        b["stop"] = json!([cut_at]);
        let (_, v) = post(&addr, "/v1/chat/completions", &b).await;
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(
            text.starts_with(got) && !got.contains(&cut_at),
            "{got:?} vs {text:?} cut at {cut_at:?}"
        );
    }

    // One slot: while a long request streams, another gets 429, and the first still completes.
    let mut long = body.clone();
    long["max_tokens"] = json!(110);
    long["stream"] = json!(true);
    long["stream_options"] = json!({"include_usage": true});
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let a = addr.clone();
    let first = tokio::spawn(async move {
        let mut usage = None;
        stream_sse(
            &a,
            "/v1/chat/completions",
            long.to_string().as_bytes(),
            &mut |d, _| {
                let _ = first_tx.send(());
                if d != "[DONE]" {
                    let v: Value = serde_json::from_str(d)?;
                    usage = v["usage"]["completion_tokens"].as_u64().or(usage);
                }
                Ok(())
            },
        )
        .await
        .map(|_| usage)
    });
    first_rx
        .recv()
        .await
        .expect("the long request started streaming");
    let (status, refused) = post(&addr, "/v1/chat/completions", &body).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["type"], "rate_limit_error");
    assert_eq!(first.await.unwrap().unwrap(), Some(110));
    let (status, _) = post(&addr, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "the slot is free again");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_server_gives_the_fixture_text() {
    let mut opts = options(shared().join("fixtures/llama_tiny/model"), 4);
    opts.tp = 2;
    let (addr, stop, handle, _) = start(opts).await;
    let (prompt, want) = fixture_greedy();
    let tok = LoadedTokenizer::load(&tokenizer()).unwrap();
    let mut d = Detokenizer::default();
    let mut want_text: String = want.iter().map(|&i| d.push(&tok, i)).collect();
    want_text.push_str(&d.flush(&tok));
    let mut tasks = Vec::new();
    for n in [10, 6, 8] {
        let a = addr.clone();
        let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0});
        tasks.push(tokio::spawn(async move {
            post(&a, "/v1/completions", &body).await
        }));
    }
    let (status, v) = tasks.remove(0).await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        want_text.as_str(),
        "tp 2 over HTTP"
    );
    for t in tasks {
        assert_eq!(t.await.unwrap().0, 200);
    }
    stop.send(()).unwrap();
    handle.await.unwrap();
}

async fn health(addr: &str) -> Value {
    request(addr, "GET", "/health", None)
        .await
        .unwrap()
        .json()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_llm_chat_past_the_context_and_a_client_that_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(random_chat_model(tmp.path()), 4);
    opts.engine.streaming = Some(StreamingConfig {
        sinks: 4,
        window: 60,
    });
    opts.limits.max_tokens = 5000;
    let (addr, stop, handle, _) = start(opts).await;
    // 4× the model's context of 256, the cache never above sinks + window (+ a block).
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me everything."}],
                      "max_tokens": 1024, "temperature": 0.8, "seed": 5, "ignore_eos": true});
    let a = addr.clone();
    let long = tokio::spawn(async move { post(&a, "/v1/chat/completions", &body).await });
    let mut peak = 0;
    while !long.is_finished() {
        peak = peak.max(health(&addr).await["cache_blocks_used"].as_u64().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let (status, v) = long.await.unwrap();
    assert_eq!(status, 200, "{v}");
    let usage = &v["usage"];
    println!("StreamingLLM chat: usage {usage}, peak {peak} cache blocks of 16 tokens");
    assert_eq!(usage["completion_tokens"], 1024);
    assert!(usage["total_tokens"].as_u64().unwrap() > 4 * 256);
    assert!((1..=5).contains(&peak), "peak {peak} blocks");

    // A client that goes away mid-stream: its request leaves the engine long before its 5000.
    let before = health(&addr).await["generated_tokens"].as_u64().unwrap();
    let body = json!({"model": "tiny", "prompt": "Once", "max_tokens": 5000, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let mut seen = 0;
    let r = stream_sse(
        &addr,
        "/v1/completions",
        body.to_string().as_bytes(),
        &mut |_, _| {
            seen += 1;
            anyhow::ensure!(seen < 3, "leaving");
            Ok(())
        },
    )
    .await;
    assert!(r.is_err());
    let mut idle = false;
    for _ in 0..2000 {
        let h = health(&addr).await;
        if h["running"] == 0 && h["waiting"] == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let made = health(&addr).await["generated_tokens"].as_u64().unwrap() - before;
    println!("a client left after {seen} events: the engine made {made} of its 5000 tokens");
    assert!(idle && made < 5000, "idle {idle}, made {made}");
    assert_eq!(health(&addr).await["cache_blocks_used"], 0);
    stop.send(()).unwrap();
    handle.await.unwrap();
}
