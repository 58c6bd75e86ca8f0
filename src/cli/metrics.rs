//! `fedleak metrics A.png B.png`: scores image B (a reconstruction) against image A (the reference).

use std::path::PathBuf;

use anyhow::{Context, Result};
use fedleak::data::{load_image_file, read_image_shape};
use fedleak_metrics::{score_pair, ImageDims};

/// Arguments of `fedleak metrics`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// The reference (private) image.
    pub reference: PathBuf,
    /// The image to score (a reconstruction); it must have the reference's size and channels.
    pub test: PathBuf,
}

/// Prints `{"psnr_db":..,"ssim":..,"ssim_skimage":..,"nmi":..,"nmi_studholme":..}` on stdout.
pub fn run(args: MetricsArgs) -> Result<()> {
    let shape = read_image_shape(&args.reference)?;
    let test_shape = read_image_shape(&args.test)?;
    if shape != test_shape {
        return Err(super::UsageError(format!(
            "`{}` is {test_shape} but the reference `{}` is {shape}\nhint: score images of the same size and channel count",
            args.test.display(),
            args.reference.display()
        ))
        .into());
    }
    let reference = load_image_file(&args.reference, shape)?;
    let test = load_image_file(&args.test, shape)?;
    let dims = ImageDims::new(shape.channels, shape.height, shape.width);
    let score = score_pair(&reference, &test, dims).with_context(|| {
        format!(
            "cannot score `{}` against `{}`",
            args.test.display(),
            args.reference.display()
        )
    })?;
    let json = MetricsJson {
        psnr_db: finite_or_string(score.psnr_db),
        ssim: score.ssim,
        ssim_skimage: score.ssim_skimage,
        nmi: finite_or_string(score.nmi),
        nmi_studholme: finite_or_string(score.nmi_studholme),
    };
    println!("{}", serde_json::to_string(&json)?);
    Ok(())
}

/// The printed object, fields in the documented order.
#[derive(serde::Serialize)]
struct MetricsJson {
    psnr_db: serde_json::Value,
    ssim: f64,
    ssim_skimage: f64,
    nmi: serde_json::Value,
    nmi_studholme: serde_json::Value,
}

/// JSON has no infinity: identical images (PSNR = inf) are written as the string `"inf"`.
fn finite_or_string(value: f64) -> serde_json::Value {
    if value.is_finite() {
        serde_json::json!(value)
    } else {
        serde_json::json!(value.to_string())
    }
}
