//! The one error type of the `fedleak` library.
//!
//! Every variant carries what a caller needs to tell the user which input is wrong and how to fix it
//! (the path, the key, what was expected and what was found). Variants split into two families, and
//! [`Error::is_user_error`] tells them apart: bad input (exit code 2 in the binary) and runtime
//! failures (exit code 1).

use std::path::PathBuf;

/// Result alias for the `fedleak` library.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the `fedleak` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("cannot access `{path}`: {source}\nhint: check that the path exists and is readable")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// An image file could not be decoded.
    #[error("cannot decode image `{path}`: {reason}\nhint: replace or remove the file; fedleak reads PNG and JPEG")]
    CorruptImage {
        /// The image file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// A dataset is malformed (wrong layout, missing key, inconsistent shapes) or empty.
    #[error("invalid dataset `{source_name}`: {reason}\nhint: {hint}")]
    InvalidDataset {
        /// The file, directory or fixture name.
        source_name: String,
        /// What is wrong.
        reason: String,
        /// How to fix it.
        hint: String,
    },
    /// A data specification such as `fixture:NAME` names nothing fedleak knows.
    #[error("unknown data source `{spec}`: {reason}\nhint: {hint}")]
    UnknownData {
        /// The specification as given.
        spec: String,
        /// What is wrong.
        reason: String,
        /// The accepted forms or names.
        hint: String,
    },
    /// A model checkpoint is missing a tensor, has a wrong shape, or has an unusable `config.json`.
    #[error("invalid checkpoint `{path}`: {reason}\nhint: {hint}")]
    InvalidCheckpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// How to fix it.
        hint: String,
    },
    /// A setting is out of range or inconsistent with another.
    #[error("invalid setting `{key}`: {reason}\nhint: {hint}")]
    InvalidSetting {
        /// The configuration key / command-line option.
        key: String,
        /// What is wrong.
        reason: String,
        /// How to fix it.
        hint: String,
    },
    /// A tensor operation failed (a bug or an unsupported device, not bad input).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An attack failed (a numerical failure, or an observation it cannot read).
    #[error(transparent)]
    Attack(#[from] fedleak_attacks::AttackError),
    /// Scoring failed (images of different shapes: a bug, not bad input).
    #[error(transparent)]
    Metrics(#[from] fedleak_metrics::MetricsError),
    /// Homomorphic encryption failed or was given values it cannot encode.
    #[error(transparent)]
    He(#[from] crate::he::HeError),
    /// Training diverged or produced non-finite values.
    #[error("training failed: {0}")]
    Training(String),
}

impl Error {
    /// True when the error comes from what the user gave (file, option, data), i.e. exit code 2.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::CorruptImage { .. }
            | Error::InvalidDataset { .. }
            | Error::UnknownData { .. }
            | Error::InvalidCheckpoint { .. }
            | Error::InvalidSetting { .. } => true,
            Error::Candle(_)
            | Error::Attack(_)
            | Error::Metrics(_)
            | Error::He(_)
            | Error::Training(_) => false,
        }
    }

    /// Builds an [`Error::Io`] naming `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
