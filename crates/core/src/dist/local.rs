//! The `local` backend: N ranks as threads of one process, messages over channels.
//! A rank that fails drops its channels, so peers waiting on it get an error naming it at once;
//! a rank that hangs is reported when the receive timeout expires. Never a silent hang.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;

use super::comm::{CommStats, Communicator};
use crate::{Error, Result};

type Endpoints = (Vec<Sender<Tensor>>, Vec<Receiver<Tensor>>);
/// A group being created: its members' global ranks and its lineage.
type GroupKey = (Vec<usize>, Vec<u64>);

/// Channels of groups being created, keyed by (member list, lineage): the lineage — the
/// split counts from the world down to the new group — tells apart groups of the same members
/// made from different communicators.
#[derive(Default)]
struct Registry {
    pending: HashMap<GroupKey, Vec<Option<Endpoints>>>,
}

pub struct LocalComm {
    rank: usize,
    /// Global rank of each member (for messages that name a rank).
    global: Vec<usize>,
    to: Vec<Sender<Tensor>>,
    from: Vec<Receiver<Tensor>>,
    timeout: Duration,
    stats: CommStats,
    registry: Arc<Mutex<Registry>>,
    splits: std::cell::Cell<u64>,
    lineage: Vec<u64>,
}

fn mesh(n: usize) -> Vec<Endpoints> {
    // senders[src][dst], receivers[dst][src]
    let mut senders: Vec<Vec<Sender<Tensor>>> = (0..n).map(|_| Vec::with_capacity(n)).collect();
    let mut receivers: Vec<Vec<Option<Receiver<Tensor>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for (src, row) in senders.iter_mut().enumerate() {
        for (dst, inbox) in receivers.iter_mut().enumerate() {
            let (tx, rx) = channel();
            row.push(tx);
            inbox[src] = Some(rx);
            let _ = dst;
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .map(|(s, r)| (s, r.into_iter().map(|x| x.expect("filled")).collect()))
        .collect()
}

impl LocalComm {
    /// A world of one rank (ZeRO's machinery where nobody shares the state).
    pub fn alone(timeout: Duration) -> LocalComm {
        Self::world(1, timeout).pop().expect("one rank")
    }

    /// Communicators for a world of `n` ranks; element r belongs to rank r.
    pub fn world(n: usize, timeout: Duration) -> Vec<LocalComm> {
        let registry = Arc::new(Mutex::new(Registry::default()));
        mesh(n)
            .into_iter()
            .enumerate()
            .map(|(rank, (to, from))| LocalComm {
                rank,
                global: (0..n).collect(),
                to,
                from,
                timeout,
                stats: CommStats::default(),
                registry: registry.clone(),
                splits: std::cell::Cell::new(0),
                lineage: Vec::new(),
            })
            .collect()
    }

    fn peer_error(&self, peer: usize, what: &str) -> Error {
        Error::Comm {
            rank: self.global[self.rank],
            msg: format!("rank {} {what}", self.global[peer]),
        }
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.stats.record(t);
        self.to[dst]
            .send(t.copy()?)
            .map_err(|_| self.peer_error(dst, "has exited (failed or finished early)"))
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        match self.from[src].recv_timeout(self.timeout) {
            Ok(t) => Ok(t),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.peer_error(src, "has exited (failed or finished early)"))
            }
            Err(RecvTimeoutError::Timeout) => Err(self.peer_error(
                src,
                &format!("sent nothing within the {:?} timeout", self.timeout),
            )),
        }
    }

    fn stats(&self) -> &CommStats {
        &self.stats
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator>> {
        let me = members
            .iter()
            .position(|&m| m == self.rank)
            .ok_or_else(|| crate::msg!("split: rank {} is not among {members:?}", self.rank))?;
        let global: Vec<usize> = members.iter().map(|&m| self.global[m]).collect();
        let count = self.splits.get();
        self.splits.set(count + 1);
        let mut lineage = self.lineage.clone();
        lineage.push(count);
        let key = (global.clone(), lineage.clone());
        let (to, from) = {
            let mut reg = self.registry.lock().expect("registry lock");
            let slot = reg
                .pending
                .entry(key.clone())
                .or_insert_with(|| mesh(members.len()).into_iter().map(Some).collect());
            let mine = slot[me]
                .take()
                .expect("each member takes its endpoints once");
            if slot.iter().all(Option::is_none) {
                reg.pending.remove(&key);
            }
            mine
        };
        Ok(Box::new(LocalComm {
            rank: me,
            global,
            to,
            from,
            timeout: self.timeout,
            stats: CommStats::default(),
            registry: self.registry.clone(),
            splits: std::cell::Cell::new(0),
            lineage,
        }))
    }
}

/// Runs `f` on `n` threads, one local rank each. Returns each rank's result, or the first
/// failure — an error or a panic — naming its rank.
pub fn run_local<T, F>(n: usize, timeout: Duration, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(LocalComm) -> Result<T> + Sync,
{
    let comms = LocalComm::world(n, timeout);
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(s, move || f(comm))
                    .expect("spawn rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h.join() {
                Ok(r) => r.map_err(|e| match e {
                    e @ Error::Comm { .. } => e,
                    e => Error::Comm {
                        rank,
                        msg: e.to_string(),
                    },
                }),
                Err(_) => Err(Error::Comm {
                    rank,
                    msg: "panicked".into(),
                }),
            })
            .collect()
    });
    // Report the root cause: a rank's own failure before peers' "rank k has exited" errors.
    let mut first_err = None;
    let mut out = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                let is_echo =
                    e.to_string().contains("has exited") || e.to_string().contains("timeout");
                if first_err.as_ref().is_none_or(|(echo, _)| *echo && !is_echo) {
                    first_err = Some((is_echo, e));
                }
            }
        }
    }
    match first_err {
        Some((_, e)) => Err(e),
        None => Ok(out),
    }
}
