//! How many images of each class a batch (or an aggregate of batches) holds, from the last layer's
//! bias gradient: the "impression" estimate of the LLG family (Wainakh et al., "User-Level Label
//! Leakage from Gradients in Federated Learning", PETS 2022; Geng et al., "Towards General Deep Leakage
//! in Federated Learning", 2021).
//!
//! For the mean cross-entropy over `B` images the classifier-bias gradient is
//! `db = (1/B) sum_b (p_b - onehot(y_b))`, so the number of images of class `c` is exactly
//! `n_c = B (mean_b p_bc - db_c)`. The attacker does not know the images' probabilities; it estimates
//! their mean by the mean softmax of the global model over uniform-random dummy images in [0, 1]
//! (seeded; [`LabelCountConfig`]), read through the model's own loss: for dummy images all labelled
//! class 0, the bias gradient of the loss is `mean p - e_0`. The raw estimates sum to `B` exactly (both
//! `p` and `onehot` sum to one); negative ones are set to zero, the rest rescaled to sum to `B` and
//! rounded by largest remainder, so the counts are non-negative integers summing to `B`.
//!
//! The estimate is exact up to how well the dummy mean stands in for the private one: near a fresh
//! initialisation (nearly uniform outputs) it is almost exact; a trained, confident model's outputs
//! on noise differ more from those on real images. This module never sees the private labels.
//!
//! An attacker who holds labelled images of the clients' distribution (never the private ones:
//! [`ReferenceImages`]) estimates better, in the spirit of LLG+ but conditioned on what the model
//! predicts rather than on the label: an image the model predicts as class `k` and that carries label
//! `c` adds `P_k - e_c` to `B db` and about `Q_k - e_c F_k^T` to `B dW`, with `P_k`, `F_k` and `Q_k` the
//! mean softmax, classifier input and their outer product over the reference images predicted `k`.
//! A trained model maps each class's images to nearly one feature and a misclassified image to the
//! feature of the class it is mistaken for, so the weight gradient tells apart what the bias gradient
//! sums: one confidently misclassified image outweighs a hundred well-fitted ones there. The counts of
//! every (prediction, label) cell are non-negative integers summing to `B` that explain both
//! gradients best, searched exhaustively. Where there are too many cells for that (many classes,
//! large aggregates) the counts are LLG+'s: the mean softmax of the model on the reference images of
//! each class `k`, `M[k]`, stands in for that of the batch's class-`k` images, so the bias gradient
//! is `B db = sum_k n_k (M[k] - e_k)`; with `sum_k n_k = B` a linear system in the counts, solved
//! directly. Figures in [`count_labels`].

use std::num::NonZeroUsize;
use std::time::Instant;

use candle_core::{Tensor, Var};
use nalgebra::{DMatrix, DVector};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::feature_inversion::random_images;
use crate::idlg::{LabelOutcome, LabelRecovery};
use crate::linear::{observed_tensor, tensor_to_f64};
use crate::model::TargetModel;
use crate::observation::{Observation, UpdateSource};
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "label-counts";

/// Dummy images per forward pass (bounds memory on large models).
const DUMMY_CHUNK: usize = 16;

/// Settings of the label-count attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelCountConfig {
    /// Number of uniform-random dummy images whose mean softmax stands in for the batch's.
    pub dummy_images: NonZeroUsize,
    /// Seed of the dummy images.
    pub seed: u64,
}

impl Default for LabelCountConfig {
    fn default() -> Self {
        Self {
            dummy_images: NonZeroUsize::new(32).expect("32 is not zero"),
            seed: 0,
        }
    }
}

/// Labelled images of the clients' data distribution that the attacker holds (for instance a held-out
/// split; never the private batch), for [`count_labels`]'s class-conditional estimate.
#[derive(Debug, Clone)]
pub struct ReferenceImages {
    /// Images, N x C x H x W, in the model's input range.
    pub images: Tensor,
    /// One label per image.
    pub labels: Vec<u32>,
}

/// Rounds non-negative-or-not real counts to non-negative integers summing to `total`: negatives are
/// set to zero, the rest rescaled to sum to `total`, floored, and the missing units given to the
/// largest fractional parts (ties to the smaller class).
///
/// # Errors
/// [`AttackError::Numerical`] when no estimate is positive (or one is not finite).
///
/// # Example
/// ```
/// let counts = fedleak_attacks::round_label_counts(&[2.6, 1.3, 0.4, -0.3], 4)?;
/// // Clamped (2.6, 1.3, 0.4, 0) sum to 4.3 -> scaled (2.42, 1.21, 0.37, 0) -> floors (2, 1, 0, 0)
/// // -> one unit left, to the largest remainder (0.42, class 0).
/// assert_eq!(counts, vec![3, 1, 0, 0]);
/// # Ok::<(), fedleak_attacks::AttackError>(())
/// ```
pub fn round_label_counts(estimates: &[f64], total: usize) -> Result<Vec<usize>> {
    let clamped: Vec<f64> = estimates.iter().map(|&e| e.max(0.0)).collect();
    let sum: f64 = clamped.iter().sum();
    if !(sum > 0.0 && sum.is_finite()) {
        return Err(AttackError::Numerical {
            attack: ATTACK,
            reason: format!("the class-count estimates {estimates:?} have no positive entry"),
        });
    }
    let scaled: Vec<f64> = clamped.iter().map(|c| c * total as f64 / sum).collect();
    let mut counts: Vec<usize> = scaled.iter().map(|s| s.floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (scaled[a] - scaled[a].floor(), scaled[b] - scaled[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &class in order.iter().take(total.saturating_sub(assigned)) {
        counts[class] += 1;
    }
    Ok(counts)
}

/// Recovers the labels of every image behind an update, as a sorted list (the counts per class; which
/// image has which label is not determined).
///
/// Applies to one client's update or an aggregate of clients' updates (every image behind it,
/// [`crate::UpdateView::images`]): a FedSGD gradient, or a plain-SGD delta, read as the gradient
/// `-delta / (lr * local_steps)` (exact for one step; for several steps it is the mean of gradients
/// at drifting parameters, an approximation), or a momentum-SGD delta, read as the weighted mean
/// `-delta / (lr * sum_s c_s)`; for an aggregate whose clients took different numbers of steps,
/// each client's steps weighted by its share ([`crate::UpdateView::gradient_weight`]). Not
/// applicable to adaptive-optimizer deltas (their per-entry rescaling loses the magnitudes),
/// features or ciphertext. The objective is, from noise dummies and LLG+, `sum_c |raw_c - n_c| / B`,
/// how far the raw estimates were from the integer counts returned; from the cells, the relative
/// residual of the gradients the counts explain.
///
/// With `reference` images the counts come from both the classifier's bias and weight gradients,
/// read through the reference images grouped by the model's prediction (see the module
/// documentation). Measured 2026-12-05 on the IHC tiles (`vit-tiny-32`, 4 clients, FedSGD batches of
/// 8 and their aggregates of 32; scratch comparison on the same captures; labels right as a
/// multiset, over the four clients' 32 and over the aggregate's 32), against the earlier
/// class-by-class bias estimate (LLG+: the reference mean softmax of class `k` for the batch's
/// class-`k` images) and noise dummies: a fresh model 32 and 32 by all three; a model trained by
/// FedAvg with AdamW for 195 rounds (`fedleak train --model vit-tiny-32 --clients 4 --rounds 200
/// --batch-size 8 --lr 0.03`, train loss 0.16, held-out images fitted as well as its own, two of the
/// 32 images confidently misclassified), then one FedSGD round from it: **32 and 32 where LLG+
/// counted 23 and 9** (noise 30 and 30); a model trained by FedSGD (`--algorithm fedsgd`, the same
/// otherwise; train loss 0.005, its own images fitted far better than held-out ones), round 195: 27
/// and 27 (LLG+ 27 and 27, noise 17 and 17), round 200: 25 and 32 (LLG+ 25 and 31, noise 11 and 11).
/// Where a model has memorised its images, their errors are smaller than the reference's by a
/// factor the gradient does not fix, and no estimate from the classifier's gradients alone
/// recovers the counts; the bias block weighs `sqrt(D)` times each weight entry (every scale from
/// 10 to 100 gave the same labels but one at 10). Past [`MAX_ENUMERATED_CELL_COUNTS`] candidates
/// (two classes: aggregates of about 180 images; ten classes: a batch of 14 on a fresh model, only
/// a few images on a trained one) the LLG+ counts stand: on a 10-class MNIST aggregate of 32
/// (`vit-tiny-32` trained by FedAvg to test accuracy 0.71, then one FedSGD round) a search by
/// single-image moves between the 100 cells counted 19 of 32 (26 from every start cell) where LLG+
/// counted 29.
///
/// [`crate::recover_batch_labels`] first separates the images it can, each exactly, and uses these
/// counts only for the rest.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks the classifier bias (or, with `reference`, its
/// weight) or the global parameters lack them, or `reference` holds no image, not one label per
/// image or (for LLG+) no image of some class; [`AttackError::Numerical`] when no estimate is
/// positive or LLG+'s system is singular; candle errors of the model's passes.
pub fn count_labels(
    observation: &Observation,
    model: &dyn TargetModel,
    config: &LabelCountConfig,
    reference: Option<&ReferenceImages>,
) -> Result<LabelOutcome> {
    let start = Instant::now();
    let not_applicable = |reason: String| {
        Ok(LabelOutcome::NotApplicable {
            attack: ATTACK,
            reason,
        })
    };
    let view = match observation.update_view() {
        Ok(view) => view,
        Err(reason) => return not_applicable(reason),
    };
    let (update, source, images) = (view.update, view.source, view.images);
    if images == 0 {
        return not_applicable("the update holds no images (batch size 0)".to_string());
    }
    let scale = match source {
        UpdateSource::Gradient => 1.0,
        UpdateSource::SgdDelta { lr, .. } | UpdateSource::MomentumSgdDelta { lr, .. } => {
            match view.gradient_weight() {
                Some(weight) if lr.is_finite() && *lr > 0.0 && weight > 0.0 => -1.0 / (lr * weight),
                _ => {
                    return not_applicable(format!(
                        "a delta of {} step(s) at learning rate {lr}{} cannot be read as a gradient",
                        source.local_steps(),
                        match source {
                            UpdateSource::MomentumSgdDelta { momentum, .. } =>
                                format!(" and momentum {momentum}"),
                            _ => String::new(),
                        }
                    ))
                }
            }
        }
        UpdateSource::OtherDelta { .. } => {
            return not_applicable(
                "an adaptive optimizer's delta rescales each entry; the bias gradient's magnitudes are lost"
                    .to_string(),
            )
        }
    };
    // The update's tensor `name`, read as a gradient.
    let gradient = |name: &str| -> Result<Vec<f64>> {
        Ok(tensor_to_f64(observed_tensor(update, name)?)?
            .into_iter()
            .map(|v| v * scale)
            .collect())
    };
    let bias_name = model.classifier().bias;
    let db = gradient(&bias_name)?;
    if db.len() != model.num_classes() {
        return Err(AttackError::Observation {
            name: bias_name,
            reason: format!(
                "the update has {} entries, the model {} classes",
                db.len(),
                model.num_classes()
            ),
        });
    }
    let total = images as f64;
    // Integer counts from real estimates, and how far the estimates were from them.
    let rounded = |raw: Vec<f64>| -> Result<(Vec<usize>, f64)> {
        let counts = round_label_counts(&raw, images)?;
        let distance = raw
            .iter()
            .zip(&counts)
            .map(|(r, &n)| (r - n as f64).abs())
            .sum::<f64>();
        Ok((counts, distance / total))
    };
    let (counts, objective) = match reference {
        None => {
            let noise = ImageSource::Noise {
                count: config.dummy_images.get(),
                seed: config.seed,
            };
            let mean_p = mean_probabilities(model, &bias_name, noise)?;
            rounded(
                mean_p
                    .iter()
                    .zip(&db)
                    .map(|(p, g)| total * (p - g))
                    .collect(),
            )?
        }
        Some(reference) => {
            let weight_name = model.classifier().weight;
            let by_prediction = match predicted_class_means(model, reference)? {
                Some(groups) => {
                    let dw = gradient(&weight_name)?;
                    let width = groups[0].features.len();
                    if dw.len() != db.len() * width {
                        return Err(AttackError::Observation {
                            name: weight_name,
                            reason: format!(
                                "the update has {} entries, the model {} classes x {width} features",
                                dw.len(),
                                db.len()
                            ),
                        });
                    }
                    prediction_conditional_counts(&groups, &db, &dw, images)
                }
                None => None,
            };
            match by_prediction {
                Some(found) => found,
                None => {
                    let per_class = class_mean_probabilities(model, &bias_name, reference)?;
                    rounded(solve_counts(&per_class, &db, total)?)?
                }
            }
        }
    };
    let labels = counts
        .iter()
        .enumerate()
        .flat_map(|(class, &n)| std::iter::repeat_n(class as u32, n))
        .collect();
    Ok(LabelOutcome::Recovered(LabelRecovery {
        labels,
        attack: ATTACK,
        objective,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// Where [`mean_probabilities`] takes its images from.
enum ImageSource<'a> {
    /// `count` seeded uniform-random images in [0, 1].
    Noise { count: usize, seed: u64 },
    /// Given images (N x C x H x W).
    Given(&'a Tensor),
}

/// The global model's mean softmax over the images of `source`, read as the bias gradient of the
/// model's loss with every image labelled class 0 (`mean p - e_0`), in chunks of [`DUMMY_CHUNK`].
fn mean_probabilities(
    model: &dyn TargetModel,
    bias_name: &str,
    source: ImageSource<'_>,
) -> Result<Vec<f64>> {
    let mut params = model.parameters().clone();
    let bias = params
        .get(bias_name)
        .ok_or_else(|| AttackError::Observation {
            name: bias_name.to_string(),
            reason: "absent from the model's global parameters".to_string(),
        })?;
    let (dtype, device) = (bias.dtype(), bias.device().clone());
    let var = Var::from_tensor(&bias.detach())?;
    params.insert(bias_name.to_string(), var.as_tensor().clone());
    let classes = model.num_classes();
    let (total, mut rng) = match source {
        ImageSource::Noise { count, seed } => (count, StdRng::seed_from_u64(seed)),
        ImageSource::Given(images) => (images.dim(0)?, StdRng::seed_from_u64(0)),
    };
    let mut sum = vec![0f64; classes];
    let mut done = 0;
    while done < total {
        let n = DUMMY_CHUNK.min(total - done);
        let images = match &source {
            ImageSource::Noise { .. } => random_images(model, n, &mut rng)?,
            ImageSource::Given(images) => images.narrow(0, done, n)?.to_dtype(dtype)?,
        };
        let mut targets = vec![0f32; n * classes];
        targets.iter_mut().step_by(classes).for_each(|t| *t = 1.0);
        let targets = Tensor::from_vec(targets, (n, classes), &device)?.to_dtype(dtype)?;
        let loss = model.loss(&params, &images, &targets)?;
        let grads = loss.backward()?;
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| AttackError::Numerical {
                attack: ATTACK,
                reason: format!("the model's loss does not depend on `{bias_name}`"),
            })?;
        for (s, g) in sum.iter_mut().zip(tensor_to_f64(grad)?) {
            *s += g * n as f64;
        }
        done += n;
    }
    let mut mean_p: Vec<f64> = sum.into_iter().map(|s| s / total as f64).collect();
    if let Some(first) = mean_p.first_mut() {
        *first += 1.0;
    }
    Ok(mean_p)
}

/// The model's mean softmax over the reference images of each class (`M[k]`, one row per class).
fn class_mean_probabilities(
    model: &dyn TargetModel,
    bias_name: &str,
    reference: &ReferenceImages,
) -> Result<Vec<Vec<f64>>> {
    if reference.images.dim(0)? != reference.labels.len() {
        return Err(AttackError::Observation {
            name: "reference images".to_string(),
            reason: format!(
                "{} images but {} labels",
                reference.images.dim(0)?,
                reference.labels.len()
            ),
        });
    }
    (0..model.num_classes())
        .map(|class| {
            let members: Vec<u32> = (0..reference.labels.len() as u32)
                .filter(|&i| reference.labels[i as usize] as usize == class)
                .collect();
            if members.is_empty() {
                return Err(AttackError::Observation {
                    name: "reference images".to_string(),
                    reason: format!(
                        "no image of class {class}: every class needs at least one reference image"
                    ),
                });
            }
            let index = Tensor::new(members.as_slice(), reference.images.device())?;
            let images = reference.images.index_select(&index, 0)?;
            mean_probabilities(model, bias_name, ImageSource::Given(&images))
        })
        .collect()
}

/// The real counts `n` that solve `sum_k n_k (M[k][c] - [k == c]) = B db_c` for every class `c` and
/// `sum_k n_k = B`. The class equations sum to zero (rows of `M` and `db` sum to 0 and 1), so the last
/// one is replaced by the total; Gaussian elimination with partial pivoting.
fn solve_counts(per_class: &[Vec<f64>], db: &[f64], total: f64) -> Result<Vec<f64>> {
    let classes = db.len();
    let mut rows: Vec<Vec<f64>> = (0..classes)
        .map(|c| {
            let mut row: Vec<f64> = (0..classes)
                .map(|k| per_class[k][c] - f64::from(u8::from(k == c)))
                .collect();
            row.push(total * db[c]);
            row
        })
        .collect();
    if let Some(last) = rows.last_mut() {
        *last = vec![1.0; classes];
        last.push(total);
    }
    for column in 0..classes {
        let pivot = (column..classes)
            .max_by(|&a, &b| rows[a][column].abs().total_cmp(&rows[b][column].abs()))
            .expect("a column below the diagonal");
        let magnitude = rows[pivot][column].abs();
        if magnitude.is_nan() || magnitude <= 1e-12 {
            return Err(AttackError::Numerical {
                attack: ATTACK,
                reason: "the reference images' class-mean outputs are linearly dependent: the \
                         counts are not determined"
                    .to_string(),
            });
        }
        rows.swap(column, pivot);
        let head = rows[column].clone();
        for row in rows.iter_mut().skip(column + 1) {
            let factor = row[column] / head[column];
            row.iter_mut()
                .zip(&head)
                .for_each(|(r, h)| *r -= factor * h);
        }
    }
    let mut counts = vec![0f64; classes];
    for c in (0..classes).rev() {
        let known: f64 = (c + 1..classes).map(|k| rows[c][k] * counts[k]).sum();
        counts[c] = (rows[c][classes] - known) / rows[c][c];
    }
    Ok(counts)
}

/// What the reference images tell of a batch image that the model predicts as class `k`: the mean
/// over the reference images it predicts as `k` of their softmax `p` (`P_k`), of their classifier
/// input `f` (`F_k`) and of `p f^T` (`Q_k`, classes x features, row-major). The reference images'
/// own labels are not used: what matters is how the model sees them.
struct PredictedClass {
    /// `P_k`.
    probabilities: Vec<f64>,
    /// `F_k`.
    features: Vec<f64>,
    /// `Q_k`.
    outer: Vec<f64>,
}

/// The reference images grouped by the class the global model predicts for them ([`PredictedClass`],
/// classes no reference image is predicted as left out); `None` when the model does not expose the
/// classifier's features.
fn predicted_class_means(
    model: &dyn TargetModel,
    reference: &ReferenceImages,
) -> Result<Option<Vec<PredictedClass>>> {
    let count = reference.images.dim(0)?;
    if count == 0 || count != reference.labels.len() {
        return Err(AttackError::Observation {
            name: "reference images".to_string(),
            reason: format!(
                "{count} images but {} labels: give at least one labelled image",
                reference.labels.len()
            ),
        });
    }
    let params = model.parameters();
    let layout = model.classifier();
    let [weight, bias] = [&layout.weight, &layout.bias].map(|name| {
        params.get(name).ok_or_else(|| AttackError::Observation {
            name: name.clone(),
            reason: "absent from the model's global parameters".to_string(),
        })
    });
    let (weight, bias) = (weight?, bias?);
    let classes = model.num_classes();
    let mut groups: Vec<Option<PredictedClass>> = (0..classes).map(|_| None).collect();
    let mut members = vec![0usize; classes];
    let mut done = 0;
    while done < count {
        let n = DUMMY_CHUNK.min(count - done);
        let images = reference
            .images
            .narrow(0, done, n)?
            .to_dtype(weight.dtype())?;
        let Some(features) = model.features(params, &images)? else {
            return Ok(None);
        };
        let features = features.detach();
        let logits = features.matmul(&weight.t()?)?.broadcast_add(bias)?;
        let (features, logits) = (tensor_to_f64(&features)?, tensor_to_f64(&logits)?);
        let width = features.len() / n;
        for (f, z) in features.chunks(width).zip(logits.chunks(classes)) {
            let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = z.iter().map(|v| (v - top).exp()).collect();
            let sum: f64 = exp.iter().sum();
            let p: Vec<f64> = exp.iter().map(|e| e / sum).collect();
            let predicted = (0..classes)
                .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            members[predicted] += 1;
            let group = groups[predicted].get_or_insert_with(|| PredictedClass {
                probabilities: vec![0.0; classes],
                features: vec![0.0; width],
                outer: vec![0.0; classes * width],
            });
            group
                .probabilities
                .iter_mut()
                .zip(&p)
                .for_each(|(s, v)| *s += v);
            group.features.iter_mut().zip(f).for_each(|(s, v)| *s += v);
            for (row, pc) in group.outer.chunks_mut(width).zip(&p) {
                row.iter_mut().zip(f).for_each(|(s, v)| *s += pc * v);
            }
        }
        done += n;
    }
    Ok(Some(
        groups
            .into_iter()
            .zip(members)
            .filter_map(|(group, n)| {
                let mut group = group?;
                let n = n as f64;
                for v in group
                    .probabilities
                    .iter_mut()
                    .chain(group.features.iter_mut())
                    .chain(group.outer.iter_mut())
                {
                    *v /= n;
                }
                Some(group)
            })
            .collect(),
    ))
}

/// The class counts of the `total` images behind a classifier gradient (`db`, `dw` row-major, the
/// batch means) that reference images grouped by prediction (`groups`) explain best, and the
/// relative residual of that explanation.
///
/// An image the model predicts as class `k` and that is labelled `c` adds `P_k - e_c` to `total db`
/// and about `Q_k - e_c F_k^T` to `total dw`, as the reference images predicted `k` do on average. A
/// trained model maps the images of a class to nearly one feature (and a misclassified image to the
/// feature of the class it is mistaken for), so the weight gradient tells the cells apart where the
/// bias gradient alone sums them: the cell counts `h_kc` (non-negative integers summing to `total`)
/// minimise the squared distance to the observed gradient, the bias block weighted by the square
/// root of the features' width so that both blocks count alike. They are searched exhaustively
/// while there are at most [`MAX_ENUMERATED_CELL_COUNTS`] candidates, otherwise by single-image
/// moves between cells from the best single cell. The class counts are `sum_k h_kc`.
fn prediction_conditional_counts(
    groups: &[PredictedClass],
    db: &[f64],
    dw: &[f64],
    total: usize,
) -> Option<(Vec<usize>, f64)> {
    let classes = db.len();
    let bias_weight = (groups[0].features.len() as f64).sqrt();
    let images = total as f64;
    let observed: Vec<f64> = db
        .iter()
        .map(|g| g * images * bias_weight)
        .chain(dw.iter().map(|g| g * images))
        .collect();
    let cells: Vec<(usize, Vec<f64>)> = groups
        .iter()
        .flat_map(|group| (0..classes).map(move |label| (group, label)))
        .map(|(group, label)| {
            let is_label = |c: usize| f64::from(u8::from(c == label));
            let bias = (0..classes).map(|c| bias_weight * (group.probabilities[c] - is_label(c)));
            let width = group.features.len();
            let weight = group.outer.iter().enumerate().map(|(i, q)| {
                let (c, d) = (i / width, i % width);
                q - is_label(c) * group.features[d]
            });
            (label, bias.chain(weight).collect())
        })
        .collect();
    let n = cells.len();
    let gram = DMatrix::from_fn(n, n, |a, b| dot(&cells[a].1, &cells[b].1));
    let linear = DVector::from_fn(n, |a, _| dot(&cells[a].1, &observed));
    let (value, cell_counts) = best_cell_counts(&gram, &linear, total)?;
    let mut counts = vec![0usize; classes];
    for ((label, _), &h) in cells.iter().zip(&cell_counts) {
        counts[*label] += h;
    }
    // |observed - sum_h h cell|^2 = h^T G h - 2 l^T h + |observed|^2.
    let energy = dot(&observed, &observed);
    let residual = (value + energy).max(0.0);
    Some((counts, (residual / energy.max(f64::MIN_POSITIVE)).sqrt()))
}

/// The most candidates (cell counts) [`prediction_conditional_counts`] tries.
const MAX_ENUMERATED_CELL_COUNTS: f64 = 1_048_576.0;

/// The non-negative integers `h` summing to `total` that minimise `h^T gram h - 2 linear^T h`, all
/// candidates tried, with that minimum; `None` when there are more than
/// [`MAX_ENUMERATED_CELL_COUNTS`].
fn best_cell_counts(
    gram: &DMatrix<f64>,
    linear: &DVector<f64>,
    total: usize,
) -> Option<(f64, Vec<usize>)> {
    let cells = linear.len();
    // C(total + cells - 1, cells - 1) candidates.
    let candidates = (1..cells).fold(1.0, |acc, i| acc * (total + i) as f64 / i as f64);
    if candidates > MAX_ENUMERATED_CELL_COUNTS {
        return None;
    }
    let mut best = (f64::INFINITY, vec![0; cells]);
    enumerate_cell_counts(&mut vec![0; cells], 0, total, &mut |h| {
        let x = DVector::from_iterator(cells, h.iter().map(|&v| v as f64));
        let value = x.dot(&(gram * &x)) - 2.0 * x.dot(linear);
        if value < best.0 {
            best = (value, h.to_vec());
        }
    });
    Some(best)
}

/// Calls `visit` with every way of putting `left` images into the cells from `cell` on (the earlier
/// cells as `counts` holds them).
fn enumerate_cell_counts(
    counts: &mut [usize],
    cell: usize,
    left: usize,
    visit: &mut dyn FnMut(&[usize]),
) {
    if cell + 1 == counts.len() {
        counts[cell] = left;
        visit(counts);
        return;
    }
    for here in 0..=left {
        counts[cell] = here;
        enumerate_cell_counts(counts, cell + 1, left - here, visit);
    }
}

/// The dot product of two equally long slices.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_non_negative_and_sum_to_the_batch() {
        for (raw, total) in [
            (vec![7.9, 0.2, -0.1], 8),
            (vec![1.0, 1.0, 1.0], 3),
            (vec![0.34, 0.33, 0.33], 1),
            (vec![-5.0, 2.0, 11.0], 8),
        ] {
            let counts = round_label_counts(&raw, total).unwrap();
            assert_eq!(counts.iter().sum::<usize>(), total, "{raw:?}");
        }
        assert_eq!(
            round_label_counts(&[7.9, 0.2, -0.1], 8).unwrap(),
            vec![8, 0, 0]
        );
        assert_eq!(
            round_label_counts(&[0.34, 0.33, 0.33], 1).unwrap(),
            vec![1, 0, 0]
        );
        assert!(round_label_counts(&[-1.0, 0.0], 2).is_err());
    }

    /// The Gram matrix and linear term of cells `vectors` against the observation `vectors h`.
    fn planted(vectors: &[Vec<f64>], h: &[usize]) -> (DMatrix<f64>, DVector<f64>) {
        let n = vectors.len();
        let observed: Vec<f64> = (0..vectors[0].len())
            .map(|r| (0..n).map(|c| h[c] as f64 * vectors[c][r]).sum())
            .collect();
        (
            DMatrix::from_fn(n, n, |a, b| dot(&vectors[a], &vectors[b])),
            DVector::from_fn(n, |a, _| dot(&vectors[a], &observed)),
        )
    }

    #[test]
    fn planted_cell_counts_are_found_by_enumeration() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(7);
        for (cells, total) in [(4, 8), (6, 5), (9, 12)] {
            for _ in 0..5 {
                let vectors: Vec<Vec<f64>> = (0..cells)
                    .map(|_| (0..24).map(|_| rng.random_range(-1.0..1.0)).collect())
                    .collect();
                let mut h = vec![0; cells];
                for _ in 0..total {
                    h[rng.random_range(0..cells)] += 1;
                }
                let (gram, linear) = planted(&vectors, &h);
                assert_eq!(
                    best_cell_counts(&gram, &linear, total).map(|(_, counts)| counts),
                    Some(h)
                );
            }
        }
    }

    #[test]
    fn a_misclassified_image_is_counted_in_the_class_it_carries() {
        // Two classes; the model maps every image to its predicted class's feature. The batch: two
        // images of class 0 and five of class 1 predicted right, one of class 1 predicted as 0
        // (the bias gradient alone sees one large error where a well-fitted batch has many small
        // ones).
        let features = [vec![1.0, -0.5, 0.3, 0.8], vec![-0.7, 0.9, 0.4, -0.2]];
        let probabilities = [vec![0.99, 0.01], vec![0.02, 0.98]];
        let groups: Vec<PredictedClass> = (0..2)
            .map(|k| PredictedClass {
                probabilities: probabilities[k].clone(),
                features: features[k].clone(),
                outer: probabilities[k]
                    .iter()
                    .flat_map(|p| features[k].iter().map(move |f| p * f))
                    .collect(),
            })
            .collect();
        let batch = [
            (0, 0),
            (0, 0),
            (0, 1),
            (1, 1),
            (1, 1),
            (1, 1),
            (1, 1),
            (1, 1),
        ];
        let (mut db, mut dw) = (vec![0.0; 2], vec![0.0; 8]);
        for &(k, label) in &batch {
            for c in 0..2 {
                let error = probabilities[k][c] - f64::from(u8::from(c == label));
                db[c] += error / 8.0;
                for (d, f) in features[k].iter().enumerate() {
                    dw[c * 4 + d] += error * f / 8.0;
                }
            }
        }
        let (counts, residual) = prediction_conditional_counts(&groups, &db, &dw, 8).unwrap();
        assert_eq!(counts, vec![2, 6]);
        // Exact up to the cancellation in the expanded square (|r|^2 from three terms of size 1).
        assert!(residual < 1e-6, "{residual}");
    }

    /// The bias gradient a batch with `counts` would give if its images' mean outputs per class were
    /// exactly `per_class`.
    fn bias_gradient(per_class: &[Vec<f64>], counts: &[f64]) -> Vec<f64> {
        let total: f64 = counts.iter().sum();
        (0..counts.len())
            .map(|c| {
                (0..counts.len())
                    .map(|k| counts[k] * (per_class[k][c] - f64::from(u8::from(k == c))))
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    #[test]
    fn the_reference_system_returns_the_counts_that_produced_the_bias_gradient() {
        for (per_class, counts) in [
            (vec![vec![0.9, 0.1], vec![0.2, 0.8]], vec![3.0, 5.0]),
            (vec![vec![0.99, 0.01], vec![0.02, 0.98]], vec![8.0, 0.0]),
            (
                vec![
                    vec![0.7, 0.2, 0.1],
                    vec![0.1, 0.6, 0.3],
                    vec![0.25, 0.25, 0.5],
                ],
                vec![1.0, 4.0, 11.0],
            ),
        ] {
            let db = bias_gradient(&per_class, &counts);
            let total = counts.iter().sum();
            let solved = solve_counts(&per_class, &db, total).unwrap();
            for (s, c) in solved.iter().zip(&counts) {
                assert!((s - c).abs() < 1e-9, "{solved:?} vs {counts:?}");
            }
        }
    }

    #[test]
    fn a_model_certain_of_every_reference_class_leaves_the_counts_undetermined() {
        // Outputs exactly one-hot on the reference: the bias gradient is zero whatever the counts.
        let per_class = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let err = solve_counts(&per_class, &[0.0, 0.0], 8.0).unwrap_err();
        assert!(err.to_string().contains("not determined"), "{err}");
    }
}
