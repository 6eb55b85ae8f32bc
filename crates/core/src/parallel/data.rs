//! Data parallel: every rank holds the whole model and runs its share of the global batch's
//! micro-batches; gradients are summed across ranks in buckets as soon as they are complete in
//! the last micro-batch (earlier micro-batches only accumulate locally, no traffic). A gradient is
//! complete after the backward of the first block that uses it (see `grad_ready_block`), so a
//! tied embedding is sent once.
//!
//! Ranks sum rather than average: the loss of each micro-batch is already divided by the token
//! count of the whole global batch, so the sum is the gradient of the global mean loss — the
//! same math as one rank running every micro-batch.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::dist::{Communicator, ReduceOp};
use crate::exec::Hooks;
use crate::params::Grads;
use crate::Result;

pub struct DataParallelSink<'a> {
    comm: &'a dyn Communicator,
    bucket_bytes: usize,
    ready_at: HashMap<String, usize>,
    /// Set before the last micro-batch of the step: its gradients are reduced.
    pub last_micro_batch: bool,
    local: Grads,
    bucket: Vec<(String, Tensor)>,
    bucket_len: usize,
    reduced: Grads,
}

impl<'a> DataParallelSink<'a> {
    /// `ready_at`: from [`crate::exec::grad_ready_block`].
    pub fn new(
        comm: &'a dyn Communicator,
        bucket_bytes: usize,
        ready_at: HashMap<String, usize>,
    ) -> Self {
        Self {
            comm,
            bucket_bytes: bucket_bytes.max(1),
            ready_at,
            last_micro_batch: false,
            local: Grads::new(),
            bucket: Vec::new(),
            bucket_len: 0,
            reduced: Grads::new(),
        }
    }

    fn flush(&mut self) -> Result<()> {
        if self.bucket.is_empty() {
            return Ok(());
        }
        let flat: Vec<Tensor> = self
            .bucket
            .iter()
            .map(|(_, g)| g.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let summed = self
            .comm
            .all_reduce(&Tensor::cat(&flat, 0)?, ReduceOp::Sum)?;
        let mut offset = 0;
        for (name, g) in self.bucket.drain(..) {
            let n = g.elem_count();
            let piece = summed.narrow(0, offset, n)?.reshape(g.shape())?;
            self.reduced.accumulate(&name, piece)?;
            offset += n;
        }
        self.bucket_len = 0;
        Ok(())
    }

    /// Reduces what is left in the bucket and returns the summed gradients.
    pub fn finish(mut self) -> Result<Grads> {
        self.flush()?;
        if !self.local.is_empty() {
            return Err(crate::msg!(
                "data parallel: the last micro-batch was never marked"
            ));
        }
        Ok(self.reduced)
    }
}

impl Hooks for DataParallelSink<'_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let mut complete = Vec::new();
        for (name, g) in grads {
            if self.last_micro_batch && self.ready_at.get(&name).is_none_or(|&b| b == block) {
                complete.push(name.clone());
            }
            self.local.accumulate(&name, g)?;
        }
        for name in complete {
            let g = self.local.take(&name).expect("just accumulated");
            self.bucket_len += g.elem_count() * g.dtype().size_in_bytes();
            self.bucket.push((name, g));
            if self.bucket_len >= self.bucket_bytes {
                self.flush()?;
            }
        }
        Ok(())
    }
}
