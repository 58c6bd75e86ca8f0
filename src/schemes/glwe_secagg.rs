//! Lattice secure aggregation (`glwe`): clients upload seeded GLWE encryptions of their updates, the
//! server adds them without being able to decrypt, the clients decrypt the aggregate.
//!
//! # Key model (read this before citing the protection)
//!
//! GLWE here is *symmetric*: every client holds the same GLWE secret key and the server does not. Any
//! client can therefore decrypt any other client's upload it intercepts; the protection is against the
//! server and against eavesdroppers, not between clients, and it rests on the key never reaching the
//! server. The key is derived from the run seed so that fedleak runs are reproducible (a deployment would
//! distribute a fresh key out of band). The public-key alternative (tfhe's LWE compact public key, where
//! clients encrypt under a key the server could publish while a threshold of clients holds the secret) is
//! not implemented.
//!
//! # Weighting
//!
//! The server computes the sample-weighted sum itself: it multiplies each client's ciphertext by that
//! client's sample count divided by the gcd of the round's counts (an integer cleartext; sample counts
//! are public in FedAvg), adds the ciphertexts and sends the one aggregate ciphertext back; the clients
//! decrypt it and divide by the total weight. The fixed-point encoding therefore keeps headroom for a
//! total weight of `max_samples` (not just the number of clients); a round whose total weight exceeds
//! it is refused (raise `max_samples`).
//!
//! # Precision
//!
//! See [`crate::he::glwe`]: values are quantised to 2^-f with f chosen from `max_abs` and
//! `max_samples`; the decrypted mean is within `FixedPoint::max_error(W) / W` of the exact mean of the
//! f32 updates (about 1.1e-6 per coordinate at the defaults max_abs = 64, max_samples = 65536, f = 19;
//! halving `max_abs` or `max_samples` gains one bit).
//!
//! # Costs
//!
//! Upload: 52 + 8 * 2048 * ceil(P / 2048) bytes for P parameters (about 8 bytes per parameter, twice
//! f32). Download: the unseeded aggregate, 36 + 16 * 2048 * ceil(P / 2048) bytes.

use std::time::Instant;

use candle_core::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{unflatten_update, Aggregate, NamedTensors, Scheme, ThreatModel, Upload, View};
use crate::fl::Transmission;
use crate::he::glwe::{FixedPoint, GlweKey, GlweParameters, GlweVector, SeededGlweVector};
use crate::he::HeError;
use crate::{Error, Result};

/// Default bound on |update value| (generous: gradients and weight deltas are far smaller).
pub(crate) fn default_max_abs() -> f64 {
    64.0
}

/// Default headroom: the largest total sample weight (counts divided by their gcd) of one round.
pub(crate) fn default_max_samples() -> u64 {
    1 << 16
}

/// Domain separator mixed into the run seed before deriving the shared GLWE key.
const KEY_DOMAIN: u64 = 0x676c_7765_5f6b_6579; // "glwe_key"

/// Secure aggregation with a GLWE secret key shared by all clients (see the module documentation).
#[derive(Debug, Clone)]
pub struct GlweScheme {
    params: GlweParameters,
    key: GlweKey,
    encoding: FixedPoint,
    /// Names and sizes of the parameters clients flattened, from the first upload of the run.
    layout: Option<Vec<(String, usize)>>,
}

impl GlweScheme {
    /// Builds the scheme at tfhe's 128-bit GLWE parameters with the key derived from `seed`; values must
    /// lie in [-`max_abs`, `max_abs`] and a round's total sample weight must not exceed `max_samples`.
    pub fn new(max_abs: f64, max_samples: u64, seed: u64) -> Result<Self> {
        let params = GlweParameters::tfhe_128bit();
        let encoding =
            FixedPoint::new(&params, max_abs, max_samples).map_err(|e| Error::InvalidSetting {
                key: "max_abs".into(),
                reason: format!("max_abs = {max_abs} with max_samples = {max_samples}: {e}"),
                hint: "use a positive max_abs and max_samples >= 1 whose product is below 2^40"
                    .into(),
            })?;
        let key_seed = StdRng::seed_from_u64(seed ^ KEY_DOMAIN).random::<u128>();
        let key = GlweKey::generate(params, key_seed)?;
        Ok(Self {
            params,
            key,
            encoding,
            layout: None,
        })
    }
}

/// Names and element counts of named tensors, in name order (the flattening order).
fn layout_of(tensors: &NamedTensors) -> Vec<(String, usize)> {
    tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.elem_count()))
        .collect()
}

/// The greatest common divisor (0 when both are 0).
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Scheme for GlweScheme {
    fn id(&self) -> &str {
        "glwe"
    }

    fn parameters(&self) -> String {
        format!(
            "max_abs={}, max_samples={}, step=2^-{}",
            self.encoding.max_abs(),
            self.encoding.headroom(),
            self.encoding.scale_bits()
        )
    }

    fn encode(&mut self, client: usize, update: &NamedTensors, rng: &mut StdRng) -> Result<Upload> {
        let started = Instant::now();
        let layout = layout_of(update);
        match &self.layout {
            None => self.layout = Some(layout),
            Some(known) if *known != layout => {
                return Err(HeError::Incompatible(format!(
                    "got parameters {:?} in client {client}'s update, and {:?} in the first upload \
                     of the run: every client must send every parameter",
                    layout.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    known.iter().map(|(n, _)| n).collect::<Vec<_>>()
                ))
                .into())
            }
            Some(_) => {}
        }
        let total: usize = update.values().map(|t| t.elem_count()).sum();
        let mut flat = Vec::with_capacity(total);
        let max_abs = self.encoding.max_abs();
        for (name, tensor) in update {
            let values = tensor
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            if let Some((i, v)) = values
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite() || v.abs() > max_abs)
            {
                return Err(Error::InvalidSetting {
                    key: "max_abs".into(),
                    reason: format!(
                        "client {client}'s update `{name}` has {v} at flat index {i}, outside \
                         [-max_abs, max_abs] = [-{max_abs}, {max_abs}]"
                    ),
                    hint: "raise `max_abs` in the glwe scheme config (each doubling costs one bit \
                           of precision); a non-finite value means training diverged"
                        .into(),
                });
            }
            flat.extend(values);
        }
        let randomness = rng.random::<u128>();
        let ciphertext = self.key.encrypt_seeded(
            &self.encoding,
            &format!("client {client}'s update"),
            &flat,
            randomness,
        )?;
        let transmission = Transmission::from_bytes(ciphertext.to_bytes());
        Ok(Upload {
            transmission,
            encode_seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn server_reads(
        &self,
        _upload: &Transmission,
        _template: &NamedTensors,
    ) -> Result<Option<NamedTensors>> {
        Ok(None)
    }

    fn aggregate(
        &mut self,
        weighted: &[(usize, &Upload)],
        template: &NamedTensors,
    ) -> Result<Aggregate> {
        let started = Instant::now();
        let template_layout = layout_of(template);
        if let Some(known) = &self.layout {
            if *known != template_layout {
                return Err(HeError::Incompatible(format!(
                    "got parameters {:?} in the clients' uploads, and {:?} in the model",
                    known.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    template_layout.iter().map(|(n, _)| n).collect::<Vec<_>>()
                ))
                .into());
            }
        }
        let total_values: usize = template_layout.iter().map(|(_, n)| n).sum();

        // Server: integer weights = sample counts / their gcd, then the weighted sum of ciphertexts.
        let divisor = weighted
            .iter()
            .fold(0u64, |g, (n, _)| gcd(g, *n as u64))
            .max(1);
        let total_weight: u64 = weighted.iter().map(|(n, _)| *n as u64 / divisor).sum();
        if total_weight > self.encoding.headroom() {
            return Err(Error::InvalidSetting {
                key: "max_samples".into(),
                reason: format!(
                    "the round's total sample weight is {total_weight} (sample counts divided by \
                     their gcd {divisor}), and the encoding has headroom for max_samples = {}",
                    self.encoding.headroom()
                ),
                hint: format!(
                    "set max_samples >= {total_weight} in the glwe scheme config (each doubling \
                     costs one bit of precision)"
                ),
            });
        }
        let mut sum: Option<GlweVector> = None;
        for (client, (samples, upload)) in weighted.iter().enumerate() {
            let seeded =
                SeededGlweVector::from_bytes(upload.transmission.as_bytes(), &self.params)?;
            if seeded.value_count() != total_values {
                return Err(HeError::Incompatible(format!(
                    "got {} values in upload {client}, and {total_values} parameters in the model",
                    seeded.value_count()
                ))
                .into());
            }
            let mut ciphertext = seeded.decompress();
            ciphertext.mul_scalar_assign(*samples as u64 / divisor)?;
            match sum.as_mut() {
                Some(sum) => sum.add_assign(&ciphertext)?,
                None => sum = Some(ciphertext),
            }
        }
        let aggregate_bytes = sum.as_ref().map(GlweVector::to_bytes);
        let server_seconds = started.elapsed().as_secs_f64();

        // Clients: decrypt the aggregate with the shared key, divide by the total weight, unflatten.
        let started = Instant::now();
        let decrypted = match &aggregate_bytes {
            Some(bytes) if total_weight > 0 => {
                let aggregate = GlweVector::from_bytes(bytes, &self.params)?;
                let scale = 1.0 / total_weight as f64;
                self.key
                    .decrypt(&aggregate, &self.encoding)?
                    .into_iter()
                    .map(|v| (v * scale) as f32)
                    .collect()
            }
            _ => vec![0f32; total_values],
        };
        let mean_update = unflatten_update(decrypted, template)?;
        Ok(Aggregate {
            mean_update,
            download_bytes_per_client: aggregate_bytes.as_ref().map_or(0, Vec::len),
            server_seconds,
            decode_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The shared GLWE secret key: N x k binary coefficients, 1 bit each when packed; distributed to the
    /// clients out of band (fedleak derives it from the seed and never sends it).
    fn key_bytes(&self) -> usize {
        (self.params.polynomial_size * self.params.glwe_dimension).div_ceil(8)
    }

    fn threat_models(&self) -> Vec<ThreatModel> {
        vec![
            ThreatModel {
                id: "server".into(),
                description: "An honest-but-curious server adds GLWE ciphertexts it cannot decrypt \
                              (the clients share the secret key); it learns the sample-weighted mean \
                              once the clients apply it to the global model."
                    .into(),
                view: View::Aggregate,
            },
            ThreatModel {
                id: "eavesdropper".into(),
                description: "A network eavesdropper reads the seeded GLWE uploads and the aggregate \
                              ciphertext, without the clients' shared key."
                    .into(),
                view: View::Ciphertext {
                    security: self.params.describe(),
                },
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::{build_scheme, weighted_mean, SchemeConfig};
    use super::*;
    use candle_core::{Device, Tensor};

    fn update(scale: f32) -> NamedTensors {
        let mut u = NamedTensors::new();
        let w: Vec<f32> = (0..12).map(|i| scale * (i as f32 * 0.7).sin()).collect();
        u.insert(
            "a.weight".into(),
            Tensor::new(w.as_slice(), &Device::Cpu)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        );
        u.insert(
            "b.bias".into(),
            Tensor::new(&[scale, -2.0 * scale, 0.001 * scale], &Device::Cpu).unwrap(),
        );
        u
    }

    fn flat(t: &NamedTensors) -> Vec<f32> {
        t.values()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn aggregate_equals_weighted_mean() {
        let mut scheme = GlweScheme::new(default_max_abs(), default_max_samples(), 42).unwrap();
        let updates = [update(1.0), update(-0.3), update(2.5)];
        let counts = [30usize, 50, 80];
        let uploads: Vec<Upload> = updates
            .iter()
            .enumerate()
            .map(|(c, u)| {
                let mut rng = StdRng::seed_from_u64(c as u64);
                scheme.encode(c, u, &mut rng).unwrap()
            })
            .collect();
        let params = GlweParameters::tfhe_128bit();
        for upload in &uploads {
            assert_eq!(upload.transmission.len(), params.seeded_bytes(15));
            assert!(scheme
                .server_reads(&upload.transmission, &updates[0])
                .unwrap()
                .is_none());
        }
        let weighted: Vec<(usize, &Upload)> = counts.iter().copied().zip(&uploads).collect();
        let aggregate = scheme.aggregate(&weighted, &updates[0]).unwrap();
        assert_eq!(aggregate.download_bytes_per_client, params.full_bytes(15));
        let plain: Vec<(usize, NamedTensors)> = counts
            .iter()
            .copied()
            .zip(updates.iter().cloned())
            .collect();
        let expected = flat(&weighted_mean(&plain, &updates[0]).unwrap());
        let got = flat(&aggregate.mean_update);
        // Weights 3, 5, 8 after dividing by the gcd 10.
        let bound = scheme.encoding.max_error(&params, 16) / 16.0 + 1e-6;
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() as f64 <= bound, "{g} vs {e} (bound {bound})");
        }
        assert_eq!(aggregate.mean_update["a.weight"].dims(), &[3, 4]);
    }

    #[test]
    fn out_of_range_update_names_client_and_parameter() {
        let mut scheme = GlweScheme::new(1.0, 16, 1).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let err = scheme
            .encode(2, &update(0.6), &mut rng)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client 2") && err.contains("`b.bias`") && err.contains("raise `max_abs`"),
            "{err}"
        );
    }

    #[test]
    fn too_much_sample_weight_is_refused() {
        let mut scheme = GlweScheme::new(4.0, 10, 1).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let a = scheme.encode(0, &update(1.0), &mut rng).unwrap();
        let b = scheme.encode(1, &update(1.0), &mut rng).unwrap();
        // Weights 7 and 4 (gcd 1): total 11 > 10.
        let err = scheme
            .aggregate(&[(7, &a), (4, &b)], &update(1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_samples"), "{err}");
        // Weights 70 and 40 reduce to 7 and 4 as well; 60 and 40 reduce to 3 and 2.
        assert!(scheme
            .aggregate(&[(60, &a), (40, &b)], &update(1.0))
            .is_ok());
    }

    #[test]
    fn config_registry_and_threat_models() {
        let config: SchemeConfig = serde_json::from_str(r#"{"id":"glwe"}"#).unwrap();
        assert_eq!(
            config,
            SchemeConfig::Glwe {
                max_abs: 64.0,
                max_samples: 65536
            }
        );
        assert_eq!(config.id(), "glwe");
        let scheme = build_scheme(&config, 3).unwrap();
        assert_eq!(scheme.id(), "glwe");
        assert_eq!(
            scheme.parameters(),
            "max_abs=64, max_samples=65536, step=2^-19"
        );
        let threats = scheme.threat_models();
        assert_eq!(threats[0].view, View::Aggregate);
        assert_eq!(
            threats[1].view,
            View::Ciphertext {
                security: "GLWE N=2048, k=1, TUniform(2^17), q=2^64, 128-bit security (tfhe-rs \
                           parameter set)"
                    .into()
            }
        );
    }
}
