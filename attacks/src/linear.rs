//! The input of a fully connected layer, read off its weight and bias gradients: the analytic attack
//! of Phong et al. ("Privacy-Preserving Deep Learning via Additively Homomorphic Encryption", IEEE TIFS
//! 2018) and the sanity oracle of `breaching` (`analytic_attack.py`).
//!
//! For `y = W x + b` and one input, `dL/dW = (dL/dy) x^T` and `dL/db = dL/dy`: the weight gradient is
//! rank one and `x = dW^T db / |db|^2`, the least-squares combination of every row `dW[k,:] = db[k] x`
//! weighted by `db[k]`. Applied to the classifier of a ViT it recovers the CLS feature after the final
//! layer norm, the input of the classifier. The result is a feature vector, not an image, so it comes
//! back as a [`FeatureRecovery`].
//!
//! This module sees only the observation and the model's layout, never the private input.

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::model::{ParamMap, TargetModel};
use crate::observation::{Observation, UpdateSource};
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "linear";

/// Feature vectors recovered from a layer's gradients, with the attack's own fit and cost.
#[derive(Debug, Clone)]
pub struct FeatureRecovery {
    /// Features (B x D), in the dtype of the observed gradients.
    pub features: Tensor,
    /// Name of the attack (`linear`).
    pub attack: &'static str,
    /// Relative residual of the rank-one fit, `|dW - db x^T|_F / |dW|_F`: zero (up to rounding) when
    /// the gradient comes from one input, large when several inputs were summed.
    pub objective: f64,
    /// Wall time of the attack in seconds.
    pub seconds: f64,
}

/// The result of a feature-recovering attack.
#[derive(Debug, Clone)]
pub enum FeatureOutcome {
    /// The attack ran and recovered features.
    Recovered(FeatureRecovery),
    /// The attack does not apply to this observation; the reason goes into the report.
    NotApplicable {
        /// The attack.
        attack: &'static str,
        /// Why not.
        reason: String,
    },
}

/// The input `x` (a vector of `in_features` values, in the dtype of `weight_grad`) of a linear layer
/// `y = W x + b` evaluated on one input, from its gradients `weight_grad = (dL/dy) x^T` (out x in) and
/// `bias_grad = dL/dy` (out). Computed in f64 as `dW^T db / |db|^2`.
///
/// # Errors
/// [`AttackError::Observation`] when the shapes do not fit together; [`AttackError::Numerical`] when the
/// bias gradient is zero (the loss is flat in the layer's output, so its input is not determined).
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor};
/// // x = (1, 2, 3), dL/dy = (2, -1): dW = dL/dy x^T.
/// let dw = Tensor::new(&[[2f64, 4., 6.], [-1., -2., -3.]], &Device::Cpu)?;
/// let db = Tensor::new(&[2f64, -1.], &Device::Cpu)?;
/// let x = fedleak_attacks::invert_linear_layer(&dw, &db)?;
/// assert_eq!(x.to_vec1::<f64>()?, vec![1., 2., 3.]);
/// # Ok::<(), fedleak_attacks::AttackError>(())
/// ```
pub fn invert_linear_layer(weight_grad: &Tensor, bias_grad: &Tensor) -> Result<Tensor> {
    let (x, _) = solve_rank_one(weight_grad, bias_grad)?;
    let n = x.len();
    Ok(Tensor::from_vec(x, n, weight_grad.device())?.to_dtype(weight_grad.dtype())?)
}

/// Recovers the classifier's input (the CLS feature after the final layer norm, 1 x D) from one
/// client's update of a single image.
///
/// Applies to a client's FedSGD gradient, or a one-step plain-SGD delta (`-lr` times the gradient; the
/// scale cancels), of batch size 1. Not applicable to batches (the weight gradient sums several
/// rank-one terms), aggregates, multi-step or adaptive-optimizer deltas (no longer rank one), features
/// or ciphertext.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks the classifier's tensors or their shapes differ
/// from the layout; [`AttackError::Numerical`] when the bias gradient is zero.
pub fn recover_classifier_input(
    observation: &Observation,
    model: &dyn TargetModel,
) -> Result<FeatureOutcome> {
    let start = Instant::now();
    let not_applicable = |reason: String| {
        Ok(FeatureOutcome::NotApplicable {
            attack: ATTACK,
            reason,
        })
    };
    let update = match observation {
        Observation::ClientUpdate {
            update,
            source,
            batch_size,
            ..
        } => {
            if *batch_size != 1 {
                return not_applicable(format!(
                    "batch > 1 sums the rank-one gradients of several inputs (batch size {batch_size})"
                ));
            }
            match source {
                UpdateSource::Gradient
                | UpdateSource::SgdDelta { local_steps: 1, .. }
                | UpdateSource::MomentumSgdDelta { local_steps: 1, .. } => update,
                UpdateSource::SgdDelta { local_steps, .. }
                | UpdateSource::MomentumSgdDelta { local_steps, .. } => {
                    return not_applicable(format!(
                        "a {local_steps}-step delta sums gradients taken at different parameters; \
                         it is not rank one"
                    ))
                }
                UpdateSource::OtherDelta { .. } => {
                    return not_applicable(
                        "an adaptive optimizer's delta rescales each entry; it is not rank one"
                            .to_string(),
                    )
                }
            }
        }
        other => return not_applicable(not_a_client_update(other)),
    };
    let layout = model.classifier();
    let weight_grad = observed_tensor(update, &layout.weight)?;
    let bias_grad = observed_tensor(update, &layout.bias)?;
    let (x, objective) = solve_rank_one(weight_grad, bias_grad)?;
    let n = x.len();
    let features =
        Tensor::from_vec(x, (1, n), weight_grad.device())?.to_dtype(weight_grad.dtype())?;
    Ok(FeatureOutcome::Recovered(FeatureRecovery {
        features,
        attack: ATTACK,
        objective,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// `x = dW^T db / |db|^2` and the relative residual `|dW - db x^T|_F / |dW|_F`.
fn solve_rank_one(weight_grad: &Tensor, bias_grad: &Tensor) -> Result<(Vec<f64>, f64)> {
    let (outputs, inputs) = match weight_grad.dims() {
        [o, i] => (*o, *i),
        dims => {
            return Err(AttackError::Observation {
                name: "weight gradient".into(),
                reason: format!("expected a matrix (out x in), got shape {dims:?}"),
            })
        }
    };
    if bias_grad.dims() != [outputs] {
        return Err(AttackError::Observation {
            name: "bias gradient".into(),
            reason: format!(
                "expected shape [{outputs}] to match the weight gradient's {outputs} outputs, got {:?}",
                bias_grad.dims()
            ),
        });
    }
    let dw = tensor_to_f64(weight_grad)?;
    let db = tensor_to_f64(bias_grad)?;
    let norm2: f64 = db.iter().map(|v| v * v).sum();
    if norm2 == 0.0 || !norm2.is_finite() {
        return Err(AttackError::Numerical {
            attack: ATTACK,
            reason: format!(
                "the bias gradient has squared norm {norm2}: the layer's input is not determined"
            ),
        });
    }
    let mut x = vec![0f64; inputs];
    for (row, &g) in dw.chunks_exact(inputs).zip(&db) {
        for (xi, &w) in x.iter_mut().zip(row) {
            *xi += g * w;
        }
    }
    x.iter_mut().for_each(|xi| *xi /= norm2);
    let (mut residual, mut total) = (0f64, 0f64);
    for (row, &g) in dw.chunks_exact(inputs).zip(&db) {
        for (&w, &xi) in row.iter().zip(&x) {
            residual += (w - g * xi).powi(2);
            total += w * w;
        }
    }
    Ok((x, (residual / total).sqrt()))
}

/// The tensor `name` of an update.
pub(crate) fn observed_tensor<'a>(update: &'a ParamMap, name: &str) -> Result<&'a Tensor> {
    update.get(name).ok_or_else(|| AttackError::Observation {
        name: name.to_string(),
        reason: "absent from the update".to_string(),
    })
}

/// Every value of a tensor, row-major, as f64.
pub(crate) fn tensor_to_f64(tensor: &Tensor) -> Result<Vec<f64>> {
    Ok(tensor
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

/// Why an observation that is not one client's update cannot feed a single-input attack.
pub(crate) fn not_a_client_update(observation: &Observation) -> String {
    match observation {
        Observation::Aggregate { clients, .. } => {
            format!(
                "an aggregate of {} clients mixes the gradients of several inputs",
                clients.len()
            )
        }
        other => other
            .update_view()
            .err()
            .unwrap_or_else(|| "a client update".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn single_input_is_recovered_exactly_and_a_sum_of_two_is_flagged() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.5f64, -1.25, 3.0, 0.0], &dev).unwrap();
        let g = Tensor::new(&[0.25f64, -2.0, 1.0], &dev).unwrap();
        let dw = g
            .unsqueeze(1)
            .unwrap()
            .matmul(&x.unsqueeze(0).unwrap())
            .unwrap();
        let (got, residual) = solve_rank_one(&dw, &g).unwrap();
        assert_eq!(got, vec![0.5, -1.25, 3.0, 0.0]);
        assert!(residual < 1e-15, "residual {residual}");

        let x2 = Tensor::new(&[1f64, 1., -1., 2.], &dev).unwrap();
        let g2 = Tensor::new(&[1f64, 0.5, 0.25], &dev).unwrap();
        let dw2 = g2
            .unsqueeze(1)
            .unwrap()
            .matmul(&x2.unsqueeze(0).unwrap())
            .unwrap();
        let (_, residual) = solve_rank_one(&(dw + dw2).unwrap(), &(g + g2).unwrap()).unwrap();
        assert!(
            residual > 0.1,
            "a sum of two inputs fits a rank-one model: {residual}"
        );
    }

    #[test]
    fn zero_bias_gradient_is_a_numerical_failure() {
        let dev = Device::Cpu;
        let dw = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let db = Tensor::zeros(2, DType::F32, &dev).unwrap();
        let err = invert_linear_layer(&dw, &db).unwrap_err();
        assert!(err.to_string().contains("not determined"), "{err}");
    }
}
