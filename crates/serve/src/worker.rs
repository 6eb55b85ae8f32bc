//! The engine's thread: takes jobs from the HTTP handlers, steps the engine while any request
//! runs, turns each request's new ids into text (stop strings cut it), and sends the pieces
//! to the request's channel. A request whose client has gone is aborted.

use std::collections::HashMap;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use colossal_core::infer::{Engine, FinishReason, Output, Request, SamplingParams};
use colossal_data::tokenizer::LoadedTokenizer;
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver, UnboundedSender};

/// What the engine is doing, for `/health`.
#[derive(Default)]
pub struct Load {
    running: AtomicUsize,
    waiting: AtomicUsize,
    generated: AtomicUsize,
    cache_blocks: AtomicUsize,
}

impl Load {
    fn publish(&self, e: &Engine) {
        self.running.store(e.num_running(), Ordering::Relaxed);
        self.waiting.store(e.num_waiting(), Ordering::Relaxed);
        self.generated
            .store(e.stats().generated_tokens, Ordering::Relaxed);
        self.cache_blocks
            .store(e.cache_usage().0, Ordering::Relaxed);
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "running": self.running.load(Ordering::Relaxed),
            "waiting": self.waiting.load(Ordering::Relaxed),
            "generated_tokens": self.generated.load(Ordering::Relaxed),
            "cache_blocks_used": self.cache_blocks.load(Ordering::Relaxed),
        })
    }
}

/// One generation asked by a handler.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Text that ends the completion (not part of it).
    pub stop: Vec<String>,
    /// Ids that end it and are not shown (EOS).
    pub hidden_stop_ids: Vec<u32>,
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text of the completion.
    Text(String),
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Turns ids into text piece by piece as TGI and vLLM do: a piece is the decode of a short
/// window of ids minus the decode of its start, so SentencePiece's space handling and
/// multi-token characters come out right; a piece that ends in an incomplete character waits.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// The text `id` adds (empty while it waits for the rest of a character).
    pub fn push(&mut self, tok: &LoadedTokenizer, id: u32) -> String {
        self.ids.push(id);
        self.piece(tok, false)
    }

    /// Whatever is still held back.
    pub fn flush(&mut self, tok: &LoadedTokenizer) -> String {
        self.piece(tok, true)
    }

    fn piece(&mut self, tok: &LoadedTokenizer, last: bool) -> String {
        let before = tok
            .decode(&self.ids[self.prefix..self.read])
            .unwrap_or_default();
        let now = tok.decode(&self.ids[self.prefix..]).unwrap_or_default();
        if now.len() <= before.len() || (!last && now.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let start = (0..=before.len())
            .rev()
            .find(|&i| now.is_char_boundary(i))
            .unwrap_or(0);
        self.prefix = self.read;
        self.read = self.ids.len();
        now[start..].to_string()
    }
}

struct Live {
    events: UnboundedSender<Event>,
    stop: Vec<String>,
    hidden: Vec<u32>,
    detok: Detokenizer,
    /// The completion's text so far, and how much of it was sent.
    text: String,
    sent: usize,
}

impl Live {
    /// Adds `piece`; sends what is safe to send (a tail that may begin a stop string waits).
    /// Returns whether a stop string was found (the text before it is sent).
    fn advance(&mut self, piece: &str, last: bool) -> bool {
        self.text.push_str(piece);
        let text = &self.text;
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let from = self.sent.saturating_sub(longest);
        let from = (0..=from)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .stop
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        let mut end = hit.unwrap_or(text.len());
        if hit.is_none() && !last {
            for s in &self.stop {
                if let Some(k) = (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
                {
                    end = end.min(text.len() - k);
                }
            }
        }
        if end > self.sent {
            let _ = self
                .events
                .send(Event::Text(text[self.sent..end].to_string()));
            self.sent = end;
        }
        hit.is_some()
    }
}

/// Runs until every job sender is dropped and the last request is done.
pub fn run(
    engine: Engine,
    followers: Vec<Sender<Mirror>>,
    tok: Arc<LoadedTokenizer>,
    mut jobs: UnboundedReceiver<Job>,
    load: Arc<Load>,
) {
    let mut engine = Driver { engine, followers };
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut open = true;
    loop {
        load.publish(&engine.engine);
        // Block for work when idle; otherwise take what has arrived and step.
        if !engine.has_work() {
            if !open {
                return;
            }
            match jobs.blocking_recv() {
                Some(job) => submit(&mut engine, &mut live, job),
                None => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => submit(&mut engine, &mut live, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let outputs = match engine.step() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for (id, l) in live.drain() {
                    let _ = l.events.send(Event::Error(e.to_string()));
                    engine.abort(id);
                }
                continue;
            }
        };
        for o in outputs {
            let Some(l) = live.get_mut(&o.id) else {
                continue;
            };
            let hidden = l.hidden.contains(&o.token);
            let last = o.finish.is_some() || hidden;
            let mut piece = if hidden {
                String::new()
            } else {
                l.detok.push(&tok, o.token)
            };
            if last {
                piece.push_str(&l.detok.flush(&tok));
            }
            let stopped = l.advance(&piece, last);
            let finish = if stopped || hidden {
                Some("stop")
            } else {
                o.finish.map(|f| match f {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                })
            };
            let gone = l.events.is_closed();
            if let Some(finish) = finish {
                let _ = l.events.send(Event::Done {
                    finish,
                    prompt_tokens: o.prompt_tokens,
                    completion_tokens: o.completion_tokens,
                });
            }
            if finish.is_some() || gone {
                if o.finish.is_none() {
                    engine.abort(o.id);
                }
                live.remove(&o.id);
            }
        }
    }
}

fn submit(engine: &mut Driver, live: &mut HashMap<u64, Live>, job: Job) {
    let mut params = job.params;
    params.stop_ids.extend(&job.hidden_stop_ids);
    let req = Request {
        prompt: job.prompt,
        params,
        keep_logits: false,
    };
    match engine.add_request(req) {
        Ok(id) => {
            live.insert(
                id,
                Live {
                    events: job.events,
                    stop: job.stop,
                    hidden: job.hidden_stop_ids,
                    detok: Detokenizer::default(),
                    text: String::new(),
                    sent: 0,
                },
            );
        }
        Err(e) => {
            let _ = job.events.send(Event::Error(e.to_string()));
        }
    }
}

/// What the first tensor-parallel rank tells the others, so every rank's engine sees the
/// same requests and steps together (its collectives run inside `step`).
pub enum Mirror {
    Add(Request),
    Abort(u64),
    Step,
}

/// The engine of the first rank, repeating every change to the other ranks' engines.
struct Driver {
    engine: Engine,
    followers: Vec<Sender<Mirror>>,
}

impl Driver {
    fn has_work(&self) -> bool {
        self.engine.has_work()
    }

    fn add_request(&mut self, req: Request) -> colossal_core::Result<u64> {
        let id = self.engine.add_request(req.clone())?;
        for f in &self.followers {
            let _ = f.send(Mirror::Add(req.clone()));
        }
        Ok(id)
    }

    fn abort(&mut self, id: u64) -> bool {
        for f in &self.followers {
            let _ = f.send(Mirror::Abort(id));
        }
        self.engine.abort(id)
    }

    fn step(&mut self) -> colossal_core::Result<Vec<Output>> {
        for f in &self.followers {
            let _ = f.send(Mirror::Step);
        }
        self.engine.step()
    }
}

/// Another tensor-parallel rank: does what the first rank does, until it hangs up.
pub fn follow(mut engine: Engine, orders: Receiver<Mirror>) {
    for m in orders {
        let r = match m {
            Mirror::Add(req) => engine.add_request(req).map(drop),
            Mirror::Abort(id) => {
                engine.abort(id);
                Ok(())
            }
            Mirror::Step => engine.step().map(drop),
        };
        if let Err(e) = r {
            tracing::error!("a tensor-parallel rank: {e}");
        }
    }
}
