//! Library error type. Every message names the file, row, flag or tensor that caused it.

/// Errors returned by the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A described failure (bad shape, bad input, unsupported configuration).
    #[error("{0}")]
    Msg(String),
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A CUDA driver / library failure.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A training step did not match the CUDA graph recorded for it (nothing of the step ran;
    /// the caller runs it again without the graph).
    #[error("CUDA graph: the step differs from the recorded one: {0}")]
    GraphDiverged(String),
}

impl Error {
    pub fn msg(s: impl Into<String>) -> Error {
        Error::Msg(s.into())
    }
    /// Whether this is a [`Error::GraphDiverged`].
    pub fn is_graph_divergence(&self) -> bool {
        matches!(self, Error::GraphDiverged(_))
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Library result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with a formatted [`Error::Msg`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::msg(format!($($arg)*))) };
}
