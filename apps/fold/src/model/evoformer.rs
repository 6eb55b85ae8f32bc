//! The Evoformer block (AlphaFold 2, Algorithm 6) as OpenFold computes it, on one example: the
//! MSA stream m (S, R, c_m) and the pair stream z (R, R, c_z). The MSA is updated by row-wise
//! gated attention biased by the pair stream, column-wise attention and a transition; the pair
//! stream by the outer product mean of the MSA, the two triangle multiplicative updates, the
//! two triangle attentions and a transition. Each update is added to its stream. Parameter
//! names are OpenFold's (`evoformer.blocks.{i}.msa_att_row.mha.linear_q.weight`, …). Dropout is
//! not applied.

use candle_core::{Result, Tensor};

use super::config::EvoformerConfig;
use super::dap::{self, Dap};
use super::primitives::{chunked, mask_bias, sigmoid, Ctx};
use super::specs::{LinearInit, Specs};

/// The masks of one example: which MSA entries (S, R) and residue pairs (R, R) are real.
pub struct Masks<'a> {
    pub msa: &'a Tensor,
    pub pair: &'a Tensor,
}

fn mul_mask(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&mask.unsqueeze(mask.rank())?)
}

/// Row attention with pair bias (Algorithm 7): attention along residues within each sequence.
/// `m` holds this rank's sequences, `z` its pair rows; the pair bias is gathered whole.
fn msa_row_attention(
    c: &Ctx,
    p: &str,
    cfg: &EvoformerConfig,
    m: &Tensor,
    z: &Tensor,
    mask: &Tensor,
    d: Option<&Dap>,
) -> Result<Tensor> {
    let m_ln = c.layer_norm(&format!("{p}.layer_norm_m"), m)?;
    let zb = c.linear(
        &format!("{p}.linear_z"),
        &c.layer_norm(&format!("{p}.layer_norm_z"), z)?,
    )?;
    let zb = dap::gather(d, &zb, 0)?.permute((2, 0, 1))?.unsqueeze(0)?; // (1, H, R, R)
    let mask = dap::local(d, mask, 0)?;
    let mb = mask_bias(&mask, cfg.inf)?.unsqueeze(1)?.unsqueeze(1)?; // (S, 1, 1, R)
    let (h, ch) = (cfg.no_heads_msa, cfg.c_hidden_msa_att);
    c.attention(&format!("{p}.mha"), &m_ln, &m_ln, &[&mb, &zb], h, ch)
}

/// Column attention (Algorithm 8): attention along sequences at each residue. `m` holds this
/// rank's residue columns, `mask` their entries.
fn msa_column_attention(
    c: &Ctx,
    p: &str,
    cfg: &EvoformerConfig,
    m: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let mt = m.transpose(0, 1)?.contiguous()?; // (R, S, c)
    let m_ln = c.layer_norm(&format!("{p}.layer_norm_m"), &mt)?;
    let mb = mask_bias(&mask.t()?, cfg.inf)?.unsqueeze(1)?.unsqueeze(1)?; // (R, 1, 1, S)
    let (h, ch) = (cfg.no_heads_msa, cfg.c_hidden_msa_att);
    let o = c.attention(&format!("{p}.mha"), &m_ln, &m_ln, &[&mb], h, ch)?;
    o.transpose(0, 1)?.contiguous()
}

/// MSA or pair transition (Algorithms 9 and 15): LayerNorm, two linears around a ReLU.
fn transition(c: &Ctx, p: &str, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    chunked(x.dim(0)?, c.chunk, |start, len| {
        let x = x.narrow(0, start, len)?;
        let h = c.linear(
            &format!("{p}.linear_1"),
            &c.layer_norm(&format!("{p}.layer_norm"), &x)?,
        )?;
        let h = c.linear(&format!("{p}.linear_2"), &h.relu()?)?;
        mul_mask(&h, &mask.narrow(0, start, len)?)
    })
}

/// Outer product mean (Algorithm 10): the MSA's per-column projections, outer products averaged
/// over sequences, projected to the pair width. `m` holds this rank's residue columns (the
/// pair rows it owns); the other side's projection is gathered whole.
fn outer_product_mean(
    c: &Ctx,
    p: &str,
    cfg: &EvoformerConfig,
    m: &Tensor,
    mask: &Tensor,
    d: Option<&Dap>,
) -> Result<Tensor> {
    let (s, r_local, _) = m.dims3()?;
    let ch = cfg.c_hidden_opm;
    let mask_local = dap::local(d, mask, 1)?;
    let ln = c.layer_norm(&format!("{p}.layer_norm"), m)?;
    let a = mul_mask(&c.linear(&format!("{p}.linear_1"), &ln)?, &mask_local)?;
    let b = mul_mask(&c.linear(&format!("{p}.linear_2"), &ln)?, &mask_local)?;
    let b = dap::gather(d, &b, 1)?;
    let r = b.dim(1)?;
    // Σ_s a[s, i, c] b[s, j, d] → (i, j, c, d), a chunk of rows i at a time.
    let b = b.reshape((s, r * ch))?;
    let out = chunked(r_local, c.chunk, |start, len| {
        let a = a.narrow(1, start, len)?.reshape((s, len * ch))?;
        let outer = a.t()?.contiguous()?.matmul(&b)?;
        let outer = outer
            .reshape((len, ch, r, ch))?
            .permute((0, 2, 1, 3))?
            .reshape((len, r, ch * ch))?;
        c.linear(&format!("{p}.linear_out"), &outer)
    })?;
    let norm = (mask_local.t()?.contiguous()?.matmul(mask)? + cfg.opm_eps)?; // (R_local, R)
    out.broadcast_div(&norm.unsqueeze(2)?)
}

/// Triangle multiplicative update (Algorithms 11 and 12): each edge ij gathers the products of
/// the other two edges of triangles through k — ik and jk (outgoing) or ki and kj (incoming).
/// `z` holds this rank's rows: outgoing gathers the jk side whole; incoming sums each rank's
/// share of k and reduce-scatters the rows.
fn triangle_multiplication(
    c: &Ctx,
    p: &str,
    z: &Tensor,
    mask: &Tensor,
    outgoing: bool,
    d: Option<&Dap>,
) -> Result<Tensor> {
    let z_ln = c.layer_norm(&format!("{p}.layer_norm_in"), z)?;
    let mask = dap::local(d, mask, 0)?;
    let proj = |which: &str| -> Result<Tensor> {
        let g = sigmoid(&c.linear(&format!("{p}.linear_{which}_g"), &z_ln)?)?;
        mul_mask(
            &(g * c.linear(&format!("{p}.linear_{which}_p"), &z_ln)?)?,
            &mask,
        )
    };
    let (a, b) = (proj("a")?, proj("b")?); // (R_local, R, c)
    let x = match outgoing {
        // x_ij = Σ_k a_ik b_jk
        true => {
            let b = dap::gather(d, &b, 0)?.permute((2, 0, 1))?; // (c, R, R)
            let a = a.permute((2, 0, 1))?.contiguous()?;
            a.matmul(&b.transpose(1, 2)?.contiguous()?)?
                .permute((1, 2, 0))?
        }
        // x_ij = Σ_k a_ki b_kj, k over this rank's rows, then summed over ranks.
        false => {
            let a = a.permute((2, 1, 0))?.contiguous()?; // (c, R_i, R_k)
            let b = b.permute((2, 0, 1))?.contiguous()?; // (c, R_k, R_j)
            let partial = a.matmul(&b)?.permute((1, 2, 0))?.contiguous()?;
            dap::reduce_scatter(d, &partial, 0)?
        }
    };
    let x = x.contiguous()?;
    let x = c.linear(
        &format!("{p}.linear_z"),
        &c.layer_norm(&format!("{p}.layer_norm_out"), &x)?,
    )?;
    let g = sigmoid(&c.linear(&format!("{p}.linear_g"), &z_ln)?)?;
    x * g
}

/// Triangle attention (Algorithms 13 and 14): around the starting node, edge ij attends to the
/// edges ik of its row, biased by edge jk; around the ending node the same on the transpose
/// (whose rows this rank gets by an all-to-all). The triangle bias is gathered whole.
fn triangle_attention(
    c: &Ctx,
    p: &str,
    cfg: &EvoformerConfig,
    z: &Tensor,
    mask: &Tensor,
    starting: bool,
    d: Option<&Dap>,
) -> Result<Tensor> {
    let (z, mask) = match starting {
        true => (z.clone(), mask.clone()),
        false => (
            dap::switch(d, z, 1, 0)?.transpose(0, 1)?.contiguous()?,
            mask.t()?.contiguous()?,
        ),
    };
    let mask = dap::local(d, &mask, 0)?;
    let z_ln = c.layer_norm(&format!("{p}.layer_norm"), &z)?;
    let tb = c.linear(&format!("{p}.linear"), &z_ln)?;
    let tb = dap::gather(d, &tb, 0)?.permute((2, 0, 1))?.unsqueeze(0)?; // (1, H, R, R)
    let mb = mask_bias(&mask, cfg.inf)?.unsqueeze(1)?.unsqueeze(1)?; // (R, 1, 1, R)
    let (h, ch) = (cfg.no_heads_pair, cfg.c_hidden_pair_att);
    let o = c.attention(&format!("{p}.mha"), &z_ln, &z_ln, &[&mb, &tb], h, ch)?;
    match starting {
        true => Ok(o),
        false => dap::switch(d, &o.transpose(0, 1)?.contiguous()?, 0, 1),
    }
}

/// One Evoformer block: (m, z) → (m, z). Under DAP `m` holds this rank's sequences and `z` its
/// pair rows, in and out; the masks are whole.
pub fn block(
    c: &Ctx,
    p: &str,
    cfg: &EvoformerConfig,
    m: &Tensor,
    z: &Tensor,
    masks: &Masks,
    d: Option<&Dap>,
) -> Result<(Tensor, Tensor)> {
    let row = msa_row_attention(c, &format!("{p}.msa_att_row"), cfg, m, z, masks.msa, d)?;
    let m = (m + row)?;
    // Column-wise from here: this rank's residue columns of every sequence.
    let m = dap::switch(d, &m, 1, 0)?;
    let cols = dap::local(d, masks.msa, 1)?;
    let m = (&m + msa_column_attention(c, &format!("{p}.msa_att_col._msa_att"), cfg, &m, &cols)?)?;
    let m = (&m + transition(c, &format!("{p}.msa_transition"), &m, &cols)?)?;
    let opm = outer_product_mean(c, &format!("{p}.outer_product_mean"), cfg, &m, masks.msa, d)?;
    let z = (z + opm)?;
    let m = dap::switch(d, &m, 0, 1)?;
    let ps = format!("{p}.pair_stack");
    let pair = masks.pair;
    let z = (&z + triangle_multiplication(c, &format!("{ps}.tri_mul_out"), &z, pair, true, d)?)?;
    let z = (&z + triangle_multiplication(c, &format!("{ps}.tri_mul_in"), &z, pair, false, d)?)?;
    let att = |z: &Tensor, name: &str, starting: bool| {
        triangle_attention(c, &format!("{ps}.{name}"), cfg, z, pair, starting, d)
    };
    let z = (&z + att(&z, "tri_att_start", true)?)?;
    let z = (&z + att(&z, "tri_att_end", false)?)?;
    let rows = dap::local(d, pair, 0)?;
    let z = (&z + transition(c, &format!("{ps}.pair_transition"), &z, &rows)?)?;
    Ok((m, z))
}

/// The parameters of one block at `p`, in OpenFold's module order.
pub fn block_specs(s: &mut Specs, p: &str, cfg: &EvoformerConfig) {
    let (cm, cz) = (cfg.c_m, cfg.c_z);
    let row = format!("{p}.msa_att_row");
    s.layer_norm(&format!("{row}.layer_norm_m"), cm);
    s.layer_norm(&format!("{row}.layer_norm_z"), cz);
    s.linear(
        &format!("{row}.linear_z"),
        cz,
        cfg.no_heads_msa,
        false,
        LinearInit::Normal,
    );
    s.attention(
        &format!("{row}.mha"),
        cm,
        cm,
        cfg.c_hidden_msa_att,
        cfg.no_heads_msa,
    );
    let col = format!("{p}.msa_att_col._msa_att");
    s.layer_norm(&format!("{col}.layer_norm_m"), cm);
    s.attention(
        &format!("{col}.mha"),
        cm,
        cm,
        cfg.c_hidden_msa_att,
        cfg.no_heads_msa,
    );
    transition_specs(s, &format!("{p}.msa_transition"), cm, cfg.transition_n);
    let opm = format!("{p}.outer_product_mean");
    s.layer_norm(&format!("{opm}.layer_norm"), cm);
    s.linear(
        &format!("{opm}.linear_1"),
        cm,
        cfg.c_hidden_opm,
        true,
        LinearInit::Default,
    );
    s.linear(
        &format!("{opm}.linear_2"),
        cm,
        cfg.c_hidden_opm,
        true,
        LinearInit::Default,
    );
    let c2 = cfg.c_hidden_opm * cfg.c_hidden_opm;
    s.linear(
        &format!("{opm}.linear_out"),
        c2,
        cz,
        true,
        LinearInit::Final,
    );
    let ps = format!("{p}.pair_stack");
    for dir in ["out", "in"] {
        let t = format!("{ps}.tri_mul_{dir}");
        let ch = cfg.c_hidden_mul;
        s.linear(&format!("{t}.linear_g"), cz, cz, true, LinearInit::Gating);
        s.linear(&format!("{t}.linear_z"), ch, cz, true, LinearInit::Final);
        s.layer_norm(&format!("{t}.layer_norm_in"), cz);
        s.layer_norm(&format!("{t}.layer_norm_out"), ch);
        s.linear(
            &format!("{t}.linear_a_p"),
            cz,
            ch,
            true,
            LinearInit::Default,
        );
        s.linear(&format!("{t}.linear_a_g"), cz, ch, true, LinearInit::Gating);
        s.linear(
            &format!("{t}.linear_b_p"),
            cz,
            ch,
            true,
            LinearInit::Default,
        );
        s.linear(&format!("{t}.linear_b_g"), cz, ch, true, LinearInit::Gating);
    }
    for node in ["start", "end"] {
        let t = format!("{ps}.tri_att_{node}");
        s.layer_norm(&format!("{t}.layer_norm"), cz);
        s.linear(
            &format!("{t}.linear"),
            cz,
            cfg.no_heads_pair,
            false,
            LinearInit::Normal,
        );
        s.attention(
            &format!("{t}.mha"),
            cz,
            cz,
            cfg.c_hidden_pair_att,
            cfg.no_heads_pair,
        );
    }
    transition_specs(s, &format!("{ps}.pair_transition"), cz, cfg.transition_n);
}

fn transition_specs(s: &mut Specs, p: &str, c: usize, n: usize) {
    s.layer_norm(&format!("{p}.layer_norm"), c);
    s.linear(&format!("{p}.linear_1"), c, n * c, true, LinearInit::Relu);
    s.linear(&format!("{p}.linear_2"), n * c, c, true, LinearInit::Final);
}
