//! Mean squared error and peak signal-to-noise ratio, as scikit-image 0.26
//! `mean_squared_error` / `peak_signal_noise_ratio(data_range=1)` compute them.
//!
//! Pure pixel arithmetic: this module knows nothing about attacks, models or where images come from.

use crate::dims::{checked_pair, ImageDims, Pixel};
use crate::error::MetricsError;

/// Mean squared error over all pixels and channels; the cost [`crate::match_batch`] minimises.
///
/// # Errors
/// [`MetricsError::LengthMismatch`], [`MetricsError::EmptyDims`] or [`MetricsError::NonFinite`].
///
/// # Example
/// ```
/// use fedleak_metrics::{mse, ImageDims};
///
/// // Differences 0, 0.5, 0, 0.5 -> squares 0, 0.25, 0, 0.25 -> mean 0.125 (exact in binary).
/// let err = mse(&[0.0_f64, 0.0, 1.0, 1.0], &[0.0, 0.5, 1.0, 0.5], ImageDims::new(1, 2, 2))?;
/// assert_eq!(err, 0.125);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn mse<T: Pixel>(reference: &[T], test: &[T], dims: ImageDims) -> Result<f64, MetricsError> {
    let (reference, test) = checked_pair(reference, test, dims)?;
    Ok(mse_checked(&reference, &test))
}

/// Peak signal-to-noise ratio in dB with data range 1: `10 log10(1 / MSE)`, MSE over all pixels and
/// channels. Identical images give `f64::INFINITY`.
///
/// # Errors
/// [`MetricsError::LengthMismatch`], [`MetricsError::EmptyDims`] or [`MetricsError::NonFinite`].
///
/// # Example
/// ```
/// use fedleak_metrics::{psnr_db, ImageDims};
///
/// // One pixel of 100 is off by 1 -> MSE = 1/100 -> PSNR = 10 log10(100) = 20 dB.
/// let dims = ImageDims::new(1, 10, 10);
/// let reference = vec![0.0_f32; dims.len()];
/// let mut test = reference.clone();
/// test[42] = 1.0;
/// assert!((psnr_db(&reference, &test, dims)? - 20.0).abs() < 1e-12);
/// assert_eq!(psnr_db(&reference, &reference, dims)?, f64::INFINITY);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn psnr_db<T: Pixel>(
    reference: &[T],
    test: &[T],
    dims: ImageDims,
) -> Result<f64, MetricsError> {
    Ok(psnr_db_from_mse(mse(reference, test, dims)?))
}

/// MSE of two checked, equally long `f64` images.
pub(crate) fn mse_checked(reference: &[f64], test: &[f64]) -> f64 {
    let sum: f64 = reference
        .iter()
        .zip(test)
        .map(|(&a, &b)| (a - b) * (a - b))
        .sum();
    sum / reference.len() as f64
}

/// `10 log10(1 / mse)`; `f64::INFINITY` for `mse == 0`.
pub(crate) fn psnr_db_from_mse(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_uniform_offset_matches_formula() {
        // Every pixel off by 0.25 -> MSE 1/16 -> PSNR = 10 log10 16.
        let dims = ImageDims::new(2, 3, 3);
        let a = vec![0.5_f64; dims.len()];
        let b = vec![0.75_f64; dims.len()];
        let got = psnr_db(&a, &b, dims).unwrap();
        assert!((got - 10.0 * 16.0_f64.log10()).abs() < 1e-12, "got {got}");
    }

    #[test]
    fn mse_rejects_wrong_length() {
        let err = mse(&[0.0_f64; 9], &[0.0_f64; 9], ImageDims::new(1, 3, 4)).unwrap_err();
        assert!(matches!(
            err,
            MetricsError::LengthMismatch {
                expected: 12,
                got: 9,
                ..
            }
        ));
    }
}
