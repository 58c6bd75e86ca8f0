//! The Vision Transformer fedleak trains, attacks and audits.
//!
//! Implements ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) with the parameter
//! names of Hugging Face `transformers`' `ViTForImageClassification`, so a user's checkpoint directory
//! (`config.json` + `model.safetensors`) loads as it is. Every operation is written so that first *and*
//! second order gradients through candle's autograd are exact (composite layer norm, softmax with a
//! detached max, GELU through `erf`): gradient-inversion attacks differentiate through the gradient.
//! This module knows nothing of federated learning, schemes or attacks.

mod backward;
mod checkpoint;
mod config;
mod fast_math;
mod init;
mod layers;
mod memory;
mod target;
mod vit;

#[cfg(test)]
mod tests;

pub use backward::loss_gradients;
pub use checkpoint::{load_checkpoint, save_checkpoint, Checkpoint, CONFIG_FILE, WEIGHTS_FILE};
pub use config::{ModelPreset, PositionEmbeddingKind, VitConfig};
pub use fedleak_attacks::one_hot;
pub use init::init_parameters;
pub use layers::{cross_entropy, gelu, layer_norm, softmax_last_dim};
pub use memory::{parameter_count, AttackStepKind, AttackStepPlan, SKIP_MEMORY_CHECK};
pub use target::VitTarget;
pub use vit::{sincos_position_embedding, Vit};
