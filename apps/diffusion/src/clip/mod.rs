//! CLIP's text side, as Stable Diffusion uses it: the BPE tokenizer and `CLIPTextModel`.

mod text_model;
mod tokenizer;

pub use text_model::{ClipTextConfig, ClipTextModel};
pub use tokenizer::ClipTokenizer;
