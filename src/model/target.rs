//! The ViT as an attack target: implements `fedleak_attacks::TargetModel` so attacks can differentiate
//! the clients' loss with respect to the input, under any parameter values, without knowing this crate.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use fedleak_attacks::{
    ClassifierBlockLayout, ClassifierLayout, GradientRequest, LossGradients, ParamMap,
    PatchEmbeddingLayout, TargetModel,
};

use super::backward::loss_gradients;
use super::checkpoint::Checkpoint;
use super::config::{PositionEmbeddingKind, VitConfig};
use super::layers::cross_entropy;
use super::vit::{sincos_position_embedding, Vit};

/// The position embedding's parameter name (Hugging Face's).
const POSITION_EMBEDDING: &str = "vit.embeddings.position_embeddings";

/// A ViT and the global parameters an attacker knows (those the server broadcast).
#[derive(Debug, Clone)]
pub struct VitTarget {
    config: VitConfig,
    parameters: ParamMap,
    hand_written_backward: bool,
}

impl VitTarget {
    /// The target for a checkpoint (the global model of a captured round).
    pub fn new(checkpoint: &Checkpoint) -> Self {
        Self {
            config: checkpoint.config.clone(),
            parameters: checkpoint.tensors.clone(),
            hand_written_backward: true,
        }
    }

    /// The same target with first-order gradients by candle's autograd instead of the hand-written
    /// backward ([`super::loss_gradients`]), for benchmarks that compare the two.
    pub fn with_autograd_only(mut self) -> Self {
        self.hand_written_backward = false;
        self
    }

    /// The model's configuration.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The ViT over the given parameters.
    pub fn model(&self, params: &ParamMap) -> fedleak_attacks::Result<Vit> {
        build_vit(&self.config, params)
    }
}

/// The ViT of `config` over `params` (a learnable position embedding among them when the
/// configuration says so).
fn build_vit(config: &VitConfig, params: &ParamMap) -> fedleak_attacks::Result<Vit> {
    let map: HashMap<String, Tensor> = params.clone().into_iter().collect();
    let (dtype, device) = params
        .values()
        .next()
        .map(|t| (t.dtype(), t.device().clone()))
        .ok_or_else(|| fedleak_attacks::AttackError::Observation {
            name: "parameters".into(),
            reason: "the model has no parameters".into(),
        })?;
    Ok(Vit::new(
        config,
        VarBuilder::from_tensors(map, dtype, &device),
    )?)
}

impl TargetModel for VitTarget {
    fn parameters(&self) -> &ParamMap {
        &self.parameters
    }

    fn loss(
        &self,
        params: &ParamMap,
        images: &Tensor,
        targets: &Tensor,
    ) -> fedleak_attacks::Result<Tensor> {
        let logits = self.model(params)?.forward(images)?;
        Ok(cross_entropy(&logits, targets)?)
    }

    fn loss_gradients(
        &self,
        params: &ParamMap,
        images: &Tensor,
        targets: &Tensor,
        request: GradientRequest,
    ) -> fedleak_attacks::Result<Option<LossGradients>> {
        if !self.hand_written_backward {
            return Ok(None);
        }
        Ok(loss_gradients(
            &self.config,
            params,
            images,
            targets,
            request,
        )?)
    }

    /// The position embedding enters every token's input once, additively, so its gradient for one
    /// image is exactly that image's token gradients. A fixed sin-cos table is made a variable for
    /// the pass (the same values, so the same forward); each image is differentiated on its own (a
    /// ViT has no interaction between the images of a batch) and scaled by 1 / B, the batch mean's
    /// share.
    fn token_gradients(
        &self,
        params: &ParamMap,
        images: &Tensor,
        targets: &Tensor,
    ) -> fedleak_attacks::Result<Option<Tensor>> {
        let mut config = self.config.clone();
        let table = match config.position_embedding {
            PositionEmbeddingKind::Learnable => params
                .get(POSITION_EMBEDDING)
                .cloned()
                .ok_or_else(|| fedleak_attacks::AttackError::Observation {
                    name: POSITION_EMBEDDING.into(),
                    reason: "the learnable position embedding is missing from the parameters"
                        .into(),
                })?,
            PositionEmbeddingKind::Sincos => {
                sincos_position_embedding(&config, images.dtype(), images.device())?
            }
        };
        config.position_embedding = PositionEmbeddingKind::Learnable;
        let batch = images.dim(0)?;
        let position = Var::from_tensor(&table)?;
        let mut with_position = params.clone();
        with_position.insert(POSITION_EMBEDDING.into(), position.as_tensor().clone());
        let model = build_vit(&config, &with_position)?;
        let mut per_image = Vec::with_capacity(batch);
        for index in 0..batch {
            let logits = model.forward(&images.narrow(0, index, 1)?)?;
            let loss = cross_entropy(&logits, &targets.narrow(0, index, 1)?)?;
            let gradients = loss.backward()?;
            let tokens = gradients.get(position.as_tensor()).ok_or_else(|| {
                fedleak_attacks::AttackError::Numerical {
                    attack: "token-gradients",
                    reason: "the loss does not depend on the position embedding".into(),
                }
            })?;
            per_image.push((tokens.squeeze(0)? / batch as f64)?);
        }
        Ok(Some(Tensor::stack(&per_image, 0)?))
    }

    fn input_dims(&self) -> (usize, usize, usize) {
        (
            self.config.num_channels,
            self.config.image_size,
            self.config.image_size,
        )
    }

    fn num_classes(&self) -> usize {
        self.config.num_labels()
    }

    fn patch_embedding(&self) -> Option<PatchEmbeddingLayout> {
        Some(PatchEmbeddingLayout {
            weight: "vit.embeddings.patch_embeddings.projection.weight".into(),
            bias: "vit.embeddings.patch_embeddings.projection.bias".into(),
            position_embedding: match self.config.position_embedding {
                PositionEmbeddingKind::Learnable => Some(POSITION_EMBEDDING.into()),
                PositionEmbeddingKind::Sincos => None,
            },
            patch_size: self.config.patch_size,
            has_cls_token: true,
        })
    }

    fn classifier_block(&self) -> Option<ClassifierBlockLayout> {
        let last = self.config.num_hidden_layers.checked_sub(1)?;
        let block = format!("vit.encoder.layer.{last}");
        Some(ClassifierBlockLayout {
            norm_weight: format!("{block}.layernorm_after.weight"),
            norm_bias: format!("{block}.layernorm_after.bias"),
            hidden_weight: format!("{block}.intermediate.dense.weight"),
            hidden_bias: format!("{block}.intermediate.dense.bias"),
            output_weight: format!("{block}.output.dense.weight"),
            output_bias: format!("{block}.output.dense.bias"),
            final_norm_weight: "vit.layernorm.weight".into(),
        })
    }

    fn classifier(&self) -> ClassifierLayout {
        ClassifierLayout {
            weight: "classifier.weight".into(),
            bias: "classifier.bias".into(),
        }
    }

    fn features(
        &self,
        params: &ParamMap,
        images: &Tensor,
    ) -> fedleak_attacks::Result<Option<Tensor>> {
        Ok(Some(self.model(params)?.cls_features(images)?))
    }
}
