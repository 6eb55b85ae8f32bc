//! A tensor-parallel plan: parameter-path patterns (`*` matches one dotted segment) and the
//! style of each, as torchtitan's `parallelize_module` plan. A style owns both how the weight is
//! split and how the activations around it are exchanged (the collectives the
//! [`TensorParallel`](super::tensor::TensorParallel) regions put at that point):
//!
//! | style | weight | activations |
//! |---|---|---|
//! | `Colwise` | output rows split (dim 0, a bias too) | input enters whole (identity forward, all-reduce backward; Megatron-SP: all-gather / reduce-scatter), output stays split |
//! | `Rowwise` | input columns split (dim 1) | input arrives split, output leaves summed (all-reduce; SP: reduce-scatter) |
//! | `VocabParallel` | embedding rows split | each rank looks up its rows, the sum completes every row |
//! | `Replicate` | whole on every rank | applied alike everywhere (under SP its gradient is summed over the group) |
//!
//! A plan is checked against the model's parameter list when the model is parallelised: an
//! entry that matches no parameter (a typo, a renamed module) and a parameter no entry covers
//! are errors naming them.

use crate::checkpoint::hf::Slice;
use crate::{Error, Result};

/// How one parameter is split over the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it.
    Replicate,
    /// Each rank holds an equal slice of this dimension.
    Dim(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpStyle {
    Colwise,
    Rowwise,
    VocabParallel,
    Replicate,
}

impl TpStyle {
    pub fn split(self) -> Split {
        match self {
            TpStyle::Colwise | TpStyle::VocabParallel => Split::Dim(0),
            TpStyle::Rowwise => Split::Dim(1),
            TpStyle::Replicate => Split::Replicate,
        }
    }
}

/// Rules in order; the first whose pattern matches a parameter gives its style.
#[derive(Clone, Debug)]
pub struct TpPlan {
    pub rules: Vec<(String, TpStyle)>,
}

impl TpPlan {
    pub fn new(rules: &[(&str, TpStyle)]) -> Self {
        TpPlan {
            rules: rules.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
        }
    }

    /// The style of `name` (replicated when no rule matches: a plan that was
    /// [`checked`](Self::check) covers every parameter).
    pub fn style(&self, name: &str) -> TpStyle {
        self.rules
            .iter()
            .find(|(pattern, _)| path_matches(pattern, name))
            .map_or(TpStyle::Replicate, |(_, s)| *s)
    }

    pub fn split(&self, name: &str) -> Split {
        self.style(name).split()
    }

    /// This rank's slice of a parameter of `shape`, or `None` when replicated.
    pub fn slice(&self, name: &str, shape: &[usize], rank: usize, size: usize) -> Option<Slice> {
        match self.split(name) {
            Split::Replicate => None,
            Split::Dim(dim) => {
                let len = shape[dim] / size;
                Some(Slice {
                    dim,
                    start: rank * len,
                    len,
                })
            }
        }
    }

    /// Every rule matches some parameter, every parameter is covered, and each split
    /// dimension exists and divides by `size`; errors name the rule or parameter.
    pub fn check(&self, params: &[(String, Vec<usize>)], size: usize) -> Result<()> {
        for (pattern, style) in &self.rules {
            if !params.iter().any(|(n, _)| path_matches(pattern, n)) {
                return Err(Error::Config(format!(
                    "tensor-parallel plan entry `{pattern}` ({style:?}) matches no parameter of the model"
                )));
            }
        }
        for (name, shape) in params {
            let Some((pattern, style)) = self.rules.iter().find(|(p, _)| path_matches(p, name))
            else {
                return Err(Error::Config(format!(
                    "parameter `{name}` is not covered by the tensor-parallel plan (say how it splits, or Replicate)"
                )));
            };
            if let Split::Dim(dim) = style.split() {
                if dim >= shape.len() || !shape[dim].is_multiple_of(size) {
                    return Err(Error::Config(format!(
                        "parameter `{name}` {shape:?} cannot be split {style:?} (plan entry `{pattern}`) over parallel.tp = {size}"
                    )));
                }
            }
        }
        Ok(())
    }
}

pub fn path_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<_>, Vec<_>) = (pattern.split('.').collect(), name.split('.').collect());
    p.len() == n.len() && p.iter().zip(&n).all(|(a, b)| *a == "*" || a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<(String, Vec<usize>)> {
        vec![
            ("layers.0.q.weight".into(), vec![8, 4]),
            ("layers.0.q.bias".into(), vec![8]),
            ("layers.0.o.weight".into(), vec![4, 8]),
            ("norm.weight".into(), vec![4]),
        ]
    }

    #[test]
    fn a_plan_is_checked_against_the_parameters() {
        use TpStyle::*;
        let good = TpPlan::new(&[
            ("layers.*.q.*", Colwise),
            ("layers.*.o.weight", Rowwise),
            ("norm.weight", Replicate),
        ]);
        good.check(&params(), 2).unwrap();
        assert_eq!(good.slice("layers.0.q.bias", &[8], 1, 2).unwrap().start, 4);
        let typo = TpPlan::new(&[
            ("layers.*.q.*", Colwise),
            ("layers.*.out.weight", Rowwise),
            ("layers.*.o.weight", Rowwise),
            ("norm.weight", Replicate),
        ]);
        let e = typo.check(&params(), 2).unwrap_err().to_string();
        assert!(
            e.contains("`layers.*.out.weight`") && e.contains("matches no parameter"),
            "{e}"
        );
        let gap = TpPlan::new(&[("layers.*.q.*", Colwise), ("layers.*.o.weight", Rowwise)]);
        let e = gap.check(&params(), 2).unwrap_err().to_string();
        assert!(e.contains("`norm.weight` is not covered"), "{e}");
        let e = good.check(&params(), 3).unwrap_err().to_string();
        assert!(
            e.contains("layers.0.q.weight") && e.contains("parallel.tp = 3"),
            "{e}"
        );
    }
}
