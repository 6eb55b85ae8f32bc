//! The one bounds-checked entry to `gemm` the kernels share.

use gemm::Parallelism;

/// A matrix operand: its elements and (row stride, column stride).
pub(crate) type Operand<'a> = (&'a [f32], usize, usize);

/// c (m×n, row stride `ldc`) = [c +] a·b. `parallel`: let gemm spread a large product over
/// rayon's threads (not from inside a task that is already one of many).
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n);
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|r| c[r * ldc..r * ldc + n].fill(0.0));
        }
        return;
    }
    assert!(a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
    assert!(b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k > 1 << 16 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm touches inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
