//! Per-op fused vs reference: forward + backward time (median of repeats) and bytes
//! allocated, at the shapes of the `llama-pretrain bench` step. `cargo bench -p
//! colossal-kernels` prints one JSON line per op and writes `kernels-bench.json`.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use colossal_kernels::Kernels;

/// Counts every byte allocated (the figure the fused kernels lower by not materialising
/// intermediates), over mimalloc as the binaries use (the system allocator's returning
/// memory to the kernel and faulting it back would swamp the timings).
struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size() as u64, Ordering::Relaxed);
        unsafe { MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new.saturating_sub(l.size()) as u64, Ordering::Relaxed);
        unsafe { MiMalloc.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

type Op = dyn Fn(Kernels, &[Tensor]) -> Result<Tensor>;

/// Median seconds and bytes allocated of forward + backward of Σ op(inputs).
fn measure(op: &Op, k: Kernels, inputs: &[Tensor]) -> (f64, u64) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let once = || {
        let y = op(k, &ts).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        drop(g);
    };
    once();
    let mut times = Vec::new();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let reps = 20;
    for _ in 0..reps {
        let t0 = Instant::now();
        once();
        times.push(t0.elapsed().as_secs_f64());
    }
    let bytes = (ALLOCATED.load(Ordering::Relaxed) - before) / reps as u64;
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], bytes)
}

fn main() {
    let (b, t, d, h, ffn, v) = (8, 256, 256, 4, 688, 2048);
    let hd = d / h;
    let targets: Vec<i64> = (0..b * t).map(|i| (i * 31 % v) as i64).collect();
    let ops: Vec<(&str, Box<Op>, Vec<Tensor>)> = vec![
        (
            "rms_norm (B·T, D)",
            Box::new(|k, x| k.rms_norm(&x[0], &x[1], 1e-5)),
            vec![random(&[b * t, d], 1), random(&[d], 2)],
        ),
        (
            "layer_norm (B·T, D)",
            Box::new(|k, x| k.layer_norm(&x[0], &x[1], &x[2], 1e-5)),
            vec![random(&[b * t, d], 21), random(&[d], 22), random(&[d], 23)],
        ),
        (
            "group_norm (B, 320, 32, 32), 32 groups",
            Box::new(|k, x| k.group_norm(&x[0], 32, &x[1], &x[2], 1e-5)),
            vec![
                random(&[2, 320, 32, 32], 24),
                random(&[320], 25),
                random(&[320], 26),
            ],
        ),
        (
            "softmax (B, H, T, T)",
            Box::new(|k, x| k.softmax(&x[0])),
            vec![random(&[b, h, t, t], 3)],
        ),
        (
            "swiglu (B·T, F)",
            Box::new(|k, x| k.swiglu(&x[0], &x[1])),
            vec![random(&[b * t, ffn], 4), random(&[b * t, ffn], 5)],
        ),
        (
            "rotary (B, H, T, hd)",
            Box::new(|k, x| k.rotary(&x[0], &x[1], &x[2])),
            vec![
                random(&[b, h, t, hd], 6),
                random(&[b, t, hd], 7),
                random(&[b, t, hd], 8),
            ],
        ),
        (
            "cross_entropy (B·T, V)",
            Box::new(move |k, x| Ok(k.cross_entropy_sum(&x[0], &targets, -100)?.0)),
            vec![random(&[b * t, v], 9)],
        ),
    ];
    let mut rows = Vec::new();
    for (name, op, inputs) in &ops {
        let (tf, bf) = measure(op.as_ref(), Kernels::Fused, inputs);
        let (tr, br) = measure(op.as_ref(), Kernels::Reference, inputs);
        let row = format!(
            "{{\"op\": \"{name}\", \"fused_ms\": {:.3}, \"reference_ms\": {:.3}, \"speedup\": {:.2}, \"fused_bytes\": {bf}, \"reference_bytes\": {br}}}",
            tf * 1e3,
            tr * 1e3,
            tr / tf
        );
        println!("{row}");
        rows.push(row);
    }
    let json = format!("[\n  {}\n]\n", rows.join(",\n  "));
    std::fs::write("kernels-bench.json", json).expect("write kernels-bench.json");
}
