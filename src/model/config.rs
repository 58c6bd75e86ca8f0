//! The ViT configuration: a serde mirror of Hugging Face's `ViTConfig` (`config.json`), plus named presets.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::data::ImageShape;
use crate::{Error, Result};

/// How token positions are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PositionEmbeddingKind {
    /// A trained parameter (`vit.embeddings.position_embeddings`), as in ViT and Hugging Face.
    #[default]
    Learnable,
    /// The fixed 2-D sine-cosine table of MAE (He et al. 2022); not trained. A known defence against
    /// closed-form attacks, which read the input gradient off the position-embedding gradient.
    Sincos,
}

/// A ViT's architecture, serialised exactly as Hugging Face's `config.json` for `ViTForImageClassification`.
///
/// Keys Hugging Face writes that fedleak does not need are accepted and ignored on load. fedleak adds one
/// key of its own, `fedleak_position_embedding`, which Hugging Face ignores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Width of every token (the embedding dimension D).
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the hidden layer of each block's MLP.
    pub intermediate_size: usize,
    /// Activation of the MLP; fedleak implements `gelu` (the exact, erf-based GELU).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Side of the (square) input image in pixels.
    pub image_size: usize,
    /// Side of the (square) patches in pixels; must divide `image_size`.
    pub patch_size: usize,
    /// Number of input channels (1 or 3).
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Whether query, key and value projections have a bias.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Class names by label index, as Hugging Face stores them (`{"0": "cat", ...}`).
    pub id2label: BTreeMap<String, String>,
    /// How positions are encoded (fedleak's key; absent means learnable, as in Hugging Face).
    #[serde(default, rename = "fedleak_position_embedding")]
    pub position_embedding: PositionEmbeddingKind,
    /// Hugging Face's model type; always `vit`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Hugging Face's architecture list; fedleak writes `["ViTForImageClassification"]`.
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
}

fn default_hidden_act() -> String {
    "gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_num_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_model_type() -> String {
    "vit".to_string()
}
fn default_architectures() -> Vec<String> {
    vec!["ViTForImageClassification".to_string()]
}

/// The named architectures fedleak ships (`--model NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelPreset {
    /// 32x32 input, patch 8 (16 patches), width 32, 1 block, 2 heads, MLP 64 (~15k parameters): the default
    /// audit's model, small enough that Paillier at 3072 bits trains it in minutes.
    #[serde(rename = "vit-nano-32")]
    VitNano32,
    /// 32x32 input, patch 8 (16 patches), width 64, 2 blocks, 4 heads, MLP 128: fast audits and tests.
    #[serde(rename = "vit-micro-32")]
    VitMicro32,
    /// 32x32 input, patch 4 (64 patches), width 192, 4 blocks, 3 heads, MLP 768: the attack literature's tiny ViT.
    #[serde(rename = "vit-tiny-32")]
    VitTiny32,
    /// ViT-B/16 at 224x224 (width 768, 12 blocks, 12 heads, MLP 3072), as in the CLS-token paper.
    #[serde(rename = "vit-b16-224")]
    VitB16_224,
}

impl ModelPreset {
    /// Every preset, in the order the help text lists them.
    pub const ALL: [ModelPreset; 4] = [
        ModelPreset::VitNano32,
        ModelPreset::VitMicro32,
        ModelPreset::VitTiny32,
        ModelPreset::VitB16_224,
    ];

    /// The preset's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            ModelPreset::VitNano32 => "vit-nano-32",
            ModelPreset::VitMicro32 => "vit-micro-32",
            ModelPreset::VitTiny32 => "vit-tiny-32",
            ModelPreset::VitB16_224 => "vit-b16-224",
        }
    }

    /// Looks a preset up by its command-line name.
    ///
    /// ```
    /// use fedleak::model::ModelPreset;
    /// assert_eq!(ModelPreset::from_name("vit-tiny-32").unwrap(), ModelPreset::VitTiny32);
    /// assert!(ModelPreset::from_name("vit-huge").is_err());
    /// ```
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| Error::InvalidSetting {
                key: "model".to_string(),
                reason: format!("unknown model preset `{name}`"),
                hint: format!(
                    "use one of {}, or a checkpoint directory with config.json + model.safetensors",
                    Self::ALL.map(|p| format!("`{}`", p.name())).join(", ")
                ),
            })
    }

    /// The preset's configuration for the given class names and position-embedding kind.
    ///
    /// ```
    /// use fedleak::model::{ModelPreset, PositionEmbeddingKind};
    /// let cfg = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], PositionEmbeddingKind::Learnable);
    /// assert_eq!((cfg.hidden_size, cfg.num_patches(), cfg.num_labels()), (192, 64, 2));
    /// ```
    pub fn config(
        self,
        class_names: &[String],
        position_embedding: PositionEmbeddingKind,
    ) -> VitConfig {
        let (image_size, patch_size, hidden_size, depth, heads, mlp, eps) = match self {
            ModelPreset::VitNano32 => (32, 8, 32, 1, 2, 64, 1e-6),
            ModelPreset::VitMicro32 => (32, 8, 64, 2, 4, 128, 1e-6),
            ModelPreset::VitTiny32 => (32, 4, 192, 4, 3, 768, 1e-6),
            ModelPreset::VitB16_224 => (224, 16, 768, 12, 12, 3072, 1e-12),
        };
        VitConfig {
            hidden_size,
            num_hidden_layers: depth,
            num_attention_heads: heads,
            intermediate_size: mlp,
            hidden_act: default_hidden_act(),
            layer_norm_eps: eps,
            image_size,
            patch_size,
            num_channels: 3,
            qkv_bias: true,
            id2label: class_names
                .iter()
                .enumerate()
                .map(|(i, name)| (i.to_string(), name.clone()))
                .collect(),
            position_embedding,
            model_type: default_model_type(),
            architectures: default_architectures(),
        }
    }
}

impl VitConfig {
    /// Number of output classes (the length of `id2label`).
    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    /// Number of patch tokens ((image_size / patch_size)^2), not counting the CLS token.
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    /// Number of values in one flattened patch (channels * patch_size^2).
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }

    /// The input image shape the model expects.
    pub fn input_shape(&self) -> ImageShape {
        ImageShape {
            channels: self.num_channels,
            height: self.image_size,
            width: self.image_size,
        }
    }

    /// Class names in label order.
    pub fn class_names(&self) -> Vec<String> {
        let mut named: Vec<(usize, &String)> = self
            .id2label
            .iter()
            .filter_map(|(k, v)| k.parse().ok().map(|i| (i, v)))
            .collect();
        named.sort();
        named.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Checks the configuration is one fedleak can build; `origin` names where it came from.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String, hint: &str| Error::InvalidSetting {
            key: origin.to_string(),
            reason,
            hint: hint.to_string(),
        };
        if self.hidden_act != "gelu" {
            return Err(bad(
                format!("hidden_act `{}` is not supported", self.hidden_act),
                "fedleak implements the exact GELU (`gelu`)",
            ));
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return Err(bad(
                format!(
                    "patch_size {} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
                "choose a patch size that divides the image size",
            ));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(
                format!(
                    "num_attention_heads {} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
                "choose a head count that divides the hidden size",
            ));
        }
        if self.num_labels() < 2 {
            return Err(bad(
                format!("the model has {} class(es)", self.num_labels()),
                "a classifier needs at least two classes in `id2label`",
            ));
        }
        if !(self.num_channels == 1 || self.num_channels == 3) {
            return Err(bad(
                format!("num_channels is {}", self.num_channels),
                "fedleak supports 1 (grayscale) or 3 (RGB) channels",
            ));
        }
        Ok(())
    }
}
