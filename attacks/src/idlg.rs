//! iDLG: the label of a single image from the last layer's gradient (Zhao et al., "iDLG: Improved Deep
//! Leakage from Gradients", arXiv:2001.02610, 2020).
//!
//! Under softmax cross-entropy the gradient with respect to the logits is `p - onehot(y)`, and the
//! classifier-bias gradient equals it: every entry is `p_c > 0` except the true class's, `p_y - 1 < 0`.
//! The label is the index of the one negative entry. (The paper reads the sign off the weight rows
//! `(p_c - y_c) f`, which needs non-negative features; a ViT's classifier sees a layer-normed feature of
//! either sign, so the bias is read instead.) The entries of `p - onehot(y)` sum to zero; the attack
//! reports how far the observed ones are from that as its objective.
//!
//! Label attacks return a [`LabelRecovery`] (labels, no images); [`crate::count_labels`] shares it.
//! This module sees only the observation and the model's layout, never the private labels.

use std::time::Instant;

use candle_core::Tensor;

use crate::linear::{not_a_client_update, observed_tensor, tensor_to_f64};
use crate::model::TargetModel;
use crate::observation::{LocalBatches, Observation, UpdateSource};
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "idlg";

/// Labels recovered from an update, with the attack's own fit and cost.
#[derive(Debug, Clone)]
pub struct LabelRecovery {
    /// The recovered labels: one per image, sorted ascending when the attack recovers only counts.
    pub labels: Vec<u32>,
    /// Name of the attack (`idlg`, `label-counts`).
    pub attack: &'static str,
    /// The attack's own measure of fit (see each attack); never a score against the true labels.
    pub objective: f64,
    /// Wall time of the attack in seconds.
    pub seconds: f64,
}

/// The result of a label attack.
#[derive(Debug, Clone)]
pub enum LabelOutcome {
    /// The attack ran and recovered labels.
    Recovered(LabelRecovery),
    /// The attack does not apply to this observation; the reason goes into the report.
    NotApplicable {
        /// The attack.
        attack: &'static str,
        /// Why not.
        reason: String,
    },
}

/// The label of one image from the classifier-bias gradient `p - onehot(y)` (or any positive multiple
/// of it): the index of its most negative entry.
///
/// A sparsified update (top-k pruning) may have dropped that entry: it has the largest magnitude
/// (`1 - p_y` is the sum of the others) but can tie, as with two classes, where the gradient is
/// `(e, -e)`. When no entry is negative, some are positive and exactly one is zero, the zero one is the
/// label: every positive entry belongs to another class, and a cross-entropy gradient, whose entries
/// sum to zero, has no zero entry beside positive ones unless one was removed.
///
/// # Errors
/// [`AttackError::Numerical`] when no entry is negative and the label is not determined as above (the
/// loss is saturated, `p_y = 1` to working precision, several entries were removed, or the vector is
/// not a cross-entropy gradient).
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor};
/// // p = (0.2, 0.5, 0.3), label 1.
/// let db = Tensor::new(&[0.2f32, -0.5, 0.3], &Device::Cpu)?;
/// assert_eq!(fedleak_attacks::infer_label_from_bias_gradient(&db)?, 1);
/// // Two classes, top-1 pruning kept the other class's entry: the dropped one is the label.
/// let pruned = Tensor::new(&[0.0f32, 0.4], &Device::Cpu)?;
/// assert_eq!(fedleak_attacks::infer_label_from_bias_gradient(&pruned)?, 0);
/// // Saturated: nothing determines the label.
/// let saturated = Tensor::new(&[0.0f32, 0.0], &Device::Cpu)?;
/// assert!(fedleak_attacks::infer_label_from_bias_gradient(&saturated).is_err());
/// # Ok::<(), fedleak_attacks::AttackError>(())
/// ```
pub fn infer_label_from_bias_gradient(bias_grad: &Tensor) -> Result<u32> {
    let db = tensor_to_f64(bias_grad)?;
    let (label, &min) = db
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .ok_or_else(|| AttackError::Observation {
            name: "bias gradient".into(),
            reason: "is empty".into(),
        })?;
    if min == 0.0 && db.iter().any(|&v| v > 0.0) {
        let mut zeros = db.iter().enumerate().filter(|(_, &v)| v == 0.0);
        if let (Some((label, _)), None) = (zeros.next(), zeros.next()) {
            return Ok(label as u32);
        }
    }
    if min.is_nan() || min >= 0.0 {
        return Err(AttackError::Numerical {
            attack: ATTACK,
            reason: format!(
                "no entry of the bias gradient is negative (smallest {min}) and no single entry \
                 was removed: the loss is saturated or the gradient is not one of softmax \
                 cross-entropy"
            ),
        });
    }
    Ok(label as u32)
}

/// Recovers the label of a client's single image from the classifier-bias entry of its update.
///
/// Applies to one client's update with batch size 1: a FedSGD gradient, or a FedAvg delta of any
/// optimizer (its sign pattern is that of the gradient: plain SGD and momentum sum `-lr (p - onehot)`
/// terms of the same signs, and Adam's per-entry normalisation keeps signs; a multi-step delta is
/// assumed to reuse the client's one image at every step; decoupled weight decay on a non-zero bias
/// can blur the signs). Not applicable to batches (use [`crate::count_labels`]), aggregates, features
/// or ciphertext. The objective is `|sum_c db_c| / |db|`, zero for an exact cross-entropy gradient.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks the classifier bias; [`AttackError::Numerical`]
/// when the bias gradient does not determine the label (see [`infer_label_from_bias_gradient`]).
pub fn infer_label_idlg(
    observation: &Observation,
    model: &dyn TargetModel,
) -> Result<LabelOutcome> {
    let start = Instant::now();
    let (update, source) = match observation {
        Observation::ClientUpdate {
            batch_size: 1,
            local_batches: LocalBatches::PerStep(sizes),
            ..
        } if sizes.len() > 1 => {
            return Ok(LabelOutcome::NotApplicable {
                attack: ATTACK,
                reason: format!(
                    "its {} local steps trained on different images, whose labels the update \
                     mixes; label counts apply instead",
                    sizes.len()
                ),
            })
        }
        Observation::ClientUpdate {
            update,
            source,
            batch_size: 1,
            ..
        } => (update, source),
        Observation::ClientUpdate { batch_size, .. } => {
            return Ok(LabelOutcome::NotApplicable {
                attack: ATTACK,
                reason: format!(
                    "batch > 1 averages the labels of several images (batch size {batch_size}); \
                     label counts apply instead"
                ),
            })
        }
        other => {
            return Ok(LabelOutcome::NotApplicable {
                attack: ATTACK,
                reason: not_a_client_update(other),
            })
        }
    };
    let observed = observed_tensor(update, &model.classifier().bias)?;
    // A delta points against the gradient.
    let bias_grad = match source {
        UpdateSource::Gradient => observed.clone(),
        UpdateSource::SgdDelta { .. }
        | UpdateSource::MomentumSgdDelta { .. }
        | UpdateSource::OtherDelta { .. } => observed.neg()?,
    };
    let label = infer_label_from_bias_gradient(&bias_grad)?;
    let db = tensor_to_f64(&bias_grad)?;
    let norm = db.iter().map(|v| v * v).sum::<f64>().sqrt();
    let objective = db.iter().sum::<f64>().abs() / norm;
    Ok(LabelOutcome::Recovered(LabelRecovery {
        labels: vec![label],
        attack: ATTACK,
        objective,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_saturated_gradient_has_no_label() {
        let db = Tensor::new(&[0f64, 0., 0.], &Device::Cpu).unwrap();
        let err = infer_label_from_bias_gradient(&db).unwrap_err();
        assert!(err.to_string().contains("saturated"), "{err}");
    }

    #[test]
    fn the_most_negative_entry_wins_even_when_others_underflow() {
        let db = Tensor::new(&[0f32, 0., -1e-30, 0.], &Device::Cpu).unwrap();
        assert_eq!(infer_label_from_bias_gradient(&db).unwrap(), 2);
    }
}
