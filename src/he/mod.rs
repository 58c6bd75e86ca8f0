//! Wrappers over maintained homomorphic-encryption crates, sized for vectors of model parameters.
//!
//! - [`glwe`]: lattice (GLWE) encryption from tfhe-rs `core_crypto` at tfhe's 128-bit parameters: secret-key
//!   additive aggregation and plaintext-polynomial products.
//! - [`paillier`]: Paillier from `fast-paillier`, with fixed-point packing of many values per plaintext.
//!
//! Schemes (`crate::schemes`) build on these; these modules know nothing of training or attacks.

pub mod glwe;
pub mod paillier;

/// Everything that can go wrong in the homomorphic-encryption wrappers.
#[derive(Debug, thiserror::Error)]
pub enum HeError {
    /// A value or a parameter is outside what the encoding can represent (names what and why).
    #[error("cannot encode {what}: {reason}")]
    Encoding {
        /// What was being encoded.
        what: String,
        /// Why it does not fit.
        reason: String,
    },
    /// Wire bytes (a ciphertext or a key) could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decoding {
        /// What was being decoded.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Ciphertexts that do not belong together (different keys, lengths or parameters) were combined.
    #[error("incompatible ciphertexts: {0}")]
    Incompatible(String),
    /// The underlying crate failed (key generation, encryption).
    #[error("cryptographic backend failed: {0}")]
    Backend(String),
}
