//! fedleak-attacks: reconstruction attacks on what a party of a federated-learning round observes.
//!
//! An attack takes an [`Observation`] (what that party legitimately sees: a client's gradient, a FedAvg
//! weight delta, an aggregate, ...) and the [`TargetModel`] the attacker knows (architecture and the
//! global parameters the server sent), and returns a [`Reconstruction`] (images and labels, with what it
//! cost) or [`AttackOutcome::NotApplicable`] with the reason. Ground truth never enters this crate:
//! scoring is the job of `fedleak-metrics`.
//!
//! This crate knows nothing of the CLI, the FL simulation, protection schemes or metrics.

#![deny(missing_docs)]

mod april;
mod error;
mod feature_inversion;
mod idlg;
mod inverting_gradients;
mod label_counts;
mod label_separation;
mod linear;
mod model;
mod observation;
mod parameter_arithmetic;
mod patch_refinement;
mod prior;
mod reconstruction;
mod unrolled_labels;

pub use april::{
    invert_patch_embedding, reconstruct_april, PatchInversion, MAX_MULTI_STEP_RANGE_EXCESS,
    MAX_MULTI_STEP_WEIGHT_RESIDUAL,
};
pub use error::{AttackError, Result};
pub use feature_inversion::{
    invert_features, noise_around_grey, random_images, FeatureInversionConfig, FeatureLoss,
    FeatureMatcher,
};
pub use idlg::{infer_label_from_bias_gradient, infer_label_idlg, LabelOutcome, LabelRecovery};
pub use inverting_gradients::{
    invert_gradients, matching_objective, seconds_per_evaluation, GradientMatcher, ImageOptimizer,
    InputGradient, InvertingGradientsConfig, MatchingLoss, BATCH_ITERATIONS, BATCH_TV_WEIGHT,
    DLG_INITIAL_SPREAD, LBFGS_HISTORY, LINE_SEARCH_TRIES, MAX_REFINEMENT_RISE,
    SINGLE_IMAGE_LBFGS_ITERATIONS, SINGLE_IMAGE_PRIOR_DECAY,
};
pub use label_counts::{count_labels, round_label_counts, LabelCountConfig, ReferenceImages};
pub use label_separation::{
    deal_labels_over_steps, recover_batch_labels, recover_labels, separate_batch_labels,
    SeparatedLabels, Separation,
};
pub use linear::{invert_linear_layer, recover_classifier_input, FeatureOutcome, FeatureRecovery};
pub use model::{
    one_hot, ClassifierBlockLayout, ClassifierLayout, GradientRequest, LossGradients, ParamMap,
    PatchEmbeddingLayout, TargetModel,
};
pub use observation::{
    momentum_gradient_weights, ClientShare, ClientSteps, LocalBatches, Observation, UpdateSource,
    UpdateView,
};
pub use patch_refinement::{
    refine_patches, refine_patches_after_client_steps, refine_patches_after_steps,
    refine_patches_after_steps_on_batches, RefinementStep, BATCH_PATCH_REFINEMENT,
    SINGLE_IMAGE_PATCH_REFINEMENT,
};
pub use prior::{patch_border_variation, total_variation, ImagePrior};
pub use reconstruction::{AttackOutcome, Reconstruction};
pub use unrolled_labels::{
    place_labels_by_unrolling, unrolled_label_hypotheses, LabelSearchSize, MAX_HALF_COMBINATIONS,
    MAX_SIMULATED_STEPS,
};

/// Makes candle keep the graph of gradients on the current thread, so that second-order gradients (the
/// input gradient of a gradient-matching loss) are exact. candle reads the setting once per thread,
/// before the first backward pass; call this before any backward on the thread that attacks.
pub fn enable_second_order_gradients() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
}

/// Whether [`enable_second_order_gradients`] was called in this process: exact second-order
/// gradients ([`InputGradient::DoubleBackward`], joint labels) are refused without it rather than
/// silently wrong. First-order work runs faster and in far less memory without it (candle then
/// detaches each gradient instead of keeping the graph of the backward pass).
pub fn second_order_gradients_enabled() -> bool {
    std::env::var("CANDLE_GRAD_DO_NOT_DETACH").is_ok_and(|v| !v.is_empty() && v != "0")
}
