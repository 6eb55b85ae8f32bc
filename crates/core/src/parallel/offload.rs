//! Where sharded optimizer state (and ZeRO-3 parameter chunks) lives: in memory, or in
//! memory-mapped files on disk whose pages are handed back to the OS after each use, so state
//! larger than RAM still trains (the OS streams it through the page cache). A disk placement
//! may carry a memory budget: buffers stay in memory, in creation order, until it is spent.
//! Without offload on a GPU, the state stays in the GPU's memory as tensors (`Device`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use memmap2::{MmapMut, UncheckedAdvice};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub enum Placement {
    Memory,
    /// Files under this directory (one per buffer), past the memory budget.
    Disk(DiskPlacement),
    /// Tensors on this device, updated there by tensor ops (no host round trip).
    Device(Device),
}

#[derive(Clone, Debug)]
pub struct DiskPlacement {
    pub dir: PathBuf,
    /// Resident bytes still allowed; shared by every buffer of this placement.
    budget_left: Arc<AtomicU64>,
}

impl Placement {
    /// Disk files under `dir`, keeping up to `budget` bytes of buffers in memory.
    pub fn disk(dir: PathBuf, budget: u64) -> Self {
        Placement::Disk(DiskPlacement {
            dir,
            budget_left: Arc::new(AtomicU64::new(budget)),
        })
    }

    /// The same place, its files under subdirectory `name` (the memory budget shared).
    pub fn within(&self, name: &str) -> Self {
        match self {
            Placement::Disk(d) => Placement::Disk(DiskPlacement {
                dir: d.dir.join(name),
                budget_left: d.budget_left.clone(),
            }),
            other => other.clone(),
        }
    }

    /// The same place with no memory budget (for transient buffers that must not use it up).
    pub fn without_budget(&self) -> Self {
        match self {
            Placement::Disk(d) => Placement::disk(d.dir.clone(), 0),
            other => other.clone(),
        }
    }
}

impl DiskPlacement {
    fn reserve(&self, bytes: u64) -> bool {
        self.budget_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(bytes)
            })
            .is_ok()
    }
}

pub enum StateBuf {
    Mem(Vec<f32>),
    Disk {
        map: MmapMut,
        len: usize,
        path: PathBuf,
    },
    /// A contiguous 1-D f32 tensor on a device; its values are read and written by the tensor
    /// operations in `state_ops.rs`, never as a host slice.
    Dev(Tensor),
}

impl StateBuf {
    /// A buffer holding `values`, placed as asked; `name` becomes the file name on disk.
    pub fn new(placement: &Placement, name: &str, values: Vec<f32>) -> Result<Self> {
        let dir = match placement {
            Placement::Memory => return Ok(StateBuf::Mem(values)),
            Placement::Device(dev) => {
                let len = values.len();
                return Ok(StateBuf::Dev(Tensor::from_vec(values, len, dev)?));
            }
            Placement::Disk(d) if d.reserve(4 * values.len() as u64) => {
                return Ok(StateBuf::Mem(values))
            }
            Placement::Disk(d) => &d.dir,
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(format!("{name}.f32"));
        let len = values.len();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len((len.max(1) * 4) as u64)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file was just created for this buffer and nothing else maps or writes it.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| Error::io(&path, e))?;
        let mut buf = StateBuf::Disk { map, len, path };
        buf.as_mut_slice().copy_from_slice(&values);
        buf.release()?;
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        match self {
            StateBuf::Mem(v) => v.len(),
            StateBuf::Disk { len, .. } => *len,
            StateBuf::Dev(t) => t.elem_count(),
        }
    }

    /// Whether the values live on a device (as a tensor) rather than on the host.
    pub fn is_device(&self) -> bool {
        matches!(self, StateBuf::Dev(_))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of a host buffer. Panics for `Dev`, whose values never come to the host
    /// (callers branch on the variant, as `state_ops.rs` does).
    pub fn as_slice(&self) -> &[f32] {
        match self {
            StateBuf::Mem(v) => v,
            // SAFETY: the mapping is page-aligned and at least len·4 bytes long.
            StateBuf::Disk { map, len, .. } => unsafe {
                std::slice::from_raw_parts(map.as_ptr() as *const f32, *len)
            },
            StateBuf::Dev(_) => panic!("a device state buffer has no host slice"),
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match self {
            StateBuf::Mem(v) => v,
            // SAFETY: as above, and `&mut self` makes this the only view.
            StateBuf::Disk { map, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut f32, *len)
            },
            StateBuf::Dev(_) => panic!("a device state buffer has no host slice"),
        }
    }

    /// Disk buffers: write dirty pages back and drop them from memory.
    pub fn release(&self) -> Result<()> {
        if let StateBuf::Disk { map, path, .. } = self {
            map.flush().map_err(|e| Error::io(&*path, e))?;
            // SAFETY: a shared file mapping whose contents were just flushed: dropping the pages
            // loses nothing; they are read back from the file on the next access.
            unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) }
                .map_err(|e| Error::io(&*path, e))?;
        }
        Ok(())
    }

    /// Bytes kept in (host or device) memory between uses.
    pub fn resident_bytes(&self) -> u64 {
        match self {
            StateBuf::Disk { .. } => 0,
            other => 4 * other.len() as u64,
        }
    }

    /// Bytes kept on disk.
    pub fn offloaded_bytes(&self) -> u64 {
        match self {
            StateBuf::Disk { len, .. } => 4 * *len as u64,
            _ => 0,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            StateBuf::Disk { path, .. } => Some(path),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_buffer_round_trips_and_releases() {
        let dir =
            std::env::temp_dir().join(format!("colossal-offload-test-{}", std::process::id()));
        let mut b = StateBuf::new(
            &Placement::disk(dir.clone(), 0),
            "m.layer",
            vec![1.0, 2.0, 3.0],
        )
        .unwrap();
        assert_eq!(b.as_slice(), &[1.0, 2.0, 3.0]);
        b.as_mut_slice()[1] = 5.0;
        b.release().unwrap();
        assert_eq!(
            b.as_slice(),
            &[1.0, 5.0, 3.0],
            "values survive dropping the pages"
        );
        assert_eq!(std::fs::metadata(b.path().unwrap()).unwrap().len(), 12);
        assert_eq!((b.resident_bytes(), b.offloaded_bytes()), (0, 12));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn memory_budget_keeps_buffers_resident_until_spent() {
        let dir = std::env::temp_dir().join(format!("colossal-budget-test-{}", std::process::id()));
        let p = Placement::disk(dir.clone(), 20);
        let a = StateBuf::new(&p, "a", vec![0.0; 3]).unwrap(); // 12 bytes: fits
        let b = StateBuf::new(&p, "b", vec![0.0; 3]).unwrap(); // 8 left: disk
        let c = StateBuf::new(&p, "c", vec![0.0; 2]).unwrap(); // 8 bytes: fits exactly
        let d = StateBuf::new(&p.without_budget(), "d", vec![0.0]).unwrap();
        assert_eq!((a.resident_bytes(), a.offloaded_bytes()), (12, 0));
        assert_eq!((b.resident_bytes(), b.offloaded_bytes()), (0, 12));
        assert_eq!((c.resident_bytes(), c.offloaded_bytes()), (8, 0));
        assert_eq!((d.resident_bytes(), d.offloaded_bytes()), (0, 4));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
