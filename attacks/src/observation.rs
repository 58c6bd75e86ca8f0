//! What a party observes of a federated round.

use candle_core::Tensor;

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
    /// A weight delta from an optimizer the attack cannot unroll exactly (AdamW, momentum); attacks treat
    /// -delta as proportional to the summed gradients.
    OtherDelta {
        /// Learning rate of the local optimizer.
        lr: f64,
        /// Number of local steps.
        local_steps: usize,
    },
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
