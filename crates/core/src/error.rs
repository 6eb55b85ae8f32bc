use std::path::PathBuf;

/// Errors of the core library. Every variant names the file, field or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("config: {0}")]
    Config(String),
    #[error(
        "checkpoint {path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("checkpoint {path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("rank {rank}: {msg}")]
    Comm { rank: usize, msg: String },
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// `bail!`-like helper for library code.
#[macro_export]
macro_rules! msg {
    ($($arg:tt)*) => { $crate::error::Error::Msg(format!($($arg)*)) };
}
