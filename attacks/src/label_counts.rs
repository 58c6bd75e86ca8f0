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
//! [`ReferenceImages`]) estimates better, as LLG+ does: the mean softmax of the model on the reference
//! images of each class `k`, `M[k]`, stands in for that of the batch's class-`k` images, so the bias
//! gradient is `B db = sum_k n_k (M[k] - e_k)`; with `sum_k n_k = B` this is a linear system in the
//! counts, solved directly. Figures in [`count_labels`].

use std::num::NonZeroUsize;
use std::time::Instant;

use candle_core::{Tensor, Var};
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
/// features or ciphertext. The objective is
/// `sum_c |raw_c - n_c| / B`, how far the raw estimates were from the integer counts returned.
///
/// With `reference` images the batch's mean softmax is estimated class by class from them (see the
/// module documentation) instead of from uniform-noise dummies. It is not reliably better. Measured
/// 2026-12-02 on the IHC tiles (`fedleak train --model vit-tiny-32 --clients 4 --rounds 200
/// --algorithm fedavg --optimizer sgd --lr 0.03 --momentum 0 --weight-decay 0 --local-steps 1
/// --batch-size 8`, then `fedleak attack --attack idlg [--label-reference fixture:ihc-tiles-32]` on
/// each client's batch of 8 and each aggregate of 32), noise dummies against reference, client /
/// aggregate labels: round 1, 100 % / 100 % both; round 100 (test accuracy 0.34, a model swinging
/// between classes) 100 % / 97 % against 88 % / 91 %; rounds 191-200 (test accuracy 1.0, train loss
/// 1.0e-3) 72 % / 72 % against 64 % / 64 %. An earlier run of the same command (2026-11-29, captures
/// gone) had found the reverse order after 191-200 rounds. The reference cannot correct for a model
/// that has memorised its own training images, whose errors are smaller than on held-out ones: the
/// bias gradient fixes only the counts scaled by that unknown shrinkage. Reading the shrinkage off the
/// classifier-weight gradient as well (its least-squares split over per-class error-weighted reference
/// features, then counts in proportion) did worse at rounds 191-200: 57 % / 57 %.
/// [`crate::recover_batch_labels`] first separates the images it can, each exactly, and uses these
/// counts only for the rest.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks the classifier bias or the global parameters lack
/// it, or `reference` holds no image of some class; [`AttackError::Numerical`] when no estimate is
/// positive or the reference system is singular; candle errors of the dummy pass.
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
    let bias_name = model.classifier().bias;
    let db: Vec<f64> = tensor_to_f64(observed_tensor(update, &bias_name)?)?
        .into_iter()
        .map(|v| v * scale)
        .collect();
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
    let raw: Vec<f64> = match reference {
        None => {
            let noise = ImageSource::Noise {
                count: config.dummy_images.get(),
                seed: config.seed,
            };
            mean_probabilities(model, &bias_name, noise)?
                .iter()
                .zip(&db)
                .map(|(p, g)| total * (p - g))
                .collect()
        }
        Some(reference) => {
            let per_class = class_mean_probabilities(model, &bias_name, reference)?;
            solve_counts(&per_class, &db, total)?
        }
    };
    let counts = round_label_counts(&raw, images)?;
    let objective = raw
        .iter()
        .zip(&counts)
        .map(|(r, &n)| (r - n as f64).abs())
        .sum::<f64>()
        / total;
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
