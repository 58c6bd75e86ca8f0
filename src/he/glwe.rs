//! GLWE vector encryption over tfhe-rs `core_crypto`, at tfhe's own 128-bit GLWE parameters.
//!
//! What it is for: secret-key additive aggregation of model updates (`crate::schemes` `glwe`) and the
//! plaintext-polynomial products of encrypted inference. No bootstrapping, no FFT: encryption, addition,
//! multiplication by integer cleartexts and by plaintext polynomials (Karatsuba over the native u64
//! torus), and sample extraction.
//!
//! # Parameters
//!
//! [`GlweParameters::tfhe_128bit`]: polynomial size N = 2048, GLWE dimension k = 1, binary secret key,
//! TUniform noise with bound 2^17 (every noise coefficient is an integer in [-2^17, 2^17]), u64 torus with
//! the native modulus q = 2^64. These are the GLWE parameters of tfhe-rs' 128-bit shortint parameter sets
//! (for example `V1_2_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`); fedleak does not re-estimate them.
//!
//! # Fixed-point encoding ([`FixedPoint`])
//!
//! A value v becomes the integer m = round(v * 2^f) placed at bit s of the torus: the plaintext is
//! m * 2^s mod 2^64, with s = 17 + 4 (the noise bound plus four guard bits), so the encryption noise of
//! one ciphertext (at most 2^17) is at most 1/16 of one quantisation step. The encoding is built for a
//! *headroom* H: the largest total integer weight that will be applied before decryption (H = K to add K
//! ciphertexts; the sum of the sample counts for a sample-weighted sum; the L1 norm of an integer weight
//! row for a dot product). `f` is the largest number of fractional bits such that
//! H * ((max_abs * 2^f + 1) * 2^s + 2^17) < 2^63, so no admissible combination wraps around the torus.
//!
//! Precision: decrypting a combination of total weight W (with W <= H) returns the same combination of
//! the inputs with an absolute error of at most W * 2^-f * (1/2 + 1/16) (rounding of each input to the
//! step 2^-f, plus worst-case noise), plus a f64 conversion error below 2^(10 - s - f)
//! ([`FixedPoint::max_error`]). At the defaults of the `glwe` scheme (max_abs = 64, H = 65536) f = 19:
//! step 2^-19 ~ 1.9e-6, error of a sample-weighted *mean* at most ~1.1e-6 per coordinate.
//!
//! # Wire format (little-endian), [`SeededGlweVector::to_bytes`] and [`GlweVector::to_bytes`]
//!
//! ```text
//! magic  b"FLGW"   4 bytes
//! version 1        u8
//! kind             u8   1 = seeded (client upload), 2 = full (aggregate)
//! scale_bits f     u8
//! noise_bits s     u8
//! polynomial_size  u32
//! glwe_dimension   u32
//! ciphertexts C    u32  = ceil(values / N)
//! values           u64  meaningful coefficients (the rest of the last polynomial is zero padding)
//! weight           u64  total integer weight of the combination (1 for a fresh ciphertext)
//! [seeded only] compression seed  u128 (tfhe `Seed`; the mask is regenerated from it)
//! data             u64 * C * N (seeded: bodies only) or u64 * C * (k + 1) * N (full)
//! ```
//!
//! So a seeded upload of n values costs 52 + 8 * N * ceil(n / N) bytes (16,436 for n = 768) and the
//! decompressed aggregate 36 + 8 * (k + 1) * N * ceil(n / N) bytes (32,804 for n = 768);
//! [`GlweParameters::seeded_bytes`] and [`GlweParameters::full_bytes`] compute them.
//!
//! # Randomness
//!
//! The secret key and every encryption are derived from caller-supplied seeds through tfhe's AES-CTR
//! CSPRNG (`SecretRandomGenerator`, `DeterministicSeeder`), so fedleak runs are reproducible from
//! `--seed`. That is a simulation choice: a deployment must seed from an entropy source.

use std::fmt;

use tfhe::core_crypto::algorithms::polynomial_algorithms::polynomial_wrapping_add_mul_assign;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::Seed;
use tfhe::core_crypto::prelude::*;

use super::HeError;

/// Guard bits between the noise bound and the quantisation step: fresh noise is at most 2^-4 step.
const GUARD_BITS: u32 = 4;
/// Wire magic.
const MAGIC: &[u8; 4] = b"FLGW";
/// Wire version.
const VERSION: u8 = 1;
/// Wire kind of a seeded (compressed) vector.
const KIND_SEEDED: u8 = 1;
/// Wire kind of a full (decompressed) vector.
const KIND_FULL: u8 = 2;
/// Bytes of the common header.
const HEADER_BYTES: usize = 4 + 1 + 1 + 1 + 1 + 4 + 4 + 4 + 8 + 8;
/// Bytes of the compression seed of a seeded vector.
const SEED_BYTES: usize = 16;

/// GLWE parameters: what the key, the ciphertexts and the security claim depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlweParameters {
    /// Polynomial size N (a power of two): values per ciphertext.
    pub polynomial_size: usize,
    /// GLWE dimension k: mask polynomials per ciphertext.
    pub glwe_dimension: usize,
    /// log2 of the TUniform noise bound: noise coefficients lie in [-2^b, 2^b].
    pub noise_bound_log2: u32,
}

impl GlweParameters {
    /// tfhe-rs' 128-bit GLWE parameters: N = 2048, k = 1, TUniform(2^17), native u64 torus.
    pub fn tfhe_128bit() -> Self {
        Self {
            polynomial_size: 2048,
            glwe_dimension: 1,
            noise_bound_log2: 17,
        }
    }

    /// One line for reports, with the security claim only for tfhe's parameter set.
    pub fn describe(&self) -> String {
        let security = if *self == Self::tfhe_128bit() {
            "128-bit security (tfhe-rs parameter set)"
        } else {
            "security not assessed (not a tfhe-rs parameter set)"
        };
        format!(
            "GLWE N={}, k={}, TUniform(2^{}), q=2^64, {security}",
            self.polynomial_size, self.glwe_dimension, self.noise_bound_log2
        )
    }

    /// Number of GLWE ciphertexts that hold `values` coefficients.
    pub fn ciphertext_count(&self, values: usize) -> usize {
        values.div_ceil(self.polynomial_size.max(1))
    }

    /// Exact wire bytes of a seeded (client-upload) encryption of `values` coefficients.
    pub fn seeded_bytes(&self, values: usize) -> usize {
        HEADER_BYTES + SEED_BYTES + 8 * self.polynomial_size * self.ciphertext_count(values)
    }

    /// Exact wire bytes of a full (decompressed, e.g. aggregate) encryption of `values` coefficients.
    pub fn full_bytes(&self, values: usize) -> usize {
        HEADER_BYTES
            + 8 * (self.glwe_dimension + 1) * self.polynomial_size * self.ciphertext_count(values)
    }

    /// Checks that tfhe can use these parameters (so later calls cannot panic inside tfhe).
    fn validate(&self) -> Result<(), HeError> {
        let n = self.polynomial_size;
        if n < 2 || !n.is_power_of_two() || n > (1 << 20) {
            return Err(HeError::Encoding {
                what: "GLWE parameters".into(),
                reason: format!("polynomial size must be a power of two in [2, 2^20], got {n}"),
            });
        }
        if self.glwe_dimension == 0 || self.glwe_dimension > 16 {
            return Err(HeError::Encoding {
                what: "GLWE parameters".into(),
                reason: format!(
                    "GLWE dimension must be in [1, 16], got {}",
                    self.glwe_dimension
                ),
            });
        }
        if self.noise_bound_log2 + GUARD_BITS >= 48 {
            return Err(HeError::Encoding {
                what: "GLWE parameters".into(),
                reason: format!(
                    "noise bound 2^{} leaves no room for values in a 64-bit torus",
                    self.noise_bound_log2
                ),
            });
        }
        Ok(())
    }

    fn noise(&self) -> Result<DynamicDistribution<u64>, HeError> {
        DynamicDistribution::try_new_t_uniform(self.noise_bound_log2)
            .map_err(|e| HeError::Backend(format!("TUniform(2^{}): {e}", self.noise_bound_log2)))
    }

    fn glwe_size(&self) -> GlweSize {
        GlweSize(self.glwe_dimension + 1)
    }
}

/// Fixed-point encoding of real values in the torus, with headroom for combinations of total integer
/// weight up to `headroom` (see the module documentation for the layout and the precision).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    max_abs: f64,
    headroom: u64,
    scale_bits: u32,
    noise_bits: u32,
}

impl FixedPoint {
    /// The finest encoding for values in [-`max_abs`, `max_abs`] that stays exact (no wrap-around, noise
    /// below 1/16 step per unit weight) for combinations of total integer weight up to `headroom`.
    /// Errors when `max_abs` is not a positive finite number, `headroom` is 0, or the two leave no
    /// fractional bit.
    pub fn new(params: &GlweParameters, max_abs: f64, headroom: u64) -> Result<Self, HeError> {
        params.validate()?;
        let what = || "the fixed-point encoding".to_string();
        if !(max_abs.is_finite() && max_abs > 0.0) {
            return Err(HeError::Encoding {
                what: what(),
                reason: format!("max_abs must be positive and finite, got {max_abs}"),
            });
        }
        if headroom == 0 {
            return Err(HeError::Encoding {
                what: what(),
                reason: "the headroom (number of summands / total weight) must be at least 1"
                    .into(),
            });
        }
        let noise_bits = params.noise_bound_log2 + GUARD_BITS;
        let fits = |f: u32| -> bool {
            let scaled = (max_abs * 2f64.powi(f as i32)).ceil();
            if scaled >= 2f64.powi(62) {
                return false;
            }
            let per_unit = ((scaled as u128) + 1) << noise_bits;
            let per_unit = per_unit + (1u128 << params.noise_bound_log2);
            (headroom as u128)
                .checked_mul(per_unit)
                .is_some_and(|total| total < (1u128 << 63))
        };
        let scale_bits = (0..=62u32).take_while(|&f| fits(f)).last().ok_or_else(|| {
            HeError::Encoding {
                what: what(),
                reason: format!(
                    "max_abs {max_abs} with headroom {headroom} leaves no fractional bit in a 64-bit \
                     torus with {noise_bits} noise bits; lower max_abs or the headroom"
                ),
            }
        })?;
        Ok(Self {
            max_abs,
            headroom,
            scale_bits,
            noise_bits,
        })
    }

    /// The largest |value| accepted by [`FixedPoint::encode`].
    pub fn max_abs(&self) -> f64 {
        self.max_abs
    }

    /// The largest total integer weight a decrypted combination may carry.
    pub fn headroom(&self) -> u64 {
        self.headroom
    }

    /// Fractional bits f: values are quantised to multiples of 2^-f.
    pub fn scale_bits(&self) -> u32 {
        self.scale_bits
    }

    /// Torus bits below the quantisation step, reserved for noise (s = noise bound + 4).
    pub fn noise_bits(&self) -> u32 {
        self.noise_bits
    }

    /// The quantisation step 2^-f.
    pub fn step(&self) -> f64 {
        2f64.powi(-(self.scale_bits as i32))
    }

    /// Bound on the absolute error of a decrypted combination of total integer weight `weight` (for a
    /// sample-weighted mean, divide by the weight). Holds for the TUniform noise of `params`.
    pub fn max_error(&self, params: &GlweParameters, weight: u64) -> f64 {
        let per_unit = 0.5 + 2f64.powi(params.noise_bound_log2 as i32 - self.noise_bits as i32);
        let conversion = 2f64.powi(10 - self.noise_bits as i32);
        (weight as f64 * per_unit + conversion) * self.step()
    }

    /// Encodes `values` as torus elements; `what` names the vector in errors, which also give the index
    /// and the value that does not fit.
    pub fn encode(&self, what: &str, values: &[f64]) -> Result<Vec<u64>, HeError> {
        let scale = 2f64.powi(self.scale_bits as i32);
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if !v.is_finite() || v.abs() > self.max_abs {
                    return Err(HeError::Encoding {
                        what: format!("{what} (value {i})"),
                        reason: format!(
                            "{v} is outside [-max_abs, max_abs] = [-{0}, {0}]",
                            self.max_abs
                        ),
                    });
                }
                let m = (v * scale).round() as i64;
                Ok((m as u64).wrapping_shl(self.noise_bits))
            })
            .collect()
    }

    /// Decodes a (noisy) torus element at `extra_scale_bits` more fractional bits than the encoding
    /// (0 for sums; the weight encoding's bits for dot products).
    fn decode(&self, torus: u64, extra_scale_bits: u32) -> f64 {
        let exponent = (self.noise_bits + self.scale_bits + extra_scale_bits) as i32;
        (torus as i64) as f64 * 2f64.powi(-exponent)
    }

    fn check_matches(&self, scale_bits: u32, noise_bits: u32, weight: u64) -> Result<(), HeError> {
        if (scale_bits, noise_bits) != (self.scale_bits, self.noise_bits) {
            return Err(HeError::Incompatible(format!(
                "got scale 2^-{scale_bits} and {noise_bits} noise bits in the ciphertext, and scale \
                 2^-{} and {} noise bits in the decoding",
                self.scale_bits, self.noise_bits
            )));
        }
        if weight > self.headroom {
            return Err(HeError::Incompatible(format!(
                "got total weight {weight} in the ciphertext, and headroom {} in the encoding: the \
                 combination may have wrapped around the torus",
                self.headroom
            )));
        }
        Ok(())
    }
}

/// Quantises a plaintext weight row to integers round(w * 2^`frac_bits`) for
/// [`GlweVector::dot_plaintext`]; `what` names the row in errors.
pub fn quantize_weights(what: &str, weights: &[f64], frac_bits: u32) -> Result<Vec<i64>, HeError> {
    if frac_bits > 40 {
        return Err(HeError::Encoding {
            what: what.to_string(),
            reason: format!("at most 40 fractional bits for weights, got {frac_bits}"),
        });
    }
    let scale = 2f64.powi(frac_bits as i32);
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let q = (w * scale).round();
            if !q.is_finite() || q.abs() >= 2f64.powi(52) {
                return Err(HeError::Encoding {
                    what: format!("{what} (weight {i})"),
                    reason: format!("{w} * 2^{frac_bits} is not finite or exceeds 2^52"),
                });
            }
            Ok(q as i64)
        })
        .collect()
}

/// A GLWE secret key (binary, tfhe's generator) and its parameters. Whoever holds it decrypts.
#[derive(Clone)]
pub struct GlweKey {
    params: GlweParameters,
    key: GlweSecretKeyOwned<u64>,
}

impl fmt::Debug for GlweKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlweKey")
            .field("params", &self.params)
            .field("key", &"<secret>")
            .finish()
    }
}

impl GlweKey {
    /// Generates a binary GLWE secret key deterministically from `seed` (tfhe's AES-CTR CSPRNG).
    pub fn generate(params: GlweParameters, seed: u128) -> Result<Self, HeError> {
        params.validate()?;
        let mut generator = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
        let key = allocate_and_generate_new_binary_glwe_secret_key(
            GlweDimension(params.glwe_dimension),
            PolynomialSize(params.polynomial_size),
            &mut generator,
        );
        Ok(Self { params, key })
    }

    /// The key's parameters.
    pub fn parameters(&self) -> &GlweParameters {
        &self.params
    }

    /// Encrypts `values` (encoded by `encoding`) as a seeded GLWE ciphertext list for the wire; the mask
    /// seed and the noise come from `randomness` (draw a fresh one per encryption). `what` names the
    /// vector in encoding errors.
    pub fn encrypt_seeded(
        &self,
        encoding: &FixedPoint,
        what: &str,
        values: &[f64],
        randomness: u128,
    ) -> Result<SeededGlweVector, HeError> {
        let n = self.params.polynomial_size;
        let count = self.params.ciphertext_count(values.len());
        let mut encoded = encoding.encode(what, values)?;
        encoded.resize(count * n, 0);
        let plaintexts = PlaintextList::from_container(encoded);
        let mut seeder = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(randomness));
        let seed = seeder.seed();
        let mut list = SeededGlweCiphertextList::new(
            0u64,
            self.params.glwe_size(),
            PolynomialSize(n),
            GlweCiphertextCount(count),
            seed.into(),
            CiphertextModulus::new_native(),
        );
        if count > 0 {
            encrypt_seeded_glwe_ciphertext_list(
                &self.key,
                &mut list,
                &plaintexts,
                self.params.noise()?,
                &mut seeder,
            );
        }
        Ok(SeededGlweVector {
            params: self.params,
            scale_bits: encoding.scale_bits,
            noise_bits: encoding.noise_bits,
            value_count: values.len(),
            seed: seed.0,
            bodies: list.into_container(),
        })
    }

    /// Decrypts a full GLWE vector: the combination of the encrypted values (not divided by its weight).
    pub fn decrypt(&self, vector: &GlweVector, encoding: &FixedPoint) -> Result<Vec<f64>, HeError> {
        self.check_parameters(&vector.params)?;
        encoding.check_matches(vector.scale_bits, vector.noise_bits, vector.weight)?;
        let n = self.params.polynomial_size;
        let count = self.params.ciphertext_count(vector.value_count);
        let mut plaintexts = PlaintextList::new(0u64, PlaintextCount(count * n));
        if count > 0 {
            let list = vector.as_list();
            decrypt_glwe_ciphertext_list(&self.key, &list, &mut plaintexts);
        }
        Ok(plaintexts
            .into_container()
            .into_iter()
            .take(vector.value_count)
            .map(|t| encoding.decode(t, 0))
            .collect())
    }

    /// Decrypts an encrypted dot product: <w, x> where `w` was quantised with `weight_frac_bits`
    /// fractional bits ([`quantize_weights`]) and `x` was encrypted with `encoding`.
    pub fn decrypt_dot(
        &self,
        dot: &EncryptedDot,
        encoding: &FixedPoint,
        weight_frac_bits: u32,
    ) -> Result<f64, HeError> {
        self.check_parameters(&dot.params)?;
        encoding.check_matches(dot.scale_bits, dot.noise_bits, dot.weight)?;
        let lwe = LweCiphertext::from_container(&dot.data[..], CiphertextModulus::new_native());
        let plaintext = decrypt_lwe_ciphertext(&self.key.as_lwe_secret_key(), &lwe);
        Ok(encoding.decode(plaintext.0, weight_frac_bits))
    }

    fn check_parameters(&self, other: &GlweParameters) -> Result<(), HeError> {
        if *other != self.params {
            return Err(HeError::Incompatible(format!(
                "got {} in the ciphertext, and {} in the key",
                other.describe(),
                self.params.describe()
            )));
        }
        Ok(())
    }
}

/// A seeded (compressed) GLWE encryption of a vector: only the bodies and the mask seed, what a client
/// uploads. Decompress with [`SeededGlweVector::decompress`] to compute on it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeededGlweVector {
    params: GlweParameters,
    scale_bits: u32,
    noise_bits: u32,
    value_count: usize,
    seed: u128,
    bodies: Vec<u64>,
}

impl SeededGlweVector {
    /// Number of encrypted values.
    pub fn value_count(&self) -> usize {
        self.value_count
    }

    /// Serialises to the documented wire format ([`GlweParameters::seeded_bytes`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.params.seeded_bytes(self.value_count));
        write_header(
            &mut out,
            KIND_SEEDED,
            &self.params,
            self.scale_bits,
            self.noise_bits,
            self.value_count,
            1,
        );
        out.extend_from_slice(&self.seed.to_le_bytes());
        for v in &self.bodies {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses the wire format, checking it against `params`; truncated or inconsistent bytes give
    /// [`HeError::Decoding`].
    pub fn from_bytes(bytes: &[u8], params: &GlweParameters) -> Result<Self, HeError> {
        let mut reader = Reader::new(bytes, "a seeded GLWE vector");
        let header = read_header(&mut reader, KIND_SEEDED, params)?;
        if header.weight != 1 {
            return Err(reader.error(format!(
                "got weight {} in a seeded vector, and 1 expected (a fresh encryption)",
                header.weight
            )));
        }
        let seed = u128::from_le_bytes(reader.array::<16>("the compression seed")?);
        let words = reader.product(&[header.ciphertexts, params.polynomial_size])?;
        let bodies = reader.words(words, "the ciphertext bodies")?;
        reader.finish()?;
        Ok(Self {
            params: *params,
            scale_bits: header.scale_bits,
            noise_bits: header.noise_bits,
            value_count: header.value_count,
            seed,
            bodies,
        })
    }

    /// Regenerates the masks from the seed: the full ciphertexts the server computes on (weight 1).
    pub fn decompress(&self) -> GlweVector {
        let n = self.params.polynomial_size;
        let seeded = SeededGlweCiphertextList::from_container(
            &self.bodies[..],
            self.params.glwe_size(),
            PolynomialSize(n),
            Seed(self.seed).into(),
            CiphertextModulus::new_native(),
        );
        let count = self.bodies.len() / n;
        let mut data = vec![0u64; count * (self.params.glwe_dimension + 1) * n];
        if count > 0 {
            let mut list = GlweCiphertextList::from_container(
                &mut data[..],
                self.params.glwe_size(),
                PolynomialSize(n),
                CiphertextModulus::new_native(),
            );
            decompress_seeded_glwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(
                &mut list, &seeded,
            );
        }
        GlweVector {
            params: self.params,
            scale_bits: self.scale_bits,
            noise_bits: self.noise_bits,
            value_count: self.value_count,
            weight: 1,
            data,
        }
    }
}

/// A full GLWE encryption of a vector (masks and bodies): what the server adds and scales, and the
/// aggregate it sends back. `weight` tracks the total integer weight of the combination it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GlweVector {
    params: GlweParameters,
    scale_bits: u32,
    noise_bits: u32,
    value_count: usize,
    weight: u64,
    data: Vec<u64>,
}

impl GlweVector {
    /// Number of encrypted values.
    pub fn value_count(&self) -> usize {
        self.value_count
    }

    /// Total integer weight of the combination (1 for a fresh ciphertext, K after adding K).
    pub fn weight(&self) -> u64 {
        self.weight
    }

    fn as_list(&self) -> GlweCiphertextList<&[u64]> {
        GlweCiphertextList::from_container(
            &self.data[..],
            self.params.glwe_size(),
            PolynomialSize(self.params.polynomial_size),
            CiphertextModulus::new_native(),
        )
    }

    fn as_mut_list(&mut self) -> GlweCiphertextList<&mut [u64]> {
        GlweCiphertextList::from_container(
            &mut self.data[..],
            self.params.glwe_size(),
            PolynomialSize(self.params.polynomial_size),
            CiphertextModulus::new_native(),
        )
    }

    /// Adds `other` (same parameters, encoding and length) ciphertext by ciphertext.
    pub fn add_assign(&mut self, other: &GlweVector) -> Result<(), HeError> {
        let mismatch = |what: &str, a: String, b: String| {
            HeError::Incompatible(format!(
                "got {what} {a} in the left ciphertext, and {b} in the right one"
            ))
        };
        if self.params != other.params {
            return Err(mismatch(
                "parameters",
                self.params.describe(),
                other.params.describe(),
            ));
        }
        if (self.scale_bits, self.noise_bits) != (other.scale_bits, other.noise_bits) {
            return Err(mismatch(
                "encoding (scale bits, noise bits)",
                format!("({}, {})", self.scale_bits, self.noise_bits),
                format!("({}, {})", other.scale_bits, other.noise_bits),
            ));
        }
        if self.value_count != other.value_count {
            return Err(mismatch(
                "value count",
                self.value_count.to_string(),
                other.value_count.to_string(),
            ));
        }
        let weight = self.weight.checked_add(other.weight).ok_or_else(|| {
            mismatch(
                "weight (overflowing u64)",
                self.weight.to_string(),
                other.weight.to_string(),
            )
        })?;
        let rhs = other.as_list();
        let mut lhs = self.as_mut_list();
        for (mut l, r) in lhs.iter_mut().zip(rhs.iter()) {
            glwe_ciphertext_add_assign(&mut l, &r);
        }
        self.weight = weight;
        Ok(())
    }

    /// Multiplies every encrypted value by the integer `factor` (e.g. a client's sample count).
    pub fn mul_scalar_assign(&mut self, factor: u64) -> Result<(), HeError> {
        self.weight = self.weight.checked_mul(factor).ok_or_else(|| {
            HeError::Incompatible(format!(
                "got weight {} in the ciphertext, and factor {factor}: the product overflows u64",
                self.weight
            ))
        })?;
        for mut ct in self.as_mut_list().iter_mut() {
            glwe_ciphertext_cleartext_mul_assign(&mut ct, Cleartext(factor));
        }
        Ok(())
    }

    /// Encrypted dot product <`weights`, x> with integer weights (one per encrypted value): multiplies
    /// each ciphertext by the plaintext polynomial holding its slice of `weights` reversed, so the
    /// negacyclic product puts the dot product in coefficient N - 1, sums over ciphertexts, and extracts
    /// only that coefficient as an LWE ciphertext (the other coefficients hold other weight combinations
    /// and are never returned). Cost: (k + 1) Karatsuba products of size N per ciphertext.
    pub fn dot_plaintext(&self, weights: &[i64]) -> Result<EncryptedDot, HeError> {
        if weights.len() != self.value_count {
            return Err(HeError::Incompatible(format!(
                "got {} weights in the plaintext row, and {} values in the ciphertext",
                weights.len(),
                self.value_count
            )));
        }
        let l1 = weights
            .iter()
            .try_fold(0u64, |acc, w| acc.checked_add(w.unsigned_abs()))
            .and_then(|l1| l1.checked_mul(self.weight))
            .ok_or_else(|| {
                HeError::Incompatible(format!(
                    "got weights whose L1 norm times the ciphertext weight {} overflows u64",
                    self.weight
                ))
            })?;
        let n = self.params.polynomial_size;
        let glwe_size = self.params.glwe_size();
        let mut acc = GlweCiphertext::new(
            0u64,
            glwe_size,
            PolynomialSize(n),
            CiphertextModulus::new_native(),
        );
        let mut reversed = Polynomial::new(0u64, PolynomialSize(n));
        for (ct, row) in self.as_list().iter().zip(weights.chunks(n)) {
            reversed.as_mut().fill(0);
            for (i, &w) in row.iter().enumerate() {
                reversed.as_mut()[n - 1 - i] = w as u64;
            }
            let mut acc_polys = acc.as_mut_polynomial_list();
            for (mut out, poly) in acc_polys.iter_mut().zip(ct.as_polynomial_list().iter()) {
                polynomial_wrapping_add_mul_assign(&mut out, &poly, &reversed);
            }
        }
        let lwe_size = GlweDimension(self.params.glwe_dimension)
            .to_equivalent_lwe_dimension(PolynomialSize(n))
            .to_lwe_size();
        let mut lwe = LweCiphertext::new(0u64, lwe_size, CiphertextModulus::new_native());
        extract_lwe_sample_from_glwe_ciphertext(&acc, &mut lwe, MonomialDegree(n - 1));
        Ok(EncryptedDot {
            params: self.params,
            scale_bits: self.scale_bits,
            noise_bits: self.noise_bits,
            weight: l1,
            data: lwe.into_container(),
        })
    }

    /// Serialises to the documented wire format ([`GlweParameters::full_bytes`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.params.full_bytes(self.value_count));
        write_header(
            &mut out,
            KIND_FULL,
            &self.params,
            self.scale_bits,
            self.noise_bits,
            self.value_count,
            self.weight,
        );
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses the wire format, checking it against `params`; truncated or inconsistent bytes give
    /// [`HeError::Decoding`].
    pub fn from_bytes(bytes: &[u8], params: &GlweParameters) -> Result<Self, HeError> {
        let mut reader = Reader::new(bytes, "a GLWE vector");
        let header = read_header(&mut reader, KIND_FULL, params)?;
        let words = reader.product(&[
            header.ciphertexts,
            params.glwe_dimension + 1,
            params.polynomial_size,
        ])?;
        let data = reader.words(words, "the ciphertexts")?;
        reader.finish()?;
        Ok(Self {
            params: *params,
            scale_bits: header.scale_bits,
            noise_bits: header.noise_bits,
            value_count: header.value_count,
            weight: header.weight,
            data,
        })
    }
}

/// An encrypted dot product: one LWE ciphertext (dimension k * N) extracted from a plaintext-polynomial
/// product, decrypted by [`GlweKey::decrypt_dot`].
#[derive(Debug, Clone, PartialEq)]
pub struct EncryptedDot {
    params: GlweParameters,
    scale_bits: u32,
    noise_bits: u32,
    weight: u64,
    data: Vec<u64>,
}

impl EncryptedDot {
    /// The L1 norm of the integer weights times the input's weight: must not exceed the headroom.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// Bytes of the LWE ciphertext ((k * N + 1) u64).
    pub fn byte_len(&self) -> usize {
        8 * self.data.len()
    }
}

fn write_header(
    out: &mut Vec<u8>,
    kind: u8,
    params: &GlweParameters,
    scale_bits: u32,
    noise_bits: u32,
    value_count: usize,
    weight: u64,
) {
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    // Both are below 64 by construction of `FixedPoint`.
    out.push(scale_bits as u8);
    out.push(noise_bits as u8);
    out.extend_from_slice(&(params.polynomial_size as u32).to_le_bytes());
    out.extend_from_slice(&(params.glwe_dimension as u32).to_le_bytes());
    out.extend_from_slice(&(params.ciphertext_count(value_count) as u32).to_le_bytes());
    out.extend_from_slice(&(value_count as u64).to_le_bytes());
    out.extend_from_slice(&weight.to_le_bytes());
}

struct Header {
    scale_bits: u32,
    noise_bits: u32,
    ciphertexts: usize,
    value_count: usize,
    weight: u64,
}

fn read_header(
    reader: &mut Reader<'_>,
    kind: u8,
    params: &GlweParameters,
) -> Result<Header, HeError> {
    let magic = reader.array::<4>("the magic")?;
    if &magic != MAGIC {
        return Err(reader.error(format!(
            "got magic {magic:?} in the bytes, and {MAGIC:?} expected"
        )));
    }
    let [version] = reader.array::<1>("the version")?;
    if version != VERSION {
        return Err(reader.error(format!(
            "got version {version} in the bytes, and {VERSION} supported"
        )));
    }
    let [found_kind] = reader.array::<1>("the kind")?;
    if found_kind != kind {
        return Err(reader.error(format!(
            "got kind {found_kind} in the bytes, and {kind} expected (1 = seeded, 2 = full)"
        )));
    }
    let [scale_bits, noise_bits] = reader.array::<2>("the encoding")?;
    if scale_bits >= 64 || noise_bits >= 64 {
        return Err(reader.error(format!(
            "got scale bits {scale_bits} and noise bits {noise_bits}, and both must be below 64"
        )));
    }
    let n = u32::from_le_bytes(reader.array::<4>("the polynomial size")?) as usize;
    let k = u32::from_le_bytes(reader.array::<4>("the GLWE dimension")?) as usize;
    if (n, k) != (params.polynomial_size, params.glwe_dimension) {
        return Err(reader.error(format!(
            "got N={n}, k={k} in the bytes, and N={}, k={} in the parameters",
            params.polynomial_size, params.glwe_dimension
        )));
    }
    let ciphertexts = u32::from_le_bytes(reader.array::<4>("the ciphertext count")?) as usize;
    let value_count = u64::from_le_bytes(reader.array::<8>("the value count")?);
    let value_count = usize::try_from(value_count)
        .map_err(|_| reader.error(format!("value count {value_count} does not fit in memory")))?;
    if ciphertexts != params.ciphertext_count(value_count) {
        return Err(reader.error(format!(
            "got {ciphertexts} ciphertexts in the bytes, and {} needed for {value_count} values",
            params.ciphertext_count(value_count)
        )));
    }
    let weight = u64::from_le_bytes(reader.array::<8>("the weight")?);
    Ok(Header {
        scale_bits: scale_bits as u32,
        noise_bits: noise_bits as u32,
        ciphertexts,
        value_count,
        weight,
    })
}

/// A bounds-checked little-endian reader over wire bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, at: 0, what }
    }

    fn error(&self, reason: String) -> HeError {
        HeError::Decoding {
            what: self.what.to_string(),
            reason,
        }
    }

    fn take(&mut self, len: usize, field: &str) -> Result<&'a [u8], HeError> {
        let end = self.at.checked_add(len).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Ok(slice)
            }
            None => Err(self.error(format!(
                "truncated: got {} bytes in the input, and {} needed to read {field} at offset {}",
                self.bytes.len(),
                self.at as u128 + len as u128,
                self.at
            ))),
        }
    }

    fn product(&self, factors: &[usize]) -> Result<usize, HeError> {
        factors
            .iter()
            .try_fold(1usize, |acc, &f| acc.checked_mul(f))
            .ok_or_else(|| self.error(format!("sizes {factors:?} overflow")))
    }

    fn array<const L: usize>(&mut self, field: &str) -> Result<[u8; L], HeError> {
        let mut out = [0u8; L];
        out.copy_from_slice(self.take(L, field)?);
        Ok(out)
    }

    fn words(&mut self, count: usize, field: &str) -> Result<Vec<u64>, HeError> {
        let len = count
            .checked_mul(8)
            .ok_or_else(|| self.error(format!("{field}: {count} words overflow")))?;
        let bytes = self.take(len, field)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let mut word = [0u8; 8];
                word.copy_from_slice(c);
                u64::from_le_bytes(word)
            })
            .collect())
    }

    fn finish(&self) -> Result<(), HeError> {
        if self.at != self.bytes.len() {
            return Err(self.error(format!(
                "got {} bytes in the input, and {} expected ({} trailing)",
                self.bytes.len(),
                self.at,
                self.bytes.len() - self.at
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GlweParameters {
        GlweParameters::tfhe_128bit()
    }

    fn values(len: usize, amplitude: f64, phase: f64) -> Vec<f64> {
        (0..len)
            .map(|i| amplitude * ((i as f64) * 0.37 + phase).sin())
            .collect()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn parameters_describe_tfhe_set() {
        assert_eq!(
            params().describe(),
            "GLWE N=2048, k=1, TUniform(2^17), q=2^64, 128-bit security (tfhe-rs parameter set)"
        );
    }

    #[test]
    fn round_trip_within_stated_error() {
        let p = params();
        let key = GlweKey::generate(p, 7).unwrap();
        let enc = FixedPoint::new(&p, 64.0, 1).unwrap();
        let x = values(3000, 50.0, 0.1); // two ciphertexts, the second partly padding
        let ct = key.encrypt_seeded(&enc, "x", &x, 11).unwrap();
        let bytes = ct.to_bytes();
        assert_eq!(bytes.len(), p.seeded_bytes(x.len()));
        let back = SeededGlweVector::from_bytes(&bytes, &p).unwrap();
        assert_eq!(back, ct);
        let decrypted = key.decrypt(&back.decompress(), &enc).unwrap();
        assert_eq!(decrypted.len(), x.len());
        let err = max_diff(&decrypted, &x);
        assert!(
            err <= enc.max_error(&p, 1),
            "{err} > {}",
            enc.max_error(&p, 1)
        );
        assert!(enc.max_error(&p, 1) < 1e-9, "{}", enc.max_error(&p, 1));
    }

    #[test]
    fn three_clients_sum_and_weighted_sum() {
        let p = params();
        let key = GlweKey::generate(p, 1).unwrap();
        let enc = FixedPoint::new(&p, 8.0, 64).unwrap();
        let xs: Vec<Vec<f64>> = (0..3).map(|c| values(768, 7.5, c as f64)).collect();
        let cts: Vec<GlweVector> = xs
            .iter()
            .enumerate()
            .map(|(c, x)| {
                let bytes = key
                    .encrypt_seeded(&enc, "x", x, 100 + c as u128)
                    .unwrap()
                    .to_bytes();
                SeededGlweVector::from_bytes(&bytes, &p)
                    .unwrap()
                    .decompress()
            })
            .collect();
        let mut sum = cts[0].clone();
        sum.add_assign(&cts[1]).unwrap();
        sum.add_assign(&cts[2]).unwrap();
        assert_eq!(sum.weight(), 3);
        let aggregate = GlweVector::from_bytes(&sum.to_bytes(), &p).unwrap();
        assert_eq!(sum.to_bytes().len(), p.full_bytes(768));
        let plain: Vec<f64> = (0..768).map(|i| xs.iter().map(|x| x[i]).sum()).collect();
        let err = max_diff(&key.decrypt(&aggregate, &enc).unwrap(), &plain);
        assert!(err <= enc.max_error(&p, 3), "{err}");

        // Weighted by integer sample counts 5, 20, 39 (total 64 = the headroom).
        let weights = [5u64, 20, 39];
        let mut acc: Option<GlweVector> = None;
        for (ct, &w) in cts.iter().zip(&weights) {
            let mut ct = ct.clone();
            ct.mul_scalar_assign(w).unwrap();
            match acc.as_mut() {
                Some(a) => a.add_assign(&ct).unwrap(),
                None => acc = Some(ct),
            }
        }
        let acc = acc.unwrap();
        assert_eq!(acc.weight(), 64);
        let plain: Vec<f64> = (0..768)
            .map(|i| (0..3).map(|c| weights[c] as f64 * xs[c][i]).sum())
            .collect();
        let err = max_diff(&key.decrypt(&acc, &enc).unwrap(), &plain);
        assert!(err <= enc.max_error(&p, 64), "{err}");
        // One more unit of weight is beyond the headroom and refused.
        let mut over = acc.clone();
        over.add_assign(&cts[0]).unwrap();
        assert!(matches!(
            key.decrypt(&over, &enc),
            Err(HeError::Incompatible(_))
        ));
    }

    #[test]
    fn wrong_key_decrypts_to_garbage() {
        let p = params();
        let key = GlweKey::generate(p, 1).unwrap();
        let other = GlweKey::generate(p, 2).unwrap();
        let enc = FixedPoint::new(&p, 1.0, 1).unwrap();
        let x = values(768, 0.9, 0.0);
        let ct = key.encrypt_seeded(&enc, "x", &x, 5).unwrap().decompress();
        let garbage = other.decrypt(&ct, &enc).unwrap();
        let err = max_diff(&garbage, &x);
        assert!(err > 1e6 * enc.max_error(&p, 1), "{err}");
        // Wrong-key plaintexts are uniform on the torus: decoded values spread over the whole
        // representable range (about +-2 * headroom * max_abs), far from the inputs on average.
        let mean_err = garbage
            .iter()
            .zip(&x)
            .map(|(g, v)| (g - v).abs())
            .sum::<f64>()
            / 768.0;
        assert!(mean_err > 0.25 * enc.max_abs(), "{mean_err}");
    }

    #[test]
    fn truncated_or_corrupt_bytes_are_decoding_errors() {
        let p = params();
        let key = GlweKey::generate(p, 3).unwrap();
        let enc = FixedPoint::new(&p, 1.0, 4).unwrap();
        let bytes = key
            .encrypt_seeded(&enc, "x", &values(10, 0.5, 0.0), 9)
            .unwrap()
            .to_bytes();
        for len in [0, 3, 20, 51, bytes.len() - 1] {
            assert!(
                matches!(
                    SeededGlweVector::from_bytes(&bytes[..len], &p),
                    Err(HeError::Decoding { .. })
                ),
                "{len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            SeededGlweVector::from_bytes(&longer, &p),
            Err(HeError::Decoding { .. })
        ));
        let mut bad_magic = bytes.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            SeededGlweVector::from_bytes(&bad_magic, &p),
            Err(HeError::Decoding { .. })
        ));
        // A huge claimed value count is refused before allocating.
        let mut huge = bytes.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[20..28].copy_from_slice(&(u32::MAX as u64 * 2048).to_le_bytes());
        assert!(matches!(
            SeededGlweVector::from_bytes(&huge, &p),
            Err(HeError::Decoding { .. })
        ));
        // Seeded bytes are not full bytes.
        assert!(matches!(
            GlweVector::from_bytes(&bytes, &p),
            Err(HeError::Decoding { .. })
        ));
    }

    #[test]
    fn seeded_size_for_768_values() {
        let p = params();
        // header 36 + seed 16 + one body polynomial of 2048 u64.
        assert_eq!(p.seeded_bytes(768), 36 + 16 + 2048 * 8);
        assert_eq!(p.seeded_bytes(768), 16_436);
        assert_eq!(p.full_bytes(768), 36 + 2 * 2048 * 8);
        let key = GlweKey::generate(p, 0).unwrap();
        let enc = FixedPoint::new(&p, 64.0, 10).unwrap();
        let ct = key
            .encrypt_seeded(&enc, "x", &values(768, 1.0, 0.0), 1)
            .unwrap();
        assert_eq!(ct.to_bytes().len(), 16_436);
        assert_eq!(ct.decompress().to_bytes().len(), 32_804);
    }

    #[test]
    fn out_of_range_values_are_named() {
        let p = params();
        let key = GlweKey::generate(p, 0).unwrap();
        let enc = FixedPoint::new(&p, 2.0, 1).unwrap();
        let err = key
            .encrypt_seeded(&enc, "layer.w", &[0.0, 2.5], 1)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("layer.w (value 1)") && msg.contains("2.5"),
            "{msg}"
        );
        assert!(key.encrypt_seeded(&enc, "y", &[f64::NAN], 1).is_err());
        assert!(FixedPoint::new(&p, 0.0, 1).is_err());
        assert!(FixedPoint::new(&p, 1.0, 0).is_err());
        assert!(FixedPoint::new(&p, 1e30, 1 << 40).is_err());
    }

    #[test]
    fn encrypted_dot_product_matches_plaintext() {
        let p = params();
        let key = GlweKey::generate(p, 4).unwrap();
        let len = 2100; // spans two ciphertexts
        let x = values(len, 3.0, 0.3);
        let w = values(len, 0.25, 1.7);
        let frac_bits = 10;
        let wq = quantize_weights("row 0", &w, frac_bits).unwrap();
        let l1: u64 = wq.iter().map(|v| v.unsigned_abs()).sum();
        let enc = FixedPoint::new(&p, 4.0, l1).unwrap();
        let ct = key.encrypt_seeded(&enc, "x", &x, 77).unwrap().decompress();
        let dot = ct.dot_plaintext(&wq).unwrap();
        assert_eq!(dot.weight(), l1);
        assert_eq!(dot.byte_len(), 8 * (2048 + 1));
        let got = key.decrypt_dot(&dot, &enc, frac_bits).unwrap();
        // Against the quantised weights: the stated encryption error.
        let exact_q: f64 = x
            .iter()
            .zip(&wq)
            .map(|(a, &b)| a * b as f64 / 2f64.powi(frac_bits as i32))
            .sum();
        let bound = enc.max_error(&p, l1) / 2f64.powi(frac_bits as i32);
        assert!(
            (got - exact_q).abs() <= bound,
            "{got} vs {exact_q}, bound {bound}"
        );
        // Against the real weights: plus the weight quantisation.
        let exact: f64 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((got - exact).abs() < 0.05, "{got} vs {exact}");
        // The wrong length is refused, naming both sides.
        let err = ct.dot_plaintext(&wq[1..]).unwrap_err().to_string();
        assert!(
            err.contains("2099 weights") && err.contains("2100 values"),
            "{err}"
        );
    }
}
