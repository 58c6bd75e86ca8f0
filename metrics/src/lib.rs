//! fedleak-metrics: scores image reconstructions against the private images they try to recover.
//!
//! Every metric reproduces a published reference implementation so that numbers in a fedleak report can
//! be compared with papers: PSNR and SSIM as scikit-image 0.26 `peak_signal_noise_ratio` /
//! `structural_similarity` compute them (SSIM after Wang et al. 2004, "Image quality assessment: from
//! error visibility to structural similarity"), and NMI as scikit-image `normalized_mutual_information`
//! (Studholme et al. 1999). [`match_batch`] pairs a batch of reconstructions with the private batch by an
//! optimal one-to-one assignment before scoring, so no reconstruction is ever counted twice.
//!
//! Images are planar `C x H x W` slices (channel-major, as a tensor gives them) of `f32` or `f64`
//! values nominally in `[0, 1]` (data range 1); all arithmetic is done in `f64`.
//!
//! This crate must not know anything about attacks, models or ML frameworks: it sees two images (or two
//! batches of images) and their [`ImageDims`], nothing about which attack produced a reconstruction.
//! It never prints; invalid input is reported as a [`MetricsError`].

#![deny(missing_docs)]

mod dims;
mod error;
mod labels;
mod matching;
mod nmi;
mod psnr;
mod ssim;

pub use crate::dims::{ImageDims, Pixel};
pub use crate::error::{ImageRole, MetricsError};
pub use crate::labels::{score_labels, score_matched_labels, RecoveredLabel};
pub use crate::matching::{assign_min_cost, match_batch, MatchedPair, Matching};
pub use crate::nmi::{nmi, nmi_studholme, NMI_BINS};
pub use crate::psnr::{colour_psnr_db, mse, psnr_db};
pub use crate::ssim::{ssim, ssim_skimage, SSIM_SKIMAGE_WINDOW, SSIM_WANG_WINDOW};

/// All metrics of one (reference, reconstruction) pair, as a report row needs them.
///
/// Built by [`score_pair`]; every field is computed on the whole image (all channels) with data range 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Peak signal-to-noise ratio in dB, `10 log10(1 / MSE)` ([`psnr_db`]); `f64::INFINITY` for
    /// identical images. Higher means a closer reconstruction.
    pub psnr_db: f64,
    /// SSIM in the Wang et al. 2004 setting: 11x11 Gaussian window (sigma 1.5), population covariance
    /// ([`ssim`]). Range `[-1, 1]`, 1 for identical images.
    pub ssim: f64,
    /// SSIM with scikit-image's defaults: 7x7 uniform window, sample covariance ([`ssim_skimage`]).
    /// Range `[-1, 1]`, 1 for identical images.
    pub ssim_skimage: f64,
    /// Normalised mutual information `I(A;B) / H(A,B)` in `[0, 1]` ([`nmi`]): `nmi_studholme - 1`, the
    /// form to put next to the CLS-token leakage paper's "NMI 0.741".
    pub nmi: f64,
    /// Studholme's normalised mutual information `(H(A) + H(B)) / H(A,B)` in `[1, 2]`, exactly as
    /// scikit-image `normalized_mutual_information(a, b, bins=100)` ([`nmi_studholme`]).
    pub nmi_studholme: f64,
}

/// Computes every metric of [`Score`] for one reconstruction `test` of the private image `reference`.
///
/// Both slices are planar `C x H x W` with the given `dims`; height and width must be at least
/// [`SSIM_WANG_WINDOW`] (11) for the SSIM windows to fit, as scikit-image requires.
///
/// # Errors
/// [`MetricsError::LengthMismatch`] if a slice is not `dims.len()` long, [`MetricsError::EmptyDims`],
/// [`MetricsError::ImageTooSmall`] below 11x11, [`MetricsError::NonFinite`] on NaN or infinite values.
///
/// # Example
/// ```
/// use fedleak_metrics::{score_pair, ImageDims};
///
/// let dims = ImageDims::new(1, 11, 11);
/// let reference: Vec<f32> = (0..dims.len()).map(|i| (i % 7) as f32 / 6.0).collect();
/// let score = score_pair(&reference, &reference, dims)?;
/// assert_eq!(score.psnr_db, f64::INFINITY);
/// assert_eq!(score.ssim, 1.0);
/// assert_eq!(score.ssim_skimage, 1.0);
/// assert!((score.nmi_studholme - 2.0).abs() < 1e-12);
/// assert!((score.nmi - 1.0).abs() < 1e-12);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn score_pair<T: Pixel>(
    reference: &[T],
    test: &[T],
    dims: ImageDims,
) -> Result<Score, MetricsError> {
    let (reference, test) = crate::dims::checked_pair(reference, test, dims)?;
    ssim::check_window_fits(SSIM_WANG_WINDOW, dims)?;
    Ok(score_checked(&reference, &test, dims))
}

/// Scores a pair already converted to `f64` and checked against `dims` (length, finiteness, size).
pub(crate) fn score_checked(reference: &[f64], test: &[f64], dims: ImageDims) -> Score {
    let nmi_studholme = nmi::nmi_studholme_checked(reference, test);
    Score {
        psnr_db: psnr::psnr_db_from_mse(psnr::mse_checked(reference, test)),
        ssim: ssim::ssim_checked(reference, test, dims, ssim::SsimWindow::WANG),
        ssim_skimage: ssim::ssim_checked(reference, test, dims, ssim::SsimWindow::SKIMAGE),
        nmi: nmi_studholme - 1.0,
        nmi_studholme,
    }
}
