//! Paillier secure aggregation (`paillier`): FedAvg over additively homomorphic ciphertexts, after
//! Lim, Prabaharan G. and Kiruthika Mani, "Privacy Preservation of Medical Images Through Synthesized
//! Federated Learning Framework in Healthcare" (Traitement du Signal 42(4), 2025): clients share one
//! Paillier key, the server adds ciphertexts with the public key only.
//!
//! # Key model
//! One key pair is generated when the scheme is built (deterministically from the run seed, so runs
//! reproduce; the key is therefore only as secret as the seed). Every client holds the secret key
//! (equivalently, a key authority decrypts for them); the server holds only the public key `n`, sent
//! once ([`PaillierScheme::public_key_bytes`] bytes, not counted per round). The server therefore never
//! reads an individual update; it learns the aggregate only as the clients apply it to the shared model.
//! An eavesdropper on the links sees ciphertexts only.
//!
//! # Round
//! - **Client** ([`Scheme::encode`]): flattens its update (f32 tensors, sorted by Hugging Face name:
//!   every client sends every parameter, in the same order, so names and shapes are not sent), encodes
//!   it in fixed point with packing ([`crate::he::paillier::SlotLayout`]) and encrypts it. Clients encrypt
//!   with the CRT speed-up their secret key allows; the ciphertexts are the same as under the public key.
//! - **Server** ([`Scheme::aggregate`]): multiplies client `k`'s ciphertexts by its sample count `n_k`
//!   (sample counts are public in FedAvg: the server needs them to weight the mean) and adds them all:
//!   `Enc(sum_k n_k x_k)`. This is the FedAvg weighting `n_k / N` with the division by `N` done by the
//!   clients after decryption; weighting on the server keeps the encoding of the clients independent
//!   of `N`, which [`Scheme::encode`] does not know. Each client downloads the aggregate ciphertexts.
//! - **Clients** decrypt (simulated here once), divide by `N = sum_k n_k` and unflatten to the
//!   template's names and shapes.
//!
//! Precision: each value is rounded to `2^-f` before encryption, so the mean is exact to within
//! `2^-(f+1)`; the headroom is sized for `N <= max_total_samples` (an error otherwise).

use std::time::Instant;

use rand::rngs::StdRng;

use super::{
    flatten_update, unflatten_update, Aggregate, NamedTensors, Scheme, ThreatModel, Upload, View,
};
use crate::fl::Transmission;
use crate::he::paillier::{
    security_bits, CiphertextVector, Packing, PaillierKeyPair, SlotLayout, DEFAULT_KEY_BITS,
};
use crate::he::HeError;
use crate::{Error, Result};

/// Default modulus bits (`key_bits` in the config).
pub(super) fn default_key_bits() -> u32 {
    DEFAULT_KEY_BITS
}

/// Default bound on a value's magnitude (`max_abs`).
pub(super) fn default_max_abs() -> f64 {
    64.0
}

/// Default fraction bits (`fraction_bits`): resolution `2^-32 ~ 2.3e-10`.
pub(super) fn default_fraction_bits() -> u32 {
    32
}

/// Default headroom (`max_total_samples`): the round's total sample count the slots can hold.
pub(super) fn default_max_total_samples() -> u64 {
    65536
}

/// Paillier secure aggregation (see the module documentation).
#[derive(Debug)]
pub struct PaillierScheme {
    keys: PaillierKeyPair,
    layout: SlotLayout,
}

impl PaillierScheme {
    /// Generates the key pair (`key_bits`, at least 2048) from `seed` and sets the fixed-point layout:
    /// `|value| <= max_abs`, `fraction_bits` bits after the point, headroom for rounds of up to
    /// `max_total_samples` samples in all.
    pub fn new(
        key_bits: u32,
        max_abs: f64,
        fraction_bits: u32,
        max_total_samples: u64,
        seed: u64,
    ) -> Result<Self> {
        let keys =
            PaillierKeyPair::generate(key_bits, seed).map_err(|e| Error::InvalidSetting {
                key: "scheme.key_bits".into(),
                reason: e.to_string(),
                hint: "use key_bits = 3072 (the default) or 2048".into(),
            })?;
        Self::with_keys(keys, max_abs, fraction_bits, max_total_samples)
    }

    /// The scheme over an existing key pair.
    pub fn with_keys(
        keys: PaillierKeyPair,
        max_abs: f64,
        fraction_bits: u32,
        max_total_samples: u64,
    ) -> Result<Self> {
        let layout = SlotLayout::new(
            keys.key_bits(),
            fraction_bits,
            max_abs,
            max_total_samples,
            Packing::Packed,
        )
        .map_err(|e| Error::InvalidSetting {
            key: "scheme.max_abs / scheme.fraction_bits / scheme.max_total_samples".into(),
            reason: e.to_string(),
            hint: "a slot must fit 64 bits: lower fraction_bits (default 32) or max_abs \
                   (default 64)"
                .into(),
        })?;
        Ok(Self { keys, layout })
    }

    /// The slot layout the clients encode with.
    pub fn layout(&self) -> &SlotLayout {
        &self.layout
    }

    /// Bytes of the public key, sent once to the server (and the clients) before the first round.
    pub fn public_key_bytes(&self) -> usize {
        self.keys.public_key().to_bytes().len()
    }

    fn security(&self) -> String {
        let bits = self.keys.key_bits();
        format!(
            "Paillier n={bits} bits, ~{}-bit security (NIST SP 800-57)",
            security_bits(bits)
        )
    }
}

fn incompatible(reason: String) -> Error {
    Error::He(HeError::Incompatible(reason))
}

impl Scheme for PaillierScheme {
    fn id(&self) -> &str {
        "paillier"
    }

    fn parameters(&self) -> String {
        format!(
            "n={} bits, {}",
            self.keys.key_bits(),
            self.layout.describe()
        )
    }

    fn encode(
        &mut self,
        _client: usize,
        update: &NamedTensors,
        rng: &mut StdRng,
    ) -> Result<Upload> {
        let started = Instant::now();
        let values = flatten_update(update)?;
        let ciphertexts = self.keys.encrypt(&self.layout, &values, rng)?;
        let transmission = Transmission::from_bytes(ciphertexts.to_bytes());
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
        let server_started = Instant::now();
        let expected: usize = template.values().map(|t| t.elem_count()).sum();
        let public = self.keys.public_key();
        let mut total: u64 = 0;
        let mut sum: Option<CiphertextVector> = None;
        for (client, (samples, upload)) in weighted.iter().enumerate() {
            let what = format!("the upload of client {client}");
            let ct = CiphertextVector::from_bytes(upload.transmission.as_bytes(), &what)?;
            if ct.len() != expected {
                return Err(incompatible(format!(
                    "{what} holds {} values but the model has {expected} parameters",
                    ct.len()
                )));
            }
            if *samples == 0 {
                continue;
            }
            let weight = *samples as u64;
            total = total.saturating_add(weight);
            let scaled = public.scale(&ct, weight)?;
            sum = Some(match sum {
                None => scaled,
                Some(s) => public.add(&s, &scaled)?,
            });
        }
        let server_seconds = server_started.elapsed().as_secs_f64();

        let Some(sum) = sum else {
            // No samples at all: the mean update is zero, as in `weighted_mean`.
            let mean_update = template
                .iter()
                .map(|(name, t)| Ok((name.clone(), t.zeros_like()?)))
                .collect::<Result<NamedTensors>>()?;
            return Ok(Aggregate {
                mean_update,
                download_bytes_per_client: 0,
                server_seconds,
                decode_seconds: 0.0,
            });
        };
        let download_bytes_per_client = sum.to_bytes().len();

        let decode_started = Instant::now();
        let sums = self.keys.decrypt(&sum)?;
        let mean: Vec<f32> = sums.iter().map(|s| (s / total as f64) as f32).collect();
        let mean_update = unflatten_update(mean, template)?;
        Ok(Aggregate {
            mean_update,
            download_bytes_per_client,
            server_seconds,
            decode_seconds: decode_started.elapsed().as_secs_f64(),
        })
    }

    /// The public key every party receives (the clients also hold the secret key, derived, not sent).
    fn key_bytes(&self) -> usize {
        self.public_key_bytes()
    }

    fn threat_models(&self) -> Vec<ThreatModel> {
        vec![
            ThreatModel {
                id: "server".into(),
                description: "An honest-but-curious server holds only the public key: it adds the \
                              clients' ciphertexts and learns the sample-weighted mean update once \
                              the clients apply it."
                    .into(),
                view: View::Aggregate,
            },
            ThreatModel {
                id: "eavesdropper".into(),
                description: "An eavesdropper on the client-server links reads Paillier \
                              ciphertexts only."
                    .into(),
                view: View::Ciphertext {
                    security: self.security(),
                },
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_core::Tensor;
    use rand::SeedableRng;

    use super::*;
    use crate::schemes::weighted_mean;

    fn scheme() -> PaillierScheme {
        // An insecure 1024-bit key keeps the test fast; the code path is that of 3072-bit keys.
        let keys = PaillierKeyPair::generate_insecure_for_tests(1024, 5).unwrap();
        PaillierScheme::with_keys(keys, 64.0, 32, 65536).unwrap()
    }

    fn update(seed: f32) -> NamedTensors {
        let dev = Device::Cpu;
        let mut u = NamedTensors::new();
        let w: Vec<f32> = (0..12)
            .map(|i| ((i as f32 + seed) * 0.7).sin() * 3.0)
            .collect();
        u.insert(
            "b.weight".into(),
            Tensor::from_vec(w, (3, 4), &dev).unwrap(),
        );
        u.insert(
            "a.bias".into(),
            Tensor::new(&[seed, -seed * 0.001, 1e-6], &dev).unwrap(),
        );
        u
    }

    #[test]
    fn aggregate_equals_weighted_mean() {
        let mut s = scheme();
        let updates = [update(1.0), update(-2.5), update(0.3)];
        let samples = [10usize, 3, 27];
        let uploads: Vec<Upload> = updates
            .iter()
            .enumerate()
            .map(|(c, u)| {
                s.encode(c, u, &mut StdRng::seed_from_u64(c as u64))
                    .unwrap()
            })
            .collect();
        for up in &uploads {
            assert_eq!(up.transmission.len(), s.layout().wire_bytes(15));
            assert!(s
                .server_reads(&up.transmission, &updates[0])
                .unwrap()
                .is_none());
        }
        let weighted: Vec<(usize, &Upload)> = samples.iter().copied().zip(uploads.iter()).collect();
        let agg = s.aggregate(&weighted, &updates[0]).unwrap();
        let plain: Vec<(usize, NamedTensors)> = samples
            .iter()
            .copied()
            .zip(updates.iter().cloned())
            .collect();
        let want = weighted_mean(&plain, &updates[0]).unwrap();
        assert_eq!(agg.download_bytes_per_client, s.layout().wire_bytes(15));
        for (name, w) in &want {
            let g = &agg.mean_update[name];
            assert_eq!(g.dims(), w.dims());
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in g.iter().zip(&w) {
                // f32 rounding of the result dominates the 2^-33 encoding error.
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
        let tm = s.threat_models();
        assert_eq!(tm[0].view, View::Aggregate);
        assert_eq!(
            tm[1].view,
            View::Ciphertext {
                security: "Paillier n=1024 bits, ~80-bit security (NIST SP 800-57)".into()
            }
        );
    }

    #[test]
    fn bad_uploads_are_errors() {
        let mut s = scheme();
        let u = update(1.0);
        let up = s.encode(0, &u, &mut StdRng::seed_from_u64(1)).unwrap();
        let bytes = up.transmission.as_bytes();
        let truncated = Upload {
            transmission: Transmission::from_bytes(bytes[..bytes.len() - 3].to_vec()),
            encode_seconds: 0.0,
        };
        let err = s.aggregate(&[(1, &truncated)], &u).unwrap_err();
        assert!(matches!(err, Error::He(HeError::Decoding { .. })), "{err}");
        // An update missing a tensor does not match the template.
        let mut short = u.clone();
        short.remove("a.bias");
        let up_short = s.encode(1, &short, &mut StdRng::seed_from_u64(1)).unwrap();
        let err = s.aggregate(&[(1, &up), (1, &up_short)], &u).unwrap_err();
        assert!(matches!(err, Error::He(HeError::Incompatible(_))), "{err}");
        // A value beyond max_abs is named.
        let mut big = u.clone();
        big.insert(
            "a.bias".into(),
            Tensor::new(&[0f32, 65.0, 0.0], &Device::Cpu).unwrap(),
        );
        let err = s
            .encode(0, &big, &mut StdRng::seed_from_u64(1))
            .unwrap_err();
        assert!(err.to_string().contains("value 1"), "{err}");
    }
}

/// Cost figures for the report: `cargo test --lib -- --ignored --nocapture paillier_cost_vit_micro`
/// (dependencies, where all the big-integer work happens, are built at opt-level 3 even in dev).
#[cfg(test)]
mod cost {
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    use super::*;
    use crate::model::{init_parameters, ModelPreset, PositionEmbeddingKind};

    #[test]
    #[ignore = "slow: generates a 3072-bit key and encrypts a whole vit-micro-32 update"]
    fn paillier_cost_vit_micro() {
        let labels: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let cfg = ModelPreset::VitMicro32.config(&labels, PositionEmbeddingKind::Learnable);
        let update = init_parameters(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let values = flatten_update(&update).unwrap();
        let count = values.len();
        let threads = rayon::current_num_threads();
        println!("vit-micro-32 (10 classes): {count} parameters, rayon threads {threads}");
        println!("plaintext f32: {} bytes", 4 * count);

        for seed in [1u64, 2] {
            let t = Instant::now();
            let keys = PaillierKeyPair::generate(3072, seed).unwrap();
            println!(
                "keygen 3072 (seed {seed}): {:.2} s",
                t.elapsed().as_secs_f64()
            );
            drop(keys);
        }
        let mut s = PaillierScheme::new(3072, 64.0, 32, 65536, 1).unwrap();
        println!("layout: {}", s.layout().describe());
        println!("public key: {} bytes (once)", s.public_key_bytes());

        let mut rng = StdRng::seed_from_u64(3);
        let t = Instant::now();
        let up = s.encode(0, &update, &mut rng).unwrap();
        let enc = t.elapsed().as_secs_f64();
        let cts = s.layout().ciphertexts_for(count);
        println!(
            "packed, secret-key (CRT) encrypt: {enc:.2} s wall for {cts} ciphertexts = {:.2} ms/ct wall, \
             {:.0} values/s; {} bytes = {:.2}x plaintext f32",
            1e3 * enc / cts as f64,
            count as f64 / enc,
            up.transmission.len(),
            up.transmission.len() as f64 / (4 * count) as f64
        );
        let t = Instant::now();
        let pk_ct = s
            .keys
            .public_key()
            .encrypt(s.layout(), &values, &mut rng)
            .unwrap();
        let enc_pk = t.elapsed().as_secs_f64();
        println!(
            "packed, public-key encrypt: {enc_pk:.2} s wall = {:.2} ms/ct wall, {:.0} values/s",
            1e3 * enc_pk / cts as f64,
            count as f64 / enc_pk
        );
        let ups: Vec<(usize, &Upload)> = vec![(100, &up), (50, &up)];
        let agg = s.aggregate(&ups, &update).unwrap();
        println!(
            "aggregate of 2 clients: server {:.2} s (scale + add), client decrypt {:.2} s = {:.2} ms/ct wall, \
             download {} bytes",
            agg.server_seconds,
            agg.decode_seconds,
            1e3 * agg.decode_seconds / cts as f64,
            agg.download_bytes_per_client
        );
        drop(pk_ct);

        // One value per ciphertext: timed on a sample, bytes exact from the layout.
        let single = SlotLayout::new(3072, 32, 64.0, 65536, Packing::OnePerCiphertext).unwrap();
        let sample = &values[..256];
        let t = Instant::now();
        let ct = s.keys.encrypt(&single, sample, &mut rng).unwrap();
        let enc1 = t.elapsed().as_secs_f64();
        println!(
            "unpacked, secret-key encrypt: {:.2} ms/ct wall, {:.0} values/s; whole update would be {} bytes \
             = {:.1}x plaintext, {:.1}x packed, ~{:.0} s",
            1e3 * enc1 / sample.len() as f64,
            sample.len() as f64 / enc1,
            single.wire_bytes(count),
            single.wire_bytes(count) as f64 / (4 * count) as f64,
            single.wire_bytes(count) as f64 / up.transmission.len() as f64,
            enc1 * count as f64 / sample.len() as f64
        );
        assert_eq!(ct.to_bytes().len(), single.wire_bytes(256));
    }
}
