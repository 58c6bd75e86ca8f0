//! Image priors of the optimisation attacks: what a plausible image looks like when the observed update
//! alone does not pin it down.
//!
//! - Total variation (Inverting Gradients): neighbouring pixels are alike.
//! - The patch prior (GradViT, Hatamizadeh et al. 2022): pixels on either side of a border between two
//!   ViT patches are alike. A ViT's gradient barely constrains a patch's mean colour relative to its
//!   neighbours (each token passes through layer norms), so without this prior reconstructions come out
//!   as a mosaic of patches with wrong offsets; the prior removes exactly those jumps and leaves texture
//!   inside patches to the gradient.

use candle_core::{Tensor, Var};

use crate::Result;

/// Weights of the image priors added to a matching objective.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagePrior {
    /// Weight of the anisotropic total variation.
    pub tv_weight: f64,
    /// Weight of the total variation of the colour-opponent differences (R-G, G-B, B-R; breaching's
    /// "double opponents"): smooths colour without flattening the luminance texture. Ignored for
    /// grayscale images.
    pub opponent_tv_weight: f64,
    /// Weight of the patch-border prior (mean squared jump across patch borders).
    pub patch_weight: f64,
    /// Patch side of the attacked ViT (the patch prior is off when this is 0 or 1).
    pub patch_size: usize,
}

impl ImagePrior {
    /// Whether any prior term is switched on.
    pub fn is_active(&self) -> bool {
        self.tv_weight > 0.0
            || self.opponent_tv_weight > 0.0
            || (self.patch_weight > 0.0 && self.patch_size > 1)
    }

    /// The same prior with every weight multiplied by `factor` (a prior schedule's current weights).
    ///
    /// ```
    /// let prior = fedleak_attacks::ImagePrior { tv_weight: 1e-3, patch_weight: 1e-2, patch_size: 4, ..Default::default() };
    /// let half = prior.scaled(0.5);
    /// assert_eq!((half.tv_weight, half.patch_weight, half.patch_size), (5e-4, 5e-3, 4));
    /// ```
    pub fn scaled(&self, factor: f64) -> ImagePrior {
        ImagePrior {
            tv_weight: self.tv_weight * factor,
            opponent_tv_weight: self.opponent_tv_weight * factor,
            patch_weight: self.patch_weight * factor,
            patch_size: self.patch_size,
        }
    }

    /// The prior's value for images (B x C x H x W), differentiable with respect to them.
    pub fn value(&self, images: &Tensor) -> Result<Tensor> {
        let mut total = Tensor::zeros((), images.dtype(), images.device())?;
        if self.tv_weight > 0.0 {
            total = (total + (total_variation(images)? * self.tv_weight)?)?;
        }
        if self.opponent_tv_weight > 0.0 && images.dim(1)? == 3 {
            let opponents = Tensor::cat(
                &[
                    (images.narrow(1, 0, 1)? - images.narrow(1, 1, 1)?)?,
                    (images.narrow(1, 1, 1)? - images.narrow(1, 2, 1)?)?,
                    (images.narrow(1, 2, 1)? - images.narrow(1, 0, 1)?)?,
                ],
                1,
            )?;
            total = (total + (total_variation(&opponents)? * self.opponent_tv_weight)?)?;
        }
        if self.patch_weight > 0.0 && self.patch_size > 1 {
            total =
                (total + (patch_border_variation(images, self.patch_size)? * self.patch_weight)?)?;
        }
        Ok(total)
    }

    /// The input gradient of the prior (zeros when no term is active).
    pub fn gradient(&self, images: &Tensor) -> Result<Tensor> {
        if !self.is_active() {
            return Ok(images.zeros_like()?);
        }
        let x = Var::from_tensor(images)?;
        let grads = self.value(x.as_tensor())?.backward()?;
        Ok(grads
            .get(x.as_tensor())
            .map_or_else(|| images.zeros_like(), |g| Ok(g.detach()))?)
    }
}

/// Anisotropic total variation: mean absolute difference of horizontal and of vertical neighbours.
pub fn total_variation(images: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    let dx = (images.narrow(3, 1, w - 1)? - images.narrow(3, 0, w - 1)?)?
        .abs()?
        .mean_all()?;
    let dy = (images.narrow(2, 1, h - 1)? - images.narrow(2, 0, h - 1)?)?
        .abs()?
        .mean_all()?;
    Ok((dx + dy)?)
}

/// GradViT's patch prior: the mean squared difference between the last pixel row (column) of each patch
/// and the first row (column) of the patch below (to the right), over all inner patch borders. Zero for
/// an image made of one patch.
///
/// ```
/// use candle_core::{Device, Tensor};
/// // Two 2x2 patches side by side, left all 0, right all 1: every pixel pair across the border jumps by 1.
/// let image = Tensor::from_vec(vec![0f32, 0., 1., 1., 0., 0., 1., 1.], (1, 1, 2, 4), &Device::Cpu)?;
/// let value = fedleak_attacks::patch_border_variation(&image, 2)?.to_scalar::<f32>()?;
/// assert_eq!(value, 1.0);
/// # Ok::<(), fedleak_attacks::AttackError>(())
/// ```
pub fn patch_border_variation(images: &Tensor, patch_size: usize) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    let mut total = Tensor::zeros((), images.dtype(), images.device())?;
    for (dim, side) in [(2usize, h), (3usize, w)] {
        let borders: Vec<u32> = (1..side / patch_size)
            .map(|k| (k * patch_size) as u32)
            .collect();
        if borders.is_empty() {
            continue;
        }
        let before: Vec<u32> = borders.iter().map(|b| b - 1).collect();
        let after = Tensor::new(borders.as_slice(), images.device())?;
        let before = Tensor::new(before.as_slice(), images.device())?;
        let jump = (images.index_select(&after, dim)? - images.index_select(&before, dim)?)?;
        total = (total + jump.sqr()?.mean_all()?)?;
    }
    Ok(total)
}
