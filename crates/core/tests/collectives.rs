//! Autograd-aware collectives, checked against the single-rank computation they stand for and by
//! central differences; and the process mesh.

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use colossal_core::dist::autograd::{
    all_to_all, copy_to, gather_from, reduce_from, scatter_reduce, split_to,
};
use colossal_core::dist::{run_local, Axis, Communicator, Group, ParallelDims, ProcessMesh};

const T: Duration = Duration::from_secs(30);

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    // Deterministic, distinct per seed, identical on every rank.
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(31));
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)
}

/// Megatron MLP: y = g( gelu(f(x) · W1_colshard) · W2_rowshard ), loss = Σ y ⊙ c.
fn tp_mlp_loss(x: &Tensor, w1: &Tensor, w2: &Tensor, c: &Tensor, g: &Group) -> Tensor {
    let h = copy_to(x, g).unwrap().matmul(w1).unwrap().tanh().unwrap();
    let y = reduce_from(&h.matmul(w2).unwrap(), g).unwrap();
    (y * c).unwrap().sum_all().unwrap()
}

#[test]
fn megatron_f_and_g_match_one_rank_and_finite_differences() {
    let (b, d, f) = (3usize, 4usize, 8usize);
    let (x, w1, w2, c) = (
        randn(1, &[b, d]),
        randn(2, &[d, f]),
        randn(3, &[f, d]),
        randn(4, &[b, d]),
    );
    // Reference: one rank, whole weights.
    let (xv, w1v, w2v) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w1).unwrap(),
        Var::from_tensor(&w2).unwrap(),
    );
    let one = Group::new(Box::new(
        colossal_core::dist::LocalComm::world(1, T).pop().unwrap(),
    ));
    let loss = tp_mlp_loss(&xv, &w1v, &w2v, &c, &one);
    let grads = loss.backward().unwrap();
    let gx = grads.get(&xv).unwrap().clone();
    let gw1 = grads.get(&w1v).unwrap().clone();
    let gw2 = grads.get(&w2v).unwrap().clone();
    let ref_loss = loss.to_scalar::<f32>().unwrap();

    for n in [2usize, 4] {
        run_local(n, T, |comm| {
            let r = comm.rank();
            let g = Group::new(Box::new(comm));
            let s = f / n;
            let xv = Var::from_tensor(&x)?;
            let w1s = Var::from_tensor(&w1.narrow(1, r * s, s)?.contiguous()?)?;
            let w2s = Var::from_tensor(&w2.narrow(0, r * s, s)?.contiguous()?)?;
            let loss = tp_mlp_loss(&xv, &w1s, &w2s, &c, &g);
            assert!((loss.to_scalar::<f32>()? - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0));
            let grads = loss.backward()?;
            assert!(max_rel(grads.get(&xv).unwrap(), &gx) < 1e-5, "x grad n={n}");
            let want1 = gw1.narrow(1, r * s, s)?;
            let want2 = gw2.narrow(0, r * s, s)?;
            assert!(max_rel(grads.get(&w1s).unwrap(), &want1) < 1e-5);
            assert!(max_rel(grads.get(&w2s).unwrap(), &want2) < 1e-5);
            // Central differences on the distributed loss, through both collectives.
            let (x64, eps) = (x.to_dtype(DType::F64)?, 1e-3);
            for idx in [0usize, 5, 11] {
                let bump = |sign: f64| -> colossal_core::Result<f32> {
                    let mut v: Vec<f64> = x64.flatten_all()?.to_vec1()?;
                    v[idx] += sign * eps;
                    let xp = Tensor::from_vec(v, (b, d), &Device::Cpu)?.to_dtype(DType::F32)?;
                    Ok(tp_mlp_loss(&xp, &w1s, &w2s, &c, &g).to_scalar::<f32>()?)
                };
                let fd = (bump(1.0)? - bump(-1.0)?) as f64 / (2.0 * eps);
                let an = grads.get(&xv).unwrap().flatten_all()?.get(idx)?;
                let an = an.to_scalar::<f32>()? as f64;
                assert!((fd - an).abs() < 2e-3, "fd {fd} vs analytic {an}");
            }
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn gather_scatter_split_and_all_to_all_have_the_paired_gradients() {
    // Logical tensor X (S, H) is sequence-sharded: rank r holds rows r·S/n... Loss = Σ op(X) ⊙ C.
    let (s, h) = (8usize, 4usize);
    let x = randn(5, &[s, h]);
    let c = randn(6, &[s, h]);
    for n in [2usize, 4] {
        run_local(n, T, |comm| {
            let r = comm.rank();
            let g = Group::new(Box::new(comm));
            let rows = s / n;
            let mine = Var::from_tensor(&x.narrow(0, r * rows, rows)?.contiguous()?)?;

            // gather_from: full X on every rank; each rank's loss uses its own coefficient slice
            // (a TP region consumes the gathered tensor partially), so the logical gradient is
            // the sum over ranks, reduce-scattered back to sequence shards.
            let full = gather_from(&mine, 0, &g)?;
            assert_eq!(full.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
            let cr = (&c * (r + 1) as f64)?;
            let loss = (&full * &cr)?.sum_all()?;
            let grad = loss.backward()?.get(&mine).unwrap().clone();
            let total: f64 = (1..=n).map(|k| k as f64).sum();
            let want = (c.narrow(0, r * rows, rows)? * total)?;
            assert!(max_rel(&grad, &want) < 1e-6, "gather_from grad");

            // scatter_reduce: input is a partial sum (rank r holds X·(r+1)); output shard r of
            // the sum; gradient of a replicated input is the all-gathered shard gradients.
            let partial = Var::from_tensor(&(&x * (r + 1) as f64)?)?;
            let shard = scatter_reduce(&partial, 0, &g)?;
            let want_val = (x.narrow(0, r * rows, rows)? * total)?;
            assert!(max_rel(&shard, &want_val) < 1e-6);
            let loss = (&shard * c.narrow(0, r * rows, rows)?)?.sum_all()?;
            let grad = loss.backward()?.get(&partial).unwrap().clone();
            assert!(max_rel(&grad, &c) < 1e-6, "scatter_reduce grad");

            // split_to: replicated X → own rows; gradient all-gathered.
            let rep = Var::from_tensor(&x)?;
            let part = split_to(&rep, 0, &g)?;
            let loss = (&part * c.narrow(0, r * rows, rows)?)?.sum_all()?;
            let grad = loss.backward()?.get(&rep).unwrap().clone();
            assert!(max_rel(&grad, &c) < 1e-6, "split_to grad");

            // all_to_all (Ulysses): sequence shard (S/n, H) → head shard (S, H/n) and back.
            let heads = all_to_all(&mine, 1, 0, &g)?;
            let hs = h / n;
            assert_eq!(
                heads.to_vec2::<f32>()?,
                x.narrow(1, r * hs, hs)?.to_vec2::<f32>()?
            );
            let loss = (&heads * c.narrow(1, r * hs, hs)?)?.sum_all()?;
            let grad = loss.backward()?.get(&mine).unwrap().clone();
            assert!(
                max_rel(&grad, &c.narrow(0, r * rows, rows)?) < 1e-6,
                "a2a grad"
            );
            let back = all_to_all(&heads, 0, 1, &g)?;
            assert_eq!(back.to_vec2::<f32>()?, mine.to_vec2::<f32>()?);
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn mesh_validates_and_groups_ranks_by_axis() {
    let err = ParallelDims::new(2, 2, 1, 1).validate(8).unwrap_err();
    assert!(
        err.to_string().contains("dp 2 × tp 2 × pp 1 × sp 1 = 4"),
        "{err}"
    );
    assert!(err.to_string().contains("8 ranks"), "{err}");
    let err = ParallelDims::new(0, 1, 1, 1).validate(0).unwrap_err();
    assert!(err.to_string().contains("parallel.dp"), "{err}");

    let dims = ParallelDims::new(2, 2, 2, 1);
    for r in 0..8 {
        assert_eq!(dims.rank(dims.coords(r)), r);
    }
    assert_eq!(dims.axis_members(5, Axis::Tp), vec![4, 5]);
    assert_eq!(dims.axis_members(5, Axis::Dp), vec![5, 7]);
    assert_eq!(dims.axis_members(5, Axis::Pp), vec![1, 5]);

    let sums = run_local(8, T, |comm| {
        let rank = comm.rank();
        let mesh = ProcessMesh::new(Box::new(comm), dims)?;
        let me = Tensor::new(&[rank as f32], &Device::Cpu)?;
        let mut out = vec![];
        for a in [Axis::Pp, Axis::Dp, Axis::Sp, Axis::Tp] {
            let s = mesh
                .axis(a)
                .all_reduce(&me, colossal_core::dist::ReduceOp::Sum)?;
            out.push(s.to_vec1::<f32>()?[0]);
        }
        Ok(out)
    })
    .unwrap();
    // Rank 5 = (pp 1, dp 0, sp 0, tp 1): tp peers {4,5}, dp {5,7}, pp {1,5}, sp {5}.
    assert_eq!(sums[5], vec![6.0, 12.0, 5.0, 9.0]);
}
