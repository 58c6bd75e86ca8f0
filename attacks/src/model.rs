//! What the attacker knows of the model: its architecture (as a differentiable function of named
//! parameters) and the parameter values the server broadcast.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::{AttackError, Result};

/// Parameters by Hugging Face name.
pub type ParamMap = BTreeMap<String, Tensor>;

/// Where a ViT's patch embedding and position embedding live, for closed-form attacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchEmbeddingLayout {
    /// Name of the projection weight (D x C x P x P).
    pub weight: String,
    /// Name of the projection bias (D).
    pub bias: String,
    /// Name of the *learnable* position embedding (1 x (N+1) x D); `None` when positions are a fixed table
    /// (then its gradient is not observed and the closed form does not apply).
    pub position_embedding: Option<String>,
    /// Patch side P.
    pub patch_size: usize,
    /// Whether token 0 is a CLS token (not a patch).
    pub has_cls_token: bool,
}

/// Where the final linear classifier lives, for the linear-layer and label attacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierLayout {
    /// Name of the weight (classes x features).
    pub weight: String,
    /// Name of the bias (classes).
    pub bias: String,
}

/// The last transformer block of a ViT that classifies from its CLS token, for separating a batch's
/// images by label: its MLP sees only that token on the way to the loss, so each of the MLP's weight
/// gradients is a sum of one outer product per image. The hidden activation must be the exact GELU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierBlockLayout {
    /// Name of the block's second layer norm's scale (D), in front of the MLP.
    pub norm_weight: String,
    /// Name of that layer norm's shift (D).
    pub norm_bias: String,
    /// Name of the MLP's hidden weight (M x D).
    pub hidden_weight: String,
    /// Name of the MLP's hidden bias (M).
    pub hidden_bias: String,
    /// Name of the MLP's output weight (D x M).
    pub output_weight: String,
    /// Name of the MLP's output bias (D).
    pub output_bias: String,
    /// Name of the final layer norm's scale (D), between the block and the classifier.
    pub final_norm_weight: String,
}

/// What a first-order pass of the training loss should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradientRequest {
    /// The gradient with respect to the images.
    pub input: bool,
    /// The gradient with respect to every parameter.
    pub parameters: bool,
}

/// The first-order gradients of a batch's training loss, as requested.
#[derive(Debug, Clone)]
pub struct LossGradients {
    /// The loss itself (the batch mean).
    pub loss: f64,
    /// With respect to the images (B x C x H x W).
    pub input: Option<Tensor>,
    /// With respect to every parameter that has one, by name.
    pub parameters: Option<ParamMap>,
}

/// The model as the attacker knows it: the architecture as a function of named parameters, and the
/// global parameter values. Implemented by the crate that owns the model (fedleak's ViT). Shared by the
/// threads that run an attack's restarts concurrently, hence `Send + Sync`.
pub trait TargetModel: Send + Sync {
    /// The global parameters the observed client started from.
    fn parameters(&self) -> &ParamMap;

    /// The client's training loss for images (B x C x H x W) and target distributions (B x classes)
    /// under the given parameters (which may be variables, or perturbed copies). The loss must be the
    /// one the clients minimise (mean over the batch).
    fn loss(&self, params: &ParamMap, images: &Tensor, targets: &Tensor) -> Result<Tensor>;

    /// The first-order gradients of [`TargetModel::loss`] (detached), by a route faster than
    /// autograd when the model has one. `Ok(None)` (the default) when it has none for these inputs:
    /// the attack then differentiates [`TargetModel::loss`] itself. Must agree with autograd on
    /// `loss` to rounding.
    fn loss_gradients(
        &self,
        params: &ParamMap,
        images: &Tensor,
        targets: &Tensor,
        request: GradientRequest,
    ) -> Result<Option<LossGradients>> {
        let _ = (params, images, targets, request);
        Ok(None)
    }

    /// The gradient of [`TargetModel::loss`] (the batch mean) with respect to every token's input
    /// embedding (B x T x D: patch embedding plus position, the CLS token first when the layout has
    /// one), detached. These are the token gradients APRIL reads off a learnable position
    /// embedding; an attacker computes them at candidate images, whatever the position encoding.
    /// `Ok(None)` (the default) when the model does not expose them: attacks that need them then
    /// skip the step that does.
    fn token_gradients(
        &self,
        params: &ParamMap,
        images: &Tensor,
        targets: &Tensor,
    ) -> Result<Option<Tensor>> {
        let _ = (params, images, targets);
        Ok(None)
    }

    /// Input shape (channels, height, width).
    fn input_dims(&self) -> (usize, usize, usize);

    /// Number of classes.
    fn num_classes(&self) -> usize;

    /// The patch-embedding layout, for architectures that have one.
    fn patch_embedding(&self) -> Option<PatchEmbeddingLayout>;

    /// The final linear classifier's layout.
    fn classifier(&self) -> ClassifierLayout;

    /// The block in front of the classifier, for architectures whose last block's MLP reads only the
    /// token the classifier reads; `None` (the default) when the model does not expose it: per-image
    /// label separation then reports itself not applicable.
    fn classifier_block(&self) -> Option<ClassifierBlockLayout> {
        None
    }

    /// The features the classifier reads (B x D; for a ViT, the CLS token after the final layer norm)
    /// of images (B x C x H x W) under the given parameters, differentiable with respect to the images.
    /// `Ok(None)` (the default) when the model does not expose them: feature inversion then reports
    /// itself not applicable.
    fn features(&self, params: &ParamMap, images: &Tensor) -> Result<Option<Tensor>> {
        let _ = (params, images);
        Ok(None)
    }
}

/// One-hot rows (B x classes) for integer labels: the targets of the clients' cross-entropy, shared by
/// the attacks and the training code that implements [`TargetModel`].
///
/// ```
/// use candle_core::{DType, Device};
/// let t = fedleak_attacks::one_hot(&[1, 0], 3, DType::F32, &Device::Cpu)?;
/// assert_eq!(t.to_vec2::<f32>()?, vec![vec![0., 1., 0.], vec![1., 0., 0.]]);
/// assert!(fedleak_attacks::one_hot(&[3], 3, DType::F32, &Device::Cpu).is_err());
/// # Ok::<(), fedleak_attacks::AttackError>(())
/// ```
pub fn one_hot(labels: &[u32], classes: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut values = vec![0f32; labels.len() * classes];
    for (row, &label) in labels.iter().enumerate() {
        let label = label as usize;
        if label >= classes {
            return Err(AttackError::Observation {
                name: "labels".to_string(),
                reason: format!("label {label} is out of range for {classes} classes"),
            });
        }
        values[row * classes + label] = 1.0;
    }
    Ok(Tensor::from_vec(values, (labels.len(), classes), device)?.to_dtype(dtype)?)
}
