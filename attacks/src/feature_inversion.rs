//! Feature inversion: optimise images so that the backbone's features (a ViT's CLS token after the final
//! layer norm) match observed feature vectors (Mahendran & Vedaldi, "Understanding Deep Image
//! Representations by Inverting Them", CVPR 2015, with the optimiser of Inverting Gradients).
//!
//! Applies to [`Observation::Features`]: one image is reconstructed per observed feature row (a single
//! image's CLS token, or a class prototype, i.e. the mean CLS token of a class).
//!
//! Objective (per image, averaged over the batch): the feature loss ([`FeatureLoss::Cosine`],
//! `1 - cos(f(x), t)`, or [`FeatureLoss::RelativeL2`], `|f(x) - t|^2 / |t|^2`), plus `tv_weight` times
//! the total variation of the image. Optimiser: Adam on the image, step decay by 10x at 3/8, 5/8 and 7/8
//! of the iterations, box constraint [0, 1] after every step. Several random restarts (uniform noise);
//! the restart with the lowest *feature loss* (without the prior) is returned — the attack never sees
//! ground truth. Only first-order gradients are needed (one backward pass per step).

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::TargetModel;
use crate::observation::Observation;
use crate::prior::total_variation;
use crate::reconstruction::{AttackOutcome, Reconstruction};
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "feature_inversion";

/// How candidate features are compared with the observed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLoss {
    /// `1 - cos(f(x), t)`: ignores the feature's scale.
    Cosine,
    /// `|f(x) - t|^2 / |t|^2`: the squared error relative to the observed norm (direction and scale).
    RelativeL2,
}

/// Settings of the feature-inversion attack.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureInversionConfig {
    /// Adam iterations per restart.
    pub iterations: usize,
    /// Random restarts (the best by feature loss is kept).
    pub restarts: usize,
    /// Adam step size on the image (pixels in [0, 1]).
    pub lr: f64,
    /// Weight of the total-variation prior.
    pub tv_weight: f64,
    /// The feature loss.
    pub loss: FeatureLoss,
    /// Seed of the random initial images.
    pub seed: u64,
}

impl Default for FeatureInversionConfig {
    fn default() -> Self {
        Self {
            iterations: 300,
            restarts: 3,
            lr: 0.05,
            tv_weight: 0.05,
            loss: FeatureLoss::RelativeL2,
            seed: 0,
        }
    }
}

/// The feature-matching objective of candidate images against observed features (n x D), and its
/// input gradient. What [`invert_features`] optimises; public so callers can score a start image.
pub struct FeatureMatcher<'a> {
    model: &'a dyn TargetModel,
    target: Tensor,
    loss: FeatureLoss,
    tv_weight: f64,
}

impl<'a> FeatureMatcher<'a> {
    /// A matcher for `target` (n x D observed features) under the model's global parameters. `None`
    /// when the model cannot compute features ([`TargetModel::features`] is not implemented).
    ///
    /// # Errors
    /// [`AttackError::Observation`] when `target` is not a non-empty matrix whose width is the model's
    /// feature width, or holds non-finite values or a zero row.
    pub fn new(
        model: &'a dyn TargetModel,
        target: &Tensor,
        loss: FeatureLoss,
        tv_weight: f64,
    ) -> Result<Option<Self>> {
        let bad = |reason: String| AttackError::Observation {
            name: "features".into(),
            reason,
        };
        let (rows, width) = match target.dims() {
            [r, w] if *r > 0 && *w > 0 => (*r, *w),
            dims => {
                return Err(bad(format!(
                    "expected a non-empty n x D matrix, got {dims:?}"
                )))
            }
        };
        let (c, h, w) = model.input_dims();
        let dtype = model
            .parameters()
            .values()
            .next()
            .map_or(DType::F32, |t| t.dtype());
        let probe = Tensor::zeros((1, c, h, w), dtype, target.device())?;
        let Some(features) = model.features(model.parameters(), &probe)? else {
            return Ok(None);
        };
        let model_width = features.dim(1)?;
        if model_width != width {
            return Err(bad(format!(
                "got {width} values per row, and the model's features have {model_width}"
            )));
        }
        let target = target.to_dtype(dtype)?;
        let norms = target
            .to_dtype(DType::F64)?
            .sqr()?
            .sum(1)?
            .to_vec1::<f64>()?;
        if let Some((row, norm)) = norms
            .iter()
            .enumerate()
            .find(|(_, n)| !(n.is_finite() && **n > 0.0))
        {
            return Err(bad(format!(
                "row {row} of {rows} has squared norm {norm}: nothing to match"
            )));
        }
        Ok(Some(Self {
            model,
            target,
            loss,
            tv_weight,
        }))
    }

    /// Number of images to reconstruct (rows of the observed features).
    pub fn rows(&self) -> usize {
        self.target.dims()[0]
    }

    /// The feature loss of every row (n), graph kept to `images`.
    fn row_loss_tensor(&self, images: &Tensor) -> Result<Tensor> {
        let features = self
            .model
            .features(self.model.parameters(), images)?
            .ok_or_else(|| AttackError::Observation {
                name: "features".into(),
                reason: "the model stopped providing features".into(),
            })?;
        let t = &self.target;
        let per_row = match self.loss {
            FeatureLoss::Cosine => {
                let dot = (&features * t)?.sum(1)?;
                let norms = (features.sqr()?.sum(1)?.sqrt()? * t.sqr()?.sum(1)?.sqrt()?)?;
                (dot / norms.maximum(1e-30)?)?.affine(-1.0, 1.0)?
            }
            FeatureLoss::RelativeL2 => ((&features - t)?.sqr()?.sum(1)? / t.sqr()?.sum(1)?)?,
        };
        Ok(per_row)
    }

    /// The feature loss (mean over rows), graph kept to `images`.
    fn loss_tensor(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.row_loss_tensor(images)?.mean_all()?)
    }

    /// The feature loss of every image (row) of `images`, without the prior.
    pub fn row_losses(&self, images: &Tensor) -> Result<Vec<f64>> {
        Ok(self
            .row_loss_tensor(images)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?)
    }

    /// The feature loss of `images` (n x C x H x W), without the prior.
    pub fn feature_loss(&self, images: &Tensor) -> Result<f64> {
        Ok(self
            .loss_tensor(images)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// The feature loss (without the prior) and the input gradient of feature loss + prior.
    pub fn objective_and_gradient(&self, images: &Tensor) -> Result<(f64, Tensor)> {
        let x = Var::from_tensor(&images.detach())?;
        let loss = self.loss_tensor(x.as_tensor())?;
        let total = if self.tv_weight > 0.0 {
            (&loss + (total_variation(x.as_tensor())? * self.tv_weight)?)?
        } else {
            loss.clone()
        };
        let grads = total.backward()?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(AttackError::Numerical {
                attack: ATTACK,
                reason: format!("the feature loss is {value}"),
            });
        }
        let grad = match grads.get(x.as_tensor()) {
            Some(g) => g.detach(),
            None => images.zeros_like()?,
        };
        Ok((value, grad))
    }

    /// Adam with step decay and the box constraint from `start`; returns the final feature loss and
    /// the images (clamped to [0, 1]).
    pub fn optimise(
        &self,
        start: Tensor,
        config: &FeatureInversionConfig,
    ) -> Result<(f64, Tensor)> {
        let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
        let mut images = start.clamp(0.0, 1.0)?;
        let mut m = images.zeros_like()?;
        let mut v = images.zeros_like()?;
        let milestones = [3, 5, 7].map(|k| config.iterations * k / 8);
        for step in 1..=config.iterations {
            let (_, grad) = self.objective_and_gradient(&images)?;
            let lr =
                config.lr * 0.1f64.powi(milestones.iter().filter(|&&s| step > s).count() as i32);
            m = ((m * beta1)? + (&grad * (1.0 - beta1))?)?;
            v = ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m / (1.0 - beta1.powi(step as i32)))?;
            let v_hat = (&v / (1.0 - beta2.powi(step as i32)))?;
            images = (images - ((m_hat / (v_hat.sqrt()? + eps)?)? * lr)?)?.clamp(0.0, 1.0)?;
        }
        Ok((self.feature_loss(&images)?, images))
    }
}

/// Uniform noise in [0, 1] of shape (`batch`, C, H, W) for `model`, from `rng`: the start of each
/// restart of [`invert_features`].
pub fn random_images(model: &dyn TargetModel, batch: usize, rng: &mut StdRng) -> Result<Tensor> {
    noise_around_grey(model, batch, 1.0, rng)
}

/// Uniform noise `spread` wide centred on mid-grey, in [0.5 - spread / 2, 0.5 + spread / 2], of shape
/// (`batch`, C, H, W) for `model`, from `rng` (one draw per pixel whatever the spread). A spread of 1
/// gives exactly [`random_images`]; 0 a flat grey image.
pub fn noise_around_grey(
    model: &dyn TargetModel,
    batch: usize,
    spread: f64,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let (c, h, w) = model.input_dims();
    let (dtype, device) = model
        .parameters()
        .values()
        .next()
        .map(|t| (t.dtype(), t.device().clone()))
        .unwrap_or((DType::F32, candle_core::Device::Cpu));
    // u * spread + offset: exactly u at spread 1.
    let (scale, offset) = (spread as f32, (0.5 - 0.5 * spread) as f32);
    let init: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random::<f32>() * scale + offset)
        .collect();
    Ok(Tensor::from_vec(init, (batch, c, h, w), &device)?.to_dtype(dtype)?)
}

/// Inverts observed features into images: one image per feature row; for every row, the restart with
/// the lowest feature loss of that row is kept (rows are independent).
///
/// Not applicable to updates or ciphertexts, nor to models that do not provide features
/// ([`TargetModel::features`]). The reconstruction's `objective` is the feature loss of the returned
/// images; `labels` is `None` (a feature vector carries no label).
///
/// # Errors
/// See [`FeatureMatcher::new`]; [`AttackError::Numerical`] when the loss becomes non-finite.
pub fn invert_features(
    observation: &Observation,
    model: &dyn TargetModel,
    config: &FeatureInversionConfig,
) -> Result<AttackOutcome> {
    let not_applicable = |reason: String| {
        Ok(AttackOutcome::NotApplicable {
            attack: ATTACK,
            reason,
        })
    };
    let features = match observation {
        Observation::Features { features } => features,
        Observation::Ciphertext { description } => {
            return not_applicable(format!("only ciphertext is observed ({description})"))
        }
        _ => {
            return not_applicable(
                "an update is observed, not features (recover the classifier input first)".into(),
            )
        }
    };
    let started = Instant::now();
    let Some(matcher) = FeatureMatcher::new(model, features, config.loss, config.tv_weight)? else {
        return not_applicable("the model does not expose its features".into());
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    let rows = matcher.rows();
    // Per row: (feature loss, image 1 x C x H x W) of the best restart so far.
    let mut best: Vec<Option<(f64, Tensor)>> = vec![None; rows];
    for _ in 0..config.restarts.max(1) {
        let start = random_images(model, rows, &mut rng)?;
        let (_, images) = matcher.optimise(start, config)?;
        for (row, loss) in matcher.row_losses(&images)?.into_iter().enumerate() {
            if best[row].as_ref().is_none_or(|(b, _)| loss < *b) {
                best[row] = Some((loss, images.narrow(0, row, 1)?));
            }
        }
    }
    let best: Vec<(f64, Tensor)> = best.into_iter().flatten().collect();
    if best.len() != rows {
        return not_applicable("no restart ran".into());
    }
    let objective = best.iter().map(|(l, _)| l).sum::<f64>() / rows as f64;
    let images = Tensor::cat(&best.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?;
    Ok(AttackOutcome::Reconstructed(Reconstruction {
        images: images.clamp(0.0, 1.0)?.to_dtype(DType::F32)?,
        labels: None,
        attack: ATTACK,
        iterations: config.iterations,
        restarts: config.restarts.max(1),
        objective,
        seconds: started.elapsed().as_secs_f64(),
    }))
}
