//! colossal-data: preprocessing tools (text / jsonl → tokenized, packed Parquet).
pub mod chat;
pub mod pretrain;
pub mod sources;
pub mod spm;
pub mod tokenizer;
