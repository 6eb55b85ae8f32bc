//! CUDA bodies of the fused ops (feature `cuda`): the sources under `kernels/cuda`, compiled at
//! run time by NVRTC — once per process, no nvcc at install time — and launched on candle's
//! stream of the tensors' device. f32 and bf16 (computed in f32, stored rounded to nearest even).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Error, Layout, Result};

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod norm;
pub(crate) mod ops;
mod sources;

/// The element types the kernels are instantiated for, by the suffix of their names.
pub(crate) trait Elem: CudaDType + DeviceRepr + ValidAsZeroBits {
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// PTX per source, compiled on first use; shared, not copied, by every later launch.
static PTX: Mutex<Option<HashMap<&'static str, Arc<str>>>> = Mutex::new(None);

fn ptx(stem: &'static str) -> Result<Arc<str>> {
    let mut cache = PTX.lock().expect("ptx cache");
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(p) = cache.get(stem) {
        return Ok(p.clone());
    }
    let body = sources::source(stem)
        .ok_or_else(|| Error::Msg(format!("no CUDA source `{stem}` in the kernels crate")))?;
    let src = format!("{}\n#line 1 \"{stem}.cu\"\n{body}", sources::PRELUDE);
    let opts = CompileOptions {
        options: vec!["--std=c++17".into()],
        name: Some(format!("{stem}.cu")),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(src, opts)
        .map_err(|e| {
            Error::Msg(format!(
                "NVRTC could not compile kernels/cuda/{stem}.cu: {e}"
            ))
        })?
        .to_src();
    let ptx: Arc<str> = ptx.into();
    cache.insert(stem, ptx.clone());
    Ok(ptx)
}

/// Kernel `{name}_{suffix of T}` of source `stem`, loaded on `dev`, and its full name.
pub(crate) fn kernel<T: Elem>(
    dev: &CudaDevice,
    stem: &'static str,
    name: &str,
) -> Result<(CudaFunction, String)> {
    let full = format!("{name}_{}", T::SUFFIX);
    Ok((load(dev, stem, &full)?, full))
}

/// Kernel `full` of source `stem`, loaded on `dev`.
pub(crate) fn load(dev: &CudaDevice, stem: &'static str, full: &str) -> Result<CudaFunction> {
    // Only names in the table CI compiles and checks against each source's PTX.
    let listed = sources::SOURCES
        .iter()
        .any(|(s, names)| *s == stem && names.contains(&full));
    if !listed {
        return Err(Error::Msg(format!(
            "CUDA kernel {full} is not listed for {stem}.cu in kernels/src/cuda/sources.rs"
        )));
    }
    let f = dev.get_or_load_custom_func(full, &format!("colossal_{stem}"), &ptx(stem)?)?;
    Ok(f.into_cuda_function())
}

/// The contiguous elements of a custom op's argument.
pub(crate) fn view<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: fused kernel takes contiguous inputs")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// An output buffer of `n` elements every kernel element writes before it is read.
pub(crate) fn output<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: each kernel writes every element of its output.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// Blocks of 256 threads covering `n` elements (grid-stride loops cover the rest).
pub(crate) fn elementwise_grid(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65_535) as u32
}

/// Threads per block of the row kernels (a multiple of 32: their reductions are per warp).
pub(crate) const THREADS: u32 = 256;

/// One block of [`THREADS`] threads per row.
pub(crate) fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Runs `f` with the element type of `dtype` (f32 or bf16), or says the op does not take it.
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => Err(candle_core::Error::Msg(format!(
                "{}: the CUDA kernel takes f32 or bf16, got {other:?}",
                $op
            ))),
        }
    };
}
pub(crate) use by_dtype;

/// Whether the CUDA kernels take tensors of this dtype.
pub(crate) fn takes(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

pub(crate) trait LaunchErr<T> {
    fn launched(self, kernel: &str) -> Result<T>;
}

impl<T, E: std::fmt::Debug> LaunchErr<T> for std::result::Result<T, E> {
    fn launched(self, kernel: &str) -> Result<T> {
        self.map_err(|e| Error::Msg(format!("CUDA kernel {kernel}: {e:?}")))
    }
}
