//! The one error type of fedleak-metrics: every way a caller can hand the metrics unusable input.
//!
//! Variants carry the values a caller needs to fix the input (expected and got, which image, which
//! index); messages are lowercase phrases followed by a `hint:`. This module knows nothing about where
//! the images came from.

use std::fmt;

use thiserror::Error;

use crate::dims::ImageDims;

/// Which side of a comparison an image is on, so an error can say which one is wrong.
///
/// # Example
/// ```
/// use fedleak_metrics::ImageRole;
///
/// assert_eq!(ImageRole::Reference.to_string(), "reference");
/// assert_eq!(ImageRole::Test.to_string(), "test");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageRole {
    /// The private (ground-truth) image.
    Reference,
    /// The image scored against it, e.g. a reconstruction.
    Test,
}

impl fmt::Display for ImageRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageRole::Reference => "reference",
            ImageRole::Test => "test",
        })
    }
}

/// Why a metric could not be computed.
///
/// # Example
/// ```
/// use fedleak_metrics::{psnr_db, ImageDims, ImageRole, MetricsError};
///
/// let err = psnr_db(&[0.0_f64; 4], &[0.0_f64; 3], ImageDims::new(1, 2, 2)).unwrap_err();
/// assert_eq!(
///     err,
///     MetricsError::LengthMismatch {
///         role: ImageRole::Test,
///         dims: ImageDims::new(1, 2, 2),
///         expected: 4,
///         got: 3,
///     }
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// An image slice does not hold `dims.len()` values.
    #[error(
        "{role} image has {got} values, expected {expected} for dims {dims}\n\
         hint: images are planar channel-major CxHxW slices; pass the dims they were made with"
    )]
    LengthMismatch {
        /// Which image of the pair is wrong.
        role: ImageRole,
        /// The dims the caller passed.
        dims: ImageDims,
        /// `dims.len()`.
        expected: usize,
        /// The slice's length.
        got: usize,
    },
    /// The dims have a zero channel count, height or width.
    #[error("image dims {got} have a zero extent\nhint: channels, height and width must all be at least 1")]
    EmptyDims {
        /// The dims the caller passed.
        got: ImageDims,
    },
    /// Height or width is smaller than the SSIM window (scikit-image refuses these too).
    #[error(
        "image dims {got} are smaller than the {window}x{window} SSIM window\n\
         hint: SSIM needs height and width of at least {window}; upsample or report PSNR alone"
    )]
    ImageTooSmall {
        /// Side of the square window that must fit: 11 (Wang) or 7 (scikit-image default).
        window: usize,
        /// The dims the caller passed.
        got: ImageDims,
    },
    /// An image holds NaN or an infinity.
    #[error(
        "{role} image has the non-finite value {value} at index {index}\n\
         hint: a diverged reconstruction cannot be scored; clamp or drop it first"
    )]
    NonFinite {
        /// Which image of the pair holds the value.
        role: ImageRole,
        /// Index into the planar slice.
        index: usize,
        /// The offending value (as `f64`).
        value: f64,
    },
    /// One image of a batch is invalid; `source` says how.
    #[error("{role} image {index} of the batch is invalid")]
    InBatch {
        /// `Reference` for the private batch, `Test` for the reconstructions.
        role: ImageRole,
        /// Position of the image in its batch.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: Box<MetricsError>,
    },
    /// A row-major cost matrix does not hold `rows * cols` entries.
    #[error(
        "cost matrix has {got} entries, expected {expected} for {rows}x{cols}\n\
         hint: costs are row-major, one row per reference"
    )]
    CostShapeMismatch {
        /// Number of rows the caller passed.
        rows: usize,
        /// Number of columns the caller passed.
        cols: usize,
        /// `rows * cols`.
        expected: usize,
        /// The slice's length.
        got: usize,
    },
    /// A cost matrix entry is NaN or infinite.
    #[error("cost matrix entry ({row}, {col}) is the non-finite value {value}\nhint: costs must be finite")]
    NonFiniteCost {
        /// Row of the entry.
        row: usize,
        /// Column of the entry.
        col: usize,
        /// The offending value.
        value: f64,
    },
}
