//! Communication: the `Communicator` trait (ring collectives over point-to-point messages,
//! counting the bytes each rank sends), its backends, collectives with backward rules for model
//! code, and the process mesh.
pub mod autograd;
mod comm;
mod exchange;
mod local;
mod mesh;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
mod mpi_native;
#[cfg(feature = "cuda")]
mod nccl;

pub use autograd::Group;
pub use comm::{CommStats, Communicator, ReduceOp};
pub use exchange::{exchange, exchange_rows};
pub use local::{run_local, LocalComm};
pub use mesh::{Axis, Coords, ParallelDims, ProcessMesh};
#[cfg(feature = "mpi")]
pub use mpi::{launched_by_mpirun, mpi_abort, MpiComm};
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
