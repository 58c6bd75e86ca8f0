//! Images on disk: one PNG per reconstruction, and grids (private | reconstruction) for reports.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Converts one image (C x H x W, values in [0, 1]) to 8-bit RGB (grayscale replicated).
fn to_rgb8(image: &Tensor) -> Result<image::RgbImage> {
    let (c, h, w) = image.dims3()?;
    let values = image
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let px = |ch: usize| (values[ch * h * w + y * w + x] * 255.0).round() as u8;
            let rgb = if c == 1 {
                [px(0); 3]
            } else {
                [px(0), px(1), px(2)]
            };
            out.put_pixel(x as u32, y as u32, image::Rgb(rgb));
        }
    }
    Ok(out)
}

/// Writes one image (C x H x W in [0, 1]) as an 8-bit PNG (`round(clip(x) * 255)`).
pub fn write_png(image: &Tensor, path: &Path) -> Result<()> {
    to_rgb8(image)?
        .save(path)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))
}

/// A grid with one row per image set (e.g. private, reconstruction) and one column per image, scaled by
/// an integer `zoom`, with a 2-pixel white gap; written as PNG to `path`.
pub fn image_grid(rows: &[&Tensor], zoom: u32, path: &Path) -> Result<()> {
    let mut columns = 0;
    for row in rows {
        columns = columns.max(row.dim(0)?);
    }
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let (_, _, h, w) = first.dims4()?;
    let (cell_w, cell_h, gap) = (w as u32 * zoom, h as u32 * zoom, 2u32);
    let mut grid = image::RgbImage::from_pixel(
        columns as u32 * (cell_w + gap) + gap,
        rows.len() as u32 * (cell_h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for col in 0..row.dim(0)? {
            let cell = to_rgb8(&row.get(col)?)?;
            let scaled = image::imageops::resize(
                &cell,
                cell_w,
                cell_h,
                image::imageops::FilterType::Nearest,
            );
            let (x0, y0) = (
                gap + col as u32 * (cell_w + gap),
                gap + r as u32 * (cell_h + gap),
            );
            image::imageops::replace(&mut grid, &scaled, x0 as i64, y0 as i64);
        }
    }
    grid.save(path)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))
}
