//! Named trainable parameters, in a fixed (checkpoint) order.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::{msg, Result};

/// Ordered map from HF parameter path to its `Var`.
#[derive(Clone, Default)]
pub struct Params {
    names: Vec<String>,
    vars: HashMap<String, Var>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, var: Var) {
        let name = name.into();
        if self.vars.insert(name.clone(), var).is_none() {
            self.names.push(name);
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor())
            .ok_or_else(|| msg!("no parameter named `{name}`"))
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| msg!("no parameter named `{name}`"))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
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
