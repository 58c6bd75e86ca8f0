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

pub mod cls_token_he;
mod dp;
mod glwe_secagg;
mod none;
mod paillier_secagg;
mod prune;

use std::collections::BTreeMap;

use candle_core::Tensor;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::fl::Transmission;
use crate::Result;

pub use dp::{DpMode, DpScheme};
pub use glwe_secagg::GlweScheme;
pub use none::PlainScheme;
pub use paillier_secagg::PaillierScheme;
pub use prune::PruneScheme;

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

    /// One-time key material each client must receive before the first round, in bytes (0 for schemes
    /// without keys).
    fn key_bytes(&self) -> usize {
        0
    }

    /// The differential-privacy guarantee `(epsilon, delta)` after `rounds` rounds, for schemes that
    /// give one (`None` otherwise). `sampling_rate` is a client's batch size over its local data and
    /// `steps_per_round` its local steps per round.
    fn dp_guarantee(
        &self,
        _rounds: u64,
        _sampling_rate: f64,
        _steps_per_round: u64,
    ) -> Option<(f64, f64)> {
        None
    }
}

/// A scheme as written in a config file: `id` plus its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "id", rename_all = "snake_case", deny_unknown_fields)]
pub enum SchemeConfig {
    /// Plain federated learning.
    None,
    /// Differential privacy, client-level or per-sample DP-SGD (see [`DpScheme`]).
    Dp {
        /// Where the noise goes (`client_level`, the default, or `dp_sgd`).
        #[serde(default)]
        mode: DpMode,
        /// Clipping norm C (of the whole update, or of each per-sample gradient); default 1.
        #[serde(default = "dp::default_clip_norm")]
        clip_norm: f64,
        /// Noise standard deviation over C; default 1.
        #[serde(default = "dp::default_noise_multiplier")]
        noise_multiplier: f64,
        /// Delta of the reported (epsilon, delta) guarantee; default 1e-5.
        #[serde(default = "dp::default_delta")]
        delta: f64,
    },
    /// Lattice secure aggregation: seeded GLWE ciphertexts under a key the clients share.
    Glwe {
        /// Largest |value| of an update coordinate (beyond it encoding fails).
        #[serde(default = "glwe_secagg::default_max_abs")]
        max_abs: f64,
        /// Largest total sample weight of a round (sample counts divided by their gcd).
        #[serde(default = "glwe_secagg::default_max_samples")]
        max_samples: u64,
    },
    /// Paillier secure aggregation: packed fixed-point values, server adds ciphertexts.
    Paillier {
        /// Modulus bits (3072: ~128-bit security; at least 2048).
        #[serde(default = "paillier_secagg::default_key_bits")]
        key_bits: u32,
        /// Largest |value| of an update coordinate that can be encoded.
        #[serde(default = "paillier_secagg::default_max_abs")]
        max_abs: f64,
        /// Fixed-point fraction bits (resolution 2^-fraction_bits).
        #[serde(default = "paillier_secagg::default_fraction_bits")]
        fraction_bits: u32,
        /// Headroom: the most samples a round may hold in all.
        #[serde(default = "paillier_secagg::default_max_total_samples")]
        max_total_samples: u64,
    },
    /// CLS-token HE (the CLS-token paper): clients send encrypted per-class CLS-feature sums instead of
    /// gradients; run by the audit with its own protocol ([`cls_token_he::run_cls_token_audit`]), not as a
    /// gradient scheme.
    ClsTokenHe {
        /// Images per client whose CLS feature the per-image attack inverts.
        #[serde(default = "default_cls_per_image")]
        per_image: usize,
        /// Feature-inversion iterations per restart.
        #[serde(default = "default_cls_iterations")]
        iterations: usize,
        /// Feature-inversion restarts (the best by feature loss is kept).
        #[serde(default = "default_cls_restarts")]
        restarts: usize,
    },
    /// Gradient pruning: keep the largest entries of every tensor (see [`PruneScheme`]).
    Prune {
        /// Fraction of each tensor's entries kept, in (0, 1]; default 0.1.
        #[serde(default = "prune::default_keep_fraction")]
        keep_fraction: f64,
        /// Quantise the kept values to 8 or 16 bits; absent: f32.
        #[serde(default)]
        quantize_bits: Option<u8>,
    },
}

impl SchemeConfig {
    /// The id used in reports.
    pub fn id(&self) -> &'static str {
        match self {
            SchemeConfig::None => "none",
            SchemeConfig::Dp { .. } => "dp",
            SchemeConfig::Prune { .. } => "prune",
            SchemeConfig::Glwe { .. } => "glwe",
            SchemeConfig::ClsTokenHe { .. } => "cls_token_he",
            SchemeConfig::Paillier { .. } => "paillier",
        }
    }
}

fn default_cls_per_image() -> usize {
    2
}

fn default_cls_iterations() -> usize {
    300
}

fn default_cls_restarts() -> usize {
    2
}

/// Builds the scheme a config names (the registry: one line per scheme).
pub fn build_scheme(config: &SchemeConfig, seed: u64) -> Result<Box<dyn Scheme>> {
    Ok(match config {
        SchemeConfig::None => Box::new(PlainScheme),
        SchemeConfig::Dp {
            mode,
            clip_norm,
            noise_multiplier,
            delta,
        } => Box::new(DpScheme::new(*mode, *clip_norm, *noise_multiplier, *delta)?),
        SchemeConfig::Prune {
            keep_fraction,
            quantize_bits,
        } => Box::new(PruneScheme::new(*keep_fraction, *quantize_bits)?),
        SchemeConfig::Glwe {
            max_abs,
            max_samples,
        } => Box::new(GlweScheme::new(*max_abs, *max_samples, seed)?),
        SchemeConfig::ClsTokenHe { .. } => return Err(crate::Error::InvalidSetting {
            key: "schemes.id".into(),
            reason:
                "`cls_token_he` exchanges features, not gradients, so it is not a training scheme"
                    .into(),
            hint: "list it under `[[schemes]]` of `fedleak audit`, which runs its own protocol"
                .into(),
        }),
        SchemeConfig::Paillier {
            key_bits,
            max_abs,
            fraction_bits,
            max_total_samples,
        } => Box::new(PaillierScheme::new(
            *key_bits,
            *max_abs,
            *fraction_bits,
            *max_total_samples,
            seed,
        )?),
    })
}

/// The server step of every scheme whose uploads the server reads: decode each upload with
/// [`Scheme::server_reads`], take the sample-weighted mean, and send back the plain model.
pub(crate) fn aggregate_readable(
    scheme: &dyn Scheme,
    weighted: &[(usize, &Upload)],
    template: &NamedTensors,
) -> Result<Aggregate> {
    let started = std::time::Instant::now();
    let decoded = weighted
        .iter()
        .map(|(samples, upload)| {
            let update = scheme
                .server_reads(&upload.transmission, template)?
                .unwrap_or_default();
            Ok((*samples, update))
        })
        .collect::<Result<Vec<_>>>()?;
    let mean_update = weighted_mean(&decoded, template)?;
    Ok(Aggregate {
        download_bytes_per_client: Transmission::plain(template, None)?.len(),
        mean_update,
        server_seconds: started.elapsed().as_secs_f64(),
        decode_seconds: 0.0,
    })
}

/// Decodes a plain (f32 safetensors) upload onto the device of `template`.
pub(crate) fn read_plain(upload: &Transmission, template: &NamedTensors) -> Result<NamedTensors> {
    let device = template
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    upload.decode_plain("a client upload", &device)
}

/// Every tensor of `update`, in name order, as one f64 vector (what the HE schemes encrypt).
pub(crate) fn flatten_update(update: &NamedTensors) -> Result<Vec<f64>> {
    let mut values = Vec::with_capacity(update.values().map(Tensor::elem_count).sum());
    for tensor in update.values() {
        values.extend(
            tensor
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?,
        );
    }
    Ok(values)
}

/// The inverse of [`flatten_update`]: cuts `values` into the names, shapes, dtypes and devices of
/// `template`.
pub(crate) fn unflatten_update(values: Vec<f32>, template: &NamedTensors) -> Result<NamedTensors> {
    let mut update = NamedTensors::new();
    let mut offset = 0;
    for (name, like) in template {
        let count = like.elem_count();
        let part = values.get(offset..offset + count).ok_or_else(|| {
            crate::Error::Training(format!(
                "a decrypted aggregate has {} values, too few for `{name}`",
                values.len()
            ))
        })?;
        offset += count;
        let tensor =
            Tensor::from_vec(part.to_vec(), like.shape(), like.device())?.to_dtype(like.dtype())?;
        update.insert(name.clone(), tensor);
    }
    Ok(update)
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
