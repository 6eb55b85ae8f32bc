//! Named trainable parameters, in a fixed (checkpoint) order, and frozen ones (a LoRA's base
//! weights) that the model reads but nothing trains: no gradient, no optimizer state, not in
//! the trainable names the engine partitions and saves.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::{msg, Result};

/// Ordered map from HF parameter path to its `Var`.
#[derive(Clone, Default)]
pub struct Params {
    names: Vec<String>,
    vars: HashMap<String, Var>,
    frozen: HashMap<String, Tensor>,
    frozen_names: Vec<String>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, var: Var) {
        let name = name.into();
        if self.frozen.remove(&name).is_some() {
            self.frozen_names.retain(|n| n != &name);
        }
        if self.vars.insert(name.clone(), var).is_none() {
            self.names.push(name);
        }
    }

    /// Adds a parameter that is read but never trained (detached: no gradient reaches it).
    pub fn insert_frozen(&mut self, name: impl Into<String>, t: Tensor) {
        let name = name.into();
        if self.vars.remove(&name).is_some() {
            self.names.retain(|n| n != &name);
        }
        if self.frozen.insert(name.clone(), t.detach()).is_none() {
            self.frozen_names.push(name);
        }
    }

    /// Freezes every trainable parameter (the base model under an adapter).
    pub fn freeze_all(&mut self) {
        for name in std::mem::take(&mut self.names) {
            let var = self.vars.remove(&name).expect("names and vars agree");
            self.insert_frozen(name, var.as_tensor().clone());
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor())
            .or_else(|| self.frozen.get(name))
            .ok_or_else(|| msg!("no parameter named `{name}`"))
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| match self.frozen.contains_key(name) {
                true => msg!("parameter `{name}` is frozen: it has no variable to train"),
                false => msg!("no parameter named `{name}`"),
            })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name) || self.frozen.contains_key(name)
    }

    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.contains_key(name)
    }

    /// The frozen parameters, in the order they were frozen.
    pub fn frozen(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.frozen_names
            .iter()
            .map(|n| (n.as_str(), &self.frozen[n]))
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(|n| (n.as_str(), &self.vars[n]))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Fresh variables holding these values in `dtype` (the low-precision compute copy of fp32
    /// master weights); gradients taken on them never touch the masters.
    pub fn cast(&self, dtype: candle_core::DType) -> Result<Params> {
        let mut out = Params::new();
        for (name, var) in self.iter() {
            let t = var.as_tensor().to_dtype(dtype)?.detach();
            out.insert(name, Var::from_tensor(&t)?);
        }
        for (name, t) in self.frozen() {
            out.insert_frozen(name, t.to_dtype(dtype)?);
        }
        Ok(out)
    }
}

/// Gradients by parameter name (summed over micro-batches).
#[derive(Clone, Default)]
pub struct Grads {
    map: HashMap<String, Tensor>,
}

impl Grads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `g` to the gradient of `name`.
    pub fn accumulate(&mut self, name: &str, g: Tensor) -> Result<()> {
        let g = g.detach();
        let next = match self.map.remove(name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.map.insert(name.to_string(), next);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }

    pub fn set(&mut self, name: &str, g: Tensor) {
        self.map.insert(name.to_string(), g);
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
