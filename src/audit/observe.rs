//! What the honest-but-curious server observes of a captured plain (unprotected) upload.

use candle_core::{DType, Device, Tensor};
use fedleak_attacks::{
    matching_objective, ClientShare, InvertingGradientsConfig, LocalBatches, Observation,
    UpdateSource,
};
use serde::{Deserialize, Serialize};

use crate::data::{load_data, DataSpec, DataSplits};
use crate::fl::{Capture, OptimizerKind, UpdateKind};
use crate::model::VitTarget;
use crate::Result;

/// Floating-point precision in which the attacker simulates the clients' updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttackPrecision {
    /// Single precision, as the clients compute.
    #[default]
    F32,
    /// Double precision: about twice the time, but the matching objective resolves far below f32's
    /// rounding (1 - cosine at the true image of a real tile: 5.0e-8 in f32, 2.0e-13 in f64).
    F64,
}

impl AttackPrecision {
    /// The tensor type of this precision.
    pub fn dtype(self) -> DType {
        match self {
            AttackPrecision::F32 => DType::F32,
            AttackPrecision::F64 => DType::F64,
        }
    }
}

/// The attacker's side of a plain capture in `precision`: the global model it knows and what it
/// observes ([`observation_of`]), both converted to that precision.
pub fn attacker_view(
    capture: &Capture,
    precision: AttackPrecision,
    device: &Device,
) -> Result<(VitTarget, Observation)> {
    let observation = observation_of(capture, device)?;
    Ok(match precision {
        AttackPrecision::F32 => (VitTarget::new(&capture.global), observation),
        AttackPrecision::F64 => (
            VitTarget::new(&capture.global.to_dtype(precision.dtype())?),
            observation.to_dtype(precision.dtype())?,
        ),
    })
}

/// The server's view of one plain capture: the decoded update and how it was produced (from the
/// sidecar, which a server knows because it sets the training plan) — one client's upload, or the
/// aggregate of the clients its sidecar lists (an aggregate of one client is that client's update,
/// and is observed as one).
pub fn observation_of(capture: &Capture, device: &Device) -> Result<Observation> {
    let update = capture.transmission.decode_plain(&capture.origin, device)?;
    let meta = &capture.meta;
    let samples = meta.client_samples();
    let total = samples.iter().sum::<usize>().max(1);
    let shares: Vec<ClientShare> = samples
        .iter()
        .map(|&held| ClientShare {
            weight: held as f64 / total as f64,
            batch_size: meta.batch_size.min(held),
            local_steps: meta.client_local_steps(held),
            local_batches: match meta.step_batch_sizes(held) {
                Some(sizes) => LocalBatches::PerStep(sizes),
                None => LocalBatches::Repeated,
            },
        })
        .collect();
    // Clients of an aggregate under local epochs took as many steps as their holdings needed;
    // the source states the most (each share its own).
    let local_steps = shares
        .iter()
        .map(|share| share.local_steps)
        .max()
        .unwrap_or(meta.local_steps);
    let source = match meta.update_kind {
        UpdateKind::Gradient => UpdateSource::Gradient,
        UpdateKind::WeightDelta if meta.optimizer == OptimizerKind::Sgd && meta.momentum == 0.0 => {
            UpdateSource::SgdDelta {
                lr: meta.lr,
                local_steps,
            }
        }
        UpdateKind::WeightDelta if meta.optimizer == OptimizerKind::Sgd => {
            UpdateSource::MomentumSgdDelta {
                lr: meta.lr,
                momentum: meta.momentum,
                local_steps,
            }
        }
        UpdateKind::WeightDelta => UpdateSource::OtherDelta {
            lr: meta.lr,
            local_steps,
        },
    };
    let per_step: Vec<usize> = shares
        .iter()
        .filter_map(|share| match &share.local_batches {
            LocalBatches::PerStep(sizes) => Some(sizes.iter().sum()),
            LocalBatches::Repeated => None,
        })
        .collect();
    if !per_step.is_empty() {
        tracing::info!(
            "{}: the local steps of {} client(s) drew batches of their own; the optimisation \
             attacks unroll each client's steps from the global model, each step on its own \
             candidates, {} in all for them (an image drawn twice is reconstructed twice)",
            capture.origin,
            per_step.len(),
            per_step.iter().sum::<usize>()
        );
    }
    // An aggregate of one client is that client's update: every single-input attack applies to it.
    Ok(match <[ClientShare; 1]>::try_from(shares) {
        Ok([share]) => Observation::ClientUpdate {
            update,
            source,
            batch_size: share.batch_size,
            local_batches: share.local_batches,
        },
        Err(clients) => Observation::Aggregate {
            update,
            source,
            clients,
        },
    })
}

/// The private images behind a capture, for scoring only.
#[derive(Debug, Clone)]
pub struct PrivateImages {
    /// Images (B x C x H x W) in the order of the first local step's batch (then any further distinct
    /// images of later steps).
    pub images: Tensor,
    /// Their labels.
    pub labels: Vec<u32>,
    /// What each local step trained on, as rows of `images` (for an aggregate, each client's
    /// batch of the step after the previous client's), as the capture's private record lists it.
    pub steps: Vec<Vec<usize>>,
}

/// Loads the private images of a capture (its `private` record) in the model's input shape.
pub fn private_images(capture: &Capture, device: &Device) -> Result<Option<PrivateImages>> {
    let Some(private) = &capture.private else {
        return Ok(None);
    };
    let spec = DataSpec::parse(&private.data)?;
    let data = load_data(
        &spec,
        capture.global.config.input_shape(),
        capture.meta.seed,
    )?;
    Ok(Some(private_images_in(capture, &data, device)?))
}

/// The private images of a capture taken from `data`, already loaded as the record names it (none
/// when the capture has no private record).
pub fn private_images_in(
    capture: &Capture,
    data: &DataSplits,
    device: &Device,
) -> Result<PrivateImages> {
    let step_indices: &[Vec<usize>] = capture
        .private
        .as_ref()
        .map_or(&[], |private| &private.step_indices);
    let mut indices: Vec<usize> = Vec::new();
    for &i in step_indices.iter().flatten() {
        if !indices.contains(&i) {
            indices.push(i);
        }
    }
    let shape = data.train.shape;
    let mut values = Vec::with_capacity(indices.len() * shape.len());
    for &i in &indices {
        values.extend_from_slice(data.train.image(i));
    }
    let images = Tensor::from_vec(
        values,
        (indices.len(), shape.channels, shape.height, shape.width),
        device,
    )?;
    let labels = indices.iter().map(|&i| data.train.labels[i]).collect();
    let row_of = |i: &usize| indices.iter().position(|j| j == i);
    let steps = step_indices
        .iter()
        .map(|step| step.iter().filter_map(row_of).collect())
        .collect();
    Ok(PrivateImages {
        images,
        labels,
        steps,
    })
}

/// A reconstruction whose matching objective is more than this many times the private images' was
/// stopped by the search, not by what the update says (a judgement call: the f32 simulation's own
/// rounding puts the private image of a sin-cos IHC tile at 4e-8 and Inverting Gradients' result
/// at 2e-7, measured 2026-12-06, while a FedAvg client's result with batches of 4 sits 100 times
/// above its private images).
pub const SEARCH_SHORTFALL: f64 = 10.0;

/// The matching objective of an optimisation attack's `config` at the private images, placed in
/// the attack's candidate order ([`fedleak_attacks::UpdateView::candidate_items`]); `None` when
/// the private record does not fit the update's layout or the attack does not apply.
pub fn private_matching_objective(
    observation: &Observation,
    target: &VitTarget,
    private: &PrivateImages,
    config: &InvertingGradientsConfig,
) -> Result<Option<f64>> {
    let Some(rows) = observation
        .update_view()
        .ok()
        .and_then(|view| view.candidate_items(&private.steps))
    else {
        return Ok(None);
    };
    let index = Tensor::new(
        rows.iter().map(|&row| row as u32).collect::<Vec<_>>(),
        private.images.device(),
    )?;
    let images = private.images.index_select(&index, 0)?;
    let labels: Vec<u32> = rows.iter().map(|&row| private.labels[row]).collect();
    Ok(matching_objective(
        observation,
        target,
        &images,
        &labels,
        config,
    )?)
}

/// Whether an attack's matching objective is more than [`SEARCH_SHORTFALL`] times the private
/// images': its search, not the update, stopped it.
pub fn search_fell_short(objective: f64, private_objective: f64) -> bool {
    objective > SEARCH_SHORTFALL * private_objective.max(0.0)
}

/// What an attack's matching objective says beside the private images' (see [`SEARCH_SHORTFALL`]).
pub fn search_finding(objective: f64, private_objective: f64) -> &'static str {
    if search_fell_short(objective, private_objective) {
        "the update singles out the private images far better than the reconstruction: a stronger search could get closer to them"
    } else {
        "the reconstruction matches the update about as well as the private images: the update, simulated at this precision, does not single them out further"
    }
}
