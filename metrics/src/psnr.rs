//! Mean squared error and peak signal-to-noise ratio, as scikit-image 0.26
//! `mean_squared_error` / `peak_signal_noise_ratio(data_range=1)` compute them.
//!
//! Pure pixel arithmetic: this module knows nothing about attacks, models or where images come from.

use crate::dims::{checked_image, checked_pair, ImageDims, Pixel};
use crate::error::{ImageRole, MetricsError};

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

/// PSNR in dB of the image's own mean colour (each channel filled with its mean) against the image:
/// what a reconstruction scores that knows the image's colour and nothing of its layout. PSNR
/// flatters blurry reconstructions; one that scores no more than this has recovered the colour
/// only. A single-colour image gives `f64::INFINITY`.
///
/// # Errors
/// [`MetricsError::LengthMismatch`], [`MetricsError::EmptyDims`] or [`MetricsError::NonFinite`].
///
/// # Example
/// ```
/// use fedleak_metrics::{colour_psnr_db, ImageDims};
///
/// // Channel 0 is 0, 0, 1, 1 (mean 0.5, every pixel 0.5 off); channel 1 is constant.
/// // MSE = (4 x 0.25 + 4 x 0) / 8 = 1/8 -> PSNR = 10 log10 8.
/// let image = [0.0_f32, 0.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3];
/// let psnr = colour_psnr_db(&image, ImageDims::new(2, 2, 2))?;
/// assert!((psnr - 10.0 * 8f64.log10()).abs() < 1e-12);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn colour_psnr_db<T: Pixel>(image: &[T], dims: ImageDims) -> Result<f64, MetricsError> {
    let image = checked_image(image, dims, ImageRole::Reference)?;
    let squared_deviation: f64 = image
        .chunks_exact(dims.plane_len())
        .map(|plane| {
            let mean = plane.iter().sum::<f64>() / plane.len() as f64;
            plane.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>()
        })
        .sum();
    Ok(psnr_db_from_mse(squared_deviation / image.len() as f64))
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
    fn colour_psnr_is_the_psnr_of_the_filled_mean_colour() {
        // Against psnr_db of an image built by hand from each channel's mean.
        let dims = ImageDims::new(3, 4, 5);
        let image: Vec<f64> = (0..dims.len())
            .map(|i| ((i * 37 % 23) as f64 / 22.0).powi(2))
            .collect();
        let filled: Vec<f64> = image
            .chunks_exact(dims.plane_len())
            .flat_map(|plane| {
                let mean = plane.iter().sum::<f64>() / plane.len() as f64;
                vec![mean; plane.len()]
            })
            .collect();
        let expected = psnr_db(&image, &filled, dims).unwrap();
        assert!((colour_psnr_db(&image, dims).unwrap() - expected).abs() < 1e-12);
        assert_eq!(
            colour_psnr_db(&[0.25_f32; 4], ImageDims::new(1, 2, 2)),
            Ok(f64::INFINITY)
        );
        assert!(colour_psnr_db(&[0.0_f32; 3], ImageDims::new(1, 2, 2)).is_err());
    }

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
