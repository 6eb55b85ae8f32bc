//! Parameter lists as OpenFold builds them: names, shapes and its initialisers (`Linear(init=
//! "default" | "relu" | "glorot" | "gating" | "final" | "normal")`, LayerNorm ones and zeros).

use colossal_core::models::{Init, ParamSpec};

/// OpenFold's Linear initialisers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearInit {
    /// LeCun (normal, variance 1/fan_in; OpenFold truncates it).
    Default,
    /// He (variance 2/fan_in).
    Relu,
    /// Glorot (variance 2/(fan_in + fan_out)).
    Glorot,
    /// Weight 0, bias 1: gates start open.
    Gating,
    /// Zeros: a residual branch starts as the identity.
    Final,
    /// Normal, variance 1/fan_in, without truncation.
    Normal,
}

#[derive(Default)]
pub struct Specs(pub Vec<ParamSpec>);

impl Specs {
    pub fn linear(
        &mut self,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        bias: bool,
        init: LinearInit,
    ) {
        let std = match init {
            LinearInit::Default | LinearInit::Normal => (1.0 / fan_in as f32).sqrt(),
            LinearInit::Relu => (2.0 / fan_in as f32).sqrt(),
            LinearInit::Glorot => (2.0 / (fan_in + fan_out) as f32).sqrt(),
            LinearInit::Gating | LinearInit::Final => 0.0,
        };
        let w = match std > 0.0 {
            true => Init::Normal {
                std,
                zero_row: None,
            },
            false => Init::Zeros,
        };
        self.push(&format!("{name}.weight"), vec![fan_out, fan_in], w);
        if bias {
            let b = match init {
                LinearInit::Gating => Init::Ones,
                _ => Init::Zeros,
            };
            self.push(&format!("{name}.bias"), vec![fan_out], b);
        }
    }

    pub fn layer_norm(&mut self, name: &str, d: usize) {
        self.push(&format!("{name}.weight"), vec![d], Init::Ones);
        self.push(&format!("{name}.bias"), vec![d], Init::Zeros);
    }

    /// OpenFold's `Attention(c_q, c_k, c_v, c_hidden, heads, gating=True)`.
    pub fn attention(
        &mut self,
        name: &str,
        c_q: usize,
        c_kv: usize,
        c_hidden: usize,
        heads: usize,
    ) {
        let hc = c_hidden * heads;
        self.linear(
            &format!("{name}.linear_q"),
            c_q,
            hc,
            false,
            LinearInit::Glorot,
        );
        self.linear(
            &format!("{name}.linear_k"),
            c_kv,
            hc,
            false,
            LinearInit::Glorot,
        );
        self.linear(
            &format!("{name}.linear_v"),
            c_kv,
            hc,
            false,
            LinearInit::Glorot,
        );
        self.linear(
            &format!("{name}.linear_o"),
            hc,
            c_q,
            true,
            LinearInit::Final,
        );
        self.linear(
            &format!("{name}.linear_g"),
            c_q,
            hc,
            true,
            LinearInit::Gating,
        );
    }

    pub fn push(&mut self, name: &str, shape: Vec<usize>, init: Init) {
        self.0.push(ParamSpec {
            name: name.to_string(),
            shape,
            init,
        });
    }
}
