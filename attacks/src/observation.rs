//! What a party observes of a federated round.

use candle_core::{DType, Tensor};

use crate::model::ParamMap;

/// How the clients that produced an update trained, as the sidecar of a capture states it.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateSource {
    /// dL/dtheta of the mean loss over one batch (FedSGD).
    Gradient,
    /// theta_local - theta_global after `local_steps` steps of plain SGD with `lr` on batches of
    /// `batch_size` (FedAvg). Multi-step attacks unroll these steps.
    SgdDelta {
        /// Learning rate of the local SGD.
        lr: f64,
        /// Number of local steps.
        local_steps: usize,
    },
    /// theta_local - theta_global after `local_steps` steps of SGD with heavy-ball momentum (`v =
    /// momentum v + g`, `theta -= lr v`, from a zero velocity, no weight decay): `-lr sum_s c_s g_s`
    /// with `c_s = sum_{t = s}^{S-1} momentum^(t - s)`, the same combination of the steps' gradients
    /// in every parameter. Inverting Gradients unrolls it; attacks that need a gradient read it as the
    /// weighted mean of the steps'.
    MomentumSgdDelta {
        /// Learning rate of the local SGD.
        lr: f64,
        /// Heavy-ball momentum, in [0, 1).
        momentum: f64,
        /// Number of local steps.
        local_steps: usize,
    },
    /// A weight delta from an optimizer whose per-entry rescaling the attacks do not unroll (AdamW);
    /// attacks treat -delta as proportional to the summed gradients.
    OtherDelta {
        /// Learning rate of the local optimizer.
        lr: f64,
        /// Number of local steps.
        local_steps: usize,
    },
}

/// Which images the local steps of a client's update trained on, as far as the attacker knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalBatches {
    /// Every step trained on the same batch: a gradient, one step, or a client that holds no more
    /// images than a batch.
    Repeated,
    /// Step `s` trained on a batch of its own of `sizes[s]` images: a client that holds more images
    /// than a batch. Which images those were is unknown; an attack reconstructs one image per slot
    /// (`sizes.iter().sum()` of them, an image drawn by two steps counting twice).
    PerStep(Vec<usize>),
}

/// What an attacker holds.
#[derive(Debug, Clone)]
pub enum Observation {
    /// One client's update, named by parameter.
    ClientUpdate {
        /// The update tensors.
        update: ParamMap,
        /// How it was produced.
        source: UpdateSource,
        /// Images per local batch (the number of images to reconstruct for FedSGD).
        batch_size: usize,
        /// Which images each local step trained on.
        local_batches: LocalBatches,
    },
    /// The (sample-weighted) average of several clients' updates: all a secure-aggregation server sees.
    Aggregate {
        /// The averaged update.
        update: ParamMap,
        /// How each client produced its update.
        source: UpdateSource,
        /// Number of clients in the aggregate.
        clients: usize,
        /// Images per client batch.
        batch_size: usize,
    },
    /// Feature vectors (e.g. CLS tokens or class prototypes) in the clear.
    Features {
        /// Features (n x D).
        features: Tensor,
    },
    /// Ciphertext only: nothing an attack can use without the key.
    Ciphertext {
        /// The scheme and parameters, for the report (e.g. "GLWE N=2048, 128-bit").
        description: String,
    },
}

/// An observed update (one client's, or an aggregate) as update-reading attacks see it.
#[derive(Debug, Clone, Copy)]
pub struct UpdateView<'a> {
    /// The update tensors.
    pub update: &'a ParamMap,
    /// How each client produced its update.
    pub source: &'a UpdateSource,
    /// Number of images behind the update (clients x batch size; for local steps on batches of
    /// their own, the sum of the steps' batch sizes).
    pub images: usize,
    /// For local steps on batches of their own, each step's batch size, in step order (the
    /// update's images are those batches one after the other); `None` when every step trained on
    /// the same images.
    pub step_batches: Option<&'a [usize]>,
}

/// The weight `c_s = sum_{t = s}^{S-1} momentum^(t - s)` of each of `steps` local steps' gradients in
/// a heavy-ball SGD delta `-lr sum_s c_s g_s` (all 1 for plain SGD).
///
/// ```
/// // v1 = g1, v2 = 0.5 g1 + g2: delta = -lr (1.5 g1 + g2).
/// assert_eq!(fedleak_attacks::momentum_gradient_weights(0.5, 2), vec![1.5, 1.0]);
/// ```
pub fn momentum_gradient_weights(momentum: f64, steps: usize) -> Vec<f64> {
    (0..steps)
        .map(|s| (0..steps - s).map(|k| momentum.powi(k as i32)).sum())
        .collect()
}

impl UpdateSource {
    /// For a momentum-SGD delta, the sum over its steps of the weights `c_s` of their gradients (see
    /// [`UpdateSource::MomentumSgdDelta`]): `-delta / (lr * this)` is the weighted mean gradient.
    /// `None` for other sources or a momentum outside [0, 1).
    ///
    /// ```
    /// use fedleak_attacks::UpdateSource;
    /// // Two steps at momentum 0.5: v1 = g1, v2 = 0.5 g1 + g2, delta = -lr (1.5 g1 + g2).
    /// let source = UpdateSource::MomentumSgdDelta { lr: 0.1, momentum: 0.5, local_steps: 2 };
    /// assert_eq!(source.momentum_step_weight(), Some(2.5));
    /// ```
    pub fn momentum_step_weight(&self) -> Option<f64> {
        match self {
            UpdateSource::MomentumSgdDelta {
                momentum,
                local_steps,
                ..
            } if (0.0..1.0).contains(momentum) => Some(
                momentum_gradient_weights(*momentum, *local_steps)
                    .iter()
                    .sum(),
            ),
            _ => None,
        }
    }
}

impl UpdateView<'_> {
    /// Local SGD steps an attack unrolls to simulate this update (1 for a gradient, or for a delta
    /// it cannot unroll and matches as a gradient).
    pub fn unrolled_steps(&self) -> usize {
        match self.source {
            UpdateSource::SgdDelta { local_steps, .. }
            | UpdateSource::MomentumSgdDelta { local_steps, .. } => (*local_steps).max(1),
            UpdateSource::Gradient | UpdateSource::OtherDelta { .. } => 1,
        }
    }
}

impl Observation {
    /// The same observation with its tensors converted to `dtype`: an attacker may simulate updates
    /// in higher precision than the clients computed them.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fedleak_attacks::{LocalBatches, Observation, ParamMap, UpdateSource};
    /// let update = ParamMap::from([("w".to_string(), Tensor::new(&[1f32, 2.], &Device::Cpu)?)]);
    /// let observation = Observation::ClientUpdate {
    ///     update,
    ///     source: UpdateSource::Gradient,
    ///     batch_size: 1,
    ///     local_batches: LocalBatches::Repeated,
    /// };
    /// let Observation::ClientUpdate { update, .. } = observation.to_dtype(DType::F64)? else { unreachable!() };
    /// assert_eq!(update["w"].dtype(), DType::F64);
    /// # Ok::<(), fedleak_attacks::AttackError>(())
    /// ```
    pub fn to_dtype(&self, dtype: DType) -> Result<Observation, crate::AttackError> {
        let mut converted = self.clone();
        match &mut converted {
            Observation::ClientUpdate { update, .. } | Observation::Aggregate { update, .. } => {
                for tensor in update.values_mut() {
                    *tensor = tensor.to_dtype(dtype)?;
                }
            }
            Observation::Features { features } => *features = features.to_dtype(dtype)?,
            Observation::Ciphertext { .. } => {}
        }
        Ok(converted)
    }

    /// The observed update, or, for features and ciphertext, why there is none (the reason an
    /// update-reading attack reports as "not applicable").
    ///
    /// ```
    /// use fedleak_attacks::Observation;
    /// let seen = Observation::Ciphertext { description: "GLWE N=2048".into() };
    /// assert_eq!(seen.update_view().unwrap_err(), "only ciphertext is observed (GLWE N=2048)");
    /// ```
    pub fn update_view(&self) -> Result<UpdateView<'_>, String> {
        match self {
            Observation::ClientUpdate {
                update,
                source,
                batch_size,
                local_batches,
            } => Ok(match local_batches {
                LocalBatches::PerStep(sizes) if sizes.len() > 1 => UpdateView {
                    update,
                    source,
                    images: sizes.iter().sum(),
                    step_batches: Some(sizes),
                },
                _ => UpdateView {
                    update,
                    source,
                    images: *batch_size,
                    step_batches: None,
                },
            }),
            Observation::Aggregate {
                update,
                source,
                clients,
                batch_size,
            } => Ok(UpdateView {
                update,
                source,
                images: clients * batch_size,
                step_batches: None,
            }),
            Observation::Features { .. } => Err(
                "features are observed in the clear; there is no gradient to invert".to_string(),
            ),
            Observation::Ciphertext { description } => {
                Err(format!("only ciphertext is observed ({description})"))
            }
        }
    }
}
