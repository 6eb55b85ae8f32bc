//! Pipeline parallelism: the block list is cut into stages, one (or, interleaved, several)
//! per rank; micro-batches flow forward through the stages and their gradients flow back.
//!
//! A schedule is, for each rank, a plain list of operations — forward `F`, backward `B` and,
//! for zero-bubble, a separate weight-gradient pass `W` — for (model chunk, micro-batch).
//! [`crate::parallel::pipeline_run`] executes such a list; [`replay`] plays it on a unit-cost
//! clock to get the schedule's own bubble, printed next to the theory.

use std::ops::Range;

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    F { chunk: usize, mb: usize },
    B { chunk: usize, mb: usize },
    W { chunk: usize, mb: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    GPipe,
    OneFOneB,
    /// Megatron's interleaved 1F1B with `chunks` model chunks (virtual stages) per rank.
    Interleaved {
        chunks: usize,
    },
    /// Zero-bubble ZB-H1: 1F1B whose backward is split into input-gradient (B) and
    /// weight-gradient (W) passes; W fills what would be bubbles.
    ZbH1,
}

impl Schedule {
    pub fn parse(name: &str, chunks: usize) -> Result<Self> {
        Ok(match name {
            "gpipe" => Schedule::GPipe,
            "1f1b" => Schedule::OneFOneB,
            "interleaved" => Schedule::Interleaved {
                chunks: chunks.max(2),
            },
            "zbh1" => Schedule::ZbH1,
            other => {
                return Err(Error::Config(format!(
                    "parallel.pp_schedule `{other}`: expected gpipe, 1f1b, interleaved or zbh1"
                )))
            }
        })
    }

    /// Model chunks per rank.
    pub fn chunks(&self) -> usize {
        match self {
            Schedule::Interleaved { chunks } => *chunks,
            _ => 1,
        }
    }

    /// Theoretical bubble fraction with F, B and W of equal cost: (p−1)/(m+p−1) for GPipe and
    /// 1F1B, (p−1)/(v·m+p−1) interleaved, (p−1)/(3m+p−1) for ZB-H1 (the zero-bubble paper's
    /// (p−1)(T_F+T_B−T_W) against 1F1B's (p−1)(T_F+T_B+T_W)).
    pub fn theoretical_bubble(&self, p: usize, m: usize) -> f64 {
        let (p, m) = (p as f64, m as f64);
        match self {
            Schedule::GPipe | Schedule::OneFOneB => (p - 1.0) / (m + p - 1.0),
            Schedule::Interleaved { chunks } => (p - 1.0) / (*chunks as f64 * m + p - 1.0),
            Schedule::ZbH1 => (p - 1.0) / (3.0 * m + p - 1.0),
        }
    }

    /// Operations of `rank` (of `p`) for `m` micro-batches.
    pub fn ops(&self, rank: usize, p: usize, m: usize) -> Result<Vec<Op>> {
        let f = |mb| Op::F { chunk: 0, mb };
        let b = |mb| Op::B { chunk: 0, mb };
        Ok(match self {
            Schedule::GPipe => (0..m).map(f).chain((0..m).map(b)).collect(),
            Schedule::OneFOneB => {
                let warmup = (p - rank - 1).min(m);
                let mut ops: Vec<Op> = (0..warmup).map(f).collect();
                for i in 0..m - warmup {
                    ops.push(f(warmup + i));
                    ops.push(b(i));
                }
                ops.extend((m - warmup..m).map(b));
                ops
            }
            Schedule::ZbH1 => zb_h1(rank, p, m),
            Schedule::Interleaved { chunks } => interleaved(rank, p, m, *chunks)?,
        })
    }
}

/// ZB-H1 on a unit clock: every rank runs 1F1B's F/B order, and whenever its next F or B is
/// not ready yet (it would idle), runs a pending W instead; leftover W passes close the list.
/// The lists are computed for all ranks together, then rank `rank`'s is returned: it is static,
/// like every other schedule.
fn zb_h1(rank: usize, p: usize, m: usize) -> Vec<Op> {
    use std::collections::{HashMap, VecDeque};
    let critical: Vec<Vec<Op>> = (0..p)
        .map(|r| {
            let warmup = (p - r - 1).min(m);
            let mut ops: Vec<Op> = (0..warmup).map(|mb| Op::F { chunk: 0, mb }).collect();
            for i in 0..m - warmup {
                ops.push(Op::F {
                    chunk: 0,
                    mb: warmup + i,
                });
                ops.push(Op::B { chunk: 0, mb: i });
            }
            ops.extend((m - warmup..m).map(|mb| Op::B { chunk: 0, mb }));
            ops
        })
        .collect();
    let mut next = vec![0usize; p];
    let mut pending: Vec<VecDeque<usize>> = vec![VecDeque::new(); p];
    let mut lists: Vec<Vec<Op>> = vec![Vec::new(); p];
    // (kind, stage, mb) → time the op ends.
    let mut done: HashMap<(bool, usize, usize), usize> = HashMap::new();
    let mut t = 0;
    while (0..p).any(|r| next[r] < critical[r].len()) {
        let mut finished = Vec::new();
        for r in 0..p {
            let ready = critical[r].get(next[r]).filter(|op| match **op {
                Op::F { mb, .. } => r == 0 || done.get(&(true, r - 1, mb)).is_some_and(|&e| e <= t),
                Op::B { mb, .. } if r + 1 == p => done.get(&(true, r, mb)).is_some_and(|&e| e <= t),
                Op::B { mb, .. } => done.get(&(false, r + 1, mb)).is_some_and(|&e| e <= t),
                Op::W { .. } => unreachable!("W is not on the critical list"),
            });
            if let Some(&op) = ready {
                lists[r].push(op);
                next[r] += 1;
                match op {
                    Op::F { mb, .. } => finished.push(((true, r, mb), t + 1)),
                    Op::B { mb, .. } => {
                        finished.push(((false, r, mb), t + 1));
                        pending[r].push_back(mb);
                    }
                    Op::W { .. } => {}
                }
            } else if let Some(mb) = pending[r].pop_front() {
                lists[r].push(Op::W { chunk: 0, mb });
            }
        }
        done.extend(finished);
        t += 1;
    }
    let mut ops = std::mem::take(&mut lists[rank]);
    ops.extend(pending[rank].drain(..).map(|mb| Op::W { chunk: 0, mb }));
    ops
}

/// Megatron's interleaved schedule: micro-batches go through the chunks in groups of p.
fn interleaved(rank: usize, p: usize, m: usize, v: usize) -> Result<Vec<Op>> {
    if !m.is_multiple_of(p) {
        return Err(Error::Config(format!(
            "the interleaved schedule needs micro-batches ({m}) to be a multiple of parallel.pp ({p})"
        )));
    }
    let total = m * v;
    // k-th forward (backward) of this rank: which chunk and micro-batch.
    let fwd = |k: usize| Op::F {
        chunk: (k / p) % v,
        mb: (k / (p * v)) * p + k % p,
    };
    let bwd = |k: usize| Op::B {
        chunk: v - 1 - (k / p) % v,
        mb: (k / (p * v)) * p + k % p,
    };
    let warmup = ((p - rank - 1) * 2 + (v - 1) * p).min(total);
    let mut ops: Vec<Op> = (0..warmup).map(fwd).collect();
    for i in 0..total - warmup {
        ops.push(fwd(warmup + i));
        ops.push(bwd(i));
    }
    ops.extend((total - warmup..total).map(bwd));
    Ok(ops)
}

/// Global stage of `chunk` on `rank`: chunks are dealt round-robin, so consecutive stages
/// sit on consecutive ranks.
pub fn stage_of(chunk: usize, rank: usize, p: usize) -> usize {
    chunk * p + rank
}

/// `n` units over `stages` stages as evenly as possible (earlier stages take the remainder),
/// or as `per_stage` says.
fn stage_counts(
    n: usize,
    stages: usize,
    per_stage: Option<&[usize]>,
    unit: &str,
) -> Result<Vec<usize>> {
    match per_stage {
        Some(c) => {
            if c.len() != stages || c.iter().sum::<usize>() != n || c.contains(&0) {
                return Err(Error::Config(format!(
                    "parallel.layers_per_stage {c:?} must give {stages} positive counts summing to the model's {n} {unit}"
                )));
            }
            Ok(c.to_vec())
        }
        None => {
            if n < stages {
                return Err(Error::Config(format!(
                    "{stages} pipeline stages need at least as many {unit}; the model has {n}"
                )));
            }
            Ok((0..stages)
                .map(|s| n / stages + usize::from(s < n % stages))
                .collect())
        }
    }
}

/// Splits `layers` decoder layers over `stages` stages as evenly as possible (earlier stages
/// take the remainder), or as `layers_per_stage` says. Block 0 (embedding) joins the first
/// stage and the last block (norm + head) the last, so stage s runs blocks `ranges[s]`.
pub fn partition(
    layers: usize,
    stages: usize,
    layers_per_stage: Option<&[usize]>,
) -> Result<Vec<Range<usize>>> {
    let counts = stage_counts(layers, stages, layers_per_stage, "layers")?;
    // Decoder layer l is block l + 1.
    let mut ranges = Vec::with_capacity(stages);
    let mut start = 1;
    for (s, n) in counts.iter().enumerate() {
        let lo = if s == 0 { 0 } else { start };
        let hi = start + n + usize::from(s + 1 == stages);
        ranges.push(lo..hi);
        start += n;
    }
    Ok(ranges)
}

/// Splits `blocks` blocks over `stages` stages, every block counting alike.
pub fn partition_blocks(
    blocks: usize,
    stages: usize,
    per_stage: Option<&[usize]>,
) -> Result<Vec<Range<usize>>> {
    let counts = stage_counts(blocks, stages, per_stage, "blocks")?;
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|n| {
            start += n;
            start - n..start
        })
        .collect())
}

/// Plays each rank's operations on a clock where F, B and W each take one unit (B two units
/// when it includes the weight gradients, i.e. without W), honouring the dependencies:
/// F(s, mb) after F(s−1, mb), B(s, mb) after B(s+1, mb) (or F(last, mb)), W after its B.
/// Returns the bubble: idle fraction of p × makespan.
pub fn replay(schedule: &Schedule, p: usize, m: usize) -> Result<f64> {
    use std::collections::HashMap;
    let split = matches!(schedule, Schedule::ZbH1);
    let v = schedule.chunks();
    let last = v * p - 1;
    let lists: Vec<Vec<Op>> = (0..p)
        .map(|r| schedule.ops(r, p, m))
        .collect::<Result<_>>()?;
    let mut pos = vec![0usize; p];
    let mut clock = vec![0usize; p];
    let mut done: HashMap<(char, usize, usize), usize> = HashMap::new();
    let mut busy = 0usize;
    loop {
        let mut progressed = false;
        for r in 0..p {
            let Some(&op) = lists[r].get(pos[r]) else {
                continue;
            };
            let (kind, chunk, mb) = match op {
                Op::F { chunk, mb } => ('F', chunk, mb),
                Op::B { chunk, mb } => ('B', chunk, mb),
                Op::W { chunk, mb } => ('W', chunk, mb),
            };
            let s = stage_of(chunk, r, p);
            let dep = match kind {
                'F' if s == 0 => Some(0),
                'F' => done.get(&('F', s - 1, mb)).copied(),
                'B' if s == last => done.get(&('F', s, mb)).copied(),
                'B' => done.get(&('B', s + 1, mb)).copied(),
                _ => done.get(&('B', s, mb)).copied(),
            };
            let Some(ready) = dep else { continue };
            let cost = if kind == 'B' && !split { 2 } else { 1 };
            let end = clock[r].max(ready) + cost;
            clock[r] = end;
            busy += cost;
            done.insert((kind, s, mb), end);
            pos[r] += 1;
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    if (0..p).any(|r| pos[r] < lists[r].len()) {
        return Err(crate::msg!(
            "pipeline schedule {schedule:?} deadlocks at p={p}, m={m}"
        ));
    }
    let makespan = *clock.iter().max().unwrap_or(&0);
    Ok(1.0 - busy as f64 / (p * makespan) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_balanced_with_embedding_first_and_head_last() {
        assert_eq!(partition(4, 2, None).unwrap(), vec![0..3, 3..6]);
        assert_eq!(partition(5, 2, None).unwrap(), vec![0..4, 4..7]);
        assert_eq!(partition(4, 4, None).unwrap(), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(partition(4, 2, Some(&[1, 3])).unwrap(), vec![0..2, 2..6]);
        assert!(partition(4, 2, Some(&[1, 2])).is_err());
        assert!(partition(2, 4, None).is_err());
    }

    #[test]
    fn every_schedule_runs_each_op_once_without_deadlock() {
        for p in [2usize, 4] {
            for m in [4usize, 8] {
                for s in [
                    Schedule::GPipe,
                    Schedule::OneFOneB,
                    Schedule::Interleaved { chunks: 2 },
                    Schedule::ZbH1,
                ] {
                    let bubble = replay(&s, p, m).unwrap();
                    let theory = s.theoretical_bubble(p, m);
                    assert!(
                        (bubble - theory).abs() < 0.12,
                        "{s:?} p={p} m={m}: {bubble} vs {theory}"
                    );
                    for r in 0..p {
                        let ops = s.ops(r, p, m).unwrap();
                        let per_mb = s.chunks() * if s == Schedule::ZbH1 { 3 } else { 2 };
                        assert_eq!(ops.len(), m * per_mb);
                        let unique: std::collections::HashSet<_> = ops.iter().collect();
                        assert_eq!(unique.len(), ops.len());
                    }
                }
            }
        }
        // The unit-cost replay of GPipe and 1F1B gives exactly (p−1)/(m+p−1).
        let b = replay(&Schedule::OneFOneB, 4, 8).unwrap();
        assert!((b - 3.0 / 11.0).abs() < 1e-12, "{b}");
    }
}
