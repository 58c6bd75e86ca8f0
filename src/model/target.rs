//! The ViT as an attack target: implements `fedleak_attacks::TargetModel` so attacks can differentiate
//! the clients' loss with respect to the input, under any parameter values, without knowing this crate.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use fedleak_attacks::{
    ClassifierLayout, GradientRequest, LossGradients, ParamMap, PatchEmbeddingLayout, TargetModel,
};

use super::backward::loss_gradients;
use super::checkpoint::Checkpoint;
use super::config::{PositionEmbeddingKind, VitConfig};
use super::layers::cross_entropy;
use super::vit::Vit;

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
            &self.config,
            VarBuilder::from_tensors(map, dtype, &device),
        )?)
    }
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
                PositionEmbeddingKind::Learnable => {
                    Some("vit.embeddings.position_embeddings".into())
                }
                PositionEmbeddingKind::Sincos => None,
            },
            patch_size: self.config.patch_size,
            has_cls_token: true,
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
