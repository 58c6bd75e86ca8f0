//! Patch refinement: APRIL's linear system for the patches, solved with token gradients *estimated* at
//! an optimisation attack's result, for position encodings whose gradient is not observed.
//!
//! The patch embedding's weight gradient is `dW = sum_i g_i x_i^T` over every patch token `i` of every
//! image (`g_i = dL/dz0_i`, the token's gradient; `x_i` its flattened patch), linear in the patches
//! once the token gradients are known. APRIL reads them off a learnable position embedding's gradient;
//! behind a fixed sin-cos table they are not observed. At candidate images `x'` close to the private
//! ones (an Inverting Gradients result), the attacker computes them, `g'_i`, by a first-order pass of
//! its own; they are close to the true ones but not equal (relative error 4.3e-3 at a 21.6 dB
//! reconstruction of an IHC tile, tiny ViT), and the system is ill-conditioned (condition 1.1e5 there),
//! so an exact solve amplifies that error into noise (6.4 dB). Regularised towards the candidates,
//!
//! `X = argmin |G'^T X - dW / s|^2 + lambda |X - X'|^2`,  `lambda = ridge * |G'|_F^2`,
//!
//! the well-determined directions move to what the observed gradient says and the ill-determined ones
//! stay where the optimisation put them. `s`, the least-squares scale of `dW` on `G'^T X'`, absorbs a
//! scaled update (a clipped gradient).
//!
//! Inverting Gradients ([`crate::invert_gradients`]) refines at each of signed Adam's step decays and
//! its final result, keeping a refinement only when it raises the matching objective at most
//! [`crate::MAX_REFINEMENT_RISE`]-fold (the refined images are closer to the private ones but match
//! the *whole* observed gradient somewhat less well; far from the images, the estimated token
//! gradients are wrong and the objective rises by orders of magnitude). Never chosen by ground truth.
//! Measured on eight sin-cos IHC tiles (tiny ViT, FedSGD batch 1, 400 iterations, 2 restarts): 21.73
//! dB / SSIM 0.379 without, 22.27 / 0.425 refining the result only (every tile gained, +0.3 to +0.8
//! dB), 22.58 / 0.451 refining at the step decays too; on eight other tiles of the same captures
//! 25.13 / 0.516, 25.84 / 0.563 and 26.23 / 0.583. One solve after another without optimisation in
//! between does not help: token gradients re-estimated at the refined images lowered the residual of
//! `dW` further but drifted away from the private image (22.01 -> 21.36 dB over five solves on one
//! tile).
//!
//! A FedAvg client's plain-SGD delta of `S` local steps on its images is `-lr sum_s G_s^T X` in the
//! patch embedding's weight: still linear in `X`, with `G_s` the token gradients of step `s`
//! ([`refine_patches_after_steps`]; the attacker unrolls the steps at its candidates to estimate
//! them). Measured 2026-12-03 (tiny ViT, sin-cos, FedAvg with 4 local steps of plain SGD on one IHC
//! tile per client, `fedleak attack --attack auto`, 400 iterations, 2 restarts): clients 1 2 4 8
//! 22.06 dB / SSIM 0.367 without, 22.80 / 0.448 with it (21.86 -> 21.45, 21.96 -> 22.46, 23.09 ->
//! 23.99, 21.32 -> 23.28); clients 0 3 5 6 24.91 / 0.513 -> 25.95 / 0.562, each of them higher.
//! With heavy-ball momentum step `s`'s gradient enters the delta with `-lr c_s` instead: at momentum
//! 0.9 (otherwise the same, clients 1 2 4 8) 22.19 / 0.367 -> 22.91 / 0.442.

use std::ops::Range;

use candle_core::Tensor;

use crate::april::{
    images_to_patches, patches_to_images, solve_least_squares, token_patch_products,
};
use crate::linear::{observed_tensor, tensor_to_f64};
use crate::model::{one_hot, ParamMap, TargetModel};
use crate::observation::consecutive_ranges;
use crate::{AttackError, Result};

/// Name of the step in error messages.
const ATTACK: &str = "patch-refinement";

/// The default ridge for one image, relative to the squared Frobenius norm of the estimated token
/// gradients. On the eight sin-cos IHC tiles' Inverting Gradients results (tiny ViT, batch 1, read
/// back from their 8-bit PNGs), tiles 1 2 4 8: 1e-6 gave 21.71 / 22.32 / 23.57 / 22.43 dB, 3e-6
/// 22.00 / 22.52 / 23.73 / 22.51, 1e-5 21.98 / 22.54 / 23.56 / 22.31, 3e-5 21.86 / 22.50 / 23.37 /
/// 22.11 (from 21.56 / 22.24 / 22.97 / 21.69 unrefined).
pub const SINGLE_IMAGE_PATCH_REFINEMENT: f64 = 3e-6;

/// The default ridge for a batch. Eight images of 64 patches are 512 unknown patch rows against 192
/// equations per pixel of a patch: the system is underdetermined and needs more of the candidates. On
/// the two batch-8 sin-cos IHC captures' Inverting Gradients results (2000 iterations, read back from
/// their 8-bit PNGs; client 0 / client 1, 18.59 / 16.27 dB unrefined): 3e-6 gave 14.59 / 16.07 dB,
/// 1e-5 17.81 / 16.26, 3e-5 19.50 / 16.36, 1e-4 20.29 / 16.39, 3e-4 20.19 / 16.35, 1e-3 19.48 /
/// 16.31.
pub const BATCH_PATCH_REFINEMENT: f64 = 1e-4;

/// Below this cosine between the observed patch-embedding gradient and the one the candidates' token
/// gradients predict, the candidates do not explain the update (noise, another model) and the
/// refinement is skipped.
const MIN_EXPLAINED_COSINE: f64 = 0.99;

/// Refines candidate images (B x C x H x W) of a gradient observation `update` with the labels of the
/// private batch (see the module docs). `ridge` is the regularisation relative to the token
/// gradients' energy. Returns the refined images (same dtype, clamped to [0, 1]), or `None` when the
/// step does not apply: no patch embedding, no token gradients from the model, zero token gradients,
/// or candidates whose token gradients explain less than cosine 0.99 of the observed patch-embedding
/// gradient.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks the patch-embedding weight or its shape does
/// not fit the model; [`AttackError::Numerical`] when the solve fails.
pub fn refine_patches(
    model: &dyn TargetModel,
    update: &ParamMap,
    images: &Tensor,
    labels: &[u32],
    ridge: f64,
) -> Result<Option<Tensor>> {
    let gradient = [(model.parameters().clone(), 1.0)];
    refine_patches_after_steps(model, update, &gradient, images, labels, ridge)
}

/// [`refine_patches`] for the weight delta of SGD steps on the private images (FedAvg): each of
/// `steps` is the parameters a local step took its gradient at (the global ones first; the attacker
/// computes the others by unrolling the steps at the candidates) and the factor that gradient enters
/// the delta with: `-lr` for plain SGD, `-lr c_s` with heavy-ball momentum (see
/// [`crate::UpdateSource::MomentumSgdDelta`]). The patch embedding's delta is then `sum_s f_s G_s^T
/// X`, still linear in the patches `X`, with `G_s` the token gradients of step `s` estimated at the
/// candidates. The global parameters with factor 1 read `update` as a gradient ([`refine_patches`]).
///
/// # Errors
/// As [`refine_patches`].
pub fn refine_patches_after_steps(
    model: &dyn TargetModel,
    update: &ParamMap,
    steps: &[(ParamMap, f64)],
    images: &Tensor,
    labels: &[u32],
    ridge: f64,
) -> Result<Option<Tensor>> {
    refine_patches_after_steps_on_batches(model, update, steps, None, images, labels, ridge)
}

/// [`refine_patches_after_steps`] where each local step may have trained on a batch of its own
/// ([`crate::LocalBatches::PerStep`]): with `step_batches`, step `s` took its gradient on the next
/// `step_batches[s]` of `images` (and `labels`) after those of the steps before it, so each image's
/// patches enter the delta through its own step's token gradients only (`sum_s f_s G_s^T X_s`);
/// `None`: every step on all of `images`.
///
/// # Errors
/// As [`refine_patches`]; [`AttackError::Configuration`] when `step_batches` does not give one
/// batch per step or does not add up to the images.
pub fn refine_patches_after_steps_on_batches(
    model: &dyn TargetModel,
    update: &ParamMap,
    steps: &[(ParamMap, f64)],
    step_batches: Option<&[usize]>,
    images: &Tensor,
    labels: &[u32],
    ridge: f64,
) -> Result<Option<Tensor>> {
    let batch = images.dim(0)?;
    let ranges: Vec<Range<usize>> = match step_batches {
        Some(sizes) => {
            if sizes.len() != steps.len() || sizes.iter().sum::<usize>() != batch {
                return Err(AttackError::Configuration {
                    attack: ATTACK,
                    reason: format!(
                        "step batches {sizes:?} for {} step(s) and {batch} image(s)",
                        steps.len()
                    ),
                });
            }
            consecutive_ranges(0, sizes)
        }
        None => vec![0..batch; steps.len()],
    };
    let steps: Vec<RefinementStep> = steps
        .iter()
        .zip(ranges)
        .map(|((parameters, factor), images)| RefinementStep {
            parameters: parameters.clone(),
            factor: *factor,
            images,
        })
        .collect();
    refine_patches_after_client_steps(model, update, &steps, images, labels, ridge)
}

/// One gradient inside an observed update, for [`refine_patches_after_client_steps`].
#[derive(Debug, Clone)]
pub struct RefinementStep {
    /// The parameters the gradient was taken at.
    pub parameters: ParamMap,
    /// The factor it enters the update with (`-lr c_s` for a local SGD step, times the client's
    /// weight in an aggregate).
    pub factor: f64,
    /// The images it was taken on, a range of all the update's images.
    pub images: Range<usize>,
}

/// [`refine_patches`] for any update that is a weighted sum of gradients on parts of the images:
/// one client's local steps (on one batch, or each on its own) or an aggregate of several clients'
/// (each unrolled on its own images). The patch embedding's part is `sum_s f_s G_s^T X_s`, linear
/// in the patches, with each image's token gradients summed over the steps that took it.
///
/// # Errors
/// As [`refine_patches`]; [`AttackError::Configuration`] when a step's images lie outside
/// `images`.
pub fn refine_patches_after_client_steps(
    model: &dyn TargetModel,
    update: &ParamMap,
    steps: &[RefinementStep],
    images: &Tensor,
    labels: &[u32],
    ridge: f64,
) -> Result<Option<Tensor>> {
    let Some(layout) = model.patch_embedding() else {
        return Ok(None);
    };
    let (c, h, w) = model.input_dims();
    let p = layout.patch_size;
    if ridge.is_nan() || ridge <= 0.0 || p == 0 || h % p != 0 || w % p != 0 {
        return Ok(None);
    }
    let batch = images.dim(0)?;
    if let Some(step) = steps.iter().find(|step| step.images.end > batch) {
        return Err(AttackError::Configuration {
            attack: ATTACK,
            reason: format!("a step on images {:?} of {batch}", step.images),
        });
    }
    if steps.is_empty() {
        return Ok(None);
    }
    let k = c * p * p;
    let n = (h / p) * (w / p);
    let cls = usize::from(layout.has_cls_token);
    let dw = tensor_to_f64(observed_tensor(update, &layout.weight)?)?;
    let d = dw.len() / k;
    if d == 0 || dw.len() != d * k {
        return Err(AttackError::Observation {
            name: layout.weight.clone(),
            reason: format!(
                "expected D x {c} x {p} x {p} values, got shape {:?}",
                update[&layout.weight].dims()
            ),
        });
    }
    // Each image's token gradients, summed over the steps that took it with their factors.
    let targets = one_hot(labels, model.num_classes(), images.dtype(), images.device())?;
    let per_image = (n + cls) * d;
    let mut tokens = vec![0f64; batch * per_image];
    for step in steps {
        let (first, count) = (step.images.start, step.images.len());
        let Some(step_tokens) = model.token_gradients(
            &step.parameters,
            &images.narrow(0, first, count)?,
            &targets.narrow(0, first, count)?,
        )?
        else {
            return Ok(None);
        };
        let step_tokens = tensor_to_f64(&(step_tokens * step.factor)?)?;
        if step_tokens.len() != count * per_image {
            return Err(AttackError::Observation {
                name: "token gradients".into(),
                reason: format!(
                    "expected {count} x {} x {d} values from the model, got {}",
                    n + cls,
                    step_tokens.len()
                ),
            });
        }
        for (sum, value) in tokens[first * per_image..].iter_mut().zip(step_tokens) {
            *sum += value;
        }
    }
    // The patch tokens' gradients, one per unknown patch row, images one after the other.
    let gradients: Vec<&[f64]> = tokens
        .chunks_exact((n + cls) * d)
        .flat_map(|image| image[cls * d..].chunks_exact(d))
        .collect();
    let energy: f64 = gradients.iter().flat_map(|g| g.iter()).map(|v| v * v).sum();
    let lambda = ridge * energy;
    if !(lambda > 0.0 && lambda.is_finite()) {
        return Ok(None);
    }
    let start = images_to_patches(&tensor_to_f64(images)?, (c, h, w), p);

    // The patch-embedding gradient the candidates predict, G'^T X', and the scale of the observed one.
    let predicted = token_patch_products(&gradients, &start, k);
    let dot: f64 = predicted.iter().zip(&dw).map(|(a, b)| a * b).sum();
    let predicted_norm = predicted.iter().map(|v| v * v).sum::<f64>().sqrt();
    let observed_norm = dw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let cosine = dot / (predicted_norm * observed_norm);
    // Also when the cosine is NaN (a zero prediction or a zero observation).
    if cosine.is_nan() || cosine < MIN_EXPLAINED_COSINE {
        return Ok(None);
    }
    let scale = dot / (predicted_norm * predicted_norm);

    // Ridge regression as one least-squares system: [G'^T; sqrt(lambda) I] X = [dW / s; sqrt(lambda) X'].
    let rows = gradients.len();
    let root = lambda.sqrt();
    let columns: Vec<Vec<f64>> = gradients
        .iter()
        .enumerate()
        .map(|(r, g)| {
            let mut column = vec![0f64; d + rows];
            column[..d].copy_from_slice(g);
            column[d + r] = root;
            column
        })
        .collect();
    let mut rhs: Vec<f64> = dw.iter().map(|v| v / scale).collect();
    rhs.extend(start.iter().map(|v| v * root));
    let (patches, _) = solve_least_squares(columns, rhs, k, f64::EPSILON, ATTACK)?;
    let refined: Vec<f64> = patches_to_images(&patches, (c, h, w), p)
        .into_iter()
        .map(|v| v.clamp(0.0, 1.0))
        .collect();
    Ok(Some(
        Tensor::from_vec(refined, (batch, c, h, w), images.device())?.to_dtype(images.dtype())?,
    ))
}
