//! Communication: the `Communicator` trait (ring collectives over point-to-point messages,
//! counting the bytes each rank sends) and its backends.
mod comm;
mod local;

pub use comm::{CommStats, Communicator, ReduceOp};
pub use local::{run_local, LocalComm};
