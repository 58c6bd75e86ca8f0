//! Single image files: decoding PNG/JPEG and converting any image to a target [`ImageShape`].
//!
//! The conversion every loader shares: resize to the target height x width with a bilinear (triangle)
//! filter unless already that size; grayscale replicated to RGB; RGB reduced to grayscale by ITU-R
//! BT.601 luma (0.299 R + 0.587 G + 0.114 B); alpha dropped; values f32 in [0, 1]; channel-planar
//! output (C x H x W). A file that cannot be decoded is an [`Error::CorruptImage`] naming it.
//!
//! This module knows nothing of labels, splits or datasets.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, Luma, Pixel, Rgb};

use super::ImageShape;
use crate::{Error, Result};

/// File extensions (lower case) read as images; other files in a dataset directory are skipped.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// True when `name` ends with one of [`IMAGE_EXTENSIONS`] (case-insensitive).
///
/// ```
/// use fedleak::data::image_file::has_image_extension;
/// assert!(has_image_extension("a/b/Tile.JPG"));
/// assert!(!has_image_extension("manifest.csv"));
/// ```
pub fn has_image_extension(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Loads the image file at `path` as `shape.len()` values (C x H x W, f32 in [0, 1]), converted as
/// described in the module doc.
///
/// ```
/// use fedleak::data::{load_image_file, ImageShape};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("grey.png");
/// image::GrayImage::from_pixel(4, 4, image::Luma([51])).save(&path).unwrap();
/// let pixels = load_image_file(&path, ImageShape::new(3, 4, 4))?;
/// assert_eq!(pixels, vec![0.2; 48]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_image_file(path: &Path, shape: ImageShape) -> Result<Vec<f32>> {
    shape.check_target()?;
    let image = read_image(path)?;
    let mut out = Vec::with_capacity(shape.len());
    append_converted(&image, shape, &mut out);
    Ok(out)
}

/// The native shape of the image file at `path`: 1 channel if it has no colour, else 3 (alpha is not
/// counted), and its height and width.
///
/// ```
/// use fedleak::data::{read_image_shape, ImageShape};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("rgb.png");
/// image::RgbImage::new(5, 4).save(&path).unwrap();
/// assert_eq!(read_image_shape(&path)?, ImageShape::new(3, 4, 5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_image_shape(path: &Path) -> Result<ImageShape> {
    let image = read_image(path)?;
    let channels = if image.color().has_color() { 3 } else { 1 };
    Ok(ImageShape::new(
        channels,
        image.height() as usize,
        image.width() as usize,
    ))
}

fn read_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// Decodes PNG or JPEG `bytes` (format guessed from the content); `path` names them in errors.
pub(crate) fn decode_image(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    image::load_from_memory(bytes).map_err(|e| Error::CorruptImage {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Appends `image` converted to `target` (C x H x W planar, f32 in [0, 1]) to `out`.
pub(crate) fn append_converted(image: &DynamicImage, target: ImageShape, out: &mut Vec<f32>) {
    let (width, height) = (target.width as u32, target.height as u32);
    if target.channels == 1 || !image.color().has_color() {
        let luma = if image.color().has_color() {
            luma_601(&image.to_rgb32f())
        } else {
            image.to_luma32f()
        };
        let luma = resize_to(luma, width, height);
        for _ in 0..target.channels {
            out.extend(luma.as_raw().iter().map(|v| v.clamp(0.0, 1.0)));
        }
    } else {
        let rgb = resize_to(image.to_rgb32f(), width, height);
        for channel in 0..3 {
            out.extend(rgb.pixels().map(|p| p.0[channel].clamp(0.0, 1.0)));
        }
    }
}

/// Appends an interleaved 8-bit image (`height` x `width` x `channels`, channels 1 or 3) converted to
/// `target` to `out`. Panics if `data` has the wrong length or `channels` is not 1 or 3 (the caller
/// checks both).
pub(crate) fn append_converted_u8(
    data: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    target: ImageShape,
    out: &mut Vec<f32>,
) {
    let (w, h) = (width as u32, height as u32);
    let image = match channels {
        1 => ImageBuffer::<Luma<u8>, _>::from_raw(w, h, data.to_vec()).map(DynamicImage::from),
        3 => ImageBuffer::<Rgb<u8>, _>::from_raw(w, h, data.to_vec()).map(DynamicImage::from),
        _ => None,
    };
    let image = image.unwrap_or_else(|| {
        panic!(
            "interleaved image of {} bytes does not hold {height}x{width}x{channels}",
            data.len()
        )
    });
    append_converted(&image, target, out);
}

fn luma_601(rgb: &ImageBuffer<Rgb<f32>, Vec<f32>>) -> ImageBuffer<Luma<f32>, Vec<f32>> {
    let data = rgb
        .pixels()
        .map(|p| 0.299 * p.0[0] + 0.587 * p.0[1] + 0.114 * p.0[2])
        .collect();
    ImageBuffer::from_raw(rgb.width(), rgb.height(), data).expect("one luma value per RGB pixel")
}

fn resize_to<P>(
    image: ImageBuffer<P, Vec<f32>>,
    width: u32,
    height: u32,
) -> ImageBuffer<P, Vec<f32>>
where
    P: Pixel<Subpixel = f32> + 'static,
{
    if image.width() == width && image.height() == height {
        image
    } else {
        image::imageops::resize(&image, width, height, FilterType::Triangle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(image: DynamicImage, target: ImageShape) -> Vec<f32> {
        let mut out = Vec::new();
        append_converted(&image, target, &mut out);
        out
    }

    #[test]
    fn rgb_to_gray_uses_bt601_luma() {
        let rgb = image::RgbImage::from_pixel(2, 1, Rgb([255, 0, 0]));
        let out = convert(rgb.into(), ImageShape::new(1, 1, 2));
        assert_eq!(out.len(), 2);
        assert!((out[0] - 0.299).abs() < 1e-6, "{out:?}");
        let rgb = image::RgbImage::from_pixel(1, 1, Rgb([10, 200, 30]));
        let out = convert(rgb.into(), ImageShape::new(1, 1, 1));
        let expected = (0.299 * 10.0 + 0.587 * 200.0 + 0.114 * 30.0) / 255.0;
        assert!((out[0] - expected).abs() < 1e-6, "{out:?} vs {expected}");
    }

    #[test]
    fn rgb_output_is_channel_planar() {
        let mut rgb = image::RgbImage::new(2, 1);
        rgb.put_pixel(0, 0, Rgb([255, 0, 51]));
        rgb.put_pixel(1, 0, Rgb([0, 255, 102]));
        let out = convert(rgb.into(), ImageShape::new(3, 1, 2));
        assert_eq!(out, vec![1.0, 0.0, 0.0, 1.0, 0.2, 0.4]);
    }

    #[test]
    fn gray_is_replicated_to_rgb() {
        let gray = image::GrayImage::from_raw(2, 1, vec![0, 255]).unwrap();
        let out = convert(gray.into(), ImageShape::new(3, 1, 2));
        assert_eq!(out, vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn resize_of_constant_image_is_constant_and_in_range() {
        let rgb = image::RgbImage::from_pixel(28, 28, Rgb([255, 255, 255]));
        let out = convert(rgb.into(), ImageShape::new(3, 32, 32));
        assert_eq!(out.len(), 3 * 32 * 32);
        assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn downscale_averages() {
        // A 2x2 checkerboard halved is its mean grey.
        let gray = image::GrayImage::from_raw(2, 2, vec![0, 255, 255, 0]).unwrap();
        let out = convert(gray.into(), ImageShape::new(1, 1, 1));
        assert!((out[0] - 0.5).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn corrupt_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        std::fs::write(&path, b"this is not a png").unwrap();
        let err = load_image_file(&path, ImageShape::new(3, 8, 8)).unwrap_err();
        match &err {
            Error::CorruptImage { path: p, .. } => assert_eq!(p, &path),
            other => panic!("expected CorruptImage, got {other:?}"),
        }
        assert!(err.to_string().contains("x.png"));
    }

    #[test]
    fn missing_file_is_io_error() {
        let err =
            load_image_file(Path::new("/nonexistent/a.png"), ImageShape::new(1, 4, 4)).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }
}
