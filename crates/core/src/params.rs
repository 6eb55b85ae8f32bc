//! Named trainable parameters, in a fixed (checkpoint) order, and frozen ones (a LoRA's base
//! weights) that the model reads but nothing trains: no gradient, no optimizer state, not in
//! the trainable names the engine partitions and saves. Frozen weights may rest quantised
//! (QLoRA): those are dequantised block by block (`dequantised`) where a block runs.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use crate::quant::{QuantKind, Quantised};
use crate::{msg, Result};

/// A frozen parameter: dense, or resting quantised.
#[derive(Clone)]
enum Frozen {
    Dense(Tensor),
    Quant(Arc<Quantised>),
}

/// Ordered map from HF parameter path to its `Var`.
#[derive(Clone, Default)]
pub struct Params {
    names: Vec<String>,
    vars: HashMap<String, Var>,
    frozen: HashMap<String, Frozen>,
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
        self.put_frozen(name.into(), Frozen::Dense(t.detach()));
    }

    fn put_frozen(&mut self, name: String, f: Frozen) {
        if self.vars.remove(&name).is_some() {
            self.names.retain(|n| n != &name);
        }
        if self.frozen.insert(name.clone(), f).is_none() {
            self.frozen_names.push(name);
        }
    }

    /// Holds the frozen weights named in `names` in `kind`'s codes with blocks of `block`;
    /// the rest stay as they are. An error if one is not a dense frozen weight.
    pub fn quantise(&mut self, names: &[String], kind: QuantKind, block: usize) -> Result<()> {
        for name in names {
            let Some(Frozen::Dense(t)) = self.frozen.get(name) else {
                return Err(msg!("only frozen weights can rest quantised, not `{name}`"));
            };
            let q = Quantised::new(t, kind, block)?;
            self.frozen.insert(name.clone(), Frozen::Quant(Arc::new(q)));
        }
        Ok(())
    }

    /// Whether any weight rests quantised.
    pub fn has_quantised(&self) -> bool {
        self.frozen.values().any(|f| matches!(f, Frozen::Quant(_)))
    }

    /// The weights resting quantised, in the order they were frozen.
    pub fn quantised(&self) -> impl Iterator<Item = (&str, &Quantised)> {
        self.frozen_names
            .iter()
            .filter_map(|n| match &self.frozen[n] {
                Frozen::Quant(q) => Some((n.as_str(), q.as_ref())),
                Frozen::Dense(_) => None,
            })
    }

    /// Those of `names` that rest quantised made dense here (a block's own copy of its
    /// weights while it runs).
    pub fn dequantise(&mut self, names: &[String]) -> Result<()> {
        for name in names {
            if let Some(Frozen::Quant(q)) = self.frozen.get(name) {
                let dense = Frozen::Dense(q.dequantise()?);
                self.frozen.insert(name.clone(), dense);
            }
        }
        Ok(())
    }

    /// These parameters with those of `names` that rest quantised dequantised; the
    /// quantised weights themselves are kept.
    pub fn dequantised(&self, names: &[String]) -> Result<Params> {
        let mut out = self.clone();
        out.dequantise(names)?;
        Ok(out)
    }

    /// Every weight dense (a checkpoint of the base).
    pub fn dense(&self) -> Result<Params> {
        let names: Vec<String> = self.quantised().map(|(n, _)| n.to_string()).collect();
        self.dequantised(&names)
    }

    /// Bytes the frozen weights hold: dense ones at their dtype, quantised ones in codes and
    /// scales.
    pub fn frozen_bytes(&self) -> usize {
        let dense: usize = self
            .frozen()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        dense + self.quantised().map(|(_, q)| q.bytes()).sum::<usize>()
    }

    /// Freezes every trainable parameter (the base model under an adapter).
    pub fn freeze_all(&mut self) {
        for name in std::mem::take(&mut self.names) {
            let var = self.vars.remove(&name).expect("names and vars agree");
            self.insert_frozen(name, var.as_tensor().clone());
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        if let Some(v) = self.vars.get(name) {
            return Ok(v.as_tensor());
        }
        match self.frozen.get(name) {
            Some(Frozen::Dense(t)) => Ok(t),
            Some(Frozen::Quant(q)) => Err(msg!(
                "parameter `{name}` rests in {} codes: read it through `dequantised`",
                q.kind()
            )),
            None => Err(msg!("no parameter named `{name}`")),
        }
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| match self.is_frozen(name) {
                true => msg!("parameter `{name}` is frozen: it has no variable to train"),
                false => msg!("no parameter named `{name}`"),
            })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name) || self.is_frozen(name)
    }

    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.contains_key(name)
    }

    /// Whether any parameter is frozen.
    pub fn is_frozen_any(&self) -> bool {
        !self.frozen.is_empty()
    }

    /// The dense frozen parameters, in the order they were frozen (not those resting
    /// quantised: `quantised`).
    pub fn frozen(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.frozen_names
            .iter()
            .filter_map(|n| match &self.frozen[n] {
                Frozen::Dense(t) => Some((n.as_str(), t)),
                Frozen::Quant(_) => None,
            })
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
        for name in &self.frozen_names {
            let f = match &self.frozen[name] {
                Frozen::Dense(t) => Frozen::Dense(t.to_dtype(dtype)?),
                Frozen::Quant(q) => Frozen::Quant(Arc::new(q.with_dtype(dtype))),
            };
            out.put_frozen(name.clone(), f);
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
