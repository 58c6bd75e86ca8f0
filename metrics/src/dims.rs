//! Image shape and pixel type shared by every metric, and the input checks they all run first.
//!
//! Images are planar `C x H x W` slices (channel-major), the layout a `[C, H, W]` tensor flattens to.
//! This module only knows shapes and values; it knows nothing of metrics, attacks or ML.

use std::fmt;

use crate::error::{ImageRole, MetricsError};

/// Shape of one planar `C x H x W` image.
///
/// # Example
/// ```
/// use fedleak_metrics::ImageDims;
///
/// let dims = ImageDims::new(3, 32, 32);
/// assert_eq!(dims.len(), 3 * 32 * 32);
/// assert_eq!(dims.plane_len(), 32 * 32);
/// assert_eq!(dims.to_string(), "3x32x32");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageDims {
    /// Number of channels (1 for grayscale, 3 for RGB).
    pub channels: usize,
    /// Number of rows.
    pub height: usize,
    /// Number of columns.
    pub width: usize,
}

impl ImageDims {
    /// Dims of a `channels x height x width` image.
    ///
    /// # Example
    /// ```
    /// use fedleak_metrics::ImageDims;
    ///
    /// let dims = ImageDims::new(1, 28, 28);
    /// assert_eq!((dims.channels, dims.height, dims.width), (1, 28, 28));
    /// ```
    pub const fn new(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
        }
    }

    /// Number of values a planar slice of these dims holds: `channels * height * width`.
    ///
    /// # Example
    /// ```
    /// use fedleak_metrics::ImageDims;
    ///
    /// assert_eq!(ImageDims::new(3, 4, 5).len(), 60);
    /// ```
    pub const fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether any extent is zero, i.e. the image holds no values.
    ///
    /// # Example
    /// ```
    /// use fedleak_metrics::ImageDims;
    ///
    /// assert!(ImageDims::new(3, 0, 5).is_empty());
    /// assert!(!ImageDims::new(1, 1, 1).is_empty());
    /// ```
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of values in one channel plane: `height * width`.
    ///
    /// # Example
    /// ```
    /// use fedleak_metrics::ImageDims;
    ///
    /// assert_eq!(ImageDims::new(3, 4, 5).plane_len(), 20);
    /// ```
    pub const fn plane_len(&self) -> usize {
        self.height * self.width
    }
}

impl fmt::Display for ImageDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A pixel value the metrics accept: `f32` or `f64`, nominally in `[0, 1]`.
///
/// Sealed on purpose: integer pixels (`u8` in `0..=255`) would silently break the data range of 1, so
/// convert them with `/ 255.0` first.
///
/// # Example
/// ```
/// use fedleak_metrics::Pixel;
///
/// assert_eq!(0.5_f32.to_f64(), 0.5_f64);
/// assert_eq!(0.25_f64.to_f64(), 0.25_f64);
/// ```
pub trait Pixel: Copy + sealed::Sealed {
    /// The value as `f64`, the precision every metric computes in.
    fn to_f64(self) -> f64;
}

impl Pixel for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Pixel for f64 {
    fn to_f64(self) -> f64 {
        self
    }
}

/// Checks that `dims` has no zero extent.
pub(crate) fn check_dims(dims: ImageDims) -> Result<(), MetricsError> {
    if dims.is_empty() {
        return Err(MetricsError::EmptyDims { got: dims });
    }
    Ok(())
}

/// Converts one image to `f64` after checking its length against `dims` and that every value is finite.
pub(crate) fn checked_image<T: Pixel>(
    image: &[T],
    dims: ImageDims,
    role: ImageRole,
) -> Result<Vec<f64>, MetricsError> {
    check_dims(dims)?;
    if image.len() != dims.len() {
        return Err(MetricsError::LengthMismatch {
            role,
            dims,
            expected: dims.len(),
            got: image.len(),
        });
    }
    image
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            let value = value.to_f64();
            if value.is_finite() {
                Ok(value)
            } else {
                Err(MetricsError::NonFinite { role, index, value })
            }
        })
        .collect()
}

/// [`checked_image`] for a (reference, test) pair.
pub(crate) fn checked_pair<T: Pixel>(
    reference: &[T],
    test: &[T],
    dims: ImageDims,
) -> Result<(Vec<f64>, Vec<f64>), MetricsError> {
    let reference = checked_image(reference, dims, ImageRole::Reference)?;
    let test = checked_image(test, dims, ImageRole::Test)?;
    Ok((reference, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_dims_before_length() {
        let err = checked_image::<f64>(&[], ImageDims::new(0, 4, 4), ImageRole::Test).unwrap_err();
        assert_eq!(
            err,
            MetricsError::EmptyDims {
                got: ImageDims::new(0, 4, 4)
            }
        );
    }

    #[test]
    fn rejects_non_finite_with_its_index() {
        let image = [0.0_f32, 0.5, f32::NAN, 1.0];
        let err = checked_image(&image, ImageDims::new(1, 2, 2), ImageRole::Reference).unwrap_err();
        match err {
            MetricsError::NonFinite { role, index, value } => {
                assert_eq!(role, ImageRole::Reference);
                assert_eq!(index, 2);
                assert!(value.is_nan());
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }

    #[test]
    fn converts_f32_exactly() {
        let image = [0.1_f32, 0.7];
        let got = checked_image(&image, ImageDims::new(1, 1, 2), ImageRole::Test).unwrap();
        assert_eq!(got, vec![f64::from(0.1_f32), f64::from(0.7_f32)]);
    }
}
