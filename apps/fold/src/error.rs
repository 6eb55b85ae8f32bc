use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with a file's content: which file, and (when known) which line.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    File {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn file(path: &Path, msg: impl ToString) -> Self {
        Error::File {
            path: path.to_path_buf(),
            line: None,
            msg: msg.to_string(),
        }
    }

    pub fn at_line(path: &Path, line: usize, msg: impl ToString) -> Self {
        Error::File {
            path: path.to_path_buf(),
            line: Some(line),
            msg: msg.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
