//! The modes of a training config, one enum each: TOML spells them as strings, a misspelling
//! is an error naming the field and the accepted values.

use std::fmt;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::parallel::pipeline::Schedule;
use crate::{Error, Result};

/// Where ranks come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Threads of this process, `parallel.nproc` of them.
    #[default]
    Local,
    /// The processes of an `mpirun`/`srun` job (a build with `--features mpi`).
    Mpi,
    /// GPU ranks whose collectives run on NCCL (a build with `--features cuda`).
    Nccl,
}

/// How the `mpi` backend runs its collectives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MpiCollectives {
    /// The MPI library's own (`MPI_Allreduce`, …): its tuned algorithms.
    #[default]
    Native,
    /// Rings over point-to-point messages: bit-identical to the local backend.
    Ring,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpMode {
    #[default]
    None,
    /// The residual stream split along the sequence between tensor-parallel regions.
    Megatron,
    /// All-to-all of heads and sequence around attention.
    Ulysses,
    /// Ring attention: key/value blocks passed around the sequence-parallel group.
    Ring,
    /// Dynamic axial parallelism (FastFold): an AlphaFold-style model's MSA and pair streams
    /// split along one axis, switched by all-to-all between row- and column-wise operations.
    Dap,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    /// With dynamic loss scaling.
    Fp16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    #[default]
    None,
    Cpu,
    Disk,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PpSchedule {
    #[serde(rename = "gpipe")]
    GPipe,
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
    #[serde(rename = "interleaved")]
    Interleaved,
    #[serde(rename = "zbh1")]
    ZbH1,
}

impl PpSchedule {
    /// The schedule, with `chunks` model chunks per rank when interleaved (at least 2).
    pub fn schedule(self, chunks: usize) -> Schedule {
        match self {
            PpSchedule::GPipe => Schedule::GPipe,
            PpSchedule::OneFOneB => Schedule::OneFOneB,
            PpSchedule::Interleaved => Schedule::Interleaved {
                chunks: chunks.max(2),
            },
            PpSchedule::ZbH1 => Schedule::ZbH1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Freeze {
    #[default]
    None,
    /// Only the token embedding and LM head train.
    NonEmbedding,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointFormat {
    /// Rank 0 gathers and writes an HF model directory plus moments.
    #[default]
    Hf,
    /// Every rank writes its own slices and an index.
    Distributed,
}

/// `train.device`: "cpu", "cuda" (each rank its local rank's GPU) or "cuda:N" (GPUs from N on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(Option<usize>),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(None) => write!(f, "cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceSpec::Cuda(Some(n)))
                .ok_or_else(|| format!("`{s}`: expected \"cpu\", \"cuda\" or \"cuda:N\"")),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// The device of local rank `local_rank` (`cuda` takes GPU `local_rank`, `cuda:N` takes
    /// `N + local_rank`). Without CUDA in the build, or without that GPU, a clear error: never
    /// a silent CPU run.
    pub fn device(self, local_rank: usize) -> Result<Device> {
        self.device_for(local_rank, "train.device")
    }

    /// [`Self::device`], naming `field` (a config key or a flag) in the error.
    pub fn device_for(self, local_rank: usize, field: &str) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(first) => {
                let ordinal = first.unwrap_or(0) + local_rank;
                cuda_device(ordinal).map_err(|why| {
                    Error::Config(format!("{field} = \"{self}\": {why}; or use \"cpu\""))
                })
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> std::result::Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| format!("GPU {ordinal} is not available ({e})"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this binary was built without CUDA; rebuild with `--features cuda` (colossal-core/cuda) on a machine with the CUDA toolkit".into())
}

macro_rules! display_as_toml {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::String(s)) => f.write_str(&s),
                    _ => write!(f, "{self:?}"),
                }
            }
        }
    )*};
}
display_as_toml!(
    Backend,
    SpMode,
    Precision,
    Offload,
    PpSchedule,
    Freeze,
    CheckpointFormat
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_and_print_as_toml_spells_them() {
        let d: DeviceSpec = "cuda:3".parse().unwrap();
        assert_eq!(d, DeviceSpec::Cuda(Some(3)));
        assert_eq!(d.to_string(), "cuda:3");
        assert!("gpu".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert_eq!(PpSchedule::OneFOneB.to_string(), "1f1b");
        assert_eq!(Freeze::NonEmbedding.to_string(), "non_embedding");
        let s: SpMode = serde_json::from_str("\"ulysses\"").unwrap();
        assert_eq!(s, SpMode::Ulysses);
        let e = serde_json::from_str::<Offload>("\"gpu\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("none") && e.contains("disk"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error_saying_why() {
        let e = DeviceSpec::Cuda(None).device(0).unwrap_err().to_string();
        assert!(
            e.contains("train.device = \"cuda\"") && e.contains("--features cuda"),
            "{e}"
        );
    }
}
