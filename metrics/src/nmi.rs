//! Normalised mutual information between two images' pixel intensities, after Studholme, Hill &
//! Hawkes 1999, "An overlap invariant entropy measure of 3D medical image alignment", computed exactly as
//! scikit-image 0.26 `normalized_mutual_information(a, b, bins=100)`.
//!
//! The joint histogram is built like `np.histogramdd`: 100 bins per image spanning that image's own
//! `min..=max` (edges from `np.linspace`, bins found by `searchsorted(side='right')`, the last bin closed
//! on the right; a constant image gets the range `value - 0.5 ..= value + 0.5`), all channels flattened
//! together. Entropies use the natural log (the ratio does not depend on the base).
//!
//! Label-based NMI (scikit-learn `normalized_mutual_info_score`) on raw float pixels is degenerate and
//! deliberately not offered. This module knows nothing about attacks or ML.

use crate::dims::{checked_pair, ImageDims, Pixel};
use crate::error::MetricsError;

/// Number of histogram bins per image, scikit-image's default.
pub const NMI_BINS: usize = 100;

/// Studholme's normalised mutual information `(H(A) + H(B)) / H(A,B)`, range `[1, 2]`: 1 for
/// independent intensities, 2 when each image's binned intensities determine the other's.
///
/// If both images are constant, `H(A,B) = 0` and the value is NaN, as in scikit-image.
///
/// # Errors
/// [`MetricsError::LengthMismatch`], [`MetricsError::EmptyDims`] or [`MetricsError::NonFinite`].
///
/// # Example
/// ```
/// use fedleak_metrics::{nmi_studholme, ImageDims};
///
/// let dims = ImageDims::new(1, 2, 2);
/// let a = [0.0_f64, 0.0, 1.0, 1.0];
/// // Same intensities: H(A) = H(B) = H(A,B) = ln 2 -> 2.
/// assert!((nmi_studholme(&a, &a, dims)? - 2.0).abs() < 1e-12);
/// // Independent: H(A,B) = 2 ln 2 = H(A) + H(B) -> 1.
/// assert!((nmi_studholme(&a, &[0.0, 1.0, 0.0, 1.0], dims)? - 1.0).abs() < 1e-12);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn nmi_studholme<T: Pixel>(
    reference: &[T],
    test: &[T],
    dims: ImageDims,
) -> Result<f64, MetricsError> {
    let (reference, test) = checked_pair(reference, test, dims)?;
    Ok(nmi_studholme_checked(&reference, &test))
}

/// Normalised mutual information `I(A;B) / H(A,B)` in `[0, 1]`, i.e. [`nmi_studholme`] minus 1: the form
/// to compare with the CLS-token leakage paper's "NMI 0.741".
///
/// # Errors
/// As [`nmi_studholme`].
///
/// # Example
/// ```
/// use fedleak_metrics::{nmi, ImageDims};
///
/// let dims = ImageDims::new(1, 2, 2);
/// let a = [0.0_f32, 0.0, 1.0, 1.0];
/// assert!((nmi(&a, &a, dims)? - 1.0).abs() < 1e-12);
/// assert!(nmi(&a, &[0.0, 1.0, 0.0, 1.0], dims)?.abs() < 1e-12);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn nmi<T: Pixel>(reference: &[T], test: &[T], dims: ImageDims) -> Result<f64, MetricsError> {
    Ok(nmi_studholme(reference, test, dims)? - 1.0)
}

/// [`nmi_studholme`] of two checked, equally long, non-empty `f64` images.
pub(crate) fn nmi_studholme_checked(reference: &[f64], test: &[f64]) -> f64 {
    let bins_a = bin_indices(reference);
    let bins_b = bin_indices(test);
    let mut joint = vec![0_usize; NMI_BINS * NMI_BINS];
    let mut marginal_a = [0_usize; NMI_BINS];
    let mut marginal_b = [0_usize; NMI_BINS];
    for (&a, &b) in bins_a.iter().zip(&bins_b) {
        joint[a * NMI_BINS + b] += 1;
        marginal_a[a] += 1;
        marginal_b[b] += 1;
    }
    let total = reference.len();
    (entropy(&marginal_a, total) + entropy(&marginal_b, total)) / entropy(&joint, total)
}

/// Histogram bin of every value, as `np.histogramdd` assigns them for one axis.
fn bin_indices(values: &[f64]) -> Vec<usize> {
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if lo == hi {
        // numpy `_get_outer_edges`: expand an empty range.
        lo -= 0.5;
        hi += 0.5;
    }
    let edges = linspace(lo, hi, NMI_BINS + 1);
    values
        .iter()
        .map(|&v| {
            if v == hi {
                // The rightmost edge belongs to the last bin.
                NMI_BINS - 1
            } else {
                // searchsorted(side='right') = number of edges <= v; bin = that - 1.
                edges.partition_point(|&edge| edge <= v) - 1
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` with its exact rounding: `i * step + start`, last element `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut edges: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    edges[num - 1] = stop;
    edges
}

/// Shannon entropy (nats) of a histogram of `total` counts; empty bins contribute nothing.
fn entropy(counts: &[usize], total: usize) -> f64 {
    let total = total as f64;
    -counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            p * p.ln()
        })
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_layout() {
        let edges = linspace(0.0, 1.0, 5);
        assert_eq!(edges, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn extremes_land_in_first_and_last_bin() {
        let bins = bin_indices(&[0.2, 0.7, 1.2, 0.2000001]);
        assert_eq!(bins[0], 0);
        assert_eq!(bins[2], NMI_BINS - 1);
        // 0.7 is exactly half-way: edge 50 = 50 * 0.01 + 0.2 -> bin 50 (or 49 if the edge rounds up).
        assert!(bins[1] == 49 || bins[1] == 50, "{bins:?}");
        assert_eq!(bins[3], 0);
    }

    #[test]
    fn constant_image_uses_unit_range_around_value() {
        // Range 0.0..=1.0 for value 0.5 -> edge 50 is 0.5 -> bin 50.
        assert_eq!(bin_indices(&[0.5, 0.5, 0.5]), vec![50, 50, 50]);
    }

    #[test]
    fn constant_image_carries_no_information() {
        let a = [0.1, 0.4, 0.9, 0.3];
        let b = [0.5; 4];
        assert!((nmi_studholme_checked(&a, &b) - 1.0).abs() < 1e-12);
    }
}
