//! Local-backend collectives: results, byte counts, groups and failure handling.

use std::time::Duration;

use candle_core::{Device, Tensor};
use colossal_core::dist::{run_local, Communicator, ReduceOp};

const T: Duration = Duration::from_secs(20);

fn ramp(rank: usize, len: usize) -> Tensor {
    let v: Vec<f32> = (0..len).map(|i| (rank * 100 + i) as f32).collect();
    Tensor::from_vec(v, len, &Device::Cpu).unwrap()
}

#[test]
fn collectives_give_reference_results() {
    for n in [1usize, 2, 3, 4] {
        let len = 10; // not divisible by 3 or 4: exercises padding
        run_local(n, T, |c| {
            let r = c.rank();
            let x = ramp(r, len);
            let sum: Vec<f32> = c.all_reduce(&x, ReduceOp::Sum)?.to_vec1()?;
            let want: Vec<f32> = (0..len)
                .map(|i| (0..n).map(|k| (k * 100 + i) as f32).sum())
                .collect();
            assert_eq!(sum, want);
            let avg: Vec<f32> = c.all_reduce(&x, ReduceOp::Avg)?.to_vec1()?;
            assert!(avg
                .iter()
                .zip(&want)
                .all(|(a, w)| (a - w / n as f32).abs() < 1e-4));
            let max: Vec<f32> = c.all_reduce(&x, ReduceOp::Max)?.to_vec1()?;
            assert_eq!(max, ramp(n - 1, len).to_vec1::<f32>()?);
            // reduce_scatter of (n·2, 3): rank r gets rows 2r..2r+2 summed.
            let m = Tensor::arange(0f32, (n * 6) as f32, &Device::Cpu)?.reshape((n * 2, 3))?;
            let rs = c.reduce_scatter(&(&m + r as f64)?, ReduceOp::Sum)?;
            let base = m.narrow(0, 2 * r, 2)?;
            let expect = ((&base * n as f64)? + (0..n).sum::<usize>() as f64)?;
            assert_eq!(rs.to_vec2::<f32>()?, expect.to_vec2::<f32>()?);
            let g = c.all_gather(&Tensor::new(&[[r as f32, 1.0]], &Device::Cpu)?)?;
            assert_eq!(g.dims(), &[n, 2]);
            assert_eq!(
                g.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?,
                (0..n).map(|k| k as f32).collect::<Vec<_>>()
            );
            let b = c.broadcast(&x, n - 1)?;
            assert_eq!(b.to_vec1::<f32>()?, ramp(n - 1, len).to_vec1::<f32>()?);
            // all_to_all: rank r sends row j = 10r + j to rank j, receives 10k + r from each k.
            let rows: Vec<f32> = (0..n).map(|j| (10 * r + j) as f32).collect();
            let a = c.all_to_all(&Tensor::from_vec(rows, n, &Device::Cpu)?)?;
            assert_eq!(
                a.to_vec1::<f32>()?,
                (0..n).map(|k| (10 * k + r) as f32).collect::<Vec<_>>()
            );
            c.barrier()?;
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn all_reduce_sends_two_n_minus_one_over_n_of_the_tensor() {
    for n in [2usize, 4] {
        let elems = 1024;
        let sent = run_local(n, T, |c| {
            let before = c.stats().bytes_sent();
            c.all_reduce(&ramp(c.rank(), elems), ReduceOp::Sum)?;
            Ok(c.stats().bytes_sent() - before)
        })
        .unwrap();
        let theory = (2 * (n - 1) * elems * 4 / n) as u64;
        assert!(
            sent.iter().all(|&b| b == theory),
            "n={n}: {sent:?} vs {theory}"
        );
    }
}

#[test]
fn subgroups_reduce_independently() {
    run_local(4, T, |c| {
        let r = c.rank();
        let members: Vec<usize> = if r % 2 == 0 { vec![0, 2] } else { vec![1, 3] };
        let g = c.split(&members)?;
        assert_eq!(g.size(), 2);
        let s: Vec<f32> = g
            .all_reduce(&Tensor::new(&[r as f32], &Device::Cpu)?, ReduceOp::Sum)?
            .to_vec1()?;
        assert_eq!(s[0], if r % 2 == 0 { 2.0 } else { 4.0 });
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_failing_rank_is_named_not_hung() {
    let started = std::time::Instant::now();
    let err = run_local(3, Duration::from_secs(30), |c| {
        if c.rank() == 1 {
            return Err(colossal_core::msg!("injected failure"));
        }
        c.all_reduce(&ramp(c.rank(), 8), ReduceOp::Sum)?;
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rank 1") && err.contains("injected failure"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "peers must fail fast on a dead rank"
    );

    let err = run_local(2, Duration::from_millis(300), |c| {
        if c.rank() == 0 {
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(());
        }
        c.all_reduce(&ramp(c.rank(), 8), ReduceOp::Sum).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rank 0") && (err.contains("timeout") || err.contains("exited")),
        "{err}"
    );
}
