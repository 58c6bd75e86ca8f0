//! APRIL's closed form for a ViT: one image read off the gradients of the patch embedding and the
//! learnable position embedding (Lu et al., "APRIL: Finding the Achilles' Heel on Privacy for Vision
//! Transformers", CVPR 2022), adapted to the linear patch embedding.
//!
//! The embedding of patch token `i` is `z0_i = W x_i + b + pos_i` (`x_i` the flattened patch, `W` the
//! D x CPP projection). The position embedding enters additively and once, so the gradient of its row
//! `i` is exactly `g_i = dL/dz0_i`; and `dW = sum_i g_i x_i^T`, `db = sum_i g_i`. Stacking the `g_i` as
//! the rows of `G` (N x D), the patches `X` (N x CPP) solve `G^T X = dW`, a linear system with a unique
//! solution when the `N` token gradients are independent (so `N <= D`). It is solved by least squares
//! in f64 through a Householder QR of `G^T` (no normal equations: the condition number is not
//! squared), and the patches are put back on the image grid. The bias gradient is redundant; the
//! relative residual `|sum_i g_i - db| / |db|` is the attack's own consistency check.
//!
//! The same holds for a FedAvg client's plain-SGD delta of several local steps on its one image, which
//! the original APRIL does not consider: each step `s` has its own token gradients `G_s`, but the
//! patches are the same, so the position embedding's delta is `-lr sum_s G_s` and the patch
//! embedding's `-lr sum_s G_s^T X = (-lr sum_s G_s)^T X`: one system of the same form, exact. Where
//! Inverting Gradients unrolls the steps and reaches about 17 dB on such deltas (4 local steps, IHC
//! tiles, learnable position embedding), the closed form recovers them at 63-71 dB in f32. Heavy-ball
//! momentum only changes the weights of the steps' gradients, the same in every parameter: with
//! momentum 0.9 (otherwise the same captures, 2026-12-03) 72.4-80.8 dB, where Inverting Gradients,
//! reading such a delta as one gradient, had scored 5.5-8.0 dB.
//!
//! A fixed position table (sin-cos, MAE) is the known defence: its gradient is not transmitted.
//! Nor does the span of the first attention's weight gradients give the patches away, as it would in
//! exact arithmetic: the query, key and value gradients of one image are sums of one outer product
//! per token, so their rows span the `T = N + 1` normalised tokens (DAGER's test, Petrov et al.,
//! NeurIPS 2024), and each patch token's membership of that span is linear in the patch and its
//! layer norm's scale (`D - T` equations in `CPP + 1` unknowns: 127 in 49 on `vit-tiny-32`). Tried
//! 2026-12-03 (scratch code, not kept) on eight sin-cos FedSGD captures of IHC tiles: the stacked
//! gradients' singular values fall from 6.6 to the f32 floor (~1e-7) within 13 of the 65, because
//! the position table dominates every token and the image is a small perturbation of it; the span's
//! complement is then mostly noise, and the solved images scored 8.8-14.5 dB. In f64 the 64th value
//! is 1e-14 of the first (7.5 dB); after 50 and 100 FedSGD rounds, 5.5-13.3 dB.
//! This module sees only the observation and the model's layout, never the private image.

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::idlg::{infer_label_idlg, LabelOutcome};
use crate::linear::{not_a_client_update, observed_tensor, tensor_to_f64};
use crate::model::{PatchEmbeddingLayout, TargetModel};
use crate::observation::{LocalBatches, Observation, UpdateSource};
use crate::reconstruction::{AttackOutcome, Reconstruction};
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "april";

/// The largest relative residual `|G^T X - dW| / |dW|` ([`PatchInversion::weight_residual`]) at which
/// a multi-step delta is taken as one image's (with [`MAX_MULTI_STEP_RANGE_EXCESS`]). Measured
/// 2026-12-03 (tiny ViT, learnable position embedding, FedAvg with 4 local steps of plain SGD at lr
/// 0.01, f32, IHC tiles): one image per client, 2.8e-6 to 4.7e-6 on eight clients (recovered at 55 to
/// 71 dB); clients with two images whose steps drew both, 7.0e-3 to 6.4e-2 (the solve is noise,
/// 5.4 to 5.8 dB). A fresh model's three steps alternating two tiles (the analytic test): 7.4e-4, and
/// the solve 11.6 dB from either.
pub const MAX_MULTI_STEP_WEIGHT_RESIDUAL: f64 = 1e-4;

/// The farthest a solved pixel may lie outside [0, 1] for a multi-step delta to be taken as one
/// image's. In the cases of [`MAX_MULTI_STEP_WEIGHT_RESIDUAL`]: one image, at most 4.3e-3; mixed
/// images, 0.62 to 77.
pub const MAX_MULTI_STEP_RANGE_EXCESS: f64 = 0.05;

/// The image recovered by [`invert_patch_embedding`], unclamped, with the solve's diagnostics.
#[derive(Debug, Clone)]
pub struct PatchInversion {
    /// The image (1 x C x H x W, f64), exactly as solved: not clamped to [0, 1].
    pub image: Tensor,
    /// Relative residual `|sum_i g_i - db| / |db|` of the token gradients against the bias gradient
    /// (the absolute residual when `db` is zero).
    pub bias_residual: f64,
    /// Estimated condition number of the token gradients `G` (ratio of the largest to the smallest
    /// diagonal entry of its triangular factor).
    pub condition: f64,
    /// Relative residual `|G^T X - dW| / |dW|` of the solved patches `X` against the weight gradient:
    /// rounding for the gradient of one image, large when `dW` mixes several images' patches.
    pub weight_residual: f64,
}

/// Solves the patch embedding's gradients for the one image behind them (see the module docs).
///
/// `weight_grad` is the projection weight's gradient (D x C x P x P, or D x CPP), `bias_grad` its
/// bias's (D), `position_grad` the learnable position embedding's ((1 x) T x D with `T = N + 1` when
/// the layout has a CLS token, else `N`); `input_dims` is (C, H, W).
///
/// # Errors
/// [`AttackError::Observation`] when a shape does not fit the layout; [`AttackError::Numerical`] when
/// the token gradients are rank-deficient to the working precision of `weight_grad`'s dtype (always so
/// when `N > D`).
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor};
/// use fedleak_attacks::{invert_patch_embedding, PatchEmbeddingLayout};
/// let dev = Device::Cpu;
/// // A 1 x 2 x 2 image with 1 x 1 patches (N = 4) embedded in D = 4 dimensions, token i's gradient 2 e_i:
/// // dW = sum_i g_i x_i^T = 2 x (as a column), db = (2, 2, 2, 2).
/// let x = [0.25f64, 0.5, 0.75, 1.0];
/// let dw = Tensor::new(&x.map(|v| 2.0 * v), &dev)?.reshape((4, 1, 1, 1))?;
/// let db = Tensor::new(&[2f64, 2., 2., 2.], &dev)?;
/// let cls_row = Tensor::new(&[[9f64, 9., 9., 9.]], &dev)?;
/// let tokens = (Tensor::eye(4, candle_core::DType::F64, &dev)? * 2.0)?;
/// let pos = Tensor::cat(&[&cls_row, &tokens], 0)?.unsqueeze(0)?;
/// let layout = PatchEmbeddingLayout {
///     weight: "w".into(),
///     bias: "b".into(),
///     position_embedding: Some("pos".into()),
///     patch_size: 1,
///     has_cls_token: true,
/// };
/// let inv = invert_patch_embedding(&dw, &db, &pos, &layout, (1, 2, 2))?;
/// assert_eq!(inv.image.flatten_all()?.to_vec1::<f64>()?, x.to_vec());
/// assert_eq!(inv.bias_residual, 0.0);
/// # Ok::<(), fedleak_attacks::AttackError>(())
/// ```
pub fn invert_patch_embedding(
    weight_grad: &Tensor,
    bias_grad: &Tensor,
    position_grad: &Tensor,
    layout: &PatchEmbeddingLayout,
    input_dims: (usize, usize, usize),
) -> Result<PatchInversion> {
    let (c, h, w) = input_dims;
    let p = layout.patch_size;
    if p == 0 || h % p != 0 || w % p != 0 {
        return Err(AttackError::Observation {
            name: layout.weight.clone(),
            reason: format!("patch size {p} does not tile a {h} x {w} image"),
        });
    }
    let (grid_h, grid_w) = (h / p, w / p);
    let n = grid_h * grid_w;
    let k = c * p * p;
    let d = bias_grad.elem_count();
    let check = |name: &str, tensor: &Tensor, expected: usize, what: String| -> Result<()> {
        if tensor.elem_count() == expected {
            Ok(())
        } else {
            Err(AttackError::Observation {
                name: name.to_string(),
                reason: format!(
                    "expected {expected} values ({what}), got shape {:?}",
                    tensor.dims()
                ),
            })
        }
    };
    check(
        &layout.weight,
        weight_grad,
        d * k,
        format!("{d} x {c} x {p} x {p}"),
    )?;
    let cls = usize::from(layout.has_cls_token);
    let position_name = layout.position_embedding.as_deref().unwrap_or("position");
    check(
        position_name,
        position_grad,
        (n + cls) * d,
        format!("{} tokens x {d}", n + cls),
    )?;

    let dw = tensor_to_f64(weight_grad)?;
    let db = tensor_to_f64(bias_grad)?;
    let positions = tensor_to_f64(position_grad)?;
    // Column i of G^T is token i's gradient.
    let columns: Vec<Vec<f64>> = positions[cls * d..]
        .chunks_exact(d)
        .map(<[f64]>::to_vec)
        .collect();

    let mut sum = vec![0f64; d];
    for g in &columns {
        sum.iter_mut().zip(g).for_each(|(s, v)| *s += v);
    }
    let residual = norm(&sum.iter().zip(&db).map(|(s, b)| s - b).collect::<Vec<_>>());
    let db_norm = norm(&db);
    let bias_residual = if db_norm > 0.0 {
        residual / db_norm
    } else {
        residual
    };

    let eps = match weight_grad.dtype() {
        DType::F64 => f64::EPSILON,
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => 9.77e-4,
        _ => 7.82e-3,
    };
    let (patches, condition) = solve_least_squares(columns.clone(), dw.clone(), k, eps, ATTACK)?;
    let explained = token_patch_products(&columns, &patches, k);
    let misfit = norm(
        &explained
            .iter()
            .zip(&dw)
            .map(|(e, o)| e - o)
            .collect::<Vec<_>>(),
    );
    let dw_norm = norm(&dw);
    let weight_residual = if dw_norm > 0.0 {
        misfit / dw_norm
    } else {
        misfit
    };
    let image = patches_to_images(&patches, input_dims, p);
    Ok(PatchInversion {
        image: Tensor::from_vec(image, (1, c, h, w), weight_grad.device())?,
        bias_residual,
        condition,
        weight_residual,
    })
}

/// Reconstructs the one image behind a client's update of a ViT with a learnable position embedding,
/// in closed form (see the module docs); labels from [`infer_label_idlg`] when it applies.
///
/// Applies to one client's FedSGD gradient of batch size 1, or its plain- or momentum-SGD delta of any
/// number of local steps on that one image (read as `-delta / lr`, a sum of the steps' gradients: each step's
/// token gradients differ, but the patches do not, so the position embedding's delta is still the
/// summed token gradients `G` and the patch embedding's is `G^T X`, exactly). A multi-step delta whose
/// solved patches explain the patch embedding's delta worse than [`MAX_MULTI_STEP_WEIGHT_RESIDUAL`] or
/// leave the pixel range by more than [`MAX_MULTI_STEP_RANGE_EXCESS`] mixes several images (steps on
/// different batches) and is refused. Not applicable (with the reason) to
/// batches, aggregates, adaptive-optimizer deltas, features, ciphertext, models without a patch
/// embedding, fixed position tables, and models with more patches than embedding dimensions. Images
/// come back as f32 clamped to [0, 1] (the solve itself is unclamped, in f64); the objective is the
/// bias-gradient residual.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks a tensor or its shape differs from the layout;
/// [`AttackError::Numerical`] when the token gradients are rank-deficient to working precision.
pub fn reconstruct_april(
    observation: &Observation,
    model: &dyn TargetModel,
) -> Result<AttackOutcome> {
    let start = Instant::now();
    let not_applicable = |reason: String| {
        Ok(AttackOutcome::NotApplicable {
            attack: ATTACK,
            reason,
        })
    };
    let (update, source) = match observation {
        Observation::ClientUpdate {
            batch_size: 1,
            local_batches: LocalBatches::PerStep(sizes),
            ..
        } if sizes.len() > 1 => {
            return not_applicable(format!(
                "its {} local steps trained on different images: the update mixes their patches",
                sizes.len()
            ))
        }
        Observation::ClientUpdate {
            update,
            source,
            batch_size: 1,
            ..
        } => (update, source),
        Observation::ClientUpdate { batch_size, .. } => {
            return not_applicable(format!(
                "batch > 1 mixes patches of several images (batch size {batch_size})"
            ))
        }
        other => return not_applicable(not_a_client_update(other)),
    };
    let (scale, steps) = match source {
        UpdateSource::Gradient => (1.0, 1),
        UpdateSource::SgdDelta { lr, local_steps }
        | UpdateSource::MomentumSgdDelta {
            lr, local_steps, ..
        } if lr.is_finite() && *lr > 0.0 => (-1.0 / lr, *local_steps),
        UpdateSource::SgdDelta { lr, .. } | UpdateSource::MomentumSgdDelta { lr, .. } => {
            return not_applicable(format!(
                "a delta at learning rate {lr} cannot be read as a gradient"
            ))
        }
        UpdateSource::OtherDelta { .. } => {
            return not_applicable(
                "an adaptive optimizer's delta is not proportional to the gradient".to_string(),
            )
        }
    };
    let Some(layout) = model.patch_embedding() else {
        return not_applicable("the model has no patch embedding".to_string());
    };
    let Some(position_name) = layout.position_embedding.as_deref() else {
        return not_applicable(
            "fixed sin-cos position embedding: its gradient is not observed".to_string(),
        );
    };
    let (c, h, w) = model.input_dims();
    let weight_grad = observed_tensor(update, &layout.weight)?;
    let d = weight_grad.dims().first().copied().unwrap_or(0);
    let p = layout.patch_size.max(1);
    let n = (h / p) * (w / p);
    if n > d {
        return not_applicable(format!(
            "{n} patches exceed the embedding width {d}: their token gradients cannot be \
             linearly independent, the patches are not determined"
        ));
    }
    let rescale = |t: &Tensor| -> Result<Tensor> {
        Ok(if scale == 1.0 {
            t.clone()
        } else {
            t.affine(scale, 0.0)?
        })
    };
    let inversion = invert_patch_embedding(
        &rescale(weight_grad)?,
        &rescale(observed_tensor(update, &layout.bias)?)?,
        &rescale(observed_tensor(update, position_name)?)?,
        &layout,
        (c, h, w),
    )?;
    if steps > 1 {
        // The largest distance of a solved pixel outside [0, 1].
        let excess = tensor_to_f64(&inversion.image)?
            .iter()
            .map(|v| (v - v.clamp(0.0, 1.0)).abs())
            .fold(0f64, f64::max);
        let residual = inversion.weight_residual;
        if !(residual <= MAX_MULTI_STEP_WEIGHT_RESIDUAL && excess <= MAX_MULTI_STEP_RANGE_EXCESS) {
            return not_applicable(format!(
                "the {steps}-step delta is not one image's (the client's steps used different \
                 images?): the solved patches leave a relative residual of {residual:.1e} in its \
                 patch embedding (at most {MAX_MULTI_STEP_WEIGHT_RESIDUAL:.0e} for one image) and \
                 reach {excess:.2} outside the pixel range (at most {MAX_MULTI_STEP_RANGE_EXCESS})"
            ));
        }
    }
    let images = inversion.image.to_dtype(DType::F32)?.clamp(0f32, 1f32)?;
    let labels = match infer_label_idlg(observation, model) {
        Ok(LabelOutcome::Recovered(recovery)) => Some(recovery.labels),
        Ok(LabelOutcome::NotApplicable { .. }) | Err(_) => None,
    };
    Ok(AttackOutcome::Reconstructed(Reconstruction {
        images,
        labels,
        attack: ATTACK,
        iterations: 0,
        restarts: 1,
        objective: inversion.bias_residual,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// The patch embedding's weight gradient the token gradients and patches make, `sum_i g_i x_i^T` (D x
/// `k`, row-major): `gradients[i]` is token `i`'s gradient (D values), `patches` its rows of `k`.
pub(crate) fn token_patch_products<G: AsRef<[f64]>>(
    gradients: &[G],
    patches: &[f64],
    k: usize,
) -> Vec<f64> {
    let d = gradients.first().map_or(0, |g| g.as_ref().len());
    let mut product = vec![0f64; d * k];
    for (g, x) in gradients.iter().zip(patches.chunks_exact(k)) {
        for (row, &gj) in product.chunks_exact_mut(k).zip(g.as_ref()) {
            row.iter_mut().zip(x).for_each(|(p, xv)| *p += gj * xv);
        }
    }
    product
}

/// The `p x p` patches of images (B x C x H x W, row-major values), one row of `C p p` values per
/// patch in the patch embedding's order (channel, then row, then column within the patch), patches
/// row by row over each image's grid, images one after the other.
pub(crate) fn images_to_patches(
    images: &[f64],
    input_dims: (usize, usize, usize),
    p: usize,
) -> Vec<f64> {
    (0..images.len())
        .map(|slot| images[pixel_of_patch_entry(slot, input_dims, p)])
        .collect()
}

/// The inverse of [`images_to_patches`].
pub(crate) fn patches_to_images(
    patches: &[f64],
    input_dims: (usize, usize, usize),
    p: usize,
) -> Vec<f64> {
    let mut images = vec![0f64; patches.len()];
    for (slot, &value) in patches.iter().enumerate() {
        images[pixel_of_patch_entry(slot, input_dims, p)] = value;
    }
    images
}

/// Where entry `slot` of the patch rows ([`images_to_patches`]) sits in the images.
fn pixel_of_patch_entry(slot: usize, input_dims: (usize, usize, usize), p: usize) -> usize {
    let (c, h, w) = input_dims;
    let k = c * p * p;
    let tokens = (h / p) * (w / p);
    let (row, index) = (slot / k, slot % k);
    let (image, token) = (row / tokens, row % tokens);
    let (gy, gx) = (token / (w / p), token % (w / p));
    let (ch, rest) = (index / (p * p), index % (p * p));
    let (y, x) = (gy * p + rest / p, gx * p + rest % p);
    ((image * c + ch) * h + y) * w + x
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Least-squares solution `X` (N x K, row-major) of `A X = B`, `A` given by its `N` columns of length
/// `D` and `B` row-major (D x K), through a Householder QR of `A`; also the condition estimate
/// `max |R_ii| / min |R_ii|`. Fails when that exceeds `1 / eps` (rank-deficient to working precision);
/// failures name `attack`.
pub(crate) fn solve_least_squares(
    mut columns: Vec<Vec<f64>>,
    mut rhs: Vec<f64>,
    k: usize,
    eps: f64,
    attack: &'static str,
) -> Result<(Vec<f64>, f64)> {
    let n = columns.len();
    let d = columns.first().map_or(0, Vec::len);
    if n > d {
        return Err(AttackError::Numerical {
            attack,
            reason: format!("{n} unknown patches but only {d} equations per pixel"),
        });
    }
    let mut diagonal = Vec::with_capacity(n);
    let mut projected = vec![0f64; k];
    for j in 0..n {
        let head = &columns[j][j..];
        let length = norm(head);
        if !(length > 0.0 && length.is_finite()) {
            return Err(AttackError::Numerical {
                attack,
                reason: format!(
                    "token gradient {} is zero or not finite after removing the others' span \
                     (norm {length}): the patches are not determined",
                    j + 1
                ),
            });
        }
        let alpha = if head[0] > 0.0 { -length } else { length };
        let mut v = head.to_vec();
        v[0] -= alpha;
        let beta = 2.0 / v.iter().map(|x| x * x).sum::<f64>();
        for column in columns.iter_mut().skip(j + 1) {
            let dot: f64 = v.iter().zip(&column[j..]).map(|(a, b)| a * b).sum();
            let f = beta * dot;
            column[j..]
                .iter_mut()
                .zip(&v)
                .for_each(|(c, a)| *c -= f * a);
        }
        projected.iter_mut().for_each(|x| *x = 0.0);
        for (r, &vr) in v.iter().enumerate() {
            let row = &rhs[(j + r) * k..(j + r + 1) * k];
            projected
                .iter_mut()
                .zip(row)
                .for_each(|(x, b)| *x += vr * b);
        }
        for (r, &vr) in v.iter().enumerate() {
            let row = &mut rhs[(j + r) * k..(j + r + 1) * k];
            let f = beta * vr;
            row.iter_mut()
                .zip(&projected)
                .for_each(|(b, x)| *b -= f * x);
        }
        columns[j][j] = alpha;
        diagonal.push(alpha.abs());
    }
    let largest = diagonal.iter().copied().fold(0.0, f64::max);
    let smallest = diagonal.iter().copied().fold(f64::INFINITY, f64::min);
    let condition = largest / smallest;
    if condition * eps >= 1.0 {
        return Err(AttackError::Numerical {
            attack,
            reason: format!(
                "the token gradients are rank-deficient to working precision (condition estimate \
                 {condition:.3e}, precision {eps:.1e}): the patches are not determined"
            ),
        });
    }
    // Back substitution R X = (Q^T B)[..n].
    let mut solution = vec![0f64; n * k];
    for i in (0..n).rev() {
        let mut row = rhs[i * k..(i + 1) * k].to_vec();
        for j in i + 1..n {
            let r = columns[j][i];
            let known = &solution[j * k..(j + 1) * k];
            row.iter_mut().zip(known).for_each(|(x, s)| *x -= r * s);
        }
        let pivot = columns[i][i];
        solution[i * k..(i + 1) * k]
            .iter_mut()
            .zip(&row)
            .for_each(|(s, x)| *s = x / pivot);
    }
    Ok((solution, condition))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) from a fixed LCG.
    fn lcg(count: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    #[test]
    fn least_squares_recovers_a_random_overdetermined_system() {
        let (d, n, k) = (12, 5, 3);
        let columns: Vec<Vec<f64>> = (0..n).map(|i| lcg(d, i as u64)).collect();
        let x = lcg(n * k, 99);
        let mut b = vec![0f64; d * k];
        for (i, column) in columns.iter().enumerate() {
            for r in 0..d {
                for c in 0..k {
                    b[r * k + c] += column[r] * x[i * k + c];
                }
            }
        }
        let (got, condition) = solve_least_squares(columns, b, k, f64::EPSILON, ATTACK).unwrap();
        let err = got
            .iter()
            .zip(&x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-13, "max error {err}, condition {condition}");
    }

    #[test]
    fn dependent_columns_are_reported() {
        let a = lcg(6, 1);
        let columns = vec![a.clone(), a.iter().map(|v| 2.0 * v).collect()];
        let err = solve_least_squares(columns, vec![0.0; 6], 1, f64::EPSILON, ATTACK).unwrap_err();
        assert!(err.to_string().contains("not determined"), "{err}");
    }
}
