//! Block-wise forward and backward.
//!
//! Candle's autograd keeps a graph (and every tensor it touched) alive until `backward()`.
//! Running the model as a chain of blocks, each with detached inputs, bounds what is alive:
//! forward keeps only each block's inputs (with activation checkpointing) or each block's own
//! graph; backward walks the blocks in reverse, seeding each block with the gradients of its
//! outputs (`Σ sum(y_k · g_k)` has gradient `g_k` w.r.t. each `y_k`), so a block's parameter
//! gradients exist — and are handed to the hooks — as soon as that block is done. ZeRO-3
//! gathers, offload, pipeline send/recv and gradient reduction attach at these points.
//!
//! Between blocks flows a named set of tensors ([`Acts`]): a tensor a block does not touch
//! (a skip connection on its way to the block that reads it) passes through, and its gradient
//! passes back the same way.

use std::ops::Range;

use candle_core::{Tensor, Var};

use super::Acts;
use crate::params::{Grads, Params};
use crate::Result;

/// A model the executor can run: `num_blocks` blocks, block `i` mapping the set of tensors
/// between blocks to the next set. Block 0 receives the model's inputs.
pub trait BlockModel {
    /// Per-batch inputs shared by all blocks (masks, position tables).
    type Ctx;
    fn num_blocks(&self) -> usize;
    fn block_param_names(&self, block: usize) -> Vec<String>;
    fn block_forward(&self, block: usize, p: &Params, x: &Acts, ctx: &Self::Ctx) -> Result<Acts>;
    /// Whether the tensor `name` between blocks takes a gradient. Inputs such as token ids,
    /// timesteps or masks carried along say no; integer tensors never take one.
    fn takes_grad(&self, _name: &str) -> bool {
        true
    }
}

/// For each parameter, the block after whose backward its gradient is complete: the first
/// block using it (backward runs last to first), so a weight shared by several blocks (tied
/// embeddings) is reduced once, after its last contribution.
pub fn grad_ready_block<M: BlockModel>(model: &M) -> std::collections::HashMap<String, usize> {
    let mut ready = std::collections::HashMap::new();
    for block in (0..model.num_blocks()).rev() {
        for name in model.block_param_names(block) {
            ready.insert(name, block);
        }
    }
    ready
}

/// Maps the last block's outputs to the scalar loss.
pub type LossFn<'a> = dyn Fn(&Acts) -> Result<Tensor> + 'a;

/// A loss computed from the model's output tensor (a LLaMA's logits or scores).
pub fn on_output<'a>(f: impl Fn(&Tensor) -> Result<Tensor> + 'a) -> Box<LossFn<'a>> {
    Box::new(move |out: &Acts| f(out.output()?))
}

/// Points between blocks. All default to doing nothing.
pub trait Hooks {
    fn before_forward(&mut self, _block: usize) -> Result<()> {
        Ok(())
    }
    fn after_forward(&mut self, _block: usize) -> Result<()> {
        Ok(())
    }
    fn before_backward(&mut self, _block: usize) -> Result<()> {
        Ok(())
    }
    /// The gradient sink: block `block`'s parameter gradients, as soon as they exist.
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()>;
}

/// The simplest sink: sums gradients by name (gradient accumulation over micro-batches).
#[derive(Default)]
pub struct GradAccumulator {
    pub grads: Grads,
}

impl Hooks for GradAccumulator {
    fn after_backward(&mut self, _block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        for (name, g) in grads {
            self.grads.accumulate(&name, g)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Executor {
    /// Keep only block inputs in forward and recompute each block before its backward.
    pub activation_checkpointing: bool,
}

pub struct StepOutput {
    /// Value of the loss returned by `loss_fn`.
    pub loss: f32,
}

/// Where a block's parameters come from. The whole model's `Params` hand every block the same
/// variables; a sharded source (ZeRO-3) gathers a block's parameters on `acquire` and lets them
/// go when the returned `Params` is dropped.
pub trait ParamSource {
    fn acquire(&mut self, block: usize) -> Result<Params>;
    /// Parameters exist only while their block runs: the executor then recomputes every block
    /// in backward instead of keeping graphs (which would hold the gathered weights).
    fn sharded(&self) -> bool {
        false
    }
}

/// All parameters resident.
pub struct FullParams<'a>(pub &'a Params);

impl ParamSource for FullParams<'_> {
    fn acquire(&mut self, _block: usize) -> Result<Params> {
        Ok(self.0.clone())
    }

    /// Weights resting quantised are dense only while their block runs.
    fn sharded(&self) -> bool {
        self.0.has_quantised()
    }
}

/// Block `block`'s parameters from `source`, those resting quantised dequantised for as long
/// as the block (and its graph) lives.
fn acquire<M: BlockModel>(source: &mut dyn ParamSource, model: &M, block: usize) -> Result<Params> {
    let mut p = source.acquire(block)?;
    if p.has_quantised() {
        p.dequantise(&model.block_param_names(block))?;
    }
    Ok(p)
}

enum Saved {
    /// The block's inputs that take a gradient (as Vars, so it can be read), outputs with
    /// their graph, and the parameters the graph was built on.
    Graph {
        inputs: Vec<(String, Var)>,
        output: Acts,
        params: Params,
    },
    /// Only the (detached) inputs; the block is recomputed in backward.
    Input(Acts),
}

impl Executor {
    /// Forward only, block by block, detaching between blocks so no graph outlives its block.
    pub fn forward<M: BlockModel>(
        &self,
        model: &M,
        params: &Params,
        inputs: &Acts,
        ctx: &M::Ctx,
    ) -> Result<Acts> {
        self.forward_with(model, &mut FullParams(params), inputs, ctx)
    }

    /// [`Self::forward`] with parameters from `source`.
    pub fn forward_with<M: BlockModel>(
        &self,
        model: &M,
        source: &mut dyn ParamSource,
        inputs: &Acts,
        ctx: &M::Ctx,
    ) -> Result<Acts> {
        let mut x = inputs.clone();
        for i in 0..model.num_blocks() {
            let params = acquire(source, model, i)?;
            x = model.block_forward(i, &params, &x, ctx)?.detach();
        }
        Ok(x)
    }

    /// Forward and backward for one micro-batch. `loss_fn` maps the last block's output to a
    /// scalar loss; parameter gradients of each block go to `hooks.after_backward`.
    pub fn forward_backward<M: BlockModel>(
        &self,
        model: &M,
        params: &Params,
        inputs: &Acts,
        ctx: &M::Ctx,
        loss_fn: &LossFn<'_>,
        hooks: &mut dyn Hooks,
    ) -> Result<StepOutput> {
        self.forward_backward_with(model, &mut FullParams(params), inputs, ctx, loss_fn, hooks)
    }

    /// [`Self::forward_backward`] with parameters from `source`.
    pub fn forward_backward_with<M: BlockModel>(
        &self,
        model: &M,
        source: &mut dyn ParamSource,
        inputs: &Acts,
        ctx: &M::Ctx,
        loss_fn: &LossFn<'_>,
        hooks: &mut dyn Hooks,
    ) -> Result<StepOutput> {
        let all = 0..model.num_blocks();
        let (_, state) =
            self.chunk_forward(model, source, all, inputs, ctx, Some(loss_fn), hooks)?;
        let loss = state
            .loss_value()?
            .expect("the last block computes the loss");
        self.chunk_backward(model, source, state, None, ctx, hooks)?;
        Ok(StepOutput { loss })
    }

    /// Forward through blocks `blocks` (a pipeline stage's chunk) from `input`: returns the
    /// chunk's outputs (detached) and what its backward needs. With `loss_fn`, the chunk ends
    /// the model and the loss is computed on its outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn chunk_forward<M: BlockModel>(
        &self,
        model: &M,
        source: &mut dyn ParamSource,
        blocks: Range<usize>,
        input: &Acts,
        ctx: &M::Ctx,
        loss_fn: Option<&LossFn<'_>>,
        hooks: &mut dyn Hooks,
    ) -> Result<(Acts, ChunkState)> {
        let recompute = self.activation_checkpointing || source.sharded();
        let mut saved: Vec<Saved> = Vec::with_capacity(blocks.len());
        let mut x = input.clone();
        let mut loss = None;
        let end = blocks.end;
        for i in blocks.clone() {
            hooks.before_forward(i)?;
            let params = acquire(source, model, i)?;
            let last = i + 1 == end;
            // The chunk's last block keeps its graph: its backward comes first.
            if recompute && !last {
                let y = model.block_forward(i, &params, &x, ctx)?.detach();
                saved.push(Saved::Input(x));
                x = y;
            } else {
                let (inputs, y) = tracked_forward(model, i, &params, &x, ctx)?;
                if let (true, Some(f)) = (last, loss_fn) {
                    loss = Some(f(&y)?);
                }
                x = y.detach();
                saved.push(Saved::Graph {
                    inputs,
                    output: y,
                    params,
                });
            }
            hooks.after_forward(i)?;
        }
        Ok((
            x,
            ChunkState {
                blocks,
                saved,
                loss,
            },
        ))
    }

    /// Backward through a chunk run by [`Self::chunk_forward`], seeded by the loss (chunk
    /// ending the model) or by `grad_out`, the gradients of the chunk's outputs. Returns the
    /// gradients of the chunk's inputs (`None` when none takes one, as for block 0's).
    pub fn chunk_backward<M: BlockModel>(
        &self,
        model: &M,
        source: &mut dyn ParamSource,
        state: ChunkState,
        grad_out: Option<&Acts>,
        ctx: &M::Ctx,
        hooks: &mut dyn Hooks,
    ) -> Result<Option<Acts>> {
        let ChunkState {
            blocks,
            mut saved,
            loss,
        } = state;
        let mut grad_out: Option<Acts> = grad_out.cloned();
        for i in blocks.rev() {
            hooks.before_backward(i)?;
            let (inputs, root, params) = match saved.pop().expect("one entry per block") {
                Saved::Graph {
                    inputs,
                    output,
                    params,
                } => {
                    let root = match (&grad_out, &loss) {
                        (Some(g), _) => seed(&output, g)?,
                        (None, Some(l)) => Some(l.clone()),
                        (None, None) => {
                            return Err(crate::msg!("chunk backward needs a loss or a gradient"))
                        }
                    };
                    (inputs, root, params)
                }
                Saved::Input(x) => {
                    let params = acquire(source, model, i)?;
                    let (inputs, y) = tracked_forward(model, i, &params, &x, ctx)?;
                    let g = grad_out.as_ref().expect("recomputed blocks are not last");
                    (inputs, seed(&y, g)?, params)
                }
            };
            let mut block_grads = Vec::new();
            let mut grad_in = Acts::new();
            // No output of this block reaches the loss: neither its weights nor its inputs
            // get a gradient from it.
            if let Some(root) = root {
                let mut store = root.backward()?;
                for name in model.block_param_names(i) {
                    if params.is_frozen(&name) {
                        continue;
                    }
                    // A weight this micro-batch did not use (an expert no token was routed
                    // to) gets zeros: every rank then hands the same gradients to its sink.
                    let var = params.var(&name)?.as_tensor();
                    let g = match store.remove(var) {
                        Some(g) => g,
                        None => var.zeros_like()?,
                    };
                    block_grads.push((name, g));
                }
                for (name, v) in &inputs {
                    if let Some(g) = store.remove(v.as_tensor()) {
                        grad_in.insert(name, g);
                    }
                }
            }
            grad_out = (!grad_in.is_empty()).then_some(grad_in);
            drop(params);
            hooks.after_backward(i, block_grads)?;
        }
        Ok(grad_out)
    }
}

/// What a chunk's backward needs: per block its graph or its input, and the loss.
pub struct ChunkState {
    blocks: Range<usize>,
    saved: Vec<Saved>,
    loss: Option<Tensor>,
}

impl ChunkState {
    /// The loss, when the chunk ends the model.
    pub fn loss_value(&self) -> Result<Option<f32>> {
        match &self.loss {
            Some(l) => Ok(Some(
                l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?,
            )),
            None => Ok(None),
        }
    }
}

/// Runs block `i` on `x` with the graph kept; each input that takes a gradient becomes a
/// `Var` so its gradient can be read after backward.
fn tracked_forward<M: BlockModel>(
    model: &M,
    i: usize,
    params: &Params,
    x: &Acts,
    ctx: &M::Ctx,
) -> Result<(Vec<(String, Var)>, Acts)> {
    let mut vars = Vec::new();
    let mut xin = Acts::new();
    for (name, t) in x.iter() {
        if model.takes_grad(name) && t.dtype().is_float() {
            let v = Var::from_tensor(t)?;
            xin.insert(name, v.as_tensor().clone());
            vars.push((name.to_string(), v));
        } else {
            xin.insert(name, t.clone());
        }
    }
    let y = model.block_forward(i, params, &xin, ctx)?;
    Ok((vars, y))
}

/// The scalar whose gradient w.r.t. each output `y_k` is `g_k`: `Σ_k sum(y_k · g_k)` over the
/// outputs that received a gradient (`None` when none did).
fn seed(output: &Acts, grads: &Acts) -> Result<Option<Tensor>> {
    let mut root: Option<Tensor> = None;
    for (name, g) in grads.iter() {
        let term = (output.get(name)? * g)?.sum_all()?;
        root = Some(match root {
            None => term,
            Some(r) => (r + term)?,
        });
    }
    Ok(root)
}
