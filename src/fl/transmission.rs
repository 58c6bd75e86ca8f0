//! What a client puts on the wire, and its exact byte cost.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A client's upload: named tensors (Hugging Face parameter names) serialised as safetensors, whose
/// exact length in bytes is the upload cost. Protection schemes produce other encodings of the same update.
#[derive(Debug, Clone)]
pub struct Transmission {
    bytes: Vec<u8>,
}

impl Transmission {
    /// Serialises plain named tensors (f32 on the wire) with optional string metadata in the header.
    pub fn plain(
        tensors: &BTreeMap<String, Tensor>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Self> {
        let f32_tensors = tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(candle_core::DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(f32_tensors, metadata)
            .map_err(|e| Error::Training(format!("cannot serialise an update: {e}")))?;
        Ok(Self { bytes })
    }

    /// Wraps bytes read back from a capture file.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { bytes }
    }

    /// The exact number of bytes a client uploads.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True for an empty transmission.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Decodes the named tensors of a plain transmission; `origin` names the source in errors.
    pub fn decode_plain(&self, origin: &str, device: &Device) -> Result<BTreeMap<String, Tensor>> {
        let tensors = candle_core::safetensors::load_buffer(&self.bytes, device).map_err(|e| {
            Error::InvalidDataset {
                source_name: origin.to_string(),
                reason: format!("not a readable safetensors update: {e}"),
                hint: "the file is truncated or not safetensors; re-capture it".to_string(),
            }
        })?;
        Ok(tensors.into_iter().collect())
    }
}
