//! Packed Paillier encryption of real-valued vectors, over `fast-paillier` (pure-Rust num-bigint backend).
//!
//! # Keys
//! [`PaillierKeyPair::generate`] draws two primes of `key_bits / 2` bits each with their two top bits set,
//! so the modulus `n = p q` has exactly `key_bits` bits; 3072 bits by default (~128-bit security, NIST
//! SP 800-57 Part 1 Table 2), 2048 at the least (~112-bit). The primes are ordinary (not safe) primes:
//! Paillier needs only `gcd(n, (p-1)(q-1)) = 1`, which equal-length primes guarantee; fast-paillier's own
//! generator insists on safe primes (for its zero-knowledge proofs) and is far slower. Generation is
//! deterministic from a `u64` seed (fedleak reproduces runs from `--seed`): the key of a simulation is
//! therefore only as secret as the seed. A deployment must seed from the operating system.
//!
//! # Fixed-point encoding, headroom and packing ([`SlotLayout`])
//! With `f` fraction bits and a bound `max_abs`:
//! - `m` is the smallest integer with `max_abs * 2^f <= 2^m`, the offset is `2^m`;
//! - a value `x` with `|x| <= max_abs` becomes `e = round(x * 2^f) + 2^m`, an integer in `[0, 2^(m+1)]`
//!   (`m + 2` bits); the rounding error is at most `2^-(f+1)`, the resolution `2^-f`;
//! - the ciphertexts of several uploads may be multiplied by public integer weights `w_k` and added:
//!   a slot then holds `sum_k w_k e_k <= W * 2^(m+1)` with `W = sum_k w_k`. The **headroom rule**: a slot
//!   has `b = (m + 2) + h` bits with `h = ceil(log2 W_max)`, so any sum with `W <= W_max` stays below `2^b`
//!   and never carries into the next slot (a plain sum of `K` clients is `W = K`);
//! - the decoder subtracts `W * 2^m` and divides by `2^f`, giving `sum_k w_k x_k` within `W * 2^-(f+1)`;
//! - packed, a plaintext holds `s = floor((key_bits - 2) / b)` slots (slot `i` at bits `[i b, (i+1) b)`),
//!   so a packed plaintext stays below `2^(key_bits - 2) <= n / 2`, inside fast-paillier's plaintext range;
//!   unpacked ([`Packing::OnePerCiphertext`]), one slot per plaintext, for comparison.
//!
//! With the defaults (`f = 32`, `max_abs = 64`, `W_max = 65536`) a slot has `38 + 2 + 16 = 56` bits and
//! a 3072-bit plaintext holds 54 values at a resolution of `2^-32 ~ 2.3e-10`.
//!
//! # Wire format ([`CiphertextVector::to_bytes`])
//! Big-endian throughout. A 42-byte header, then every ciphertext as an integer modulo `n^2` in exactly
//! `2 * key_bits / 8` bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `FLPC` |
//! | 1 | version (1) |
//! | 1 | packing: 0 one value per ciphertext, 1 packed |
//! | 2 | modulus bits |
//! | 8 | key id: the low 64 bits of `n` (catches ciphertexts of different keys) |
//! | 1 | fraction bits `f` |
//! | 1 | magnitude bits `m` (offset `2^m`) |
//! | 1 | headroom bits `h` |
//! | 1 | slot bits `b` |
//! | 2 | slots per ciphertext |
//! | 8 | weight sum `W` applied so far (1 for a fresh encryption) |
//! | 8 | number of values |
//! | 4 | number of ciphertexts |
//!
//! The public key (`n`, [`PaillierPublicKey::to_bytes`]) is sent once: 8 header bytes plus `key_bits / 8`.

use std::cmp::Ordering;

use fast_paillier::backend::{Integer, IsPrime};
use fast_paillier::{AnyEncryptionKey, DecryptionKey, EncryptionKey};
use rand::rngs::StdRng;
use rand::{CryptoRng, RngCore, SeedableRng};
use rayon::prelude::*;

use super::HeError;

/// Default modulus size in bits (~128-bit security).
pub const DEFAULT_KEY_BITS: u32 = 3072;
/// Smallest modulus accepted outside tests (~112-bit security).
pub const MIN_KEY_BITS: u32 = 2048;
/// Length in bytes of the header of [`CiphertextVector::to_bytes`].
pub const CIPHERTEXT_HEADER_BYTES: usize = 42;
/// Length in bytes of the header of [`PaillierPublicKey::to_bytes`].
pub const PUBLIC_KEY_HEADER_BYTES: usize = 8;

const CT_MAGIC: &[u8; 4] = b"FLPC";
const PK_MAGIC: &[u8; 4] = b"FLPK";
const VERSION: u8 = 1;
/// Largest modulus the wire format (2-byte field) and this module accept.
const MAX_KEY_BITS: u32 = 16384;
/// Small primes used to sieve prime candidates before the probabilistic test.
const SIEVE_LIMIT: u32 = 4096;

/// Approximate symmetric-equivalent security of an RSA/Paillier modulus (NIST SP 800-57 Part 1 Table 2).
pub fn security_bits(key_bits: u32) -> u32 {
    match key_bits {
        15360.. => 256,
        7680.. => 192,
        3072.. => 128,
        2048.. => 112,
        1024.. => 80,
        _ => 0,
    }
}

/// Adapts a rand 0.9 generator to the rand_core 0.6 traits fast-paillier takes.
struct Rng06<'a, R>(&'a mut R);

impl<R: RngCore> rand_core_06::RngCore for Rng06<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core_06::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl<R: RngCore + CryptoRng> rand_core_06::CryptoRng for Rng06<'_, R> {}

fn backend(what: &str, e: fast_paillier::Error) -> HeError {
    HeError::Backend(format!("{what}: {e}"))
}

fn u64_to_integer(v: u64) -> Integer {
    Integer::from_bytes_msf(&v.to_be_bytes())
}

/// The low 64 bits of `n`, a fingerprint that tells keys apart on the wire.
fn key_id(n: &Integer) -> u64 {
    let bytes = n.to_bytes_msf();
    let mut low = [0u8; 8];
    let take = bytes.len().min(8);
    low[8 - take..].copy_from_slice(&bytes[bytes.len() - take..]);
    u64::from_be_bytes(low)
}

fn small_primes() -> Vec<u32> {
    let limit = SIEVE_LIMIT as usize;
    let mut composite = vec![false; limit];
    let mut primes = Vec::new();
    for i in 2..limit {
        if !composite[i] {
            primes.push(i as u32);
            let mut j = i * i;
            while j < limit {
                composite[j] = true;
                j += i;
            }
        }
    }
    primes
}

/// A random prime of exactly `bits` bits whose two top bits are set (so two of them multiply to
/// exactly `2 * bits` bits): random odd candidates, sieved by small primes, then glass_pumpkin's
/// Miller-Rabin + Lucas test (via fast-paillier).
fn generate_prime<R: RngCore>(rng: &mut R, bits: u32, sieve: &[u32]) -> Integer {
    let mut rng = Rng06(rng);
    loop {
        let mut x = Integer::random_bits(bits, &mut rng);
        x.set_bit(bits - 1, true);
        x.set_bit(bits - 2, true);
        x.set_bit(0, true);
        if sieve.iter().any(|&p| x.mod_u(p) == 0) {
            continue;
        }
        if matches!(
            x.is_probably_prime(25, &mut rng),
            IsPrime::Yes | IsPrime::Probably
        ) {
            return x;
        }
    }
}

/// A Paillier key pair (the secret key, with CRT precomputation, and its public key).
///
/// In the secure-aggregation scheme the clients hold it; the server holds only [`PaillierPublicKey`].
#[derive(Clone)]
pub struct PaillierKeyPair {
    dk: DecryptionKey,
    public: PaillierPublicKey,
}

impl std::fmt::Debug for PaillierKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaillierKeyPair")
            .field("key_bits", &self.public.key_bits)
            .finish_non_exhaustive()
    }
}

impl PaillierKeyPair {
    /// Generates a key with a `key_bits`-bit modulus, deterministically from `seed`.
    ///
    /// `key_bits` must be a multiple of 16 in `[MIN_KEY_BITS, 16384]` (see the module documentation
    /// for the security levels); smaller keys are refused with [`HeError::Encoding`].
    pub fn generate(key_bits: u32, seed: u64) -> Result<Self, HeError> {
        if key_bits < MIN_KEY_BITS {
            return Err(HeError::Encoding {
                what: format!("a {key_bits}-bit Paillier key"),
                reason: format!(
                    "moduli below {MIN_KEY_BITS} bits are insecure (NIST SP 800-57 gives {} bits of \
                     security); use 3072 (the default) or 2048",
                    security_bits(key_bits)
                ),
            });
        }
        Self::generate_unchecked(key_bits, seed)
    }

    /// Generates a key of any size from 256 bits up, for tests only: keys below [`MIN_KEY_BITS`] are
    /// breakable.
    #[cfg(test)]
    pub(crate) fn generate_insecure_for_tests(key_bits: u32, seed: u64) -> Result<Self, HeError> {
        Self::generate_unchecked(key_bits, seed)
    }

    fn generate_unchecked(key_bits: u32, seed: u64) -> Result<Self, HeError> {
        if !(256..=MAX_KEY_BITS).contains(&key_bits) || key_bits % 16 != 0 {
            return Err(HeError::Encoding {
                what: format!("a {key_bits}-bit Paillier key"),
                reason: format!(
                    "the modulus size must be a multiple of 16 in [256, {MAX_KEY_BITS}]"
                ),
            });
        }
        // Domain-separate from the other users of the run seed.
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5041_4949_4c4c_4945);
        let sieve = small_primes();
        let half = key_bits / 2;
        let p = generate_prime(&mut rng, half, &sieve);
        let q = loop {
            let q = generate_prime(&mut rng, half, &sieve);
            if q != p {
                break q;
            }
        };
        Self::from_primes(p, q)
    }

    /// Builds the key pair of two distinct primes of equal length (the modulus length must be a
    /// multiple of 8 bits). Used for keys stored elsewhere; does not check primality.
    pub fn from_primes(p: Integer, q: Integer) -> Result<Self, HeError> {
        let n_bits = (&p * &q).significant_bits();
        if p.significant_bits() != q.significant_bits() || n_bits % 8 != 0 {
            return Err(HeError::Encoding {
                what: "a Paillier key from primes".into(),
                reason: format!(
                    "p ({} bits) and q ({} bits) must have equal length and a product of a whole \
                     number of bytes ({n_bits} bits)",
                    p.significant_bits(),
                    q.significant_bits()
                ),
            });
        }
        let dk = DecryptionKey::from_primes(p, q).map_err(|e| backend("key construction", e))?;
        let public = PaillierPublicKey::from_n(dk.n().clone())?;
        Ok(Self { dk, public })
    }

    /// The public key (what the server holds).
    pub fn public_key(&self) -> &PaillierPublicKey {
        &self.public
    }

    /// Modulus length in bits.
    pub fn key_bits(&self) -> u32 {
        self.public.key_bits
    }

    /// The secret primes `(p, q)`, e.g. to store a key for tests.
    pub fn primes(&self) -> (&Integer, &Integer) {
        (self.dk.p(), self.dk.q())
    }

    /// Encrypts `values` like [`PaillierPublicKey::encrypt`] but faster (CRT exponentiation with the
    /// factorisation of `n`): for parties that hold the secret key, such as the clients of
    /// [`crate::schemes`]' Paillier aggregation. The ciphertexts are indistinguishable from the public
    /// key's.
    pub fn encrypt<R: RngCore + CryptoRng>(
        &self,
        layout: &SlotLayout,
        values: &[f64],
        rng: &mut R,
    ) -> Result<CiphertextVector, HeError> {
        encrypt_with(&self.dk, &self.public, layout, values, rng)
    }

    /// Decrypts and unpacks: for every value index, `sum_k w_k x_k` (the weighted sum of what was
    /// encrypted, `W = sum_k w_k` being [`CiphertextVector::weight_sum`]), within `W * 2^-(f+1)`.
    pub fn decrypt(&self, ct: &CiphertextVector) -> Result<Vec<f64>, HeError> {
        self.public.check_key(ct)?;
        let layout = &ct.layout;
        let per = layout.slots_per_ciphertext();
        let plaintexts = ct
            .ciphertexts
            .par_iter()
            .map(|c| self.dk.decrypt(c).map_err(|e| backend("decryption", e)))
            .collect::<Result<Vec<_>, HeError>>()?;
        let scale = (-(layout.fraction_bits as f64)).exp2();
        let offset = (ct.weight_sum as i128) << layout.magnitude_bits;
        let mut out = Vec::with_capacity(ct.len);
        for (i, plain) in plaintexts.iter().enumerate() {
            let take = per.min(ct.len - i * per);
            let slots = unpack_slots(plain, layout.slot_bits, per, take).ok_or_else(|| {
                HeError::Decoding {
                    what: format!("plaintext {i} of {}", ct.ciphertexts.len()),
                    reason: "it does not fit the slot layout (wrong key, or a sum beyond the \
                             layout's headroom)"
                        .into(),
                }
            })?;
            out.extend(
                slots
                    .into_iter()
                    .map(|s| (s as i128 - offset) as f64 * scale),
            );
        }
        Ok(out)
    }
}

/// A Paillier public key: the modulus `n`.
#[derive(Debug, Clone)]
pub struct PaillierPublicKey {
    ek: EncryptionKey,
    key_bits: u32,
    key_id: u64,
}

impl PaillierPublicKey {
    fn from_n(n: Integer) -> Result<Self, HeError> {
        let bits = n.significant_bits();
        if n.cmp0() != Ordering::Greater
            || bits % 8 != 0
            || bits > MAX_KEY_BITS as u64
            || n.is_even()
        {
            return Err(HeError::Decoding {
                what: "a Paillier public key".into(),
                reason: format!(
                    "the modulus must be odd, positive, a whole number of bytes and at most \
                     {MAX_KEY_BITS} bits (got {bits} bits)"
                ),
            });
        }
        Ok(Self {
            key_id: key_id(&n),
            ek: EncryptionKey::from_n(n),
            key_bits: bits as u32,
        })
    }

    /// Modulus length in bits.
    pub fn key_bits(&self) -> u32 {
        self.key_bits
    }

    /// The one-time wire form: magic `FLPK`, version, 1 reserved byte, modulus bits (u16), then `n`
    /// big-endian in `key_bits / 8` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let width = self.key_bits as usize / 8;
        let mut out = Vec::with_capacity(PUBLIC_KEY_HEADER_BYTES + width);
        out.extend_from_slice(PK_MAGIC);
        out.push(VERSION);
        out.push(0);
        out.extend_from_slice(&(self.key_bits as u16).to_be_bytes());
        push_fixed(&mut out, self.ek.n(), width);
        out
    }

    /// Parses [`PaillierPublicKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HeError> {
        let bad = |reason: String| HeError::Decoding {
            what: "a Paillier public key".into(),
            reason,
        };
        if bytes.len() < PUBLIC_KEY_HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, shorter than its header",
                bytes.len()
            )));
        }
        if &bytes[0..4] != PK_MAGIC || bytes[4] != VERSION {
            return Err(bad(
                "not a fedleak Paillier public key (magic/version)".into()
            ));
        }
        let bits = u16::from_be_bytes([bytes[6], bytes[7]]) as usize;
        if bytes.len() != PUBLIC_KEY_HEADER_BYTES + bits / 8 {
            return Err(bad(format!(
                "{} bytes where a {bits}-bit modulus needs {}",
                bytes.len(),
                PUBLIC_KEY_HEADER_BYTES + bits / 8
            )));
        }
        let key = Self::from_n(Integer::from_bytes_msf(&bytes[PUBLIC_KEY_HEADER_BYTES..]))?;
        if key.key_bits as usize != bits {
            return Err(bad(format!(
                "header says {bits} bits, the modulus has {}",
                key.key_bits
            )));
        }
        Ok(key)
    }

    /// Encrypts `values` under `layout` with nonces from `rng`; errors name the first value that is
    /// non-finite or beyond `max_abs`.
    pub fn encrypt<R: RngCore + CryptoRng>(
        &self,
        layout: &SlotLayout,
        values: &[f64],
        rng: &mut R,
    ) -> Result<CiphertextVector, HeError> {
        encrypt_with(&self.ek, self, layout, values, rng)
    }

    /// Homomorphic addition, ciphertext by ciphertext: decrypts to the sum of both vectors (weight
    /// sums add; they must stay within the layout's headroom).
    pub fn add(
        &self,
        a: &CiphertextVector,
        b: &CiphertextVector,
    ) -> Result<CiphertextVector, HeError> {
        self.check_key(a)?;
        self.check_key(b)?;
        if !a.layout.same_slots(&b.layout) || a.len != b.len {
            return Err(HeError::Incompatible(format!(
                "cannot add {} values ({}) to {} values ({})",
                b.len,
                b.layout.describe(),
                a.len,
                a.layout.describe()
            )));
        }
        let weight_sum = a
            .layout
            .check_weight(a.weight_sum.checked_add(b.weight_sum))?;
        let ciphertexts = a
            .ciphertexts
            .par_iter()
            .zip(b.ciphertexts.par_iter())
            .map(|(x, y)| self.ek.oadd(x, y).map_err(|e| backend("addition", e)))
            .collect::<Result<Vec<_>, HeError>>()?;
        Ok(CiphertextVector {
            weight_sum,
            ciphertexts,
            ..a.clone_header()
        })
    }

    /// Homomorphic multiplication by a public positive integer `weight` (e.g. a client's sample count):
    /// decrypts to `weight * x`, and the weight sum is multiplied by `weight`.
    pub fn scale(&self, a: &CiphertextVector, weight: u64) -> Result<CiphertextVector, HeError> {
        self.check_key(a)?;
        if weight == 0 {
            return Err(HeError::Encoding {
                what: "a ciphertext weight".into(),
                reason: "the weight must be positive (leave a zero-weight vector out instead)"
                    .into(),
            });
        }
        let weight_sum = a.layout.check_weight(a.weight_sum.checked_mul(weight))?;
        if weight == 1 {
            return Ok(a.clone());
        }
        let w = u64_to_integer(weight);
        let ciphertexts = a
            .ciphertexts
            .par_iter()
            .map(|c| {
                self.ek
                    .omul(&w, c)
                    .map_err(|e| backend("scalar product", e))
            })
            .collect::<Result<Vec<_>, HeError>>()?;
        Ok(CiphertextVector {
            weight_sum,
            ciphertexts,
            ..a.clone_header()
        })
    }

    fn check_key(&self, ct: &CiphertextVector) -> Result<(), HeError> {
        if ct.key_bits != self.key_bits || ct.key_id != self.key_id {
            return Err(HeError::Incompatible(format!(
                "ciphertexts of another key ({} bits, id {:016x}; this key: {} bits, id {:016x})",
                ct.key_bits, ct.key_id, self.key_bits, self.key_id
            )));
        }
        Ok(())
    }
}

/// Whether a plaintext carries many values or one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// As many `b`-bit slots as fit below `2^(key_bits - 2)`.
    Packed,
    /// One value per ciphertext (the naive baseline).
    OnePerCiphertext,
}

/// The fixed-point encoding and slot layout of a vector (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotLayout {
    key_bits: u32,
    packing: Packing,
    fraction_bits: u32,
    magnitude_bits: u32,
    headroom_bits: u32,
    slot_bits: u32,
    slots_per_ciphertext: usize,
    max_abs: f64,
}

impl SlotLayout {
    /// The layout for a `key_bits` modulus: `fraction_bits` (`f`, at most 52), values with
    /// `|x| <= max_abs`, and headroom for sums whose weights add up to at most `max_weight_sum`
    /// (`K` for a plain sum of `K` vectors). Errors when a slot would exceed 64 bits or not fit.
    pub fn new(
        key_bits: u32,
        fraction_bits: u32,
        max_abs: f64,
        max_weight_sum: u64,
        packing: Packing,
    ) -> Result<Self, HeError> {
        let bad = |reason: String| HeError::Encoding {
            what: "the Paillier slot layout".into(),
            reason,
        };
        if fraction_bits > 52 {
            return Err(bad(format!(
                "fraction_bits = {fraction_bits} exceeds 52 (the f64 mantissa)"
            )));
        }
        if !(max_abs.is_finite() && max_abs > 0.0) {
            return Err(bad(format!(
                "max_abs = {max_abs} must be finite and positive"
            )));
        }
        if max_weight_sum == 0 {
            return Err(bad("max_weight_sum must be at least 1".into()));
        }
        let scaled = max_abs * (fraction_bits as f64).exp2();
        let mut magnitude_bits = scaled.log2().ceil().max(0.0) as u32;
        while (magnitude_bits as f64).exp2() < scaled {
            magnitude_bits += 1;
        }
        while magnitude_bits > 0 && ((magnitude_bits - 1) as f64).exp2() >= scaled {
            magnitude_bits -= 1;
        }
        let headroom_bits = max_weight_sum.next_power_of_two().trailing_zeros();
        let slot_bits = magnitude_bits + 2 + headroom_bits;
        if slot_bits > 64 {
            return Err(bad(format!(
                "a slot needs {slot_bits} bits (2^{magnitude_bits} >= max_abs * 2^f, 2 bits of \
                 sign and rounding, {headroom_bits} of headroom), above 64; lower fraction_bits, \
                 max_abs or the number of summands"
            )));
        }
        Self::from_parts(
            key_bits,
            packing,
            fraction_bits,
            magnitude_bits,
            headroom_bits,
        )
        .map(|mut layout| {
            layout.max_abs = max_abs;
            layout
        })
    }

    fn from_parts(
        key_bits: u32,
        packing: Packing,
        fraction_bits: u32,
        magnitude_bits: u32,
        headroom_bits: u32,
    ) -> Result<Self, HeError> {
        let slot_bits = magnitude_bits + 2 + headroom_bits;
        let usable = key_bits.saturating_sub(2);
        let slots_per_ciphertext = match packing {
            Packing::Packed => (usable / slot_bits.max(1)) as usize,
            Packing::OnePerCiphertext => 1,
        };
        if slots_per_ciphertext == 0 || slot_bits > usable || slot_bits > 64 {
            return Err(HeError::Encoding {
                what: "the Paillier slot layout".into(),
                reason: format!(
                    "a {slot_bits}-bit slot does not fit a {key_bits}-bit plaintext (or exceeds 64 bits)"
                ),
            });
        }
        Ok(Self {
            key_bits,
            packing,
            fraction_bits,
            magnitude_bits,
            headroom_bits,
            slot_bits,
            slots_per_ciphertext,
            max_abs: (magnitude_bits as f64 - fraction_bits as f64).exp2(),
        })
    }

    /// Modulus bits the layout is for.
    pub fn key_bits(&self) -> u32 {
        self.key_bits
    }
    /// Packed or one value per ciphertext.
    pub fn packing(&self) -> Packing {
        self.packing
    }
    /// Fraction bits `f`.
    pub fn fraction_bits(&self) -> u32 {
        self.fraction_bits
    }
    /// Largest encodable magnitude (for a parsed layout, `2^(m-f)`).
    pub fn max_abs(&self) -> f64 {
        self.max_abs
    }
    /// Headroom bits `h`: sums with weights adding up to at most `2^h` decode exactly.
    pub fn headroom_bits(&self) -> u32 {
        self.headroom_bits
    }
    /// Largest total weight `W` a ciphertext may carry (`2^h`).
    pub fn max_weight_sum(&self) -> u64 {
        1u64 << self.headroom_bits
    }
    /// Bits per slot `b`.
    pub fn slot_bits(&self) -> u32 {
        self.slot_bits
    }
    /// Values per ciphertext.
    pub fn slots_per_ciphertext(&self) -> usize {
        self.slots_per_ciphertext
    }
    /// Resolution `2^-f` (the rounding error of one value is at most half of it).
    pub fn resolution(&self) -> f64 {
        (-(self.fraction_bits as f64)).exp2()
    }
    /// Bytes of one ciphertext on the wire (`2 * key_bits / 8`).
    pub fn ciphertext_bytes(&self) -> usize {
        2 * self.key_bits as usize / 8
    }
    /// Ciphertexts needed for `values` values.
    pub fn ciphertexts_for(&self, values: usize) -> usize {
        values.div_ceil(self.slots_per_ciphertext)
    }
    /// Exact wire length of an encrypted vector of `values` values.
    pub fn wire_bytes(&self, values: usize) -> usize {
        CIPHERTEXT_HEADER_BYTES + self.ciphertexts_for(values) * self.ciphertext_bytes()
    }
    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "{}-bit slots x {} per ciphertext, f={}, |x|<={}, headroom 2^{}",
            self.slot_bits,
            self.slots_per_ciphertext,
            self.fraction_bits,
            self.max_abs,
            self.headroom_bits
        )
    }

    fn same_slots(&self, other: &Self) -> bool {
        self.key_bits == other.key_bits
            && self.packing == other.packing
            && self.fraction_bits == other.fraction_bits
            && self.magnitude_bits == other.magnitude_bits
            && self.headroom_bits == other.headroom_bits
    }

    fn check_weight(&self, weight_sum: Option<u64>) -> Result<u64, HeError> {
        match weight_sum {
            Some(w) if w <= self.max_weight_sum() => Ok(w),
            _ => Err(HeError::Encoding {
                what: "a homomorphic sum".into(),
                reason: format!(
                    "the total weight would exceed the layout's headroom of {} (slots would carry \
                     into each other); raise the headroom (max clients / samples)",
                    self.max_weight_sum()
                ),
            }),
        }
    }

    /// The slot integers `round(x * 2^f) + 2^m` of `values`.
    fn encode(&self, values: &[f64]) -> Result<Vec<u64>, HeError> {
        let scale = (self.fraction_bits as f64).exp2();
        let offset = 1i64 << self.magnitude_bits;
        values
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if !x.is_finite() || x.abs() > self.max_abs {
                    return Err(HeError::Encoding {
                        what: format!("value {i}"),
                        reason: format!(
                            "{x} is outside the bound |x| <= max_abs = {}; raise max_abs or clip \
                             the update",
                            self.max_abs
                        ),
                    });
                }
                Ok(((x * scale).round() as i64 + offset) as u64)
            })
            .collect()
    }
}

/// An encrypted vector: its layout, the key it belongs to, and one ciphertext per group of slots.
#[derive(Debug, Clone)]
pub struct CiphertextVector {
    layout: SlotLayout,
    key_bits: u32,
    key_id: u64,
    weight_sum: u64,
    len: usize,
    ciphertexts: Vec<Integer>,
}

impl CiphertextVector {
    /// Number of values encrypted.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when no value is encrypted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Number of ciphertexts.
    pub fn num_ciphertexts(&self) -> usize {
        self.ciphertexts.len()
    }
    /// The slot layout.
    pub fn layout(&self) -> &SlotLayout {
        &self.layout
    }
    /// Total weight `W` applied (1 for a fresh encryption; sums and scalings add and multiply it).
    pub fn weight_sum(&self) -> u64 {
        self.weight_sum
    }

    fn clone_header(&self) -> Self {
        Self {
            layout: self.layout.clone(),
            key_bits: self.key_bits,
            key_id: self.key_id,
            weight_sum: self.weight_sum,
            len: self.len,
            ciphertexts: Vec::new(),
        }
    }

    /// The exact wire bytes (see the module documentation); the length is
    /// [`SlotLayout::wire_bytes`] of [`CiphertextVector::len`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let width = self.layout.ciphertext_bytes();
        let mut out = Vec::with_capacity(CIPHERTEXT_HEADER_BYTES + self.ciphertexts.len() * width);
        out.extend_from_slice(CT_MAGIC);
        out.push(VERSION);
        out.push(match self.layout.packing {
            Packing::OnePerCiphertext => 0,
            Packing::Packed => 1,
        });
        out.extend_from_slice(&(self.key_bits as u16).to_be_bytes());
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.push(self.layout.fraction_bits as u8);
        out.push(self.layout.magnitude_bits as u8);
        out.push(self.layout.headroom_bits as u8);
        out.push(self.layout.slot_bits as u8);
        out.extend_from_slice(&(self.layout.slots_per_ciphertext as u16).to_be_bytes());
        out.extend_from_slice(&self.weight_sum.to_be_bytes());
        out.extend_from_slice(&(self.len as u64).to_be_bytes());
        out.extend_from_slice(&(self.ciphertexts.len() as u32).to_be_bytes());
        debug_assert_eq!(out.len(), CIPHERTEXT_HEADER_BYTES);
        for c in &self.ciphertexts {
            push_fixed(&mut out, c, width);
        }
        out
    }

    /// Parses [`CiphertextVector::to_bytes`]; truncated, padded or inconsistent bytes give
    /// [`HeError::Decoding`]. `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, HeError> {
        let bad = |reason: String| HeError::Decoding {
            what: what.to_string(),
            reason,
        };
        if bytes.len() < CIPHERTEXT_HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, shorter than the {CIPHERTEXT_HEADER_BYTES}-byte header (truncated)",
                bytes.len()
            )));
        }
        if &bytes[0..4] != CT_MAGIC {
            return Err(bad("not fedleak Paillier ciphertexts (bad magic)".into()));
        }
        if bytes[4] != VERSION {
            return Err(bad(format!(
                "format version {} (this build reads {VERSION})",
                bytes[4]
            )));
        }
        let packing = match bytes[5] {
            0 => Packing::OnePerCiphertext,
            1 => Packing::Packed,
            other => return Err(bad(format!("unknown packing {other}"))),
        };
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let key_bits = u16::from_be_bytes([bytes[6], bytes[7]]) as u32;
        let key_id = be64(8);
        let (fraction_bits, magnitude_bits, headroom_bits, slot_bits) = (
            bytes[16] as u32,
            bytes[17] as u32,
            bytes[18] as u32,
            bytes[19] as u32,
        );
        let slots = u16::from_be_bytes([bytes[20], bytes[21]]) as usize;
        let weight_sum = be64(22);
        let len = be64(30);
        let count = u32::from_be_bytes([bytes[38], bytes[39], bytes[40], bytes[41]]) as usize;
        if key_bits % 8 != 0 || key_bits == 0 || fraction_bits > 52 {
            return Err(bad(format!(
                "implausible header ({key_bits}-bit modulus, {fraction_bits} fraction bits)"
            )));
        }
        let layout = SlotLayout::from_parts(
            key_bits,
            packing,
            fraction_bits,
            magnitude_bits,
            headroom_bits,
        )
        .map_err(|e| bad(e.to_string()))?;
        if layout.slot_bits != slot_bits || layout.slots_per_ciphertext != slots {
            return Err(bad(format!(
                "the header's slot layout ({slot_bits} bits x {slots}) contradicts its parameters \
                 ({} bits x {})",
                layout.slot_bits, layout.slots_per_ciphertext
            )));
        }
        if weight_sum == 0 || weight_sum > layout.max_weight_sum() {
            return Err(bad(format!(
                "weight sum {weight_sum} outside [1, {}]",
                layout.max_weight_sum()
            )));
        }
        let len = usize::try_from(len).map_err(|_| bad(format!("{len} values")))?;
        if layout.ciphertexts_for(len) != count {
            return Err(bad(format!(
                "{count} ciphertexts cannot hold {len} values at {slots} per ciphertext"
            )));
        }
        let width = layout.ciphertext_bytes();
        let expected = count
            .checked_mul(width)
            .and_then(|b| b.checked_add(CIPHERTEXT_HEADER_BYTES));
        if expected != Some(bytes.len()) {
            return Err(bad(format!(
                "{} bytes where {count} ciphertexts of {width} bytes need {} (truncated or padded)",
                bytes.len(),
                CIPHERTEXT_HEADER_BYTES.saturating_add(count.saturating_mul(width))
            )));
        }
        let ciphertexts = bytes[CIPHERTEXT_HEADER_BYTES..]
            .chunks_exact(width)
            .map(Integer::from_bytes_msf)
            .collect();
        Ok(Self {
            layout,
            key_bits,
            key_id,
            weight_sum,
            len,
            ciphertexts,
        })
    }
}

/// Appends `x` big-endian, left-padded with zeros to `width` bytes (callers guarantee it fits).
fn push_fixed(out: &mut Vec<u8>, x: &Integer, width: usize) {
    let bytes = x.to_bytes_msf();
    let pad = width.saturating_sub(bytes.len());
    out.extend(std::iter::repeat_n(0u8, pad));
    out.extend_from_slice(&bytes[bytes.len().saturating_sub(width)..]);
}

/// Packs `slots` (each below `2^slot_bits`) into one integer, slot `i` at bits `[i b, (i+1) b)`.
fn pack_slots(slots: &[u64], slot_bits: u32) -> Integer {
    let b = slot_bits as usize;
    let mut limbs = vec![0u64; (slots.len() * b).div_ceil(64) + 1];
    for (i, &v) in slots.iter().enumerate() {
        let (limb, shift) = ((i * b) / 64, (i * b) % 64);
        limbs[limb] |= v << shift;
        if shift > 0 && shift + b > 64 {
            limbs[limb + 1] |= v >> (64 - shift);
        }
    }
    let bytes: Vec<u8> = limbs.iter().rev().flat_map(|l| l.to_be_bytes()).collect();
    Integer::from_bytes_msf(&bytes)
}

/// The first `take` slots of a plaintext packed with `per` slots; `None` if it is negative or longer
/// than `per` slots.
fn unpack_slots(plain: &Integer, slot_bits: u32, per: usize, take: usize) -> Option<Vec<u64>> {
    let b = slot_bits as usize;
    if plain.cmp0() == Ordering::Less || plain.significant_bits() > (per * b) as u64 {
        return None;
    }
    let bytes = plain.to_bytes_msf();
    let n_limbs = (per * b).div_ceil(64) + 1;
    let mut limbs = vec![0u64; n_limbs];
    for (k, byte) in bytes.iter().rev().enumerate() {
        limbs[k / 8] |= (*byte as u64) << (8 * (k % 8));
    }
    let mask = if b == 64 { u64::MAX } else { (1u64 << b) - 1 };
    Some(
        (0..take)
            .map(|i| {
                let (limb, shift) = ((i * b) / 64, (i * b) % 64);
                let mut v = limbs[limb] >> shift;
                if shift > 0 && shift + b > 64 {
                    v |= limbs[limb + 1] << (64 - shift);
                }
                v & mask
            })
            .collect(),
    )
}

fn encrypt_with<K, R>(
    key: &K,
    public: &PaillierPublicKey,
    layout: &SlotLayout,
    values: &[f64],
    rng: &mut R,
) -> Result<CiphertextVector, HeError>
where
    K: AnyEncryptionKey + Sync,
    R: RngCore + CryptoRng,
{
    if layout.key_bits != public.key_bits {
        return Err(HeError::Incompatible(format!(
            "a layout for {}-bit keys used with a {}-bit key",
            layout.key_bits, public.key_bits
        )));
    }
    let slots = layout.encode(values)?;
    let per = layout.slots_per_ciphertext;
    // Nonces drawn in order from the caller's generator (reproducible), encryption in parallel.
    let mut rng06 = Rng06(rng);
    let jobs: Vec<(&[u64], Integer)> = slots
        .chunks(per)
        .map(|chunk| (chunk, Integer::sample_in_mult_group_of(&mut rng06, key.n())))
        .collect();
    let ciphertexts = jobs
        .par_iter()
        .map(|(chunk, nonce)| {
            key.encrypt_with(&pack_slots(chunk, layout.slot_bits), nonce)
                .map_err(|e| backend("encryption", e))
        })
        .collect::<Result<Vec<_>, HeError>>()?;
    Ok(CiphertextVector {
        layout: layout.clone(),
        key_bits: public.key_bits,
        key_id: public.key_id,
        weight_sum: 1,
        len: values.len(),
        ciphertexts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1024-bit test modulus: fast to generate and use, insecure; the layout logic is the same.
    fn test_keys(bits: u32) -> PaillierKeyPair {
        PaillierKeyPair::generate_insecure_for_tests(bits, 7).expect("test key")
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(11)
    }

    #[test]
    fn round_trip_negatives_and_bound() {
        let keys = test_keys(1024);
        let layout = SlotLayout::new(1024, 32, 64.0, 16, Packing::Packed).unwrap();
        assert_eq!(layout.slot_bits(), 38 + 2 + 4);
        assert_eq!(layout.slots_per_ciphertext(), 1022 / 44);
        let values: Vec<f64> = (0..50)
            .map(|i| ((i as f64) * 0.731).sin() * 63.0 - if i % 3 == 0 { 0.5 } else { 0.0 })
            .chain([64.0, -64.0, 0.0, 1e-9, -1e-9])
            .collect();
        let ct = keys.encrypt(&layout, &values, &mut rng()).unwrap();
        assert_eq!(ct.num_ciphertexts(), layout.ciphertexts_for(values.len()));
        let back = keys.decrypt(&ct).unwrap();
        assert_eq!(back.len(), values.len());
        for (i, (a, b)) in values.iter().zip(&back).enumerate() {
            assert!(
                (a - b).abs() <= layout.resolution() / 2.0,
                "value {i}: {a} vs {b}"
            );
        }
        // The public key encrypts to the same plaintexts.
        let ct = keys
            .public_key()
            .encrypt(&layout, &values, &mut rng())
            .unwrap();
        assert_eq!(keys.decrypt(&ct).unwrap(), back);
    }

    #[test]
    fn value_beyond_bound_is_named() {
        let keys = test_keys(1024);
        let layout = SlotLayout::new(1024, 20, 8.0, 4, Packing::Packed).unwrap();
        let err = keys
            .encrypt(&layout, &[1.0, -8.0, 8.5, 0.0], &mut rng())
            .unwrap_err();
        match &err {
            HeError::Encoding { what, reason } => {
                assert_eq!(what, "value 2");
                assert!(reason.contains("max_abs = 8"), "{reason}");
            }
            other => panic!("expected an encoding error, got {other:?}"),
        }
        assert!(matches!(
            keys.encrypt(&layout, &[f64::NAN], &mut rng()),
            Err(HeError::Encoding { .. })
        ));
    }

    #[test]
    fn three_clients_add_to_the_plain_sum() {
        let keys = test_keys(1024);
        let k = 3usize;
        let layout = SlotLayout::new(1024, 24, 4.0, k as u64, Packing::Packed).unwrap();
        let clients: Vec<Vec<f64>> = (0..k)
            .map(|c| {
                (0..100)
                    .map(|i| ((i * 7 + c * 13) as f64 * 0.37).cos() * 4.0)
                    .collect()
            })
            .collect();
        let pk = keys.public_key();
        let mut sum: Option<CiphertextVector> = None;
        for (c, v) in clients.iter().enumerate() {
            let ct = keys
                .encrypt(&layout, v, &mut StdRng::seed_from_u64(c as u64))
                .unwrap();
            // Through the wire, as the server sees it.
            let ct = CiphertextVector::from_bytes(&ct.to_bytes(), "upload").unwrap();
            sum = Some(match sum {
                None => ct,
                Some(s) => pk.add(&s, &ct).unwrap(),
            });
        }
        let sum = sum.unwrap();
        assert_eq!(sum.weight_sum(), 3);
        let got = keys.decrypt(&sum).unwrap();
        for (i, g) in got.iter().enumerate() {
            let want: f64 = clients.iter().map(|v| v[i]).sum();
            assert!(
                (g - want).abs() <= layout.resolution() * k as f64,
                "{i}: {g} vs {want}"
            );
        }
        // A fourth summand would overflow the headroom (W = 4 is allowed, 5 is not).
        let one = keys.encrypt(&layout, &clients[0], &mut rng()).unwrap();
        let four = pk.add(&sum, &one).unwrap();
        assert!(matches!(pk.add(&four, &one), Err(HeError::Encoding { .. })));
        // Weighted: 2 * a + 1 * b decodes to the weighted sum.
        let a = keys.encrypt(&layout, &clients[0], &mut rng()).unwrap();
        let b = keys.encrypt(&layout, &clients[1], &mut rng()).unwrap();
        let ab = pk.add(&pk.scale(&a, 2).unwrap(), &b).unwrap();
        for (i, g) in keys.decrypt(&ab).unwrap().iter().enumerate() {
            let want = 2.0 * clients[0][i] + clients[1][i];
            assert!((g - want).abs() <= layout.resolution() * 3.0);
        }
    }

    #[test]
    fn truncated_or_garbled_bytes_are_decoding_errors() {
        let keys = test_keys(1024);
        let layout = SlotLayout::new(1024, 16, 1.0, 2, Packing::Packed).unwrap();
        let bytes = keys
            .encrypt(&layout, &[0.5; 40], &mut rng())
            .unwrap()
            .to_bytes();
        assert_eq!(bytes.len(), layout.wire_bytes(40));
        for cut in [0, 10, CIPHERTEXT_HEADER_BYTES, bytes.len() - 1] {
            assert!(
                matches!(
                    CiphertextVector::from_bytes(&bytes[..cut], "upload"),
                    Err(HeError::Decoding { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            CiphertextVector::from_bytes(&padded, "upload"),
            Err(HeError::Decoding { .. })
        ));
        let mut lying = bytes.clone();
        lying[37] ^= 0x40; // the value count
        assert!(matches!(
            CiphertextVector::from_bytes(&lying, "upload"),
            Err(HeError::Decoding { .. })
        ));
        // Another key's ciphertexts are refused.
        let other = PaillierKeyPair::generate_insecure_for_tests(1024, 8).unwrap();
        let ct = CiphertextVector::from_bytes(&bytes, "upload").unwrap();
        assert!(matches!(
            other.public_key().add(&ct, &ct),
            Err(HeError::Incompatible(_))
        ));
        // Public key wire form.
        let pk_bytes = keys.public_key().to_bytes();
        assert_eq!(pk_bytes.len(), PUBLIC_KEY_HEADER_BYTES + 128);
        let pk = PaillierPublicKey::from_bytes(&pk_bytes).unwrap();
        assert_eq!(pk.key_bits(), 1024);
        assert!(matches!(
            PaillierPublicKey::from_bytes(&pk_bytes[..100]),
            Err(HeError::Decoding { .. })
        ));
    }

    #[test]
    fn packed_is_far_smaller_than_one_value_per_ciphertext() {
        let keys = test_keys(2048);
        let packed = SlotLayout::new(2048, 32, 64.0, 65536, Packing::Packed).unwrap();
        let single = SlotLayout::new(2048, 32, 64.0, 65536, Packing::OnePerCiphertext).unwrap();
        assert_eq!(packed.slot_bits(), 56);
        assert_eq!(packed.slots_per_ciphertext(), 2046 / 56); // 36
        let values: Vec<f64> = (0..72).map(|i| i as f64 / 10.0 - 3.0).collect();
        let p = keys
            .encrypt(&packed, &values, &mut rng())
            .unwrap()
            .to_bytes();
        let s = keys.encrypt(&single, &values, &mut rng()).unwrap();
        assert_eq!(p.len(), 42 + 2 * 512);
        assert_eq!(s.to_bytes().len(), 42 + 72 * 512);
        assert!(s.to_bytes().len() >= 20 * p.len());
        let back = keys.decrypt(&s).unwrap();
        assert!(values.iter().zip(back).all(|(a, b)| (a - b).abs() < 1e-9));
    }

    #[test]
    fn keys_below_2048_bits_are_refused_and_generation_is_deterministic() {
        let err = PaillierKeyPair::generate(1024, 1).unwrap_err();
        assert!(err.to_string().contains("insecure"), "{err}");
        let a = PaillierKeyPair::generate_insecure_for_tests(512, 3).unwrap();
        let b = PaillierKeyPair::generate_insecure_for_tests(512, 3).unwrap();
        assert_eq!(a.primes(), b.primes());
        assert_eq!(a.key_bits(), 512);
        assert_eq!(security_bits(3072), 128);
        assert_eq!(security_bits(2048), 112);
    }
}
