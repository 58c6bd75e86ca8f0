//! What a party observes of a federated round.

use std::ops::Range;

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

/// One client's part of an aggregate: its weight in the average and how its local steps took their
/// images. A FedAvg server knows both: it weighs each upload by the images the client holds, and it
/// sets the training plan (batch size, local steps or epochs).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientShare {
    /// The client's weight in the average (the weights of an aggregate's clients add up to 1).
    pub weight: f64,
    /// Images per local batch.
    pub batch_size: usize,
    /// How many local steps it took (clients' counts differ under local epochs with unequal
    /// holdings); for [`LocalBatches::PerStep`] its sizes give the steps, and this is their number.
    pub local_steps: usize,
    /// Which images its local steps trained on.
    pub local_batches: LocalBatches,
}

impl ClientShare {
    /// `clients` clients of equal weight that each took one step on one batch of `batch_size`
    /// images: the shares of a FedSGD aggregate over equal holdings.
    ///
    /// ```
    /// let shares = fedleak_attacks::ClientShare::even(4, 8);
    /// assert_eq!(shares.len(), 4);
    /// assert_eq!(shares[3].weight, 0.25);
    /// ```
    pub fn even(clients: usize, batch_size: usize) -> Vec<ClientShare> {
        let share = ClientShare {
            weight: 1.0 / clients.max(1) as f64,
            batch_size,
            local_steps: 1,
            local_batches: LocalBatches::Repeated,
        };
        vec![share; clients]
    }
}

/// One client's unrolled training as an attack simulates it: which of the update's images each of
/// its local steps trained on, and its weight in the observed update.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSteps {
    /// The client's weight in the observed update (1 for one client's own update).
    pub weight: f64,
    /// For each local step the attack unrolls (one for a gradient), the range of the update's images
    /// it trained on.
    pub steps: Vec<Range<usize>>,
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
        /// How each client produced its update; its `local_steps` is the most any client took
        /// (each client's own count is in its share).
        source: UpdateSource,
        /// Each client's weight, local steps and local batches, in the order of the aggregate.
        clients: Vec<ClientShare>,
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
#[derive(Debug, Clone)]
pub struct UpdateView<'a> {
    /// The update tensors.
    pub update: &'a ParamMap,
    /// How each client produced its update.
    pub source: &'a UpdateSource,
    /// Number of images behind the update (clients x batch size; for local steps on batches of
    /// their own, the sum of the steps' batch sizes).
    pub images: usize,
    /// Each client's unrolled steps over the update's images, which are the clients' images one
    /// client after the other and, within a client whose steps drew batches of their own, one
    /// step's batch after the other. Clients that each took a single step from the global
    /// parameters and are weighted by their batch sizes (FedSGD with equal shares) come as one,
    /// training on all the images: the mean loss over them gives the same update.
    pub clients: Vec<ClientSteps>,
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
    /// The local steps the update took (1 for a gradient).
    pub fn local_steps(&self) -> usize {
        match self {
            UpdateSource::Gradient => 1,
            UpdateSource::SgdDelta { local_steps, .. }
            | UpdateSource::MomentumSgdDelta { local_steps, .. }
            | UpdateSource::OtherDelta { local_steps, .. } => *local_steps,
        }
    }

    /// Whether the attacks unroll the update's local steps: plain- and momentum-SGD deltas. A
    /// gradient is one step, and an adaptive optimizer's delta is matched as a gradient.
    pub(crate) fn unrolls(&self) -> bool {
        matches!(
            self,
            UpdateSource::SgdDelta { .. } | UpdateSource::MomentumSgdDelta { .. }
        )
    }
}

impl UpdateView<'_> {
    /// Local SGD steps an attack unrolls to simulate this update, over all the clients it
    /// simulates apart (one per client for a gradient, or for a delta it cannot unroll and matches
    /// as a gradient; one in all for clients it simulates together, see [`UpdateView::clients`]).
    pub fn unrolled_steps(&self) -> usize {
        self.clients.iter().map(|client| client.steps.len()).sum()
    }

    /// For an SGD delta, the weight of the clients' gradients in it: `-delta / (lr * this)` is the
    /// mean gradient over the clients' steps, each client weighted as in the update. It is
    /// `sum_k w_k sum_s c_s` over client `k`'s steps `s`, with `c_s` its step's weight in a
    /// momentum delta ([`momentum_gradient_weights`]; 1 for plain SGD), i.e. the number of local
    /// steps when every client took as many. `None` for a gradient, an adaptive optimizer's delta
    /// or a momentum outside [0, 1).
    ///
    /// ```
    /// use fedleak_attacks::{ClientShare, LocalBatches, Observation, UpdateSource};
    /// let share = |weight, local_steps| ClientShare {
    ///     weight,
    ///     batch_size: 2,
    ///     local_steps,
    ///     local_batches: LocalBatches::Repeated,
    /// };
    /// let observation = Observation::Aggregate {
    ///     update: Default::default(),
    ///     source: UpdateSource::MomentumSgdDelta { lr: 0.1, momentum: 0.5, local_steps: 2 },
    ///     clients: vec![share(0.25, 1), share(0.75, 2)],
    /// };
    /// // One step: 1; two steps: v1 = g1, v2 = 0.5 g1 + g2, delta = -lr (1.5 g1 + g2).
    /// let view = observation.update_view().unwrap();
    /// assert_eq!(view.gradient_weight(), Some(0.25 * 1.0 + 0.75 * 2.5));
    /// ```
    pub fn gradient_weight(&self) -> Option<f64> {
        let momentum = match self.source {
            UpdateSource::SgdDelta { .. } => 0.0,
            UpdateSource::MomentumSgdDelta { momentum, .. } if (0.0..1.0).contains(momentum) => {
                *momentum
            }
            _ => return None,
        };
        Some(
            self.clients
                .iter()
                .map(|client| {
                    let steps = momentum_gradient_weights(momentum, client.steps.len());
                    client.weight * steps.iter().sum::<f64>()
                })
                .sum(),
        )
    }

    /// The sizes of the groups of the update's images that trained together, in image order: one
    /// group per client whose steps all saw its one batch, one per step for a client whose steps
    /// drew batches of their own. Label counts say how many images of each class the update holds,
    /// not in which group; more than one group means the attacks must guess (and search) that.
    ///
    /// ```
    /// use fedleak_attacks::{ClientShare, LocalBatches, Observation, UpdateSource};
    /// let share = |local_batches| ClientShare {
    ///     weight: 0.5,
    ///     batch_size: 2,
    ///     local_steps: 3,
    ///     local_batches,
    /// };
    /// let observation = Observation::Aggregate {
    ///     update: Default::default(),
    ///     source: UpdateSource::SgdDelta { lr: 0.01, local_steps: 3 },
    ///     clients: vec![
    ///         share(LocalBatches::Repeated),
    ///         share(LocalBatches::PerStep(vec![2, 2, 1])),
    ///     ],
    /// };
    /// let view = observation.update_view().unwrap();
    /// assert_eq!(view.images, 7);
    /// assert_eq!(view.image_groups(), vec![2, 2, 2, 1]);
    /// ```
    pub fn image_groups(&self) -> Vec<usize> {
        self.group_ranges()
            .iter()
            .map(ExactSizeIterator::len)
            .collect()
    }

    /// The update's images in the order the attacks take their candidates in, from what each local
    /// step trained on as the clients saw it: `step_items[s]` lists step `s`'s items (image ids of
    /// any kind), each client's batch of that step after the previous client's. Steps that train on
    /// the same candidates (a client's one batch, repeated) must list the same items, in any order.
    /// `None` when the lists do not fit the view: another number of steps or of items, or two steps
    /// that disagree on one candidate group.
    ///
    /// ```
    /// use fedleak_attacks::{ClientShare, LocalBatches, Observation, UpdateSource};
    /// let share = |local_batches| ClientShare {
    ///     weight: 0.5,
    ///     batch_size: 1,
    ///     local_steps: 2,
    ///     local_batches,
    /// };
    /// let observation = Observation::Aggregate {
    ///     update: Default::default(),
    ///     source: UpdateSource::SgdDelta { lr: 0.01, local_steps: 2 },
    ///     clients: vec![
    ///         share(LocalBatches::Repeated),
    ///         share(LocalBatches::PerStep(vec![1, 1])),
    ///     ],
    /// };
    /// let view = observation.update_view().unwrap();
    /// // Step 0 trained on images 7 (client 0) and 3 (client 1), step 1 on 7 and 5.
    /// assert_eq!(view.candidate_items(&[vec![7, 3], vec![7, 5]]), Some(vec![7, 3, 5]));
    /// assert_eq!(view.candidate_items(&[vec![7, 3], vec![8, 5]]), None);
    /// ```
    pub fn candidate_items(&self, step_items: &[Vec<usize>]) -> Option<Vec<usize>> {
        let steps = self.clients.iter().map(|c| c.steps.len()).max()?;
        if step_items.len() != steps {
            return None;
        }
        let mut items: Vec<Option<usize>> = vec![None; self.images];
        for (step, listed) in step_items.iter().enumerate() {
            let mut listed = listed.iter().copied();
            for range in self.clients.iter().filter_map(|c| c.steps.get(step)) {
                let batch: Vec<usize> = listed.by_ref().take(range.len()).collect();
                if batch.len() != range.len() {
                    return None;
                }
                let seen = items.get(range.clone())?;
                if seen.iter().all(Option::is_none) {
                    for (slot, item) in items[range.clone()].iter_mut().zip(batch) {
                        *slot = Some(item);
                    }
                } else {
                    let mut seen: Vec<Option<usize>> = seen.to_vec();
                    let mut batch: Vec<Option<usize>> = batch.into_iter().map(Some).collect();
                    seen.sort_unstable();
                    batch.sort_unstable();
                    if seen != batch {
                        return None;
                    }
                }
            }
            if listed.next().is_some() {
                return None;
            }
        }
        items.into_iter().collect()
    }

    /// The ranges of the update's images that trained together, in image order (see
    /// [`UpdateView::image_groups`]).
    pub(crate) fn group_ranges(&self) -> Vec<Range<usize>> {
        let mut groups: Vec<Range<usize>> = Vec::new();
        for range in self.clients.iter().flat_map(|client| &client.steps) {
            if !groups.contains(range) {
                groups.push(range.clone());
            }
        }
        groups
    }
}

/// Ranges of `sizes[0]`, `sizes[1]`, ... items one after the other from item `first`: the images of
/// local steps that each trained on a batch of their own.
pub(crate) fn consecutive_ranges(first: usize, sizes: &[usize]) -> Vec<Range<usize>> {
    sizes
        .iter()
        .scan(first, |next, &size| {
            *next += size;
            Some(*next - size..*next)
        })
        .collect()
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
        let (update, source, shares) = match self {
            Observation::ClientUpdate {
                update,
                source,
                batch_size,
                local_batches,
            } => (
                update,
                source,
                vec![ClientShare {
                    weight: 1.0,
                    batch_size: *batch_size,
                    local_steps: source.local_steps(),
                    local_batches: local_batches.clone(),
                }],
            ),
            Observation::Aggregate {
                update,
                source,
                clients,
            } => (update, source, clients.clone()),
            Observation::Features { .. } => {
                return Err(
                    "features are observed in the clear; there is no gradient to invert"
                        .to_string(),
                )
            }
            Observation::Ciphertext { description } => {
                return Err(format!("only ciphertext is observed ({description})"))
            }
        };
        let unrolls = source.unrolls();
        let mut first = 0;
        let clients = shares
            .iter()
            .map(|share| {
                let steps = match &share.local_batches {
                    LocalBatches::PerStep(sizes) if sizes.len() > 1 => {
                        let steps = consecutive_ranges(first, sizes);
                        first += sizes.iter().sum::<usize>();
                        steps
                    }
                    _ => {
                        first += share.batch_size;
                        let steps = if unrolls { share.local_steps.max(1) } else { 1 };
                        vec![first - share.batch_size..first; steps]
                    }
                };
                ClientSteps {
                    weight: share.weight,
                    steps,
                }
            })
            .collect::<Vec<ClientSteps>>();
        // Clients that each took one step from the global parameters, weighted by their batch sizes,
        // add up to one step on all their images together (the mean loss over all of them): one
        // pass simulates them, and which client held which image does not matter.
        let joint = clients.iter().all(|client| {
            client.steps.len() == 1
                && (client.weight - client.steps[0].len() as f64 / first.max(1) as f64).abs()
                    <= 1e-9
        });
        let clients = if joint && clients.len() > 1 {
            vec![ClientSteps {
                weight: 1.0,
                steps: std::iter::once(0..first).collect(),
            }]
        } else {
            clients
        };
        Ok(UpdateView {
            update,
            source,
            images: first,
            clients,
        })
    }
}
