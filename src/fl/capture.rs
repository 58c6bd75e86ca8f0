//! Captured transmissions on disk: what a party saw in a round, in a format other FL systems can produce.
//!
//! Layout under an output directory (round numbers are 1-based, zero-padded):
//!
//! ```text
//! captures/round-0003/global/config.json, model.safetensors   the model the clients started from
//! captures/round-0003/client-1/update.safetensors             what the server reads of client 1's upload
//! captures/round-0003/client-1/update.json                    sidecar: round, client, algorithm, lr, ...
//! captures/round-0003/aggregate/update.safetensors            the sample-weighted mean of all clients
//! private/round-0003/client-1.json                            the private batch, for scoring only
//! private/round-0003/aggregate.json                           the union of the clients' batches
//! ```
//!
//! The private batch is kept in a separate tree so that an attack given `captures/` never sees it. A
//! PyTorch/Flower system can hand fedleak an update by writing the same safetensors (Hugging Face names)
//! and sidecar.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::config::{Algorithm, OptimizerKind};
use super::transmission::Transmission;
use crate::model::{load_checkpoint, save_checkpoint, Checkpoint};
use crate::{Error, Result};

/// What the uploaded tensors are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// dL/dtheta of the mean loss over one batch (FedSGD).
    Gradient,
    /// theta_after_local_training - theta_global (FedAvg).
    WeightDelta,
}

/// The sidecar of a captured update: everything an attacker legitimately knows about how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureMeta {
    /// 1-based round.
    pub round: usize,
    /// 0-based client index.
    pub client: usize,
    /// FedSGD or FedAvg.
    pub algorithm: Algorithm,
    /// Gradient or weight delta.
    pub update_kind: UpdateKind,
    /// The client's optimizer (FedAvg).
    pub optimizer: OptimizerKind,
    /// Learning rate of the local optimizer (FedAvg) or the server step (FedSGD).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// AdamW's decoupled weight decay, as applied (0 for SGD and FedSGD, which apply none).
    pub weight_decay: f64,
    /// Number of local optimizer steps taken (1 for FedSGD); for an aggregate, the most any of its
    /// clients took (under local epochs each client's count follows from its holding,
    /// [`CaptureMeta::client_local_steps`]).
    pub local_steps: usize,
    /// FedAvg by local epochs: how many (each a pass over the client's images in batches, the last
    /// batch of a pass holding the remainder); absent for a fixed number of local steps (each a
    /// batch drawn afresh) and for FedSGD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_epochs: Option<usize>,
    /// Images per local batch (a client holding fewer images trains on all it holds).
    pub batch_size: usize,
    /// The client's number of training images (its aggregation weight).
    pub num_samples: usize,
    /// The protection scheme that produced the transmission (`none` for plain FL).
    pub scheme: String,
    /// The run's seed.
    pub seed: u64,
    /// Exact wire bytes of the upload (for an aggregate: of the aggregate each client downloads).
    pub upload_bytes: usize,
    /// For an aggregate capture, the clients whose updates it averages (empty for one client's update).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregate_of: Vec<usize>,
    /// For an aggregate capture, each of those clients' number of training images (its weight in
    /// the average, which the server applies), in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregate_samples: Vec<usize>,
}

impl CaptureMeta {
    /// Whether this is the server's aggregate (of one client or several) rather than one client's
    /// upload.
    pub fn is_aggregate(&self) -> bool {
        !self.aggregate_of.is_empty()
    }

    /// The number of training images of each client behind the update (their aggregation weights):
    /// `num_samples` for one client's upload; for an aggregate, `aggregate_samples`, or, in a
    /// sidecar written before it was recorded, the total split as evenly as it goes.
    ///
    /// ```
    /// let text = r#"{"round": 1, "client": 0, "algorithm": "fedavg", "update_kind": "weight_delta",
    ///     "optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "local_steps": 4,
    ///     "batch_size": 4, "num_samples": 10, "scheme": "none", "seed": 1, "upload_bytes": 0,
    ///     "aggregate_of": [0, 1, 2]}"#;
    /// let mut meta: fedleak::fl::CaptureMeta = serde_json::from_str(text).unwrap();
    /// assert_eq!(meta.client_samples(), vec![4, 3, 3]);
    /// meta.aggregate_samples = vec![2, 5, 3];
    /// assert_eq!(meta.client_samples(), vec![2, 5, 3]);
    /// ```
    pub fn client_samples(&self) -> Vec<usize> {
        let clients = self.aggregate_of.len();
        if clients == 0 {
            return vec![self.num_samples];
        }
        if self.aggregate_samples.len() == clients {
            return self.aggregate_samples.clone();
        }
        (0..clients)
            .map(|k| self.num_samples / clients + usize::from(k < self.num_samples % clients))
            .collect()
    }

    /// The number of local steps a client holding `held` images took: `local_steps`, or under
    /// local epochs one per batch of each pass (a client of an aggregate holding fewer images
    /// than another takes fewer steps).
    ///
    /// ```
    /// let text = r#"{"round": 1, "client": 0, "algorithm": "fedavg", "update_kind": "weight_delta",
    ///     "optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "local_steps": 6,
    ///     "local_epochs": 2, "batch_size": 4, "num_samples": 13, "scheme": "none", "seed": 1,
    ///     "upload_bytes": 0, "aggregate_of": [0, 1], "aggregate_samples": [10, 3]}"#;
    /// let meta: fedleak::fl::CaptureMeta = serde_json::from_str(text).unwrap();
    /// assert_eq!(meta.client_local_steps(10), 6); // two passes of batches of 4, 4 and 2
    /// assert_eq!(meta.client_local_steps(3), 2); // two passes of one batch
    /// ```
    pub fn client_local_steps(&self, held: usize) -> usize {
        match self.local_epochs {
            Some(epochs) if self.update_kind == UpdateKind::WeightDelta && self.batch_size > 0 => {
                epochs * held.div_ceil(self.batch_size).max(1)
            }
            _ => self.local_steps,
        }
    }

    /// For a client holding `held` images whose local steps went through different batches (a
    /// weight delta of more than one step, from more images than a batch), each step's batch size
    /// in step order, as the attacker derives it from the protocol: a batch of `batch_size` per
    /// step for a fixed number of steps; for local epochs, each pass's batches, the last one
    /// holding the remainder. `None` when every step saw the client's one batch.
    ///
    /// ```
    /// let text = r#"{"round": 1, "client": 0, "algorithm": "fedavg", "update_kind": "weight_delta",
    ///     "optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "local_steps": 4,
    ///     "batch_size": 4, "num_samples": 10, "scheme": "none", "seed": 1, "upload_bytes": 0}"#;
    /// let mut meta: fedleak::fl::CaptureMeta = serde_json::from_str(text).unwrap();
    /// assert_eq!(meta.step_batch_sizes(10), Some(vec![4, 4, 4, 4]));
    /// assert_eq!(meta.step_batch_sizes(4), None); // one batch, seen at every step
    /// meta.local_steps = 6; // two epochs over 10 images in batches of 4
    /// meta.local_epochs = Some(2);
    /// assert_eq!(meta.step_batch_sizes(10), Some(vec![4, 4, 2, 4, 4, 2]));
    /// ```
    pub fn step_batch_sizes(&self, held: usize) -> Option<Vec<usize>> {
        let batch = self.batch_size;
        if self.update_kind != UpdateKind::WeightDelta
            || self.local_steps <= 1
            || batch == 0
            || held <= batch
        {
            return None;
        }
        let pass: Vec<usize> = (0..held.div_ceil(batch))
            .map(|k| batch.min(held - k * batch))
            .collect();
        Some(match self.local_epochs {
            Some(epochs) => pass.repeat(epochs),
            None => vec![batch; self.local_steps],
        })
    }

    /// The party's name in paths and reports: `client-K` for one client's upload, `aggregate` for the
    /// aggregate.
    pub fn party(&self) -> String {
        if self.is_aggregate() {
            "aggregate".to_string()
        } else {
            format!("client-{}", self.client)
        }
    }
}

/// The private images behind a captured update, as indices into the training split; for scoring only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateBatch {
    /// The data source (`fixture:ihc-tiles-32`, ...).
    pub data: String,
    /// Training-split indices of each local step's batch, step by step.
    pub step_indices: Vec<Vec<usize>>,
    /// Labels of each step's batch.
    pub step_labels: Vec<Vec<u32>>,
}

/// One captured transmission with its context.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The sidecar.
    pub meta: CaptureMeta,
    /// Exactly what the client uploaded.
    pub transmission: Transmission,
    /// The global model the client started the round from (known to the server).
    pub global: Checkpoint,
    /// The private batch (absent when reading a capture whose private part is not available).
    pub private: Option<PrivateBatch>,
    /// Where the upload came from, for messages: its file when read from disk, its round and
    /// client when captured in memory.
    pub origin: String,
}

fn round_dir(root: &Path, round: usize) -> PathBuf {
    root.join("captures").join(format!("round-{round:04}"))
}

fn private_path(root: &Path, meta: &CaptureMeta) -> PathBuf {
    root.join("private")
        .join(format!("round-{:04}", meta.round))
        .join(format!("{}.json", meta.party()))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Training(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes a capture under `root` in the layout of this module; returns the update's directory.
pub fn write_capture(root: &Path, capture: &Capture) -> Result<PathBuf> {
    let round = capture.meta.round;
    let global_dir = round_dir(root, round).join("global");
    if !global_dir.join(crate::model::WEIGHTS_FILE).exists() {
        save_checkpoint(&global_dir, &capture.global)?;
    }
    let update_dir = round_dir(root, round).join(capture.meta.party());
    std::fs::create_dir_all(&update_dir).map_err(|e| Error::io(&update_dir, e))?;
    let weights = update_dir.join("update.safetensors");
    std::fs::write(&weights, capture.transmission.as_bytes())
        .map_err(|e| Error::io(&weights, e))?;
    write_json(&update_dir.join("update.json"), &capture.meta)?;
    if let Some(private) = &capture.private {
        let path = private_path(root, &capture.meta);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_json(&path, private)?;
    }
    Ok(update_dir)
}

/// Reads a capture from its update directory (or any file in it). The global model is read from the
/// sibling `global/` directory; the private batch, when `with_private`, from the `private/` tree.
pub fn read_capture(path: &Path, with_private: bool, device: &Device) -> Result<Capture> {
    let dir = if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path.to_path_buf()
    };
    let sidecar = dir.join("update.json");
    let text = std::fs::read_to_string(&sidecar).map_err(|e| Error::InvalidDataset {
        source_name: sidecar.display().to_string(),
        reason: format!("cannot read the capture sidecar: {e}"),
        hint: "point `--capture` at a directory written by `fedleak train` (captures/round-NNNN/client-K)".into(),
    })?;
    let meta: CaptureMeta = serde_json::from_str(&text).map_err(|e| Error::InvalidDataset {
        source_name: sidecar.display().to_string(),
        reason: format!("not a capture sidecar: {e}"),
        hint: "the sidecar needs round, client, algorithm, update_kind, optimizer, lr, momentum, weight_decay, local_steps, batch_size, num_samples, scheme, seed, upload_bytes".into(),
    })?;
    // The attacks unroll the client's steps from these: a momentum of 1 or more, or a learning rate
    // that is negative or not finite, describes no training fedleak runs.
    if !((0.0..1.0).contains(&meta.momentum) && meta.lr.is_finite() && meta.lr >= 0.0) {
        return Err(Error::InvalidDataset {
            source_name: sidecar.display().to_string(),
            reason: format!(
                "momentum {} or lr {} is out of range (momentum in [0, 1), lr >= 0)",
                meta.momentum, meta.lr
            ),
            hint: "re-run `fedleak train` to rewrite the capture; a sidecar edited by hand must keep the values training used".into(),
        });
    }
    // The attacks weigh each client of an aggregate by its holding.
    let holdings = &meta.aggregate_samples;
    if !holdings.is_empty()
        && (holdings.len() != meta.aggregate_of.len()
            || holdings.contains(&0)
            || holdings.iter().sum::<usize>() != meta.num_samples)
    {
        return Err(Error::InvalidDataset {
            source_name: sidecar.display().to_string(),
            reason: format!(
                "aggregate_samples {holdings:?} does not give a positive holding for each of the \
                 {} clients in aggregate_of adding up to num_samples {}",
                meta.aggregate_of.len(),
                meta.num_samples
            ),
            hint: "re-run `fedleak train` to rewrite the capture, or remove aggregate_samples to \
                   have the clients' holdings taken as equal"
                .into(),
        });
    }
    let weights = dir.join("update.safetensors");
    let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
    let global_dir = dir.parent().map(|p| p.join("global")).unwrap_or_default();
    let global = load_checkpoint(&global_dir, DType::F32, device)?;
    let private = if with_private {
        let root = dir
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let path = private_path(root, &meta);
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                serde_json::from_str(&text).map_err(|e| Error::InvalidDataset {
                    source_name: path.display().to_string(),
                    reason: format!("not a private-batch record: {e}"),
                    hint: "re-run `fedleak train` to regenerate it".into(),
                })?,
            ),
            Err(_) => None,
        }
    } else {
        None
    };
    Ok(Capture {
        origin: weights.display().to_string(),
        meta,
        transmission: Transmission::from_bytes(bytes),
        global,
        private,
    })
}

/// An observer that writes every capture under a root directory.
#[derive(Debug, Clone)]
pub struct CaptureWriter {
    root: PathBuf,
    written: Vec<PathBuf>,
}

impl CaptureWriter {
    /// Writes under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            written: Vec::new(),
        }
    }

    /// Update directories written so far.
    pub fn written(&self) -> &[PathBuf] {
        &self.written
    }

    /// Writes one capture.
    pub fn write(&mut self, capture: &Capture) -> Result<()> {
        let dir = write_capture(&self.root, capture)?;
        self.written.push(dir);
        Ok(())
    }
}
