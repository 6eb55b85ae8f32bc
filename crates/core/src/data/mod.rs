//! Packed token sequences in Parquet: the format `colossal-data` writes and trainers read.
mod format;
mod loader;

pub use format::{Manifest, PackedSequence, ShardWriter, SplitInfo, MANIFEST};
pub use loader::{Batch, PackedDataset};
