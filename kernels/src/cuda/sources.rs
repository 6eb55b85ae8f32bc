//! The CUDA sources under `kernels/cuda` and the kernels the ops launch from each (f32 and bf16
//! instances). `scripts/check_cuda_sources.py` reads this table: CI compiles every source with
//! NVRTC and checks that each name listed here is an entry point of its PTX.

pub(crate) const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

pub(crate) const SOURCES: &[(&str, &[&str])] = &[
    (
        "rms_norm",
        &[
            "rms_norm_fwd_f32",
            "rms_norm_fwd_bf16",
            "rms_norm_dx_f32",
            "rms_norm_dx_bf16",
            "rms_norm_inv_f32",
            "rms_norm_inv_bf16",
            "rms_norm_dw_f32",
            "rms_norm_dw_bf16",
        ],
    ),
    (
        "softmax",
        &[
            "softmax_fwd_f32",
            "softmax_fwd_bf16",
            "softmax_bwd_f32",
            "softmax_bwd_bf16",
        ],
    ),
    (
        "swiglu",
        &[
            "swiglu_fwd_f32",
            "swiglu_fwd_bf16",
            "swiglu_bwd_f32",
            "swiglu_bwd_bf16",
        ],
    ),
    ("rotary", &["rotary_f32", "rotary_bf16"]),
    (
        "attention",
        &[
            "attn_fwd_f32",
            "attn_fwd_bf16",
            "attn_bwd_dq_f32",
            "attn_bwd_dq_bf16",
            "attn_bwd_dkv_f32",
            "attn_bwd_dkv_bf16",
        ],
    ),
    (
        "cross_entropy",
        &[
            "ce_rows_f32",
            "ce_rows_bf16",
            "ce_grad_f32",
            "ce_grad_bf16",
            "ce_sum",
            "ce_split_max_f32",
            "ce_split_max_bf16",
            "ce_split_stats_f32",
            "ce_split_stats_bf16",
            "ce_split_grad_f32",
            "ce_split_grad_bf16",
        ],
    ),
    (
        "norm",
        &[
            "norm_fwd_f32",
            "norm_fwd_bf16",
            "norm_dx_f32",
            "norm_dx_bf16",
            "norm_stats_f32",
            "norm_stats_bf16",
            "norm_dwdb_f32",
            "norm_dwdb_bf16",
        ],
    ),
    ("adamw", &["adamw_f32", "adamw_bf16"]),
];

/// The text of source `stem` (without the prelude).
pub(crate) fn source(stem: &str) -> Option<&'static str> {
    Some(match stem {
        "rms_norm" => include_str!("../../cuda/rms_norm.cu"),
        "softmax" => include_str!("../../cuda/softmax.cu"),
        "swiglu" => include_str!("../../cuda/swiglu.cu"),
        "rotary" => include_str!("../../cuda/rotary.cu"),
        "norm" => include_str!("../../cuda/norm.cu"),
        "attention" => include_str!("../../cuda/attention.cu"),
        "cross_entropy" => include_str!("../../cuda/cross_entropy.cu"),
        "adamw" => include_str!("../../cuda/adamw.cu"),
        _ => return None,
    })
}
