//! Shared by the CPU and CUDA op tests: the vocabulary-split cross-entropy run over threads,
//! one per rank, its row statistics reduced through a shared exchange.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Tensor, Var};
use colossal_kernels::Kernels::Fused;

struct Exchange {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

fn reducer(ex: Arc<Exchange>, rank: usize, fold: fn(f32, f32) -> f32) -> colossal_kernels::Reduce {
    Box::new(move |buf: &mut [f32]| {
        ex.slots.lock().unwrap()[rank] = buf.to_vec();
        ex.barrier.wait();
        let all = ex.slots.lock().unwrap().clone();
        ex.barrier.wait();
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().map(|s| s[i]).reduce(fold).unwrap();
        }
        Ok(())
    })
}

/// Each rank's loss and the gradient of its columns, with `logits` (rows, v) split by
/// vocabulary over `ranks` threads; the logits' device and dtype are kept.
pub fn split_cross_entropy(
    logits: &Tensor,
    targets: &[i64],
    ignore: i64,
    ranks: usize,
) -> Vec<(f32, Tensor)> {
    let ex = Arc::new(Exchange {
        slots: Mutex::new(vec![Vec::new(); ranks]),
        barrier: Barrier::new(ranks),
    });
    let (rows, v) = logits.dims2().unwrap();
    let per = v / ranks;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let ex = ex.clone();
                s.spawn(move || {
                    let mine = Var::from_tensor(&logits.narrow(1, r * per, per).unwrap()).unwrap();
                    let split = colossal_kernels::VocabSplit {
                        start: r * per,
                        all_max: reducer(ex.clone(), r, f32::max),
                        all_sum: reducer(ex, r, |a, b| a + b),
                    };
                    let (sum, n) = Fused
                        .cross_entropy_sum_split(mine.as_tensor(), targets, ignore, split)
                        .unwrap()
                        .expect("a fused kernel for these logits");
                    let counted = targets.iter().filter(|&&t| t != ignore).count();
                    assert_eq!(n, counted, "{rows} rows");
                    let g = sum
                        .backward()
                        .unwrap()
                        .get(mine.as_tensor())
                        .unwrap()
                        .clone();
                    (
                        sum.to_dtype(candle_core::DType::F32)
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap(),
                        g,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
