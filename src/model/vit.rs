//! The ViT itself: embeddings, pre-norm encoder blocks, final norm and a linear classifier on the CLS token.
//!
//! Field names equal Hugging Face's module names, so `vb.pp(..)` segments produce exactly the checkpoint
//! keys of `ViTForImageClassification` (`vit.encoder.layer.3.attention.attention.query.weight`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{PositionEmbeddingKind, VitConfig};
use super::layers::{gelu, layer_norm, linear, repeat_rows, softmax_last_dim};

/// A weight matrix (out x in) and optional bias, applied as `x W^T + b`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(inputs: usize, outputs: usize, has_bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((outputs, inputs), "weight")?;
        let bias = if has_bias {
            Some(vb.get(outputs, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// Layer-norm scale and shift.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Patch projection: the stride = kernel convolution of Hugging Face, computed as the equivalent linear
/// map on flattened patches (same weight layout D x C x P x P).
#[derive(Debug, Clone)]
struct PatchEmbeddings {
    projection: Linear,
    patch_size: usize,
}

impl PatchEmbeddings {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("projection");
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let weight = vb.get((d, c, p, p), "weight")?.reshape((d, c * p * p))?;
        let bias = vb.get(d, "bias")?;
        Ok(Self {
            projection: Linear {
                weight,
                bias: Some(bias),
            },
            patch_size: p,
        })
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.projection.forward(&patchify(images, self.patch_size)?)
    }
}

/// Cuts images (B x C x H x W) into flattened patches (B x N x C*P*P), row-major over the patch grid,
/// each patch flattened as (channel, row, column), the order of a conv kernel.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
/// let p = fedleak::model::Vit::patchify(&x, 2).unwrap();
/// assert_eq!(p.to_vec3::<f32>().unwrap()[0][1], vec![2., 3., 6., 7.]);
/// ```
fn patchify(images: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    images
        .reshape((b, c, h / patch, patch, w / patch, patch))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / patch) * (w / patch), c * patch * patch))
}

/// CLS token, patch embeddings and position embeddings.
#[derive(Debug, Clone)]
struct Embeddings {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: PatchEmbeddings,
}

impl Embeddings {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let tokens = cfg.num_patches() + 1;
        let position_embeddings = match cfg.position_embedding {
            PositionEmbeddingKind::Learnable => vb.get((1, tokens, d), "position_embeddings")?,
            PositionEmbeddingKind::Sincos => {
                sincos_position_embedding(cfg, vb.dtype(), vb.device())?
            }
        };
        Ok(Self {
            cls_token: vb.get((1, 1, d), "cls_token")?,
            position_embeddings,
            patch_embeddings: PatchEmbeddings::new(cfg, vb.pp("patch_embeddings"))?,
        })
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let patches = self.patch_embeddings.forward(images)?;
        let (b, _, d) = patches.dims3()?;
        let cls = repeat_rows(&self.cls_token, b)?.reshape((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        tokens.clone() + repeat_rows(&self.position_embeddings, b)?.reshape(tokens.shape())?
    }
}

/// The fixed 2-D sine-cosine position table (1 x (N+1) x D) of MAE: half of the width encodes the patch
/// row, half the column, each with sin and cos at geometric frequencies; the CLS position is zero.
///
/// ```
/// use candle_core::{DType, Device};
/// use fedleak::model::{ModelPreset, PositionEmbeddingKind};
/// let cfg = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], PositionEmbeddingKind::Sincos);
/// let table = fedleak::model::sincos_position_embedding(&cfg, DType::F32, &Device::Cpu).unwrap();
/// assert_eq!(table.dims(), &[1, 17, 64]);
/// ```
pub fn sincos_position_embedding(cfg: &VitConfig, dtype: DType, device: &Device) -> Result<Tensor> {
    let d = cfg.hidden_size;
    let side = cfg.image_size / cfg.patch_size;
    let quarter = d / 4;
    let mut table = vec![0f64; (side * side + 1) * d];
    for row in 0..side {
        for col in 0..side {
            let token = 1 + row * side + col;
            for (half, pos) in [(0, row), (1, col)] {
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                    let angle = pos as f64 * omega;
                    let base = token * d + half * (d / 2);
                    table[base + k] = angle.sin();
                    table[base + quarter + k] = angle.cos();
                }
            }
        }
    }
    Tensor::from_vec(table, (1, side * side + 1, d), device)?.to_dtype(dtype)
}

/// Multi-head self-attention (query, key, value projections and the output projection).
#[derive(Debug, Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: usize,
}

impl Attention {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let inner = vb.pp("attention");
        Ok(Self {
            query: Linear::new(d, d, cfg.qkv_bias, inner.pp("query"))?,
            key: Linear::new(d, d, cfg.qkv_bias, inner.pp("key"))?,
            value: Linear::new(d, d, cfg.qkv_bias, inner.pp("value"))?,
            output: Linear::new(d, d, true, vb.pp("output").pp("dense"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let context = softmax_last_dim(&scores)?.matmul(&v)?;
        let merged = context.transpose(1, 2)?.reshape((b, t, d))?;
        self.output.forward(&merged)
    }
}

/// One pre-norm transformer block (Hugging Face's `ViTLayer`).
#[derive(Debug, Clone)]
struct Block {
    layernorm_before: LayerNorm,
    attention: Attention,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
}

impl Block {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            layernorm_before: LayerNorm::new(d, eps, vb.pp("layernorm_before"))?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            layernorm_after: LayerNorm::new(d, eps, vb.pp("layernorm_after"))?,
            intermediate: Linear::new(d, m, true, vb.pp("intermediate").pp("dense"))?,
            output: Linear::new(m, d, true, vb.pp("output").pp("dense"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.forward(&self.layernorm_before.forward(x)?)?)?;
        let hidden = gelu(
            &self
                .intermediate
                .forward(&self.layernorm_after.forward(&x)?)?,
        )?;
        x + self.output.forward(&hidden)?
    }
}

/// A Vision Transformer classifier with Hugging Face `ViTForImageClassification` parameter names.
///
/// Built from a [`VarBuilder`] (trainable variables from a `VarMap`, or tensors loaded from a
/// checkpoint); holds only tensors, so building one is cheap and it can be rebuilt around other
/// parameter values (e.g. an attacker's copy of the global model).
#[derive(Debug, Clone)]
pub struct Vit {
    config: VitConfig,
    embeddings: Embeddings,
    layer: Vec<Block>,
    layernorm: LayerNorm,
    classifier: Linear,
}

impl Vit {
    /// Builds the model; every parameter is fetched from `vb` under its Hugging Face name.
    pub fn new(config: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let vit = vb.pp("vit");
        let layer = (0..config.num_hidden_layers)
            .map(|i| Block::new(config, vit.pp("encoder").pp("layer").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            embeddings: Embeddings::new(config, vit.pp("embeddings"))?,
            layer,
            layernorm: LayerNorm::new(
                config.hidden_size,
                config.layer_norm_eps,
                vit.pp("layernorm"),
            )?,
            classifier: Linear::new(
                config.hidden_size,
                config.num_labels(),
                true,
                vb.pp("classifier"),
            )?,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The CLS token after the final layer norm (B x D): the features the classifier sees.
    pub fn cls_features(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings.forward(images)?;
        for block in &self.layer {
            x = block.forward(&x)?;
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        self.layernorm.forward(&cls)
    }

    /// Class logits (B x num_labels) for images (B x C x H x W).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.classifier.forward(&self.cls_features(images)?)
    }

    /// Applies the classifier head to CLS features (B x D).
    pub fn classify_features(&self, features: &Tensor) -> Result<Tensor> {
        self.classifier.forward(features)
    }

    /// Flattened patches (B x N x C*P*P) of images, in the order the patch embedding reads them.
    pub fn patchify(images: &Tensor, patch_size: usize) -> Result<Tensor> {
        patchify(images, patch_size)
    }
}
