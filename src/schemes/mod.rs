//! Protection schemes: what a client puts on the wire, how the server aggregates it, and what each party
//! can read.
//!
//! A scheme sits between a client's local training and the server. The federated loop
//! ([`crate::fl::run_federated`]) asks it, for every client and round, to turn the plain update (a
//! gradient or a weight delta, Hugging Face parameter names) into a [`Transmission`] whose exact byte
//! length is the upload cost; then to aggregate the round's transmissions into the sample-weighted mean
//! update that every client applies. Each scheme also states, per threat model, what that party sees, so
//! the audit runs every attack that applies and says why the others do not.
//!
//! One file per scheme; [`build_scheme`] is the registry.

mod none;

use std::collections::BTreeMap;

use candle_core::Tensor;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::fl::Transmission;
use crate::Result;

pub use none::PlainScheme;

/// A client's plain update, by Hugging Face parameter name.
pub type NamedTensors = BTreeMap<String, Tensor>;

/// How a client computes its local gradients (most schemes leave local training alone).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LocalTraining {
    /// The gradient of the batch-mean loss.
    Standard,
    /// DP-SGD (Abadi et al. 2016): clip every per-sample gradient to L2 norm `clip_norm`, sum, add
    /// N(0, (noise_multiplier * clip_norm)^2) to every coordinate, divide by the batch size.
    PerSampleDp {
        /// Per-sample clipping norm C.
        clip_norm: f64,
        /// Noise multiplier sigma.
        noise_multiplier: f64,
    },
}

/// What one party can read of the round's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum View {
    /// Each client's update in the clear (after the scheme's transformation).
    ClientUpdates,
    /// Only the sample-weighted mean of all clients' updates.
    Aggregate,
    /// Ciphertexts only; `security` states the parameters and security level.
    Ciphertext {
        /// Parameters and security level, for the report.
        security: String,
    },
}

/// A party that may try to reconstruct private data, and what it sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreatModel {
    /// Stable id used in reports (`server`, `eavesdropper`).
    pub id: String,
    /// One sentence for the report: who this is and what they hold.
    pub description: String,
    /// What it can read.
    pub view: View,
}

/// What a client sends, and what producing it cost.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The wire bytes.
    pub transmission: Transmission,
    /// Seconds the client spent encoding (encryption, sparsification, noise), excluding training.
    pub encode_seconds: f64,
}

/// The server's result for a round.
#[derive(Debug, Clone)]
pub struct Aggregate {
    /// The sample-weighted mean of the clients' updates, as every client decodes it.
    pub mean_update: NamedTensors,
    /// Bytes each client downloads to learn the aggregate (the model or the aggregate ciphertext).
    pub download_bytes_per_client: usize,
    /// Seconds the server spent aggregating.
    pub server_seconds: f64,
    /// Seconds each client spent decoding the aggregate (decryption), 0 for plain schemes.
    pub decode_seconds: f64,
}

/// One protection scheme (see the module documentation).
pub trait Scheme {
    /// Stable id used in configs and reports (`none`, `dp`, `prune`, `paillier`, `glwe`).
    fn id(&self) -> &str;

    /// The settings in one line for the report (`sigma=1.0, C=1.0`), empty when there are none.
    fn parameters(&self) -> String;

    /// How clients compute local gradients under this scheme.
    fn local_training(&self) -> LocalTraining {
        LocalTraining::Standard
    }

    /// Client side: encodes `client`'s plain update for the wire; `rng` is that client's stream.
    fn encode(&mut self, client: usize, update: &NamedTensors, rng: &mut StdRng) -> Result<Upload>;

    /// What a server that reads `upload` in the clear decodes from it; `None` when it cannot (ciphertext).
    fn server_reads(
        &self,
        upload: &Transmission,
        template: &NamedTensors,
    ) -> Result<Option<NamedTensors>>;

    /// Server side (and the clients' decryption of the result): the sample-weighted mean of the updates.
    /// `weighted` pairs each client's sample count with its upload; `template` gives names and shapes.
    fn aggregate(
        &mut self,
        weighted: &[(usize, &Upload)],
        template: &NamedTensors,
    ) -> Result<Aggregate>;

    /// Every party worth auditing and what it sees.
    fn threat_models(&self) -> Vec<ThreatModel>;
}

/// A scheme as written in a config file: `id` plus its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "id", rename_all = "snake_case", deny_unknown_fields)]
pub enum SchemeConfig {
    /// Plain federated learning.
    None,
}

impl SchemeConfig {
    /// The id used in reports.
    pub fn id(&self) -> &'static str {
        match self {
            SchemeConfig::None => "none",
        }
    }
}

/// Builds the scheme a config names (the registry: one line per scheme).
pub fn build_scheme(config: &SchemeConfig, _seed: u64) -> Result<Box<dyn Scheme>> {
    Ok(match config {
        SchemeConfig::None => Box::new(PlainScheme),
    })
}

/// The sample-weighted mean of decoded updates; a tensor missing from an update counts as zero there.
pub(crate) fn weighted_mean(
    decoded: &[(usize, NamedTensors)],
    template: &NamedTensors,
) -> Result<NamedTensors> {
    let total: usize = decoded.iter().map(|(n, _)| n).sum::<usize>().max(1);
    let mut mean = NamedTensors::new();
    for (name, shape_of) in template {
        let mut sum = shape_of.zeros_like()?;
        for (samples, update) in decoded {
            if let Some(u) = update.get(name) {
                sum = (sum + (u * (*samples as f64 / total as f64))?)?;
            }
        }
        mean.insert(name.clone(), sum);
    }
    Ok(mean)
}
