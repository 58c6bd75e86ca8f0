//! Hugging Face checkpoint directories: `config.json` + `model.safetensors`, read and written as they are.
//!
//! A checkpoint saved by fedleak loads in `transformers.ViTForImageClassification.from_pretrained`, and a
//! user's checkpoint of that class loads here. Every problem names the file, the tensor, and the fix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{PositionEmbeddingKind, VitConfig};
use super::init::parameter_inventory;
use super::vit::{sincos_position_embedding, Vit};
use crate::{Error, Result};

/// File name of the configuration inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// A model's configuration and parameters, by Hugging Face name.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The architecture.
    pub config: VitConfig,
    /// Every parameter, by name (the sin-cos table excluded when it is fixed).
    pub tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Builds the model over these tensors.
    pub fn model(&self) -> Result<Vit> {
        let map: HashMap<String, Tensor> = self.tensors.clone().into_iter().collect();
        let (dtype, device) = first_dtype_device(&self.tensors)?;
        Ok(Vit::new(
            &self.config,
            VarBuilder::from_tensors(map, dtype, &device),
        )?)
    }

    /// The same checkpoint with every tensor converted to `dtype` (e.g. f64 for an attacker who
    /// simulates updates in double precision).
    pub fn to_dtype(&self, dtype: DType) -> Result<Checkpoint> {
        let mut converted = self.clone();
        for tensor in converted.tensors.values_mut() {
            *tensor = tensor.to_dtype(dtype)?;
        }
        Ok(converted)
    }
}

fn first_dtype_device(tensors: &BTreeMap<String, Tensor>) -> Result<(DType, Device)> {
    tensors
        .values()
        .next()
        .map(|t| (t.dtype(), t.device().clone()))
        .ok_or_else(|| Error::Training("a model without parameters".to_string()))
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
///
/// With a fixed sin-cos position embedding, the table is written too under
/// `vit.embeddings.position_embeddings`, so that Hugging Face, which always expects that tensor, loads it.
pub fn save_checkpoint(dir: &Path, checkpoint: &Checkpoint) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(&checkpoint.config)
        .map_err(|e| Error::Training(format!("cannot serialise the model config: {e}")))?;
    std::fs::write(&config_path, json).map_err(|e| Error::io(&config_path, e))?;
    let mut tensors: HashMap<String, Tensor> = checkpoint
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.detach()))
        .collect();
    if checkpoint.config.position_embedding == PositionEmbeddingKind::Sincos {
        let (dtype, device) = first_dtype_device(&checkpoint.tensors)?;
        tensors.insert(
            "vit.embeddings.position_embeddings".to_string(),
            sincos_position_embedding(&checkpoint.config, dtype, &device)?,
        );
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights_path)?;
    Ok(())
}

/// Reads a checkpoint directory (or the directory holding a given `model.safetensors` / `config.json`)
/// and checks every parameter the configuration needs is present with the right shape.
///
/// Half-precision weights are converted to `dtype`. Tensors the model does not use (a pooler, say) are
/// ignored.
pub fn load_checkpoint(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let dir: PathBuf = if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path.to_path_buf()
    };
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let invalid = |path: &Path, reason: String, hint: &str| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
        hint: hint.to_string(),
    };
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        invalid(
            &config_path,
            format!("cannot read it: {e}"),
            "a checkpoint is a directory with config.json and model.safetensors (Hugging Face layout)",
        )
    })?;
    let config: VitConfig = serde_json::from_str(&text).map_err(|e| {
        invalid(
            &config_path,
            format!("not a ViT config: {e}"),
            "expected a Hugging Face ViTConfig with hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, image_size, patch_size and id2label",
        )
    })?;
    config
        .validate(&config_path.display().to_string())
        .map_err(|e| invalid(&config_path, e.to_string(), "fix config.json"))?;
    if !weights_path.is_file() {
        return Err(invalid(
            &weights_path,
            "the file does not exist".to_string(),
            "save the weights as model.safetensors next to config.json (PyTorch .bin files are not read)",
        ));
    }
    let loaded = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
        invalid(
            &weights_path,
            format!("cannot read safetensors: {e}"),
            "the file is truncated or not safetensors; re-export it with `save_pretrained(safe_serialization=True)`",
        )
    })?;
    let mut tensors = BTreeMap::new();
    for (name, shape, _) in parameter_inventory(&config) {
        let tensor = loaded.get(&name).ok_or_else(|| {
            invalid(
                &weights_path,
                format!("missing tensor `{name}`"),
                "the checkpoint must hold every parameter of ViTForImageClassification for this config.json",
            )
        })?;
        if tensor.dims() != shape.as_slice() {
            return Err(invalid(
                &weights_path,
                format!(
                    "shape mismatch for `{name}`: config.json implies {shape:?}, the file has {:?}",
                    tensor.dims()
                ),
                "config.json and model.safetensors do not belong together",
            ));
        }
        let converted = tensor.to_dtype(dtype)?;
        let values_finite = converted
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .all(|v| v.is_finite());
        if !values_finite {
            return Err(invalid(
                &weights_path,
                format!("tensor `{name}` holds NaN or infinite values"),
                "the checkpoint is corrupt or came from a diverged run",
            ));
        }
        tensors.insert(name, converted);
    }
    Ok(Checkpoint { config, tensors })
}
