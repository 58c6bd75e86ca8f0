//! Per-image labels of a batch, separated from the gradients of the last transformer block's MLP,
//! for the case where the counts of [`crate::count_labels`] fail: a trained model that fits its
//! training images, whose bias gradient no longer says how many images of each class the batch held.
//! The idea is that of the instance-wise label attacks (Ma et al., "Instance-wise Batch Label
//! Restoration via Gradients in Federated Learning", ICLR 2023) and of SPEAR's decomposition of a
//! layer's gradient into per-sample terms (Dimitrov et al., "SPEAR: Exact Gradient Inversion of
//! Batches in Federated Learning", NeurIPS 2024), here for a ViT's classifier block.
//!
//! A ViT classifies from its CLS token, so the last block's MLP matters only at that token: for image
//! `i`, `m_i` (the block's second layer-normed CLS token, D values) enters the hidden layer
//! `a_i = gelu(W1 m_i + b1)` (M values), and `W2 a_i` is added back. The weight gradients are then
//! sums of one outer product per image, `dW1 = sum_i h_i m_i^T` and `dW2 = sum_i d_i a_i^T`: the `B`
//! images' `m_i` span the row space of `dW1` (a `B`-dimensional subspace of the D-dimensional
//! tokens), their `a_i` that of `dW2`. So `m_i = U c_i` for `B` coefficients `c_i`, and `a(c) =
//! gelu(W1 U c + b1)` must lie in the row space of `dW2`: `M - B` conditions on `B` unknowns (760 on 8
//! for `vit-tiny-32` at batch 8), which isolate each image's `c_i`. They are found by
//! Levenberg-Marquardt from seeded random starts; every start that converges lands on one image
//! (measured: no start converged elsewhere, and every separated label was right, below).
//!
//! With the activations `A = [a_i]` known, `dW2 A (A^T A)^-1` gives each image's gradient at the
//! block's output, `d_i = (1/B) J_i^T W^T (p_i - y_i)`, with `W` the classifier and `J_i` the
//! Jacobian of the final layer norm: `1/s_i` times the projection orthogonal to the ones vector and to
//! the normalised token `n_i`, times `diag(gamma)`. So `d_i = E e_i` plus a multiple of `n_i`, with
//! `E = C diag(gamma) W^T` (`C` the centring) and `e_i = (p_i - y_i) / (B s_i)`, whose one negative
//! entry is at the label. With two classes `E e_i = e_i1 E (e_1 - e_0)`, and the sign of `d_i` along
//! that direction is the sign of `e_i1` (the term along `n_i` cannot flip it, by Cauchy-Schwarz):
//! exact. With more classes the token's term is fitted as a nuisance: `n_i` normalises
//! `r_i + W2 a_i + b2`, and the residual `r_i` is known from `m_i` up to its scale and mean, so
//! `n_i` lies in a known plane. An image whose fitted `e` (summing to zero, as `p - y` does) has not
//! exactly one negative entry is left unseparated. Measured (2026-12-03, `vit-micro-32`, the test
//! `label_separation_labels_each_image_of_a_batch_also_where_the_model_fits_it`): on MNIST digits
//! fitted to loss 0.1, ignoring the token's term left no image with one negative entry; fitting it,
//! 7 of 8 images were separated, all correctly. On `vit-tiny-32` FedSGD captures of MNIST batches of 8
//! (a model still at 11-18 % test accuracy after 100 and 150 rounds), 5-8 of 8 images per client
//! and 5 of an aggregate's 32 were separated, each with a label of the batch.
//!
//! What it cannot do: an image the model fits so well that its share of the gradient is below the
//! update's rounding leaves nothing to separate (its `a_i` is not in the numerical row space). A
//! weight delta is rounded relative to the weights, so far more of it is lost than of a gradient:
//! measured 2026-12-03 on `vit-tiny-32` trained on the IHC tiles (4 clients, batch 8, lr 0.03, test
//! accuracy 1.0 after 200 rounds), 6-8 of 8 images separated from FedSGD gradients at rounds 195 and
//! 200 (13 and 14 of 32 from the aggregates), but 2-4 of 8 from one-step FedAvg deltas (rounds 195,
//! 196, 200). Images left unseparated take the counts of [`crate::count_labels`] that the separated
//! ones leave ([`recover_batch_labels`]).
//! When the random starts leave exactly one image of the batch, it is searched with the found
//! images deflated: the residual is measured against the part of the activation outside their
//! span, so that a start no longer slides into an image already found. That also finds points that
//! are no image (their membership residual as small as the images', 1.9e-10), so of the points
//! found the one is kept that makes the complete batch explain the hidden layer's weight gradient
//! best: with every image's `d_i` from `dW2`, `dW1` must equal `sum_i delta_i m_i^T`, `delta_i`
//! the back-propagation of `d_i` to the hidden pre-activation (relative residual 2e-7 - 1e-6 with
//! the private images' points, 6.7e-7 and 6.0e-5 with points that are no image). Measured
//! 2026-12-05 (FedSGD captures of the IHC tiles, `vit-tiny-32` trained to test accuracy 1.0, rounds
//! 195 and 200, four clients, seeds 0 - 3 of the starts): the random starts alone left one image in
//! about half of the 32 runs; with the deflated search 8 of 8 in 31 of them, every label right (the
//! other run had found 6, which the search leaves as they are). Aiming starts at the missing image
//! instead (from the found images' mean along each direction of the tokens' row space they leave
//! out) found it in only one run.
//!
//! The separated images' tokens `m_i` would be per-image targets for Inverting Gradients on the
//! batch; measured 2026-12-04 (a scratch branch matching them image by image, weight x (1 - cosine)
//! beside the gradient matching; `vit-tiny-32`, sin-cos IHC tiles, FedSGD batches of 8, 1000
//! iterations, one restart), they do not help. At the initial weights the tokens came out exact
//! (cosine 0.99998 - 0.999998 against the private images') but only 2 - 3 of 8 images per batch
//! separate (41 converged starts, 3 distinct points; starting orthogonally to the points found
//! finds no others), and every image's token lies within cosine 0.996 - 1.0000 of every other's,
//! so they do not tell the images apart: 18.22 dB without, 18.29 / 18.15 / 18.95 at weights 0.01 /
//! 0.3 / 1, within batch 8's scatter, with no candidate drawn to its token's image. After 200
//! rounds (test accuracy 1.0) 6 - 7 of 8 separate, but Inverting Gradients fails on such a batch
//! either way (8.86 dB without, 8.47 with).

use std::time::Instant;

use candle_core::Tensor;
use nalgebra::{DMatrix, DVector};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::idlg::{infer_label_idlg, LabelOutcome, LabelRecovery};
use crate::label_counts::{count_labels, round_label_counts, LabelCountConfig, ReferenceImages};
use crate::linear::{observed_tensor, tensor_to_f64};
use crate::model::{ClassifierBlockLayout, TargetModel};
use crate::observation::{Observation, UpdateSource};
use crate::unrolled_labels::place_labels_by_unrolling;
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "label-separation";

/// Random starts per image of the batch (at least [`MIN_STARTS`]).
const STARTS_PER_IMAGE: usize = 4;

/// The fewest random starts.
const MIN_STARTS: usize = 32;

/// Levenberg-Marquardt iterations per start.
const ITERATIONS: usize = 100;

/// The largest relative residual `|a - P a|^2 / |a|^2` of an activation `a` and its projection `P a`
/// on the row space of `dW2` at which a start counts as one image's: a guard against a start that
/// stalls. Measured 2026-12-03 on the captures of the module docs (32 starts per batch of 8, 128 per
/// aggregate of 32): every start converged, to at most 3.5e-10 on gradients and 1.1e-5 on one-step
/// deltas (whose rounding is coarser).
const ACCEPTED_RESIDUAL: f64 = 1e-4;

/// A separated image's activation whose part outside the span of those separated before it is
/// smaller than this, relative to its norm, adds no image (measured 2026-12-05: a trained model
/// whose batch images of a class share nearly one activation gave two starts' points that differed
/// by more than [`SAME_IMAGE`] with activations too close to be inverted apart).
const DEPENDENT_ACTIVATION: f64 = 1e-9;

/// Random starts with the found images deflated, for the one image the others leave.
const DEFLATED_STARTS: usize = 16;

/// The largest relative residual of the hidden layer's weight gradient that a batch completed by a
/// deflated start may leave ([`BlockValues::hidden_consistency`]). Measured 2026-12-05 on f32
/// FedSGD captures (the module docs): complete batches of the private images' points 2.0e-7 -
/// 1.0e-6; batches completed by a point that is no image 6.7e-7 (which the lower residual of the
/// right point beat, 4.6e-7) and 6.0e-5.
const CONSISTENT_BATCH: f64 = 1e-5;

/// Two solutions closer than this, relative to their norm, are the same image.
const SAME_IMAGE: f64 = 1e-3;

/// The labels [`separate_batch_labels`] could assign to single images of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SeparatedLabels {
    /// One label per separated image, in the order found (at most `images`).
    pub labels: Vec<u32>,
    /// Each separated image's relative residual (see the module docs), in the same order.
    pub residuals: Vec<f64>,
    /// Number of images behind the update.
    pub images: usize,
}

/// The outcome of [`separate_batch_labels`].
#[derive(Debug, Clone, PartialEq)]
pub enum Separation {
    /// The decomposition ran; it may have separated none, some or all of the images.
    Separated(SeparatedLabels),
    /// It does not apply to this observation or model, for the reason given.
    NotApplicable {
        /// Why not.
        reason: String,
    },
}

/// Separates the images of a batch (or of an aggregate of batches) in the gradients of the model's
/// classifier block and labels each one it separates (see the module docs). `seed` seeds the random
/// starts.
///
/// Applies to a FedSGD gradient, a one-step plain- or momentum-SGD delta (read as `-delta / lr`), and
/// aggregates of either, of two or more images, at most as many as the block is wide. Not
/// applicable (with the reason) to one image (iDLG is exact there), multi-step deltas (each step
/// moves the parameters, so the images' terms do not add up to one outer product each),
/// adaptive-optimizer deltas, features, ciphertext, and models that do not expose a classifier block.
///
/// # Errors
/// [`AttackError::Observation`] when the update or the model lacks a tensor of the block or its shape
/// differs from the layout; [`AttackError::Numerical`] when the gradients are not finite.
pub fn separate_batch_labels(
    observation: &Observation,
    model: &dyn TargetModel,
    seed: u64,
) -> Result<Separation> {
    let not_applicable = |reason: String| Ok(Separation::NotApplicable { reason });
    let view = match observation.update_view() {
        Ok(view) => view,
        Err(reason) => return not_applicable(reason),
    };
    let (update, images) = (view.update, view.images);
    if images < 2 {
        return not_applicable(format!(
            "{images} image(s): nothing to separate (iDLG reads one image's label exactly)"
        ));
    }
    let sign = match gradient_sign(view.source) {
        Ok(sign) => sign,
        Err(reason) => return not_applicable(reason),
    };
    let Some(layout) = model.classifier_block() else {
        return not_applicable("the model does not expose its classifier block".to_string());
    };
    let block = BlockValues::read(model, &layout, update, sign)?;
    if images >= block.width.min(block.hidden) {
        return not_applicable(format!(
            "{images} images fill the block's width {} (hidden {}): their outer products span \
             everything",
            block.width, block.hidden
        ));
    }
    Ok(Separation::Separated(block.separate(images, seed)?))
}

/// The sign that makes `source`'s update a gradient for the separation (its scale does not matter),
/// or why it cannot be read as one.
fn gradient_sign(source: &UpdateSource) -> std::result::Result<f64, String> {
    match source {
        UpdateSource::Gradient => Ok(1.0),
        UpdateSource::SgdDelta { lr, local_steps }
        | UpdateSource::MomentumSgdDelta {
            lr, local_steps, ..
        } => {
            if *local_steps != 1 {
                Err(format!(
                    "each of the {local_steps} local steps moves the parameters: an image's \
                     terms do not add up to one outer product"
                ))
            } else if lr.is_finite() && *lr > 0.0 {
                Ok(-1.0)
            } else {
                Err(format!(
                    "a delta at learning rate {lr} cannot be read as a gradient"
                ))
            }
        }
        UpdateSource::OtherDelta { .. } => Err(
            "an adaptive optimizer's delta rescales each entry: the outer products are lost"
                .to_string(),
        ),
    }
}

/// Recovers one label per image behind an update, by the strongest label attack that applies: iDLG
/// ([`infer_label_idlg`]) for one client's single image, [`recover_batch_labels`] for a batch or an
/// aggregate. For images in several groups ([`crate::UpdateView::image_groups`]: local steps on
/// batches of their own, [`crate::LocalBatches::PerStep`], or the clients of an aggregate that are
/// simulated apart) the update tells only the counts over all of them, not which group held which
/// label: the labels come back dealt out over the groups in turn ([`deal_labels_over_steps`]), in
/// the order of the update's images that [`crate::invert_gradients`] takes them in. For a plain- or
/// momentum-SGD delta of more than one local step, whose drift the counts do not model, the labels
/// of [`place_labels_by_unrolling`] replace them where it applies (noise stand-ins seeded by the
/// config's seed, or `reference` images).
///
/// # Errors
/// As those attacks.
pub fn recover_labels(
    observation: &Observation,
    model: &dyn TargetModel,
    config: &LabelCountConfig,
    reference: Option<&ReferenceImages>,
) -> Result<LabelOutcome> {
    let view = observation.update_view().ok();
    if matches!(observation, Observation::ClientUpdate { .. })
        && view.as_ref().is_some_and(|view| view.images == 1)
    {
        return infer_label_idlg(observation, model);
    }
    let outcome = recover_batch_labels(observation, model, config, reference)?;
    let (LabelOutcome::Recovered(mut recovery), Some(view)) = (outcome.clone(), view) else {
        return Ok(outcome);
    };
    let groups = view.image_groups();
    if groups.len() > 1 {
        recovery.labels = deal_labels_over_steps(&recovery.labels, &groups);
    }
    // Local steps drift the parameters: the counts read off the summed delta are estimates, which
    // the unrolled match of the classifier's delta replaces (batch by batch) where it applies.
    if let Some(placed) = place_labels_by_unrolling(&view, model, reference, config.seed)? {
        return Ok(LabelOutcome::Recovered(LabelRecovery {
            seconds: recovery.seconds + placed.seconds,
            ..placed
        }));
    }
    Ok(LabelOutcome::Recovered(recovery))
}

/// Sorted `labels` dealt out like cards over local steps with batches of `sizes` images (the first
/// label to step 0, the next to step 1, ..., skipping full steps), returned step after step: the
/// guess that spreads every class as evenly over the steps as the counts allow, when only the counts
/// over all steps are known. Labels beyond the steps' total are dropped; missing ones are not made
/// up.
///
/// ```
/// use fedleak_attacks::deal_labels_over_steps;
/// // Three of class 0 and three of class 1 over three steps of two images.
/// assert_eq!(deal_labels_over_steps(&[0, 0, 0, 1, 1, 1], &[2, 2, 2]), vec![0, 1, 0, 1, 0, 1]);
/// // A shorter last step (an epoch's remainder).
/// assert_eq!(deal_labels_over_steps(&[0, 0, 1, 1, 1], &[2, 2, 1]), vec![0, 1, 0, 1, 1]);
/// ```
pub fn deal_labels_over_steps(labels: &[u32], sizes: &[usize]) -> Vec<u32> {
    let mut sorted = labels.to_vec();
    sorted.sort_unstable();
    let mut steps: Vec<Vec<u32>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut next = sorted.into_iter();
    'dealing: loop {
        let mut dealt = false;
        for (step, &size) in steps.iter_mut().zip(sizes) {
            if step.len() < size {
                let Some(label) = next.next() else {
                    break 'dealing;
                };
                step.push(label);
                dealt = true;
            }
        }
        if !dealt {
            break;
        }
    }
    steps.concat()
}

/// Recovers the labels of the images behind an update: those [`separate_batch_labels`] separates,
/// each exactly, and for the rest the counts of [`count_labels`] (with `reference` images when given)
/// that the separated ones leave, largest remainder first. Labels come back sorted (which image had
/// which is not reported). When nothing is separated (or the separation does not apply) this is
/// [`count_labels`]' outcome. The objective is the share of images whose labels came from the
/// counts (0 when every image was separated).
///
/// Measured 2026-12-03 (`fedleak train --model vit-tiny-32 --clients 4 --rounds 200 --batch-size 8
/// --lr 0.03`, IHC tiles, then `fedleak attack --attack idlg [--label-reference fixture:ihc-tiles-32]`
/// on each client's batch; mean label accuracy over the four clients), FedSGD: round 1 100 % either
/// way; round 195 counts alone 66 % (noise dummies) / 88 % (reference), with separation 100 % / 97 %;
/// round 200 59 % / 81 %, with separation 94 % / 94 %; the aggregates of 32 images at rounds 195 and
/// 200, 66 / 56 % (noise) alone and 78 / 66 % with separation, 91 / 81 % (reference) either way.
/// One-step FedAvg deltas (`--algorithm fedavg --optimizer sgd --local-steps 1`, the same
/// otherwise), rounds 195, 196 and 200: 53 / 47 / 34 % (noise) and 84 / 75 / 66 % (reference) alone,
/// 75 / 66 / 53 % and 84 / 75 / 66 % with separation. About 0.4 s per batch of 8 and 3 s per
/// aggregate of 32 (release build, counts included). Re-measured 2026-12-05 on a new FedSGD run of
/// the command above (`--algorithm fedsgd`: test accuracy 1.0, train loss 0.005), clients /
/// aggregate: before the deflated search for a batch's last image and the prediction-conditional
/// reference counts of [`count_labels`], round 195 noise 91 % / 63 %, reference 97 % / 84 %, round
/// 200 noise 97 % / 53 %, reference 97 % / 97 %; with both, **100 % of the clients' labels at
/// either round, noise or reference**, aggregates 63 % / 84 % and 53 % / 100 % (0.3 - 0.6 s per
/// batch, 5 - 7 s per aggregate). On a model trained by FedAvg with AdamW (195 rounds, then one
/// FedSGD round from it; one image of 8 separated, the images of a class mapped to nearly one
/// feature): noise 94 % / 94 %, reference **100 % / 100 %** (the earlier reference counts: 72 % /
/// 31 %).
///
/// # Errors
/// As [`separate_batch_labels`] and [`count_labels`].
pub fn recover_batch_labels(
    observation: &Observation,
    model: &dyn TargetModel,
    config: &LabelCountConfig,
    reference: Option<&ReferenceImages>,
) -> Result<LabelOutcome> {
    let start = Instant::now();
    let separated = match separate_batch_labels(observation, model, config.seed)? {
        Separation::Separated(separated) if !separated.labels.is_empty() => separated,
        _ => return count_labels(observation, model, config, reference),
    };
    let images = separated.images;
    let missing = images - separated.labels.len();
    let mut labels = separated.labels;
    if missing > 0 {
        let counted = match count_labels(observation, model, config, reference)? {
            LabelOutcome::Recovered(recovery) => recovery.labels,
            not_applicable @ LabelOutcome::NotApplicable { .. } => return Ok(not_applicable),
        };
        labels.extend(remaining_labels(&labels, &counted, missing)?);
    }
    labels.sort_unstable();
    Ok(LabelOutcome::Recovered(LabelRecovery {
        labels,
        attack: ATTACK,
        objective: missing as f64 / images as f64,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// `missing` labels for the images not separated: the counts of `counted` (a label per image of the
/// whole batch) less the `separated` ones, shared out by [`round_label_counts`] (negative ones count
/// as zero; largest remainder, ties to the smaller class).
fn remaining_labels(separated: &[u32], counted: &[u32], missing: usize) -> Result<Vec<u32>> {
    let classes = separated
        .iter()
        .chain(counted)
        .max()
        .map_or(0, |&c| c as usize + 1);
    let histogram = |labels: &[u32]| {
        let mut counts = vec![0f64; classes];
        labels.iter().for_each(|&l| counts[l as usize] += 1.0);
        counts
    };
    let (found, total) = (histogram(separated), histogram(counted));
    // Never all zero: the counts cover every image, the separated ones fewer.
    let left: Vec<f64> = total.iter().zip(&found).map(|(t, f)| t - f).collect();
    Ok(round_label_counts(&left, missing)?
        .iter()
        .enumerate()
        .flat_map(|(class, &n)| std::iter::repeat_n(class as u32, n))
        .collect())
}

/// The classifier block's global parameters and observed gradients, in f64.
struct BlockValues {
    /// Token width D.
    width: usize,
    /// Hidden width M.
    hidden: usize,
    /// Hidden weight W1 (M x D).
    hidden_weight: DMatrix<f64>,
    /// Hidden bias b1 (M).
    hidden_bias: DVector<f64>,
    /// Norm of a typical `m`: sqrt(sum gamma^2 + sum beta^2) of the block's layer norm.
    token_norm: f64,
    /// The block's layer norm's scale and shift (D each).
    norm: (DVector<f64>, DVector<f64>),
    /// Output weight W2 (D x M) and bias b2 (D).
    output: (DMatrix<f64>, DVector<f64>),
    /// Gradient of W1 (M x D), as a gradient (a delta's sign undone).
    hidden_gradient: DMatrix<f64>,
    /// Gradient of W2 (D x M), likewise.
    output_gradient: DMatrix<f64>,
    /// `C diag(gamma_final) W^T` (D x classes): the directions of the classifier's error at the
    /// block's output, centred.
    error_directions: DMatrix<f64>,
}

impl BlockValues {
    /// Reads the block from the model's global parameters and `update` (multiplied by `sign`).
    fn read(
        model: &dyn TargetModel,
        layout: &ClassifierBlockLayout,
        update: &crate::model::ParamMap,
        sign: f64,
    ) -> Result<Self> {
        let global = model.parameters();
        let values = |map: &crate::model::ParamMap, name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let tensor: &Tensor = observed_tensor(map, name)?;
            Ok((tensor.dims().to_vec(), tensor_to_f64(tensor)?))
        };
        let matrix = |map, name: &str| -> Result<DMatrix<f64>> {
            match values(map, name)? {
                (dims, v) if dims.len() == 2 => Ok(DMatrix::from_row_slice(dims[0], dims[1], &v)),
                (dims, _) => Err(AttackError::Observation {
                    name: name.to_string(),
                    reason: format!("expected a matrix, got shape {dims:?}"),
                }),
            }
        };
        let expect_shape = |m: DMatrix<f64>, name: &str, rows: usize, cols: usize| {
            if m.shape() == (rows, cols) {
                Ok(m)
            } else {
                Err(AttackError::Observation {
                    name: name.to_string(),
                    reason: format!("expected {rows} x {cols}, got {:?}", m.shape()),
                })
            }
        };
        let hidden_weight = matrix(global, &layout.hidden_weight)?;
        let (hidden, width) = hidden_weight.shape();
        let vector = |name: &str, expected: usize| -> Result<Vec<f64>> {
            let (_, v) = values(global, name)?;
            if v.len() == expected {
                Ok(v)
            } else {
                Err(AttackError::Observation {
                    name: name.to_string(),
                    reason: format!("expected {expected} values, got {}", v.len()),
                })
            }
        };
        let hidden_bias = DVector::from_vec(vector(&layout.hidden_bias, hidden)?);
        let output_weight = expect_shape(
            matrix(global, &layout.output_weight)?,
            &layout.output_weight,
            width,
            hidden,
        )?;
        let output_bias = DVector::from_vec(vector(&layout.output_bias, width)?);
        let gamma = vector(&layout.norm_weight, width)?;
        let beta = vector(&layout.norm_bias, width)?;
        let final_gamma = vector(&layout.final_norm_weight, width)?;
        let classifier = matrix(global, &model.classifier().weight)?;
        let classes = classifier.nrows();
        if classifier.ncols() != width {
            return Err(AttackError::Observation {
                name: model.classifier().weight,
                reason: format!(
                    "expected {width} columns (the block's width), got {}",
                    classifier.ncols()
                ),
            });
        }
        let hidden_gradient = expect_shape(
            matrix(update, &layout.hidden_weight)? * sign,
            &layout.hidden_weight,
            hidden,
            width,
        )?;
        let output_gradient = expect_shape(
            matrix(update, &layout.output_weight)? * sign,
            &layout.output_weight,
            width,
            hidden,
        )?;
        if hidden_gradient
            .iter()
            .chain(output_gradient.iter())
            .any(|v| !v.is_finite())
        {
            return Err(AttackError::Numerical {
                attack: ATTACK,
                reason: "the classifier block's gradients are not finite".into(),
            });
        }
        let mut error_directions =
            DMatrix::from_fn(width, classes, |r, c| final_gamma[r] * classifier[(c, r)]);
        for mut column in error_directions.column_iter_mut() {
            let mean = column.mean();
            column.add_scalar_mut(-mean);
        }
        let token_norm = gamma.iter().chain(&beta).map(|v| v * v).sum::<f64>().sqrt();
        Ok(Self {
            width,
            hidden,
            hidden_weight,
            hidden_bias,
            token_norm,
            norm: (DVector::from_vec(gamma), DVector::from_vec(beta)),
            output: (output_weight, output_bias),
            hidden_gradient,
            output_gradient,
            error_directions,
        })
    }

    /// Separates the `images` images (see the module docs).
    fn separate(&self, images: usize, seed: u64) -> Result<SeparatedLabels> {
        // Row spaces: the tokens m_i (in R^D) and the activations a_i (in R^M).
        let tokens = leading_row_space(&self.hidden_gradient, images)?;
        let activations = leading_row_space(&self.output_gradient, images)?;
        let reduced = &self.hidden_weight * tokens.transpose(); // M x B: W1 U
        let problem = Membership {
            reduced: &reduced,
            bias: &self.hidden_bias,
            basis: &activations,
            unfound: None,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let starts = (STARTS_PER_IMAGE * images).max(MIN_STARTS);
        let mut found: Vec<(DVector<f64>, f64)> = Vec::new();
        for _ in 0..starts {
            let Some(start) = self.random_start(images, &mut rng) else {
                continue;
            };
            let (point, residual) = problem.solve(start);
            if residual.is_nan() || residual > ACCEPTED_RESIDUAL {
                continue;
            }
            if !is_known(&point, &found) {
                found.push((point, residual));
            }
        }
        if found.len() + 1 == images {
            let spaces = RowSpaces {
                tokens: &tokens,
                problem: &problem,
            };
            found.extend(self.last_image(&spaces, &found, &mut rng));
        }
        found.sort_by(|a, b| a.1.total_cmp(&b.1));
        // Two points whose activations are (numerically) dependent are one image found twice, or
        // images the model maps to one activation: neither can be told apart from the other.
        let mut independent: Vec<DVector<f64>> = Vec::new();
        found.retain(|(c, _)| {
            let activation = problem.activation(c);
            let mut rest = activation.clone();
            for basis in &independent {
                rest -= basis * basis.dot(&rest);
            }
            let keep = rest.norm() > DEPENDENT_ACTIVATION * activation.norm();
            if keep {
                independent.push(rest.normalize());
            }
            keep
        });
        found.truncate(images);
        if found.is_empty() {
            return Ok(SeparatedLabels {
                labels: Vec::new(),
                residuals: Vec::new(),
                images,
            });
        }
        let columns: Vec<DVector<f64>> = found.iter().map(|(c, _)| problem.activation(c)).collect();
        let Some(outputs) = self.output_gradients(&columns) else {
            return Err(AttackError::Numerical {
                attack: ATTACK,
                reason: "the separated activations are linearly dependent".into(),
            });
        };
        let mut labels = Vec::new();
        let mut residuals = Vec::new();
        for (index, (coefficients, residual)) in found.iter().enumerate() {
            let token = tokens.transpose() * coefficients;
            let final_token = self.final_token_directions(&token, &columns[index]);
            if let Some(label) = self.label_of(&outputs.column(index).into_owned(), &final_token) {
                labels.push(label);
                residuals.push(*residual);
            }
        }
        Ok(SeparatedLabels {
            labels,
            residuals,
            images,
        })
    }

    /// A random start of norm `token_norm` (at least 1) in the tokens' `images` coefficients.
    fn random_start(&self, images: usize, rng: &mut StdRng) -> Option<DVector<f64>> {
        let start = DVector::from_fn(images, |_, _| {
            rng.sample::<f64, _>(rand_distr::StandardNormal)
        });
        let norm = start.norm();
        (norm > 0.0).then(|| start * (self.token_norm.max(1.0) / norm))
    }

    /// The one image of the batch that the random starts left (see the module docs): searched
    /// with the `found` images deflated (the residual measured against the part of the activation
    /// outside their span), and of the points reached the one that makes the whole batch explain
    /// the hidden layer's gradient best, if that is within [`CONSISTENT_BATCH`].
    fn last_image(
        &self,
        spaces: &RowSpaces<'_>,
        found: &[(DVector<f64>, f64)],
        rng: &mut StdRng,
    ) -> Option<(DVector<f64>, f64)> {
        let images = found.len() + 1;
        let unfound = spaces.unfound_activations(found)?;
        let deflated = Membership {
            unfound: Some(&unfound),
            ..*spaces.problem
        };
        let mut best: Option<(f64, (DVector<f64>, f64))> = None;
        for _ in 0..DEFLATED_STARTS {
            let Some(start) = self.random_start(images, rng) else {
                continue;
            };
            let (point, _) = deflated.solve(start);
            let residual = spaces
                .problem
                .residual_and_jacobian(&point)
                .0
                .norm_squared();
            if residual.is_nan() || residual > ACCEPTED_RESIDUAL || is_known(&point, found) {
                continue;
            }
            let mut points: Vec<&DVector<f64>> = found.iter().map(|(c, _)| c).collect();
            points.push(&point);
            let Some(consistency) = self.hidden_consistency(spaces, &points) else {
                continue;
            };
            if consistency <= CONSISTENT_BATCH
                && best.as_ref().is_none_or(|(b, _)| consistency < *b)
            {
                best = Some((consistency, (point, residual)));
            }
        }
        best.map(|(_, image)| image)
    }

    /// Each image's gradient at the block's output (D x images), `dW2 A (A^T A)^-1` for the images'
    /// activations `A`; `None` when they are linearly dependent.
    fn output_gradients(&self, activations: &[DVector<f64>]) -> Option<DMatrix<f64>> {
        let stacked = DMatrix::from_columns(activations);
        let inverse = (stacked.transpose() * &stacked).try_inverse()?;
        Some(&self.output_gradient * &stacked * inverse)
    }

    /// How well the images at coefficients `points` explain the hidden layer's weight gradient,
    /// `|dW1 - sum_i delta_i m_i^T| / |dW1|`, with each image's gradient at the block's output
    /// from `dW2` and `delta_i` its back-propagation to the hidden pre-activation; `None` when the
    /// images' activations are dependent.
    fn hidden_consistency(&self, spaces: &RowSpaces<'_>, points: &[&DVector<f64>]) -> Option<f64> {
        let columns: Vec<DVector<f64>> = points
            .iter()
            .map(|c| spaces.problem.activation(c))
            .collect();
        let outputs = self.output_gradients(&columns)?;
        let mut explained = DMatrix::<f64>::zeros(self.hidden, self.width);
        for (index, c) in points.iter().enumerate() {
            let pre = spaces.problem.reduced * *c + &self.hidden_bias;
            let back = self.output.0.transpose() * outputs.column(index);
            let delta = DVector::from_fn(self.hidden, |r, _| gelu_slope(pre[r]) * back[r]);
            explained += delta * (spaces.tokens.transpose() * *c).transpose();
        }
        Some((&self.hidden_gradient - explained).norm() / self.hidden_gradient.norm())
    }

    /// Two directions spanning the image's final token, centred: the token reaches the final layer
    /// norm as `r + W2 a + b2`, with the residual `r` known from the block's normed token `m` up to
    /// its scale and mean (`r = s (m - beta) / gamma + mu`), so it lies in the span of `C (m - beta) /
    /// gamma` and `C (W2 a + b2)`.
    fn final_token_directions(
        &self,
        token: &DVector<f64>,
        activation: &DVector<f64>,
    ) -> DMatrix<f64> {
        let (gamma, beta) = &self.norm;
        let residual = DVector::from_fn(self.width, |r, _| {
            if gamma[r] == 0.0 {
                0.0
            } else {
                (token[r] - beta[r]) / gamma[r]
            }
        });
        let added = &self.output.0 * activation + &self.output.1;
        let centre = |v: DVector<f64>| v.add_scalar(-v.mean());
        DMatrix::from_columns(&[centre(residual), centre(added)])
    }

    /// The class whose entry of the least-squares `e` (summing to zero) with `E e + T t = output` is
    /// the only negative one, `T` the final token's directions (the final layer norm's Jacobian
    /// removes the error's component along the token, a nuisance `t`; with two classes it is left
    /// out); `None` when not exactly one entry is negative.
    fn label_of(&self, output: &DVector<f64>, final_token: &DMatrix<f64>) -> Option<u32> {
        let classes = self.error_directions.ncols();
        // Two classes: the sign along E (e_1 - e_0) is exact without the nuisance (the module docs),
        // and fitting it could only blur the sign.
        let nuisance = if classes > 2 { 2 } else { 0 };
        // e = Z z with Z's columns e_c - e_0 (c = 1..classes): every vector summing to zero.
        let mut reduced = DMatrix::from_fn(self.width, classes - 1 + nuisance, |r, c| {
            if c + 1 < classes {
                self.error_directions[(r, c + 1)] - self.error_directions[(r, 0)]
            } else {
                final_token[(r, c + 1 - classes)]
            }
        });
        // Unit columns, so that the rank cut-off treats them alike.
        let scales: Vec<f64> = reduced
            .column_iter()
            .map(|c| c.norm().max(f64::MIN_POSITIVE))
            .collect();
        for (mut column, s) in reduced.column_iter_mut().zip(&scales) {
            column /= *s;
        }
        let solution = reduced.svd(true, true).solve(output, 1e-12).ok()?;
        let z = DVector::from_fn(classes - 1, |c, _| solution[c] / scales[c]);
        let mut e = vec![-z.sum()];
        e.extend(z.iter());
        let negative: Vec<usize> = (0..classes).filter(|&c| e[c] < 0.0).collect();
        match negative.as_slice() {
            [label] => Some(*label as u32),
            _ => None,
        }
    }
}

/// The orthonormal basis (as the rows of a `count` x columns matrix) of the span of the `count`
/// leading right singular vectors of `matrix`.
fn leading_row_space(matrix: &DMatrix<f64>, count: usize) -> Result<DMatrix<f64>> {
    // The right singular vectors of a wide matrix are the left ones of its transpose.
    let svd = matrix.transpose().svd(true, false);
    let u = svd.u.ok_or_else(|| AttackError::Numerical {
        attack: ATTACK,
        reason: "the singular value decomposition returned no singular vectors".into(),
    })?;
    let sigma = &svd.singular_values;
    let mut order: Vec<usize> = (0..sigma.len()).collect();
    order.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]));
    let mut basis = DMatrix::zeros(count, u.nrows());
    for (row, &index) in order.iter().take(count).enumerate() {
        basis.set_row(row, &u.column(index).transpose());
    }
    Ok(basis)
}

/// The row spaces a separation works in: the tokens', and the activations' inside its membership
/// problem (`problem.basis`, with `problem.reduced` = `W1 U`).
struct RowSpaces<'a> {
    /// Orthonormal rows spanning the tokens (B x D).
    tokens: &'a DMatrix<f64>,
    /// Whether an activation lies in the activations' span.
    problem: &'a Membership<'a>,
}

impl RowSpaces<'_> {
    /// Orthonormal rows (as many as images are missing) spanning the part of the activations'
    /// span that the `found` images' activations leave out; `None` when nothing is left out or
    /// the found activations are dependent.
    fn unfound_activations(&self, found: &[(DVector<f64>, f64)]) -> Option<DMatrix<f64>> {
        let activations = self.problem.basis;
        let spanned: Vec<DVector<f64>> = found
            .iter()
            .map(|(c, _)| activations * self.problem.activation(c))
            .collect();
        let unspanned = unspanned_directions(&spanned, activations.nrows());
        let rows: Vec<_> = unspanned
            .iter()
            .map(|d| d.transpose() * activations)
            .collect();
        (!rows.is_empty()).then(|| DMatrix::from_rows(&rows))
    }
}

/// Whether `point` is one of the `found` images' (within [`SAME_IMAGE`]).
fn is_known(point: &DVector<f64>, found: &[(DVector<f64>, f64)]) -> bool {
    found
        .iter()
        .any(|(other, _)| (point - other).norm() <= SAME_IMAGE * other.norm().max(1e-12))
}

/// An orthonormal basis of the directions of `R^dimension` orthogonal to every vector of `spanned`
/// (none when they are dependent).
fn unspanned_directions(spanned: &[DVector<f64>], dimension: usize) -> Vec<DVector<f64>> {
    let spanned = DMatrix::from_columns(spanned);
    let Some(inverse) = (spanned.transpose() * &spanned).try_inverse() else {
        return Vec::new();
    };
    let projector =
        DMatrix::identity(dimension, dimension) - &spanned * inverse * spanned.transpose();
    let eigen = projector.symmetric_eigen();
    eigen
        .eigenvalues
        .iter()
        .zip(eigen.eigenvectors.column_iter())
        .filter(|(value, _)| **value > 0.5)
        .map(|(_, vector)| vector.into_owned())
        .collect()
}

/// The condition that an activation `gelu(W1 U c + b1)` lies in the span of `basis`' rows.
struct Membership<'a> {
    /// `W1 U` (M x B).
    reduced: &'a DMatrix<f64>,
    /// `b1` (M).
    bias: &'a DVector<f64>,
    /// Orthonormal rows spanning the activations (B x M).
    basis: &'a DMatrix<f64>,
    /// Orthonormal rows spanning the part of the activations' span that no image found so far
    /// spans; when given, the residual is measured against the activation's part in it instead of
    /// the whole activation, so that an image already found (none of whose activation lies there)
    /// repels the solver rather than attracting it.
    unfound: Option<&'a DMatrix<f64>>,
}

impl Membership<'_> {
    /// The hidden activation for coefficients `c`.
    fn activation(&self, c: &DVector<f64>) -> DVector<f64> {
        (self.reduced * c + self.bias).map(gelu)
    }

    /// The residual `(a - P a) / |a|` (or `/ |Q a|`, see [`Membership::unfound`]) and its Jacobian
    /// with respect to `c`.
    fn residual_and_jacobian(&self, c: &DVector<f64>) -> (DVector<f64>, DMatrix<f64>) {
        let pre = self.reduced * c + self.bias;
        let activation = pre.map(gelu);
        let slope = pre.map(gelu_slope);
        let mut jacobian = self.reduced.clone();
        for (mut row, s) in jacobian.row_iter_mut().zip(slope.iter()) {
            row *= *s;
        }
        // The part of the activation the residual is measured against: `Q a`, with `Q` the
        // identity or the projection on the unfound span.
        let measured = match self.unfound {
            Some(unfound) => unfound.transpose() * (unfound * &activation),
            None => activation.clone(),
        };
        let norm = measured.norm().max(f64::MIN_POSITIVE);
        let outside = |v: &DMatrix<f64>| v - self.basis.transpose() * (self.basis * v);
        let residual = (&activation - self.basis.transpose() * (self.basis * &activation)) / norm;
        // d/dc [P a / |Q a|] = P J / |Q a| - (P a)((Q a)^T J) / |Q a|^3 (Q a symmetric projection).
        let along = measured.transpose() * &jacobian / (norm * norm);
        let jacobian = outside(&jacobian) / norm - &residual * along;
        (residual, jacobian)
    }

    /// Levenberg-Marquardt from `start`: the point reached and its relative residual `|r|^2`.
    fn solve(&self, start: DVector<f64>) -> (DVector<f64>, f64) {
        let mut point = start;
        let (mut residual, mut jacobian) = self.residual_and_jacobian(&point);
        let mut value = residual.norm_squared();
        let mut damping = 1e-3;
        for _ in 0..ITERATIONS {
            let normal = jacobian.transpose() * &jacobian;
            let gradient = jacobian.transpose() * &residual;
            let mut system = normal.clone();
            for i in 0..system.nrows() {
                system[(i, i)] += damping * (normal[(i, i)] + 1e-12);
            }
            let Some(step) = system.cholesky().map(|c| c.solve(&(-&gradient))) else {
                damping *= 10.0;
                continue;
            };
            let candidate = &point + step;
            let (next_residual, next_jacobian) = self.residual_and_jacobian(&candidate);
            let next_value = next_residual.norm_squared();
            if next_value < value {
                point = candidate;
                residual = next_residual;
                jacobian = next_jacobian;
                value = next_value;
                damping = (damping / 3.0).max(1e-9);
            } else {
                damping *= 10.0;
            }
            if value < 1e-24 || damping > 1e8 {
                break;
            }
        }
        (point, value)
    }
}

/// GELU, `u Phi(u)`.
fn gelu(u: f64) -> f64 {
    u * normal_cdf(u)
}

/// GELU's derivative, `Phi(u) + u phi(u)`.
fn gelu_slope(u: f64) -> f64 {
    normal_cdf(u) + u * normal_density(u)
}

/// The standard normal distribution function.
fn normal_cdf(u: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(u * std::f64::consts::FRAC_1_SQRT_2))
}

/// The standard normal density.
fn normal_density(u: f64) -> f64 {
    (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classifier block of random weights (width `D`, hidden `M`) and the gradients that `images`
    /// random tokens with random output gradients give it; returns the block and the tokens.
    fn synthetic_block(width: usize, hidden: usize, images: usize) -> (BlockValues, DMatrix<f64>) {
        let mut rng = StdRng::seed_from_u64(11);
        let mut normal = |rows, cols, scale: f64| {
            DMatrix::from_fn(rows, cols, |_, _| {
                scale * rng.sample::<f64, _>(rand_distr::StandardNormal)
            })
        };
        let hidden_weight = normal(hidden, width, 1.0 / (width as f64).sqrt());
        let hidden_bias = normal(hidden, 1, 0.1).column(0).into_owned();
        let output_weight = normal(width, hidden, 1.0 / (hidden as f64).sqrt());
        let tokens = normal(width, images, 1.0);
        let outputs = normal(width, images, 0.01);
        let (mut hidden_gradient, mut output_gradient) =
            (DMatrix::zeros(hidden, width), DMatrix::zeros(width, hidden));
        for i in 0..images {
            let pre = &hidden_weight * tokens.column(i) + &hidden_bias;
            let activation = pre.map(gelu);
            let back = output_weight.transpose() * outputs.column(i);
            let delta = DVector::from_fn(hidden, |r, _| gelu_slope(pre[r]) * back[r]);
            hidden_gradient += delta * tokens.column(i).transpose();
            output_gradient += outputs.column(i) * activation.transpose();
        }
        let ones = DVector::from_element(width, 1.0);
        let block = BlockValues {
            width,
            hidden,
            hidden_weight,
            hidden_bias,
            token_norm: (width as f64).sqrt(),
            norm: (ones.clone(), DVector::zeros(width)),
            output: (output_weight, DVector::zeros(width)),
            hidden_gradient,
            output_gradient,
            error_directions: DMatrix::from_fn(
                width,
                2,
                |r, c| if (r + c) % 2 == 0 { 1.0 } else { -1.0 },
            ),
        };
        (block, tokens)
    }

    #[test]
    fn the_last_image_is_found_with_the_others_deflated_and_the_batch_explains_the_hidden_gradient()
    {
        let images = 4;
        let (block, private_tokens) = synthetic_block(24, 96, images);
        let tokens = leading_row_space(&block.hidden_gradient, images).unwrap();
        let activations = leading_row_space(&block.output_gradient, images).unwrap();
        let reduced = &block.hidden_weight * tokens.transpose();
        let problem = Membership {
            reduced: &reduced,
            bias: &block.hidden_bias,
            basis: &activations,
            unfound: None,
        };
        let spaces = RowSpaces {
            tokens: &tokens,
            problem: &problem,
        };
        // The private images' coefficients in the tokens' row space.
        let private: Vec<DVector<f64>> = (0..images)
            .map(|i| &tokens * private_tokens.column(i))
            .collect();
        let all: Vec<&DVector<f64>> = private.iter().collect();
        let explained = block.hidden_consistency(&spaces, &all).unwrap();
        assert!(explained < 1e-10, "{explained:e}");
        for left_out in 0..images {
            let found: Vec<(DVector<f64>, f64)> = (0..images)
                .filter(|&i| i != left_out)
                .map(|i| (private[i].clone(), 0.0))
                .collect();
            let mut rng = StdRng::seed_from_u64(left_out as u64);
            let (point, residual) = block.last_image(&spaces, &found, &mut rng).unwrap();
            let distance = (&point - &private[left_out]).norm() / private[left_out].norm();
            assert!(
                distance < 1e-6,
                "image {left_out}: {distance:e} (residual {residual:e})"
            );
            // From next to a found image, the plain solve returns to it; with the found images
            // deflated, the solve is pushed off every one of them.
            let other = (left_out + 1) % images;
            let start = &private[other] * 1.001;
            let (plain, _) = problem.solve(start.clone());
            assert!((&plain - &private[other]).norm() < 1e-6 * private[other].norm());
            let unfound = spaces.unfound_activations(&found).unwrap();
            let deflated = Membership {
                unfound: Some(&unfound),
                ..problem
            };
            let (pushed, _) = deflated.solve(start);
            assert!(
                !is_known(&pushed, &found),
                "image {left_out}: stayed at a found image"
            );
            // A batch completed by another image's point leaves the hidden gradient unexplained.
            let mut wrong = all.clone();
            wrong[left_out] = &private[(left_out + 1) % images];
            assert!(block
                .hidden_consistency(&spaces, &wrong)
                .is_none_or(|r| r > 1e-3));
        }
    }

    #[test]
    fn leftover_counts_fill_the_images_not_separated() {
        // Counts say three of class 1 and one of class 0; one of class 1 was separated.
        assert_eq!(
            remaining_labels(&[1], &[0, 1, 1, 1], 3).unwrap(),
            vec![0, 1, 1]
        );
        // The separated images used up class 0's count: the rest follow what is left.
        assert_eq!(
            remaining_labels(&[0, 0], &[0, 1, 1, 1], 2).unwrap(),
            vec![1, 1]
        );
        // Counts of two against two separated of one class: the rest are the other class.
        assert_eq!(
            remaining_labels(&[1, 1], &[1, 1, 0, 0], 2).unwrap(),
            vec![0, 0]
        );
        // What is left is shared in proportion: 3 of class 0 and 1 of class 2 for two images.
        assert_eq!(
            remaining_labels(&[1], &[0, 0, 0, 1, 2], 2).unwrap(),
            vec![0, 0]
        );
        assert_eq!(
            remaining_labels(&[0, 0], &[0, 0, 0, 1, 2], 3).unwrap(),
            vec![0, 1, 2]
        );
    }
}
