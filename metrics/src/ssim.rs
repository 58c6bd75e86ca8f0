//! Structural similarity (SSIM), Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment:
//! from error visibility to structural similarity", computed exactly as scikit-image 0.26
//! `structural_similarity(data_range=1)` does, in two settings:
//!
//! - [`ssim`]: the paper's setting (`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`,
//!   truncate 3.5 -> an 11x11 window);
//! - [`ssim_skimage`]: scikit-image's defaults (7x7 uniform window, sample covariance `N/(N-1)`, N=49).
//!
//! Local statistics are filtered like `scipy.ndimage` with `mode='reflect'` (half-sample symmetric:
//! `d c b a | a b c d`), separably, rows then columns; `K1 = 0.01`, `K2 = 0.03`; the SSIM map is
//! averaged after cropping `(win - 1) / 2` pixels on every side; multi-channel SSIM is the mean of the
//! per-channel values. This module knows nothing about attacks or ML.

use crate::dims::{checked_pair, ImageDims, Pixel};
use crate::error::MetricsError;

/// Side of the Gaussian window of [`ssim`]: `2 * int(3.5 * 1.5 + 0.5) + 1 = 11`.
pub const SSIM_WANG_WINDOW: usize = 11;

/// Side of the uniform window of [`ssim_skimage`].
pub const SSIM_SKIMAGE_WINDOW: usize = 7;

const K1: f64 = 0.01;
const K2: f64 = 0.03;
const WANG_SIGMA: f64 = 1.5;
const WANG_TRUNCATE: f64 = 3.5;

/// The two SSIM settings: which window and which covariance normalisation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SsimWindow {
    /// Normalised 1-D Gaussian of `sigma`, radius `int(truncate * sigma + 0.5)`, population covariance.
    Gaussian { sigma: f64, truncate: f64 },
    /// Box filter of `size` taps, sample covariance `N / (N - 1)` with `N = size^2`.
    Uniform { size: usize },
}

impl SsimWindow {
    /// Wang et al. 2004.
    pub(crate) const WANG: Self = Self::Gaussian {
        sigma: WANG_SIGMA,
        truncate: WANG_TRUNCATE,
    };
    /// scikit-image defaults.
    pub(crate) const SKIMAGE: Self = Self::Uniform {
        size: SSIM_SKIMAGE_WINDOW,
    };

    /// The 1-D kernel applied along each axis; its length is the window side.
    fn kernel(self) -> Vec<f64> {
        match self {
            Self::Gaussian { sigma, truncate } => {
                // scipy.ndimage._gaussian_kernel1d: radius = int(truncate * sd + 0.5), then normalised.
                let radius = (truncate * sigma + 0.5) as i64;
                let weights: Vec<f64> = (-radius..=radius)
                    .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
                    .collect();
                let total: f64 = weights.iter().sum();
                weights.into_iter().map(|w| w / total).collect()
            }
            Self::Uniform { size } => vec![1.0 / size as f64; size],
        }
    }

    /// Factor applied to the local (co)variances.
    fn covariance_norm(self) -> f64 {
        match self {
            Self::Gaussian { .. } => 1.0,
            Self::Uniform { size } => {
                let n = (size * size) as f64;
                n / (n - 1.0)
            }
        }
    }
}

/// SSIM in the Wang et al. 2004 setting (11x11 Gaussian window, sigma 1.5, population covariance), as
/// scikit-image `structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False)`; for several channels, the mean of the per-channel SSIM.
///
/// # Errors
/// [`MetricsError::ImageTooSmall`] if height or width is below 11, and the input errors of
/// [`crate::mse`].
///
/// # Example
/// ```
/// use fedleak_metrics::{ssim, ImageDims};
///
/// let dims = ImageDims::new(1, 11, 11);
/// let image: Vec<f64> = (0..dims.len()).map(|i| (i % 5) as f64 / 4.0).collect();
/// assert_eq!(ssim(&image, &image, dims)?, 1.0);
/// // Constant 0 against constant 1: every window gives C1 / (1 + C1) with C1 = 0.01^2.
/// let (black, white) = (vec![0.0_f32; dims.len()], vec![1.0_f32; dims.len()]);
/// assert!((ssim(&black, &white, dims)? - 1e-4 / 1.0001).abs() < 1e-12);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn ssim<T: Pixel>(reference: &[T], test: &[T], dims: ImageDims) -> Result<f64, MetricsError> {
    ssim_with(reference, test, dims, SsimWindow::WANG, SSIM_WANG_WINDOW)
}

/// SSIM with scikit-image's defaults (7x7 uniform window, sample covariance), as
/// `structural_similarity(a, b, data_range=1)`; for several channels, the mean of the per-channel SSIM.
///
/// # Errors
/// [`MetricsError::ImageTooSmall`] if height or width is below 7, and the input errors of
/// [`crate::mse`].
///
/// # Example
/// ```
/// use fedleak_metrics::{ssim_skimage, ImageDims};
///
/// let dims = ImageDims::new(3, 7, 7);
/// let image: Vec<f32> = (0..dims.len()).map(|i| (i % 3) as f32 / 2.0).collect();
/// assert_eq!(ssim_skimage(&image, &image, dims)?, 1.0);
/// // Constant 0 against constant 1: every window gives C1 / (1 + C1) with C1 = 0.01^2.
/// let (black, white) = (vec![0.0_f64; dims.len()], vec![1.0_f64; dims.len()]);
/// assert!((ssim_skimage(&black, &white, dims)? - 1e-4 / 1.0001).abs() < 1e-12);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn ssim_skimage<T: Pixel>(
    reference: &[T],
    test: &[T],
    dims: ImageDims,
) -> Result<f64, MetricsError> {
    ssim_with(
        reference,
        test,
        dims,
        SsimWindow::SKIMAGE,
        SSIM_SKIMAGE_WINDOW,
    )
}

fn ssim_with<T: Pixel>(
    reference: &[T],
    test: &[T],
    dims: ImageDims,
    window: SsimWindow,
    side: usize,
) -> Result<f64, MetricsError> {
    let (reference, test) = checked_pair(reference, test, dims)?;
    check_window_fits(side, dims)?;
    Ok(ssim_checked(&reference, &test, dims, window))
}

/// Errors unless a `window x window` patch fits in one channel plane (scikit-image's own check).
pub(crate) fn check_window_fits(window: usize, dims: ImageDims) -> Result<(), MetricsError> {
    if dims.height < window || dims.width < window {
        return Err(MetricsError::ImageTooSmall { window, got: dims });
    }
    Ok(())
}

/// Mean over channels of the per-channel SSIM of two checked images whose planes fit the window.
pub(crate) fn ssim_checked(
    reference: &[f64],
    test: &[f64],
    dims: ImageDims,
    window: SsimWindow,
) -> f64 {
    let kernel = window.kernel();
    let plane = dims.plane_len();
    let total: f64 = reference
        .chunks_exact(plane)
        .zip(test.chunks_exact(plane))
        .map(|(x, y)| ssim_plane(x, y, dims.height, dims.width, &kernel, window))
        .sum();
    total / dims.channels as f64
}

/// Mean SSIM of one channel plane, cropped by the window's radius on every side.
fn ssim_plane(
    x: &[f64],
    y: &[f64],
    height: usize,
    width: usize,
    kernel: &[f64],
    window: SsimWindow,
) -> f64 {
    let filter = |image: &[f64]| filter_reflect_2d(image, height, width, kernel);
    let product = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).collect::<Vec<_>>();
    let ux = filter(x);
    let uy = filter(y);
    let uxx = filter(&product(x, x));
    let uyy = filter(&product(y, y));
    let uxy = filter(&product(x, y));

    let cov_norm = window.covariance_norm();
    let c1 = K1 * K1;
    let c2 = K2 * K2;
    let pad = (kernel.len() - 1) / 2;
    let mut sum = 0.0;
    for row in pad..height - pad {
        for col in pad..width - pad {
            let i = row * width + col;
            let vx = cov_norm * (uxx[i] - ux[i] * ux[i]);
            let vy = cov_norm * (uyy[i] - uy[i] * uy[i]);
            let vxy = cov_norm * (uxy[i] - ux[i] * uy[i]);
            let a1 = 2.0 * ux[i] * uy[i] + c1;
            let a2 = 2.0 * vxy + c2;
            let b1 = ux[i] * ux[i] + uy[i] * uy[i] + c1;
            let b2 = vx + vy + c2;
            sum += (a1 * a2) / (b1 * b2);
        }
    }
    sum / ((height - 2 * pad) * (width - 2 * pad)) as f64
}

/// Index into `0..n` of position `i` under scipy's `reflect` boundary (half-sample symmetric).
fn reflect_index(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m < n {
        m
    } else {
        2 * n - 1 - m
    }
}

/// Correlates a `height x width` plane with `kernel` along rows' axis 0 then axis 1, like
/// `scipy.ndimage.correlate1d` applied per axis with `mode='reflect'` and the kernel centred.
fn filter_reflect_2d(image: &[f64], height: usize, width: usize, kernel: &[f64]) -> Vec<f64> {
    let radius = (kernel.len() / 2) as isize;
    // Axis 0 (down the columns).
    let mut vertical = vec![0.0; image.len()];
    for row in 0..height {
        for col in 0..width {
            vertical[row * width + col] = kernel
                .iter()
                .enumerate()
                .map(|(k, w)| {
                    let src = reflect_index(row as isize + k as isize - radius, height);
                    w * image[src * width + col]
                })
                .sum();
        }
    }
    // Axis 1 (along each row).
    let mut out = vec![0.0; image.len()];
    for row in 0..height {
        let line = &vertical[row * width..(row + 1) * width];
        for col in 0..width {
            out[row * width + col] = kernel
                .iter()
                .enumerate()
                .map(|(k, w)| w * line[reflect_index(col as isize + k as isize - radius, width)])
                .sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_is_half_sample_symmetric() {
        // d c b a | a b c d | d c b a
        let got: Vec<usize> = (-4..8).map(|i| reflect_index(i, 4)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]);
    }

    #[test]
    fn wang_kernel_has_eleven_normalised_taps() {
        let kernel = SsimWindow::WANG.kernel();
        assert_eq!(kernel.len(), SSIM_WANG_WINDOW);
        assert!((kernel.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        // Ratio of neighbouring taps is exp(-(2x+1) / (2 sigma^2)).
        let expected = (-1.0_f64 / (2.0 * 1.5 * 1.5)).exp();
        assert!((kernel[6] / kernel[5] - expected).abs() < 1e-15);
    }

    #[test]
    fn box_filter_of_reflected_ramp() {
        // Row [0, 1, 2] with a 3-tap box: reflected ends give (0+0+1)/3, (0+1+2)/3, (1+2+2)/3.
        let out = filter_reflect_2d(&[0.0, 1.0, 2.0], 1, 3, &[1.0 / 3.0; 3]);
        let expected = [1.0 / 3.0, 1.0, 5.0 / 3.0];
        for (got, want) in out.iter().zip(expected) {
            assert!((got - want).abs() < 1e-15, "{out:?}");
        }
    }

    #[test]
    fn too_small_image_is_an_error() {
        let dims = ImageDims::new(1, 10, 32);
        let image = vec![0.5_f64; dims.len()];
        assert_eq!(
            ssim(&image, &image, dims).unwrap_err(),
            MetricsError::ImageTooSmall {
                window: 11,
                got: dims
            }
        );
        assert!(ssim_skimage(&image, &image, dims).is_ok());
    }
}
