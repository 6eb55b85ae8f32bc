//! What flows between blocks: a small named set of tensors. A LLaMA passes one stream (`h`);
//! a UNet adds each down block's skip (`skip.3`) for the up block that reads it; an Evoformer
//! carries `msa` and `pair`. Order is kept (pipeline messages list the tensors in it).

use candle_core::Tensor;

use crate::Result;

#[derive(Clone, Debug, Default)]
pub struct Acts {
    items: Vec<(String, Tensor)>,
}

impl Acts {
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding one tensor.
    pub fn one(name: &str, t: Tensor) -> Self {
        let mut a = Self::new();
        a.insert(name, t);
        a
    }

    /// Adds `t` under `name`, replacing a tensor of that name.
    pub fn insert(&mut self, name: &str, t: Tensor) {
        match self.items.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = t,
            None => self.items.push((name.to_string(), t)),
        }
    }

    /// `self` with `t` under `name` (builder style).
    pub fn with(mut self, name: &str, t: Tensor) -> Self {
        self.insert(name, t);
        self
    }

    /// Where `name` is, or an error listing what the set holds.
    fn position(&self, name: &str) -> Result<usize> {
        self.items
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                crate::msg!(
                    "no activation `{name}` between blocks (have {:?})",
                    self.names()
                )
            })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        Ok(&self.items[self.position(name)?].1)
    }

    /// Removes and returns the tensor `name` (a skip connection consumed by its block).
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        let i = self.position(name)?;
        Ok(self.items.remove(i).1)
    }

    pub fn names(&self) -> Vec<&str> {
        self.items.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.items.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A model's output: the first tensor of the last block's set (any further ones are
    /// auxiliary streams, such as a mixture of experts' routing sums).
    pub fn output(&self) -> Result<&Tensor> {
        match self.items.first() {
            Some((_, t)) => Ok(t),
            None => Err(crate::msg!("the blocks produced no output tensor")),
        }
    }

    /// Every tensor detached from its graph.
    pub fn detach(&self) -> Self {
        self.map(|t| Ok(t.detach())).expect("detach cannot fail")
    }

    /// Applies `f` to every tensor, keeping names and order.
    pub fn map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let items = self
            .items
            .iter()
            .map(|(n, t)| Ok((n.clone(), f(t)?)))
            .collect::<Result<_>>()?;
        Ok(Self { items })
    }
}
