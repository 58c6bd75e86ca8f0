//! Inverting Gradients (Geiping et al., "Inverting Gradients — How easy is it to break privacy in
//! federated learning?", NeurIPS 2020), with the additions that make it strong on ViTs.
//!
//! Objective: the mean over parameter tensors of 1 - cos(grad_theta L(x', y), observed), plus a total-variation
//! prior on x'. Optimiser: Adam on the image with *signed* gradients, step decay at 3/8, 5/8 and 7/8 of
//! the iterations, box constraint [0, 1] after every step. Several random restarts; the one with the
//! lowest *matching objective* is returned — the attack never sees ground truth. The input gradient of the
//! objective is a Hessian-vector product by finite difference of first-order passes by default
//! (forward for one image, alternating sides for a batch), or the exact second-order gradient through candle's
//! autograd (`CANDLE_GRAD_DO_NOT_DETACH`); see [`InputGradient`].
//!
//! For a FedAvg weight delta from local SGD, the client's local steps are unrolled with the known
//! learning rate (as Inverting Gradients does) and the simulated delta is matched instead; its input
//! gradient comes from an adjoint sweep back through the steps. With heavy-ball momentum the
//! velocity is unrolled as well and its adjoint carried back (FedAvg with 4 local steps at momentum
//! 0.9, sin-cos IHC tiles, 2026-12-03: 5.56 dB when such a delta was matched as one gradient, 22.19
//! dB / SSIM 0.367 unrolled, 22.91 / 0.442 with the patch refinement).
//!
//! A client holding more images than a batch trains each local step on a batch of its own
//! ([`crate::LocalBatches::PerStep`]); step `s` is then unrolled on its own slice of the candidates
//! ([`GradientMatcher::with_step_batches`]), and which step held which label is searched
//! ([`GradientMatcher::rearranged_candidates`]). Measured 2026-12-04 (sin-cos tiny ViT, IHC tiles,
//! FedAvg with 4 local steps of plain SGD at lr 0.01, one image per step drawn from each client's
//! 111, `fedleak attack --attack auto`, defaults: 3000 iterations, 2 restarts): client 0 (labels from
//! the counts right, dealt to the right steps) 21.58 dB / SSIM 0.406 with the per-step unroll alone;
//! client 1 (counts 3 of 4 right) 8.23 dB / 0.038 at objective 1.6e-2 without the search; client 2
//! (counts right, dealt to the wrong steps) 7.95 dB when every restart could relabel. With the
//! search as it is (swaps; relabelling in every second restart): client 1 21.43 / 0.321 at 1.7e-6,
//! client 2 22.34 / 0.397 at 2.0e-6, labels 4 of 4 each.
//! Before the per-step unroll, a capture with batches of 4 (16 images behind the delta) scored 6.36
//! dB at objective 0.19; per step without the search or the patch refinement, 9.35 dB at 1.2e-2
//! (labels 12 of 16); with both, 9.70 dB / SSIM 0.016 at 1.19e-2, labels still 12 of 16
//! (2026-12-04, client 0): the greedy search does not place 16 candidates. The counts were the
//! blocker: with the private labels in their steps (a scratch probe, the same defaults) the run
//! reached 19.59 dB at objective 1.5e-6 (2026-12-05); [`crate::place_labels_by_unrolling`] now
//! finds those labels (16 of 16 on that client), by unrolling the steps' drift, and `fedleak
//! attack` with them reached 19.24 dB / SSIM 0.304 at objective 1.4e-6 (clients 1 - 3 of the
//! capture: 17.69, 19.58 and 20.17 dB, labels 16 of 16 each). Twice the iterations
//! (`--iterations 6000`, the same run otherwise) do not help: 19.21 dB / SSIM 0.300 at 1.40e-6
//! (2026-12-05, 67 min of attack on shared cores): the run has settled by 3000.
//! Nor does polishing it (2026-12-06, client 0 of that kind of capture, regenerated bit for bit; a
//! scratch branch starting from given images and labels): the private images, with their labels in
//! their steps, match at -1.4e-8 (f32 rounding), the result (19.63 dB) read back from its PNGs at
//! 1.50e-6; L-BFGS from there stops at 1.38e-6 and 19.70 dB with the default TV 1e-3, at 5.4e-7
//! and 19.64 dB without a prior; the result's images moved to the private images' places (by the
//! scoring's assignment) start at 8.6e-5 and stop at 1.7e-6, 19.82 dB. The run sits in a wide
//! valley whose floor is far above the private images' and whose lower points are no closer to
//! them.
//!
//! An aggregate of several clients' updates is simulated client by client
//! ([`GradientMatcher::with_clients`]): each client unrolls its own steps from the global model on
//! its own candidates, and the simulated updates are summed with the clients' weights, as the
//! server averaged them. FedAvg clients do not share a trajectory: one client training on all the
//! clients' images (the model used before) leaves an objective of 0.41 at the private images of a
//! two-client, two-step aggregate where the per-client simulation leaves 1e-17 (the f64 test); on a
//! captured FedAvg aggregate of 4 clients each holding one IHC tile (4 steps of SGD at lr 0.01,
//! sin-cos tiny ViT, 2026-12-04) 0.96 against 1.1e-7 in f32, and Inverting Gradients (defaults)
//! stopped at objective 0.45 and 8.59 dB under the one-client model, at 1.5e-5 and 13.93 dB / SSIM
//! 0.053 client by client.
//!
//! Labels are given (iDLG, label counts) or, as in the original DLG, optimised jointly with the images.
//!
//! Optimising the matching objective further does not bring the result closer. Measured 2026-12-03
//! on a sin-cos IHC tile (tiny ViT, batch 1) from Inverting Gradients' result (22.82 dB, 1 - cosine
//! 1.8e-7 in f64), with scratch probes: f64 L-BFGS without a prior lowered the objective to 6.4e-10
//! in 500 iterations and the PSNR to 22.09 dB (with TV 1e-6: 3.5e-9, 22.51 dB); Levenberg-Marquardt on
//! the per-tensor normalised L2 residual with conjugate-gradient inner solves (20 x 100) lowered that
//! residual 400-fold and the PSNR to 22.05 dB. From halfway between the result and the private image
//! (28.84 dB, 1 - cosine 9.0e-8) L-BFGS reached 30.31 dB at 5.3e-10: images from 22 to 30 dB away
//! share objectives far below the result's. What is left is not the optimiser's but the prior's.
//! Two priors fitted on the attacker's held-out tiles do not supply it (2026-12-03, scratch scripts
//! on the eight tiles' results, read back from their PNGs): a Gaussian model of 4 x 4 patches gives
//! the private images an energy of 31.0 and the results 31.9 (8 x 8 patches: 107 and 131), but the
//! average of the two, smoother than either, 21.6 (75): it favours smoothness, not the private image
//! (so it was not tried inside the optimisation). A linear correction of each patch from its 8 x 8 neighbourhood, fitted on
//! pairs of results and private images of the other tiles (leave-one-out over sixteen, with flips
//! and rotations), gained 0.3 dB (22.58 -> 22.87 dB; 26.22 -> 26.37 on the other eight).
//! Nor does averaging restarts: their errors are shared, not independent (2026-12-03, the eight
//! tiles, `fedleak attack --attack auto --restarts 1 --seed S` for S = 1..8, the PNGs averaged by a
//! scratch program): one restart 22.63 dB / SSIM 0.456, the mean of two 22.75 / 0.456, of eight
//! 22.85 / 0.464, where independent errors would have gained up to 9 dB.
//! Tried inside the optimisation after all, a Gaussian model of 8 x 8 patches (fitted on the 182
//! test tiles at least 32 pixels from every attacked one) does not help either (2026-12-04, scratch
//! probe, 100 Adam steps on matching + weight x energy from the result, two other tiles): it
//! lowered the patches' energy far below the private images' (5.7 - 13.5 against 55.7 / 79.1) for
//! +0.1 / +0.2 dB (22.92 -> 23.04, 20.73 -> 20.91). Nor does a prior on feature statistics, as
//! GradViT and DeepInversion take from a network's batch-norm statistics (2026-12-05, scratch
//! probe): the per-channel means and standard deviations of a random three-layer convolutional
//! net's ReLU activations (widths 32, 64, 64), z-scored against the attacker's 182 held-out tiles
//! and added to the TV schedule, took the eight goal tiles from 22.49 dB (without it, `fedleak
//! attack --attack auto` defaults) to 21.02, 20.60, 18.37 and 13.34 dB at weights 1e-5, 1e-4, 1e-3
//! and 1e-2: those tiles (the first row of the slide) are not typical of the held-out set, and a
//! prior that pulls their statistics towards it pulls the images away (eight tiles drawn at random
//! from the training split score 25.19 dB / SSIM 0.551 without it). Nor does a deep image prior
//! (Ulyanov et al.: the image is the output of an untrained convolutional net on fixed noise, and
//! Adam moves the net's weights along the objective's image gradient; 2026-12-05, scratch probe,
//! an encoder-decoder of 32 or 64 channels with one skip, instance norm, leaky ReLU and a sigmoid
//! output, the default TV schedule): on the goal's first two sin-cos tiles 21.95 / 22.22 dB at 400
//! iterations against 21.88 / 22.93 without it, on the first at 1500 iterations 21.58 dB (22.04 on
//! the signed image gradient) and 19.45 dB without TV, at objective 7.4e-8: the net fits the
//! gradient without preferring the private image, at four to eight times the time.
//! Where the error lies (the eight results against their private tiles,
//! 2026-12-04): 96 % of its energy is luminance (the colours are right), half of it is in the 4 x 4
//! patches' mean values, and the results have about 70 % of the private images' contrast: the
//! gradient leaves the patches' brightness relative to each other loose, and the prior fills it in
//! smoothly. The gradient is that loose because the position table dominates every token and the
//! image is a small perturbation of it (see the `april` module on the first attention's span): on a
//! FedSGD gradient of one sin-cos IHC tile (tiny ViT, f32, initial weights) the patch embedding's
//! weight gradient (192 x 48) has 2 singular values above 1e-3 of the largest, 13 above 1e-5 and 34
//! above 1e-7, and the first block's query, key and value weight gradients 16, 18 and 10 of 192
//! above 1e-7; after 200 FedSGD rounds 11 - 20.
//! Where the information ends (2026-12-05, a scratch program on the goal's first sin-cos tile): the
//! Jacobian of the parameter gradient (each tensor scaled by its norm, key biases left out) with
//! respect to the 3072 pixels, taken at the private image in f64 by central differences and
//! sketched to 32768 rows, has full rank, the eigenvalues of J^T J falling from 2.2e-2 to 1.8e-13
//! (242 above 1e-2 of the largest, 1028 above 1e-6, 1920 above 1e-8). The result (21.88 dB) has
//! no error in the first 200 directions and 68 % of its error energy in the first 1000: corrected
//! in its first 500, 1000 or 1500 it would score 22.73, 26.77 or 32.42 dB. In f32 the simulation
//! resolves the objective to ~1e-7 away from the captured point, about the first 500 directions'
//! worth; in f64 the private image's objective against the f32 capture is 2.2e-13, but that
//! determines the image only near it: Gauss-Newton from the result on that Jacobian (recomputed
//! at each iterate, eigen-truncated, the best of six truncations and two step lengths by
//! objective, 200 s an iteration) lowered the objective from 2.3e-7 to 5.3e-9 in three iterations
//! while the PSNR fell to 21.10 dB, and `--precision f64` scores 22.64 dB / SSIM 0.446 on the
//! eight tiles (22.49 / 0.442 in f32) at twice the time.
//! Nor do other rounds' gradients of the same image (2026-12-06, a scratch branch matching the
//! mean of several rounds' objectives, each round's update simulated under that round's global
//! weights, the prior's weight raised with the number of rounds to keep its share). A client
//! whose only image is its batch sends an honest-but-curious server that image's gradient every
//! round; the goal tiles, one per client, trained by FedSGD for 50 rounds (`fedleak train --data
//! D8 --position-embedding sincos --clients 8 --batch-size 1 --algorithm fedsgd --rounds 50
//! --capture-rounds 1,2,5,10,20,50 --seed 1`, the server's AdamW at lr 1e-3; round 1's captures
//! are the goal's, bit for bit): rounds 1 and 2 together 22.41 dB / SSIM 0.436, rounds 1 and 5
//! 22.54 / 0.442, against round 1 alone's 22.43 / 0.447; rounds 1, 20 and 50 19.56 / 0.215 on the
//! first four tiles (round 1 alone 22.53). Each later round alone scores less: round 5 21.67 /
//! 0.411, round 20 19.21 / 0.250, round 50 18.12 / 0.191. The rounds near the first add no
//! constraint the first lacks, and the later ones pull the match away from it.
//!
//! At batch 8 the matching objective does not tell the images apart in f32 (2026-12-06, the goal
//! tiles as one FedSGD batch, `fedleak train --data D8 --position-embedding sincos --clients 1
//! --batch-size 8 --algorithm fedsgd --rounds 1 --seed 1`; a scratch branch evaluating and
//! starting from given images): the private images score 5.1e-8, the eight batch-1 results (22.43
//! dB) put together 1.26e-7, the default attack's result (17.09 dB / SSIM 0.233) 2.4e-7, and an
//! attack with one image's settings (TV 1e-3, prior decay 0.1, refinement ridge 3e-6; 1500
//! iterations, one restart) 3.1e-8 at 17.04 dB / 0.239, below the private images. Started from the
//! batch-1 results, the batch attack leaves them: 19.05 dB at 2.0e-7 with the defaults (1000
//! iterations), 20.19 dB at 1.12e-7 with one image's settings at a tenth of the step. Images of
//! 17 dB match the batch's gradient as well as the private ones: at batch 8 the attack is limited by
//! what the f32 gradient says, not by the search. Simulated in f64 the gradient does single them
//! out, and the search is then the limit (the same day, `fedleak attack --precision f64`, one
//! image's settings as above): the private images match at 4.0e-14, the 17.04 dB result (read back
//! from its PNGs) at 3.2e-8 and the batch-1 results at 9.4e-8, and the f64 attack stops at 1.5e-8
//! and 17.01 dB / SSIM 0.235 (200 s).
//!
//! The same machinery runs DLG ([`InvertingGradientsConfig::dlg`]): squared-L2 matching, no prior,
//! projected L-BFGS ([`ImageOptimizer::Lbfgs`]).

use std::borrow::Cow;
use std::ops::Range;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::feature_inversion::noise_around_grey;
use crate::model::{one_hot, GradientRequest, ParamMap, TargetModel};
use crate::observation::{
    consecutive_ranges, momentum_gradient_weights, ClientSteps, Observation, UpdateSource,
    UpdateView,
};
use crate::parameter_arithmetic::{linear_combination, squared_norm, squared_norm_and_dot};
use crate::patch_refinement::{
    refine_patches_after_client_steps, RefinementStep, BATCH_PATCH_REFINEMENT,
    SINGLE_IMAGE_PATCH_REFINEMENT,
};
use crate::prior::ImagePrior;
use crate::reconstruction::{AttackOutcome, Reconstruction};
use crate::{AttackError, Result};

/// Settings of Inverting Gradients.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvertingGradientsConfig {
    /// Optimiser iterations per restart (Adam steps, or L-BFGS steps of at most
    /// [`LINE_SEARCH_TRIES`] evaluations each).
    pub iterations: usize,
    /// Random restarts (the best by matching objective is kept).
    pub restarts: usize,
    /// Restarts run at once, each on its own thread (1: one after the other). The result does not
    /// depend on it; the wall time does. On small models a kernel parallelised over cores is mostly
    /// synchronisation (tiny ViT, one image: 119 ms per step on one thread, 135 ms on two), so
    /// restarts on separate cores with one kernel thread each use a multi-core machine best.
    pub restart_workers: usize,
    /// Adam step size on the image; for L-BFGS, the largest pixel change of its first step.
    pub lr: f64,
    /// How the image is optimised.
    pub optimizer: ImageOptimizer,
    /// Weight of the total-variation prior.
    pub tv_weight: f64,
    /// Weight of the colour-opponent total variation (see [`ImagePrior::opponent_tv_weight`]).
    pub opponent_tv_weight: f64,
    /// Weight of GradViT's patch-border prior (see [`crate::patch_border_variation`]); the patch size
    /// is the model's.
    pub patch_weight: f64,
    /// Factor applied to the prior's weights at each of signed Adam's step decays (1: a constant
    /// prior; L-BFGS keeps it constant). Below 1 the prior shapes the early iterations and gives way
    /// to the gradient later (loss scheduling, as GradViT does). See
    /// [`InvertingGradientsConfig::default_prior_decay`] for what suits one image and a batch.
    pub prior_decay: f64,
    /// Seed of the random initial images.
    pub seed: u64,
    /// How the input gradient of the matching objective is computed (the forward difference by
    /// default; [`InvertingGradientsConfig::default_input_gradient`] for a batch).
    pub input_gradient: InputGradient,
    /// The matching loss: 1 - cosine (Inverting Gradients) or squared L2 (DLG).
    pub loss: MatchingLoss,
    /// Ridge of the patch refinement ([`crate::refine_patches_after_steps`]) applied, for a gradient
    /// or plain- or momentum-SGD delta with known labels, at each of signed Adam's step decays and to
    /// the result;
    /// relative to the token gradients' energy; 0 switches it off.
    pub patch_refinement: f64,
    /// Width of the uniform noise every restart starts from, centred on mid-grey: 1 for noise over
    /// the whole [0, 1] range, 0 for a flat grey image (see [`noise_around_grey`]). A matching
    /// objective without a prior leaves the directions the gradient does not determine where they
    /// started, so DLG starts near grey ([`DLG_INITIAL_SPREAD`]); with a prior it made no difference
    /// (see there).
    pub initial_spread: f64,
}

/// How the candidate images are optimised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageOptimizer {
    /// Adam on the *signed* input gradient with step decay at 3/8, 5/8 and 7/8 of the iterations
    /// (Inverting Gradients). Also read as `signed-adam`, the command line's spelling.
    #[default]
    #[serde(alias = "signed-adam")]
    SignedAdam,
    /// L-BFGS (DLG): the last [`LBFGS_HISTORY`] steps model the curvature; each step is projected on
    /// the box [0, 1] and backtracked until the objective (matching + prior) decreases enough (Armijo).
    /// The prior's weight stays constant. It takes the configured input gradient: the line search and
    /// the curvature pairs need one consistent function, which a finite difference is (the
    /// alternating difference evaluates every point on the same side here, as a forward difference).
    /// Measured 2026-12-05 (tiny ViT with a learnable table, FedSGD, batch 1, two IHC tiles, 1 -
    /// cosine + TV 1e-3, 400 iterations, 2 restarts): the forward difference 29.63 / 31.56 dB in
    /// 10.5 / 9.2 s, the central difference 29.88 / 31.57 dB in 15.1 / 11.3 s, the exact double
    /// backward 29.92 / 31.59 dB in 44.6 / 32.5 s.
    Lbfgs,
}

/// Curvature pairs L-BFGS keeps.
pub const LBFGS_HISTORY: usize = 20;

/// Objective evaluations an L-BFGS line search tries (halving the step each time) before it resets
/// the curvature history.
pub const LINE_SEARCH_TRIES: usize = 10;

/// How simulated and observed updates are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchingLoss {
    /// Inverting Gradients (Geiping et al. 2020): the mean over parameter tensors of 1 - cosine,
    /// blind to the update's scale. Every tensor counts the same: on four sin-cos IHC tiles (tiny
    /// ViT, batch 1, defaults) one cosine over all tensors concatenated, as the original code
    /// computes it, scored 20.94 dB / SSIM 0.265 against 22.18 / 0.378 for the mean, and weighting
    /// tensors by depth (exp(-a * layer / depth)) gained nothing (a = 1.5: 22.25 / 0.369; a = 4:
    /// 21.80; a = -1.5: 20.99).
    #[default]
    Cosine,
    /// DLG / iDLG (Zhu et al. 2019, Zhao et al. 2020): the sum over all entries of the squared
    /// difference, with labels from iDLG or label counts.
    SquaredL2,
}

impl MatchingLoss {
    /// The id of the attack this loss defines (`ig` or `dlg`).
    pub fn attack_id(self) -> &'static str {
        match self {
            MatchingLoss::Cosine => "ig",
            MatchingLoss::SquaredL2 => "dlg",
        }
    }
}

/// How the input gradient of the gradient-matching objective is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputGradient {
    /// Exact double backward through candle's autograd (keeps the whole gradient graph, and candle also
    /// computes the unneeded second-order parameter gradients).
    DoubleBackward,
    /// A Hessian-vector product by central difference: the objective's gradient with respect to the
    /// simulated update, u, is closed form; then grad_x = (grad_x L(x, theta + eps u) - grad_x L(x,
    /// theta - eps u)) / 2 eps. Three first-order passes, no retained graph, no parameter gradients in
    /// the last two. For a FedAvg delta of S local steps, an adjoint sweep back through the unrolled
    /// steps, each step's input and parameter Hessian-vector products from the same two passes: 3S
    /// first-order passes. Checked against the exact double backward in tests (cosine >= 0.999 in
    /// f64, for a gradient and for an unrolled plain- or momentum-SGD delta).
    CentralDifference,
    /// As [`InputGradient::CentralDifference`], but one-sided: grad_x = (grad_x L(x, theta + eps u) -
    /// grad_x L(x, theta)) / eps, where the second term comes from the pass that simulates the
    /// update (it also takes the input gradient). Two first-order passes (2S for S local steps), the
    /// second without parameter gradients; first-order accurate in eps instead of second-order.
    ForwardDifference,
    /// As [`InputGradient::ForwardDifference`] (two first-order passes), but the one-sided step
    /// alternates between theta + eps u and theta - eps u from one optimiser step to the next, so
    /// the difference's first-order error in eps changes sign every step and the optimiser's
    /// momentum averages it away.
    AlternatingDifference,
}

impl Default for InvertingGradientsConfig {
    fn default() -> Self {
        Self {
            iterations: 400,
            restarts: 2,
            restart_workers: 1,
            lr: 0.1,
            optimizer: ImageOptimizer::SignedAdam,
            tv_weight: 1e-3,
            opponent_tv_weight: 0.0,
            patch_weight: 0.0,
            prior_decay: 1.0,
            seed: 0,
            input_gradient: InputGradient::ForwardDifference,
            loss: MatchingLoss::Cosine,
            patch_refinement: SINGLE_IMAGE_PATCH_REFINEMENT,
            initial_spread: 1.0,
        }
    }
}

/// Prior decay [`InvertingGradientsConfig::default_prior_decay`] gives one image.
pub const SINGLE_IMAGE_PRIOR_DECAY: f64 = 0.1;

/// Iterations [`InvertingGradientsConfig::default_iterations`] gives a batch (more than one image).
pub const BATCH_ITERATIONS: usize = 3000;

/// Iterations [`InvertingGradientsConfig::default_iterations`] gives one image under L-BFGS: a cap,
/// since L-BFGS stops once its line search has failed twice in a row (converged). Measured
/// 2026-12-05 (tiny ViT with a learnable table, FedSGD, the first eight `dab_positive` IHC tiles,
/// `fedleak attack --attack ig`, 2 restarts): six tiles had converged by 400 iterations (the same
/// images at 1000), the other two went from 29.63 / 28.83 dB at 400 to 30.55 / 30.90 at 1000 and
/// stayed there at 2000; the eight 31.00 -> 31.37 dB, SSIM 0.916 -> 0.919. DLG (squared L2, no
/// prior) on the first tile: 20.25 dB at 400, 26.85 at 1000.
pub const SINGLE_IMAGE_LBFGS_ITERATIONS: usize = 1000;

/// Weight of the total-variation prior [`InvertingGradientsConfig::default_tv_weight`] gives a
/// batch (more than one image); one image keeps [`InvertingGradientsConfig::default`]'s, and so
/// does a FedAvg delta's unrolled steps ([`InvertingGradientsConfig::for_observation`]).
pub const BATCH_TV_WEIGHT: f64 = 3e-2;

impl InvertingGradientsConfig {
    /// Default prior decay for an observation of `images` private images: one image lets the prior
    /// go ([`SINGLE_IMAGE_PRIOR_DECAY`]), a batch keeps it (1). Measured on the sin-cos IHC tiles
    /// (tiny ViT, FedSGD): at batch 1 (400 iterations, 2 restarts) 0.1 raised every one of the 8
    /// tiles, mean 21.18 -> 21.84 dB, SSIM 0.33 -> 0.38 (0.03 was worse on the two tiles tried); at
    /// batch 8 (1000 iterations, 1 restart) it fell from 16.40 to 12.17 dB: with eight images behind
    /// one gradient the prior is needed to the end.
    ///
    /// ```
    /// use fedleak_attacks::{InvertingGradientsConfig, SINGLE_IMAGE_PRIOR_DECAY};
    /// assert_eq!(InvertingGradientsConfig::default_prior_decay(1), SINGLE_IMAGE_PRIOR_DECAY);
    /// assert_eq!(InvertingGradientsConfig::default_prior_decay(8), 1.0);
    /// ```
    pub fn default_prior_decay(images: usize) -> f64 {
        if images > 1 {
            1.0
        } else {
            SINGLE_IMAGE_PRIOR_DECAY
        }
    }

    /// Default weight of the total-variation prior for an observation of `images` private images:
    /// [`BATCH_TV_WEIGHT`] for a batch, [`InvertingGradientsConfig::default`]'s 1e-3 for one image.
    /// Signed Adam moves every pixel by the sign of its gradient, so the prior shapes a pixel only
    /// where its gradient outweighs the matching term's. A batch of mixed labels has a gradient that
    /// is the difference of its two classes' images' gradients; the matching term stays large, and at
    /// 1e-3 the result is pixel noise around each image's brightness. Measured 2026-12-05 (sin-cos
    /// tiny ViT, FedSGD batches of 8 IHC tiles at initial weights, `fedleak attack --attack auto`:
    /// 3000 iterations, 2 restarts; 1e-3 / 3e-2): a random batch of four and four labels from
    /// `fixture:ihc-tiles-32` 14.23 dB / SSIM 0.073 / 19.51 / 0.326; the capture's second batch
    /// (three and five) 21.37 / 0.450 / 21.19 / 0.443; the goal's eight
    /// tiles as one batch (one label) 17.41 / 0.221 / 17.19 / 0.236; the same tiles with four of them
    /// filed under the other label 13.84 / 0.230 / 14.96 / 0.240 (colours still wrong: both
    /// classes' tiles are brown, and their common colour cancels from the difference). A
    /// 1000-iteration, one-restart screen on the random batch gave 13.27, 15.39, 18.54, 16.66 and
    /// 18.66 dB at 1e-3, 1e-2, 3e-2, 1e-1 and 3e-1, on the one-label batch 17.00, 17.70 and 17.74 dB
    /// at 1e-3, 3e-2 and 1e-1. FedAvg with one image in each of 4 local steps (a client of a
    /// four-client capture, plain SGD at lr 0.01): 22.47 / 0.421 / 22.25 / 0.411. At batch 8 the
    /// attack recovers each image's colour and little of its layout: the images' own mean colours
    /// score 20.36, 21.97 and 17.41 dB on the two random batches and the one-label batch (the FedAvg
    /// client's 20.55, below its result).
    ///
    /// ```
    /// use fedleak_attacks::{InvertingGradientsConfig, BATCH_TV_WEIGHT};
    /// let single = InvertingGradientsConfig::default_tv_weight(1);
    /// assert_eq!(single, InvertingGradientsConfig::default().tv_weight);
    /// assert_eq!(InvertingGradientsConfig::default_tv_weight(8), BATCH_TV_WEIGHT);
    /// ```
    pub fn default_tv_weight(images: usize) -> f64 {
        if images > 1 {
            BATCH_TV_WEIGHT
        } else {
            Self::default().tv_weight
        }
    }

    /// Default input gradient for an observation of `images` private images: the two-pass forward
    /// difference for one image, the two-pass alternating difference for a batch. Measured on the
    /// sin-cos IHC tiles (tiny ViT): at batch 1 the forward difference costs nothing in quality (8
    /// tiles 21.93 dB / SSIM 0.379 against 21.84 / 0.38 for the three-pass central difference;
    /// FedAvg 4 local steps, 4 tiles 21.31 against 21.40 dB) for 0.72x the time per step. At batch 8
    /// (2000 iterations, 1 restart) the forward difference ended at higher matching objectives (3.1e-6
    /// / 3.4e-6 against 2.7e-6 / 1.0e-6) and lower PSNR (18.47 / 16.40 against 18.76 / 17.48 dB on
    /// two clients' batches): its first-order error in eps always pushes the same way. Alternating
    /// the side every step lets signed Adam's momentum cancel it: on 2026-12-03 (`fedleak attack
    /// --attack auto --input-gradient central|alternating`, 3000 iterations, 2 restarts, seed 1, four
    /// FedSGD batches of 8 sin-cos IHC tiles from two captures) alternating ended at a lower
    /// objective on three of the four (9.16e-7 / 9.51e-7 / 1.045e-6 / 1.363e-6 against 9.32e-7 /
    /// 1.419e-6 / 1.059e-6 / 1.309e-6), at 20.95 / 16.75 / 18.17 / 20.97 dB against 21.01 / 17.75 /
    /// 18.01 / 21.08 (mean 19.21 / SSIM 0.312 against 19.46 / 0.323: at batch 8 PSNR scatters by
    /// about 1 dB at equal objective), in 0.72x the wall time (1122 against 1564 s on one batch, run
    /// side by side). A FedAvg delta of 4 local SGD steps on 4 such tiles (one client): objective
    /// 3.163e-6 against 3.185e-6, 19.61 dB / SSIM 0.306 against 20.16 / 0.307.
    ///
    /// ```
    /// use fedleak_attacks::{InputGradient, InvertingGradientsConfig};
    /// let single = InvertingGradientsConfig::default_input_gradient(1);
    /// assert_eq!(single, InputGradient::ForwardDifference);
    /// let batch = InvertingGradientsConfig::default_input_gradient(8);
    /// assert_eq!(batch, InputGradient::AlternatingDifference);
    /// ```
    pub fn default_input_gradient(images: usize) -> InputGradient {
        if images > 1 {
            InputGradient::AlternatingDifference
        } else {
            InputGradient::ForwardDifference
        }
    }

    /// Default ridge of the patch refinement for an observation of `images` private images:
    /// [`SINGLE_IMAGE_PATCH_REFINEMENT`] for one, [`BATCH_PATCH_REFINEMENT`] for a batch (whose
    /// patches outnumber the equations; the figures are in their docs).
    ///
    /// ```
    /// use fedleak_attacks::{InvertingGradientsConfig, BATCH_PATCH_REFINEMENT};
    /// assert_eq!(InvertingGradientsConfig::default_patch_refinement(8), BATCH_PATCH_REFINEMENT);
    /// ```
    pub fn default_patch_refinement(images: usize) -> f64 {
        if images > 1 {
            BATCH_PATCH_REFINEMENT
        } else {
            SINGLE_IMAGE_PATCH_REFINEMENT
        }
    }

    /// The default configuration for an observation of `images` private images: iterations, prior
    /// weight and decay, input gradient and patch refinement as
    /// [`InvertingGradientsConfig::default_iterations`],
    /// [`InvertingGradientsConfig::default_tv_weight`],
    /// [`InvertingGradientsConfig::default_prior_decay`],
    /// [`InvertingGradientsConfig::default_input_gradient`] and
    /// [`InvertingGradientsConfig::default_patch_refinement`] give them.
    ///
    /// ```
    /// use fedleak_attacks::{InvertingGradientsConfig, BATCH_ITERATIONS};
    /// let batch = InvertingGradientsConfig::for_images(8);
    /// assert_eq!(batch.iterations, BATCH_ITERATIONS);
    /// assert_eq!(batch.prior_decay, 1.0);
    /// ```
    pub fn for_images(images: usize) -> Self {
        Self {
            iterations: Self::default_iterations(images, ImageOptimizer::default()),
            tv_weight: Self::default_tv_weight(images),
            prior_decay: Self::default_prior_decay(images),
            input_gradient: Self::default_input_gradient(images),
            patch_refinement: Self::default_patch_refinement(images),
            ..Self::default()
        }
    }

    /// [`InvertingGradientsConfig::for_images`] for the private images behind `observation` (its
    /// batch, or all clients' batches for an aggregate; one when it holds no update to invert), with
    /// the optimiser [`InvertingGradientsConfig::default_optimizer`] gives `model` and that
    /// optimiser's iterations, and the one-image TV weight (1e-3) wherever a client's update is
    /// unrolled through several local steps (a FedAvg delta, alone or in an aggregate): each step
    /// then holds a share of the images, and [`BATCH_TV_WEIGHT`], chosen for a mixed-label FedSGD
    /// batch of 8, smooths them too much. Measured 2026-12-05 (sin-cos tiny ViT, FedAvg with 4
    /// local steps of plain SGD at lr 0.01 on batches of 4 of their own, 16 IHC tiles behind one
    /// client's delta, `fedleak attack --attack auto`, labels 16 of 16 either way): 18.15 dB / SSIM
    /// 0.286 at objective 3.6e-6 with 3e-2 against 19.55 / 0.305 at 1.4e-6 with 1e-3 (19.24 with
    /// the binary of 2026-12-05 morning); with one image in each step the two weights had scored
    /// 22.47 / 0.421 (1e-3) and 22.25 / 0.411 (3e-2).
    pub fn for_observation(observation: &Observation, model: &dyn TargetModel) -> Self {
        let view = observation.update_view().ok();
        let images = Self::images_behind(view.as_ref());
        let unrolled = view
            .as_ref()
            .is_some_and(|view| view.clients.iter().any(|client| client.steps.len() > 1));
        let optimizer = Self::default_optimizer(model);
        Self {
            optimizer,
            iterations: Self::default_iterations(images, optimizer),
            tv_weight: Self::default_tv_weight(if unrolled { 1 } else { images }),
            ..Self::for_images(images)
        }
    }

    /// DLG's setting ([`InvertingGradientsConfig::dlg`]) with the iterations L-BFGS takes for the
    /// private images behind `observation`.
    pub fn dlg_for_observation(observation: &Observation) -> Self {
        Self {
            iterations: Self::default_iterations(
                Self::images_behind(observation.update_view().ok().as_ref()),
                ImageOptimizer::Lbfgs,
            ),
            ..Self::dlg()
        }
    }

    /// The private images behind an observation's update view: its batch, or all clients' batches
    /// for an aggregate; one when it holds no update to invert (no view).
    fn images_behind(view: Option<&UpdateView>) -> usize {
        view.map_or(1, |view| view.images)
    }

    /// Default optimiser for an attack on `model`: L-BFGS (with the finite-difference input
    /// gradient) when its position embedding is learnable, signed Adam behind a fixed table.
    /// Measured 2026-12-05 (tiny ViT at initial weights, FedSGD, the first eight `dab_positive` IHC
    /// tiles one per client, `fedleak attack --attack ig --optimizer signed-adam|lbfgs`, 2
    /// restarts). A learnable table (the image dominates the tokens): signed Adam (400 iterations)
    /// 16.04 dB / SSIM 0.273 (13.5 - 18.3 dB; 2000 iterations took two tiles from 13.5 / 15.0 to
    /// only 19.4 / 20.4 dB, at objectives of 3.4e-6 / 3.9e-6, which L-BFGS reaches at 29.9 / 31.6
    /// dB), L-BFGS 31.00 / 0.916 at 400 iterations and 31.37 / 0.919 at 1000 (29.7 - 33.0 dB, each
    /// tile above breaching's DLG's best), 9 - 14 s a tile; its TV weight is right at 1e-3 (two
    /// tiles: 22.6 / 21.4 dB at 1e-4, 25.4 / 26.7 at 1e-2). A batch of 8 (3000 iterations) 18.86 /
    /// 0.383 in 302 s against signed Adam's 18.77 / 0.390 in 458 s; FedAvg with one image in each
    /// of 4 local SGD steps (3000 iterations) 22.57 / 0.499 in 97 s against 23.05 / 0.483 in 559 s.
    /// A sin-cos table (the image a small perturbation of it): signed Adam 22.49 / 0.442, L-BFGS
    /// 22.01 / 0.396 (400 iterations), stopping early at objectives of 6e-7 - 2.5e-6 (TV 1e-4 or
    /// 1e-2 no better on two tiles); a batch of 8 19.51 / 0.326 against 18.23 / 0.317.
    pub fn default_optimizer(model: &dyn TargetModel) -> ImageOptimizer {
        let learnable_positions = model
            .patch_embedding()
            .is_some_and(|layout| layout.position_embedding.is_some());
        if learnable_positions {
            ImageOptimizer::Lbfgs
        } else {
            ImageOptimizer::SignedAdam
        }
    }

    /// Default iterations for an observation of `images` private images under `optimizer`. One image
    /// under L-BFGS: [`SINGLE_IMAGE_LBFGS_ITERATIONS`], a cap. One image under signed Adam has
    /// converged by the default 400 (on the sin-cos IHC tiles, 1000 iterations gave 22.40 / 20.94 dB against
    /// 22.44 / 21.13 dB at 400), a batch keeps improving ([`BATCH_ITERATIONS`]; batch 8 of those tiles:
    /// 15.8 dB at 300, 18.1 dB at 1000, 18.8 dB at 2000 iterations on one client; over both clients' 16
    /// images 17.25 dB at 1000 and 18.12 dB at 2000 iterations, 1 restart; re-measured on 2026-12-02
    /// at 2000 iterations: 17.49 dB with 1 restart, 18.12 dB with `fedleak attack`'s default 2).
    /// Measured on 2026-12-03 with the hand-written backward (2 restarts, no patch refinement; client
    /// 0 / client 1 of that capture): 2000 iterations 18.59 / 16.27 dB (seed 1), - / 16.71 (seed 2);
    /// 3000 iterations 20.77 / 16.88 (seed 1), 20.70 / 17.16 (seed 2); 4000 iterations 20.98 / 16.86
    /// (seed 1). 3000 it is: +1.4 dB on average for 1.5x the time, where 4000 added 0.1 dB more.
    ///
    /// ```
    /// use fedleak_attacks::{
    ///     ImageOptimizer, InvertingGradientsConfig, BATCH_ITERATIONS, SINGLE_IMAGE_LBFGS_ITERATIONS,
    /// };
    /// let single = InvertingGradientsConfig::default_iterations(1, ImageOptimizer::SignedAdam);
    /// assert_eq!(single, InvertingGradientsConfig::default().iterations);
    /// let lbfgs = InvertingGradientsConfig::default_iterations(1, ImageOptimizer::Lbfgs);
    /// assert_eq!(lbfgs, SINGLE_IMAGE_LBFGS_ITERATIONS);
    /// let batch = InvertingGradientsConfig::default_iterations(8, ImageOptimizer::Lbfgs);
    /// assert_eq!(batch, BATCH_ITERATIONS);
    /// ```
    pub fn default_iterations(images: usize, optimizer: ImageOptimizer) -> usize {
        match (images > 1, optimizer) {
            (true, _) => BATCH_ITERATIONS,
            (false, ImageOptimizer::Lbfgs) => SINGLE_IMAGE_LBFGS_ITERATIONS,
            (false, ImageOptimizer::SignedAdam) => Self::default().iterations,
        }
    }

    /// DLG's setting: squared-L2 matching without an image prior, optimised by L-BFGS (labels known,
    /// as in iDLG). The input gradient is the exact double backward: the central difference agreed with
    /// it only to cosine 0.984 on the squared-L2 loss in the f64 test, below the 0.999 it must reach,
    /// and L-BFGS's line search needs a gradient consistent with the objective.
    pub fn dlg() -> Self {
        Self {
            optimizer: ImageOptimizer::Lbfgs,
            tv_weight: 0.0,
            opponent_tv_weight: 0.0,
            patch_weight: 0.0,
            loss: MatchingLoss::SquaredL2,
            input_gradient: InputGradient::DoubleBackward,
            patch_refinement: 0.0,
            initial_spread: DLG_INITIAL_SPREAD,
            ..Self::default()
        }
    }
}

/// [`InvertingGradientsConfig::initial_spread`] of DLG: start from grey with noise 0.02 wide.
/// Measured 2026-12-05 (tiny ViT at initial weights, FedSGD batch 1, the first eight `dab_positive`
/// IHC tiles one per client, `fedleak attack --attack dlg`, defaults otherwise, scratch build with
/// the width from the environment; 2 restarts, at most 1000 L-BFGS iterations, 56 - 116 s a tile):
/// behind a sin-cos table 15.81 dB / SSIM 0.101 from noise over [0, 1] (14.98 - 16.75 dB a tile),
/// **21.61 / 0.363** from width 0.02 (19.81 - 23.02; breaching's DLG 20.6 dB on this case); with a
/// learnable table 25.24 / 0.749 (23.49 - 26.78) and **30.06 / 0.892** (24.86 - 34.79; breaching's
/// 22.9, three of eight stalled). On the first two sin-cos tiles the width 1 / 0.5 / 0.2 / 1e-4
/// gave 15.86 / 16.68 / 19.72 / 21.38 and 16.75 / 17.72 / 20.32 / 21.62 dB; a little noise is
/// kept so that restarts differ. Inverting Gradients keeps
/// noise over [0, 1]: its prior fills those directions in, and the start made no difference (sin-cos
/// table, signed Adam: 22.51 / 0.449 from [0, 1], 22.30 / 0.440 at width 0.2, 22.55 / 0.454 at
/// 1e-4; learnable table, L-BFGS: 31.40 / 0.919, 31.39 / 0.918, 31.34 / 0.918).
pub const DLG_INITIAL_SPREAD: f64 = 0.02;

/// The most a patch refinement may multiply the matching objective by and still be kept. On a
/// sin-cos IHC tile (tiny ViT, batch 1) the refinements at the three step decays and of the result
/// changed it by 0.2x, 1.1x, 2.2x and 1.5x, and every one moved the images closer to the private
/// one; with a learnable position embedding, where Inverting Gradients stops far from the images (16
/// dB, objective 3-5e-5), they raised it 50- to 900-fold, and taken anyway they wrecked the images
/// (8 tiles 16.1 -> 7.1 dB); on the optimisation test's fresh vit-micro-32 (60 iterations, 8 dB)
/// 8.5- to 10.7-fold, and the ones a tenfold bound let through cost the test its margin.
pub const MAX_REFINEMENT_RISE: f64 = 3.0;

/// Observed tensors with a norm below this fraction of the largest are treated as zero.
const NEGLIGIBLE_NORM: f64 = 1e-6;

/// One attack step: the gradient-matching objective of candidate images and its input gradient.
///
/// Holds what the attacker matches against (the observed update, how to simulate it, the labels); what
/// `fedleak bench --step attack` times is exactly [`GradientMatcher::objective_and_gradient`].
#[derive(Clone)]
pub struct GradientMatcher<'a> {
    model: &'a dyn TargetModel,
    observed: &'a ParamMap,
    /// `None`: match a gradient. `Some((lr, steps))`: unroll `steps` SGD steps and match the delta.
    unroll: Option<(f64, usize)>,
    /// Heavy-ball momentum of the unrolled steps (0: plain SGD; [`GradientMatcher::with_momentum`]).
    momentum: f64,
    names: Vec<String>,
    observed_norms: Vec<f64>,
    /// Norm of the global values of the observed parameters (the finite differences' step scale):
    /// constant over an attack, so taken once.
    start_norm: f64,
    /// The known labels as one-hot rows (B x classes); `None` when they are optimised jointly with
    /// the images and every evaluation brings its own.
    soft_labels: Option<Tensor>,
    /// The dtype and device of the model's parameters (and so of candidate images).
    dtype: DType,
    device: Device,
    prior: ImagePrior,
    input_gradient: InputGradient,
    loss: MatchingLoss,
    /// The patch refinement's ridge and the known labels, when the refinement applies
    /// ([`GradientMatcher::with_patch_refinement`]).
    refinement: Option<(f64, Vec<u32>)>,
    /// The clients the update averages, each with its weight and which candidates each of its
    /// unrolled steps trains on ([`GradientMatcher::with_clients`]); `None`: one client whose every
    /// step trains on all candidates.
    clients: Option<Vec<ClientSteps>>,
}

/// Where one client's simulated local SGD stands after some of its steps
/// ([`GradientMatcher::simulated_sgd_step`]), so that simulations sharing their first steps share
/// them once.
#[derive(Debug, Clone)]
pub(crate) struct SimulatedSgd {
    /// The observed parameters, in the matcher's order.
    parameters: Vec<Tensor>,
    /// The heavy-ball velocity of the last step (`None` before the first).
    velocity: Option<Vec<Tensor>>,
}

/// Relative step of the central difference: eps * |u| = this fraction of |theta|.
const CENTRAL_DIFFERENCE_STEP: f64 = 1e-3;

/// Relative step of the forward difference in f32 (as [`CENTRAL_DIFFERENCE_STEP`]). On a real IHC
/// tile's f32 gradient (vit-micro-32, sin-cos), against the exact double backward in f64, at a random
/// image and near the true one: cosine 0.99983-0.99991 at 1e-2, 0.999997-0.999999 at 1e-3 and
/// 3e-4, 0.99998 at 1e-4 (rounding takes over).
const FORWARD_DIFFERENCE_STEP: f64 = 1e-3;

/// Relative step of the forward difference in f64, where rounding allows a smaller step: on the
/// finite-difference test's model (weights scaled away from the linear regime) the worst cosine
/// against the exact double backward is 0.9985 at 1e-3, 0.9999998 at 1e-5, 0.99998 at 1e-6.
const FORWARD_DIFFERENCE_STEP_F64: f64 = 1e-5;

/// A point of the finite-difference sweep: parameters at which Hessian-vector products are taken,
/// with (forward difference only) the first-order gradients there that the products are
/// differences from.
struct SweepPoint {
    theta: Vec<Tensor>,
    /// The norm of `theta`, the scale of the finite-difference step.
    theta_norm: f64,
    /// The input gradient of the training loss at `theta`.
    input: Option<Tensor>,
    /// The parameter gradient at `theta`, kept when the sweep needs parameter products there.
    gradient: Option<Vec<Tensor>>,
}

/// One client's forward sweep with what it trained on, for the adjoint sweep back through it.
struct AdjointSweep<'s> {
    client: &'s ClientSteps,
    /// The parameters before each of the client's steps ([`GradientMatcher::forward_sweep`]).
    points: &'s [SweepPoint],
    /// All candidate images and their labels (the client's steps take their ranges).
    images: &'s Tensor,
    labels: &'s Tensor,
    /// The side of a one-sided difference (see [`GradientMatcher::hessian_products`]).
    side: f64,
}

impl<'a> GradientMatcher<'a> {
    /// A matcher for `observed` (a gradient when `unroll` is `None`, else an SGD weight delta of
    /// `(lr, steps)`), under the model's global parameters and the given labels (`None`: labels
    /// optimised jointly; each evaluation then brings its own label logits, and the known-label
    /// methods return [`AttackError::LabelsUnknown`]).
    pub fn new(
        model: &'a dyn TargetModel,
        observed: &'a ParamMap,
        unroll: Option<(f64, usize)>,
        labels: Option<&[u32]>,
        prior: ImagePrior,
        input_gradient: InputGradient,
    ) -> Result<Self> {
        let names: Vec<String> = observed
            .keys()
            .filter(|k| model.parameters().contains_key(*k))
            .cloned()
            .collect();
        let observed_norms = names
            .iter()
            .map(|n| {
                Ok(observed[n]
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?
                    .sqrt())
            })
            .collect::<Result<Vec<f64>>>()?;
        // Tensors whose gradient is zero in exact arithmetic (e.g. attention key biases: softmax ignores
        // a per-row shift) carry only rounding noise; normalising by their tiny norms would amplify that
        // noise into the input gradient, so they are left out.
        let largest = observed_norms.iter().copied().fold(0f64, f64::max);
        let (names, observed_norms): (Vec<String>, Vec<f64>) = names
            .into_iter()
            .zip(observed_norms)
            .filter(|(_, norm)| *norm > largest * NEGLIGIBLE_NORM)
            .unzip();
        let (dtype, device) = model
            .parameters()
            .values()
            .next()
            .map(|t| (t.dtype(), t.device().clone()))
            .unwrap_or((DType::F32, Device::Cpu));
        let soft_labels = labels
            .map(|labels| one_hot(labels, model.num_classes(), dtype, &device))
            .transpose()?;
        let start: Vec<Tensor> = names
            .iter()
            .map(|n| model.parameters()[n].clone())
            .collect();
        let start_norm = squared_norm(&start)?.sqrt();
        Ok(Self {
            model,
            observed,
            unroll,
            names,
            observed_norms,
            start_norm,
            soft_labels,
            dtype,
            device,
            prior,
            input_gradient,
            loss: MatchingLoss::Cosine,
            refinement: None,
            momentum: 0.0,
            clients: None,
        })
    }

    /// The same matcher for local steps on batches of their own ([`crate::LocalBatches::PerStep`]):
    /// step `s` of the unrolled update trains on the next `sizes[s]` candidate images (and their
    /// labels) after those of the steps before it, so candidates hold `sizes.iter().sum()` images
    /// (the patch refinement then takes each image's token gradients from its own step).
    ///
    /// # Errors
    /// [`AttackError::Configuration`] when the matcher does not unroll exactly `sizes.len()` steps.
    pub fn with_step_batches(self, sizes: &[usize]) -> Result<Self> {
        let steps = self.unroll.map_or(0, |(_, steps)| steps);
        if steps != sizes.len() {
            return Err(AttackError::Configuration {
                attack: self.loss.attack_id(),
                reason: format!(
                    "{} step batches given for an update of {steps} unrolled local step(s)",
                    sizes.len()
                ),
            });
        }
        let steps = consecutive_ranges(0, sizes);
        self.with_clients(&[ClientSteps { weight: 1.0, steps }])
    }

    /// The same matcher for an update that averages `clients` (an aggregate; one client's update
    /// is one client of weight 1): the simulated update is the weighted sum of the clients' own,
    /// each unrolled from the global parameters on its own candidates step by step (FedAvg clients
    /// do not share a trajectory), and the patch refinement takes each image's token gradients from
    /// its client's steps. See [`crate::UpdateView::clients`].
    ///
    /// # Errors
    /// [`AttackError::Configuration`] when there are no clients, a client has no steps, or a client
    /// takes more than one step in a matcher of a gradient.
    pub fn with_clients(mut self, clients: &[ClientSteps]) -> Result<Self> {
        let gradient = self.unroll.is_none();
        let unfit = clients
            .iter()
            .find(|client| client.steps.is_empty() || (gradient && client.steps.len() > 1));
        if clients.is_empty() || unfit.is_some() {
            return Err(AttackError::Configuration {
                attack: self.loss.attack_id(),
                reason: format!(
                    "{} client(s), one of {} step(s), for a matcher of {}",
                    clients.len(),
                    unfit.map_or(0, |client| client.steps.len()),
                    match self.unroll {
                        Some((_, steps)) => format!("{steps} unrolled local step(s)"),
                        None => "a gradient".to_string(),
                    }
                ),
            });
        }
        self.clients = Some(clients.to_vec());
        Ok(self)
    }

    /// The clients to simulate for candidates of `images` images: the matcher's own, or one client
    /// training on all of them at each unrolled step (one for a gradient).
    fn clients_of(&self, images: usize) -> Cow<'_, [ClientSteps]> {
        match &self.clients {
            Some(clients) => Cow::Borrowed(clients),
            None => Cow::Owned(vec![ClientSteps {
                weight: 1.0,
                steps: vec![0..images; self.unroll.map_or(1, |(_, steps)| steps.max(1))],
            }]),
        }
    }

    /// The same matcher under other known labels (one per candidate image, in the candidates'
    /// order), for the matching and the patch refinement alike.
    fn with_known_labels(mut self, labels: &[u32]) -> Result<Self> {
        self.soft_labels = Some(one_hot(
            labels,
            self.model.num_classes(),
            self.dtype,
            &self.device,
        )?);
        if let Some((_, refined_labels)) = &mut self.refinement {
            *refined_labels = labels.to_vec();
        }
        Ok(self)
    }

    /// For local steps on batches of their own, or clients of an aggregate that unroll apart, under
    /// known labels, which step's batch (or client) each candidate (an image with its label)
    /// belongs to is a guess: the counts over all images are all the update tells of the labels
    /// ([`crate::deal_labels_over_steps`]), and on a multi-step delta they are estimates (a 4-step
    /// delta of one image per step at the initial weights: 1 of 4 labels wrong on two of four
    /// clients). This searches greedily, keeping each move that lowers the matching objective:
    /// swaps of two candidates of different groups (steps' batches, clients) and different labels
    /// (which changes the groups' label counts), then, when `relabel`, each candidate's label set
    /// to each other class. Returns the new order of the candidates (position `k` takes candidate
    /// `order[k]`) and the labels of the positions, or `None` when no move helps or the search
    /// does not apply. Costs one first-order unroll per move tried.
    ///
    /// Relabelling can hurt: on candidates still far from the private images the objective moved
    /// a right count to a wrong one (7.9 dB, where keeping the counts gave 22.4 dB), so Inverting
    /// Gradients relabels in every second restart only and keeps the restart with the lower
    /// objective. A gate on the classifier bias residual (relabel only where the simulated bias
    /// says the counts are off) was tried and dropped: the optimisation fits the bias delta under
    /// the wrong labels by shifting the candidates' softmax, so the residual does not show the
    /// miscount (8.23 dB, the same objective as no search).
    pub fn rearranged_candidates(
        &self,
        images: &Tensor,
        relabel: bool,
    ) -> Result<Option<(Vec<usize>, Vec<u32>)>> {
        let (Some(clients), Some(soft_labels)) = (&self.clients, &self.soft_labels) else {
            return Ok(None);
        };
        let mut labels = soft_labels.argmax(1)?.to_vec1::<u32>()?;
        // The group of images each candidate trained with (its step's batch, or its client's).
        let mut group_of = vec![usize::MAX; labels.len()];
        for (group, range) in clients.iter().flat_map(|c| &c.steps).enumerate() {
            for k in range.clone() {
                if let Some(slot) = group_of.get_mut(k).filter(|slot| **slot == usize::MAX) {
                    *slot = group;
                }
            }
        }
        if group_of.iter().all(|&group| group == group_of[0]) {
            return Ok(None);
        }
        let images = images.detach();
        let classes = self.model.num_classes() as u32;
        let objective_of = |order: &[usize], labels: &[u32]| -> Result<f64> {
            let index = Tensor::new(
                order.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                &self.device,
            )?;
            let targets = one_hot(labels, classes as usize, self.dtype, &self.device)?;
            let simulated =
                self.simulate_first_order(&images.index_select(&index, 0)?, &targets)?;
            let (objective, _, scale) = self.objective_and_direction(&simulated)?;
            Ok(objective * scale)
        };
        let mut order: Vec<usize> = (0..group_of.len()).collect();
        let mut best = objective_of(&order, &labels)?;
        let mut moved = false;
        for i in 0..order.len() {
            for j in i + 1..order.len() {
                if group_of[i] == group_of[j] || labels[i] == labels[j] {
                    continue;
                }
                order.swap(i, j);
                labels.swap(i, j);
                let objective = objective_of(&order, &labels)?;
                if objective < best {
                    best = objective;
                    moved = true;
                } else {
                    order.swap(i, j);
                    labels.swap(i, j);
                }
            }
        }
        if relabel {
            for k in 0..order.len() {
                let given = labels[k];
                for class in (0..classes).filter(|&c| c != given) {
                    let kept = std::mem::replace(&mut labels[k], class);
                    let objective = objective_of(&order, &labels)?;
                    if objective < best {
                        best = objective;
                        moved = true;
                    } else {
                        labels[k] = kept;
                    }
                }
            }
        }
        Ok(moved.then_some((order, labels)))
    }

    /// Where every client's simulated local SGD starts: the global parameters, no velocity.
    pub(crate) fn sgd_start(&self) -> SimulatedSgd {
        let base = self.model.parameters();
        SimulatedSgd {
            parameters: self.names.iter().map(|n| base[n].clone()).collect(),
            velocity: None,
        }
    }

    /// `state` after one more simulated local SGD step on `images` (N x C x H x W) under `labels`
    /// (one class per image), by one first-order pass at the matcher's learning rate and momentum.
    ///
    /// # Errors
    /// [`AttackError::Configuration`] when the matcher matches a gradient (it unrolls no steps);
    /// [`AttackError::Observation`] for labels outside the model's classes; candle errors.
    pub(crate) fn simulated_sgd_step(
        &self,
        state: &SimulatedSgd,
        images: &Tensor,
        labels: &[u32],
    ) -> Result<SimulatedSgd> {
        let Some((lr, _)) = self.unroll else {
            return Err(AttackError::Configuration {
                attack: self.loss.attack_id(),
                reason: "a matcher of a gradient simulates no local steps".to_string(),
            });
        };
        let targets = one_hot(labels, self.model.num_classes(), self.dtype, &self.device)?;
        self.advance(state, &images.to_dtype(self.dtype)?, &targets, lr)
    }

    /// How far `state` has moved the parameter `name` from its global value.
    ///
    /// # Errors
    /// [`AttackError::Observation`] for a parameter the update does not observe.
    pub(crate) fn simulated_change(&self, state: &SimulatedSgd, name: &str) -> Result<Tensor> {
        let index =
            self.names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| AttackError::Observation {
                    name: name.to_string(),
                    reason: "absent from the update".to_string(),
                })?;
        Ok((&state.parameters[index] - &self.model.parameters()[name])?)
    }

    /// `state` after one local SGD step on `images` under one-hot `labels` at learning rate `lr`.
    fn advance(
        &self,
        state: &SimulatedSgd,
        images: &Tensor,
        labels: &Tensor,
        lr: f64,
    ) -> Result<SimulatedSgd> {
        let (_, gradient) = self.first_order(&state.parameters, images, labels, false, true)?;
        let gradient = gradient.ok_or_else(|| self.no_parameter_gradients())?;
        let (parameters, velocity) =
            self.sgd_step(&state.parameters, state.velocity.as_deref(), gradient, lr)?;
        Ok(SimulatedSgd {
            parameters,
            velocity: Some(velocity),
        })
    }

    /// The update `images` under `labels` would produce, by first-order passes only (no graph kept):
    /// the weighted sum of each client's gradient, or of its delta after its unrolled steps.
    fn simulate_first_order(&self, images: &Tensor, labels: &Tensor) -> Result<Vec<Tensor>> {
        let start = self.sgd_start().parameters;
        self.sum_over_clients(&self.clients_of(images.dim(0)?), |client| {
            Ok(match self.unroll {
                None => {
                    let (step_images, step_labels) =
                        slice_inputs(images, labels, &client.steps[0])?;
                    let (_, gradient) =
                        self.first_order(&start, &step_images, &step_labels, false, true)?;
                    gradient.ok_or_else(|| self.no_parameter_gradients())?
                }
                Some((lr, _)) => {
                    let trajectory = self.first_order_trajectory(
                        client,
                        images,
                        labels,
                        lr,
                        client.steps.len(),
                    )?;
                    let end = trajectory.last().unwrap_or(&start);
                    end.iter()
                        .zip(&start)
                        .map(|(end, begin)| end - begin)
                        .collect::<candle_core::Result<_>>()?
                }
            })
        })
    }

    /// The weighted sum over `clients` ([`GradientMatcher::clients_of`]) of the update `update_of`
    /// gives for each.
    fn sum_over_clients(
        &self,
        clients: &[ClientSteps],
        mut update_of: impl FnMut(&ClientSteps) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let mut total: Option<Vec<Tensor>> = None;
        for client in clients {
            let update = update_of(client)?;
            total = Some(add_weighted(total, update, client.weight)?);
        }
        total.ok_or_else(|| self.no_parameter_gradients())
    }

    /// The error of a first-order pass that returned no parameter gradients.
    fn no_parameter_gradients(&self) -> AttackError {
        AttackError::Numerical {
            attack: self.loss.attack_id(),
            reason: "a first-order pass returned no parameter gradients".to_string(),
        }
    }

    /// The observed parameters before each of the first `steps` of `client`'s unrolled local SGD
    /// steps at `lr` and after the last (`steps + 1` points, the global values first), on its
    /// images of `images` under `labels`, by first-order passes only (no graph kept).
    fn first_order_trajectory(
        &self,
        client: &ClientSteps,
        images: &Tensor,
        labels: &Tensor,
        lr: f64,
        steps: usize,
    ) -> Result<Vec<Vec<Tensor>>> {
        // Only the last step's velocity is kept: the trajectory holds parameters alone.
        let mut state = self.sgd_start();
        let mut trajectory = vec![state.parameters.clone()];
        for range in client.steps.iter().take(steps) {
            let (step_images, step_labels) = slice_inputs(images, labels, range)?;
            state = self.advance(&state, &step_images, &step_labels, lr)?;
            trajectory.push(state.parameters.clone());
        }
        Ok(trajectory)
    }

    /// The same matcher refining candidates by [`refine_patches_after_steps_on_batches`] at `ridge` (see
    /// [`GradientMatcher::refine`]); for an observed gradient or plain- or momentum-SGD delta with
    /// known labels; a ridge of 0 switches it off.
    pub fn with_patch_refinement(mut self, ridge: f64, labels: &[u32]) -> Self {
        self.refinement = (ridge > 0.0).then(|| (ridge, labels.to_vec()));
        self
    }

    /// The same matcher unrolling SGD steps with heavy-ball `momentum` (`v = momentum v + g`, `theta
    /// -= lr v`, from a zero velocity), for a momentum-SGD delta.
    pub fn with_momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }

    /// Candidate images (B x C x H x W) after the patch refinement, with their matching objective;
    /// `None` when the matcher has none, when it does not apply to them, or when it raises the
    /// matching objective more than [`MAX_REFINEMENT_RISE`]-fold (candidates too far from the private
    /// images for their token gradients to stand in for the true ones).
    pub fn refine(&self, images: &Tensor) -> Result<Option<(Tensor, f64)>> {
        let Some((ridge, labels)) = &self.refinement else {
            return Ok(None);
        };
        // Where each client took its gradients and with which factor: the global parameters (its
        // weight w) for a gradient; for a delta each local step's, unrolled at the candidates, with
        // -w lr c_s, c_s = sum_{t >= s} momentum^(t - s) (1 for plain SGD).
        let images_detached = images.detach();
        let mut steps = Vec::new();
        for client in self.clients_of(images.dim(0)?).iter() {
            match self.unroll {
                None => steps.push(RefinementStep {
                    parameters: self.model.parameters().clone(),
                    factor: client.weight,
                    images: client.steps[0].clone(),
                }),
                Some((lr, _)) => {
                    let count = client.steps.len();
                    // The parameters each step took its gradient at (no pass after the last step).
                    let trajectory = self.first_order_trajectory(
                        client,
                        &images_detached,
                        self.known_labels()?,
                        lr,
                        count - 1,
                    )?;
                    steps.extend(
                        trajectory
                            .iter()
                            .zip(momentum_gradient_weights(self.momentum, count))
                            .zip(&client.steps)
                            .map(|((theta, weight), range)| RefinementStep {
                                parameters: self.params_with(theta),
                                factor: -lr * weight * client.weight,
                                images: range.clone(),
                            }),
                    );
                }
            }
        }
        let Some(refined) = refine_patches_after_client_steps(
            self.model,
            self.observed,
            &steps,
            images,
            labels,
            *ridge,
        )?
        else {
            return Ok(None);
        };
        let objective = |x: &Tensor| -> Result<f64> {
            Ok(self.matching(x)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        };
        let after = objective(&refined)?;
        Ok((after <= MAX_REFINEMENT_RISE * objective(images)?).then_some((refined, after)))
    }

    /// The same matcher with another matching loss.
    pub fn with_loss(mut self, loss: MatchingLoss) -> Self {
        self.loss = loss;
        self
    }

    /// Global parameters with the observed ones replaced by `values` (same order as `names`).
    fn params_with(&self, values: &[Tensor]) -> ParamMap {
        let mut params = self.model.parameters().clone();
        for (name, value) in self.names.iter().zip(values) {
            params.insert(name.clone(), value.clone());
        }
        params
    }

    /// The update the candidate images would produce, tensor by tensor (graph kept to the images):
    /// the weighted sum of each client's gradient, or of its delta after its unrolled steps.
    fn simulate(&self, images: &Tensor, soft_labels: &Tensor) -> Result<Vec<Tensor>> {
        let start = self.sgd_start().parameters;
        self.sum_over_clients(&self.clients_of(images.dim(0)?), |client| {
            Ok(match self.unroll {
                None => {
                    let (step_images, step_labels) =
                        slice_inputs(images, soft_labels, &client.steps[0])?;
                    self.loss_gradient(&start, &step_images, &step_labels)?
                }
                Some((lr, _)) => {
                    // theta_{s+1} = theta_s - lr * grad L(x', theta_s). A zero variable added at each
                    // step makes candle keep the gradient with respect to the intermediate parameters.
                    let mut current = start.clone();
                    let mut velocity: Option<Vec<Tensor>> = None;
                    for range in &client.steps {
                        let (step_images, step_labels) = slice_inputs(images, soft_labels, range)?;
                        let probes: Vec<Var> = current
                            .iter()
                            .map(|t| Var::zeros(t.shape(), t.dtype(), t.device()))
                            .collect::<candle_core::Result<_>>()?;
                        let shifted: Vec<Tensor> = current
                            .iter()
                            .zip(&probes)
                            .map(|(t, p)| t + p.as_tensor())
                            .collect::<candle_core::Result<_>>()?;
                        let loss = self.model.loss(
                            &self.params_with(&shifted),
                            &step_images,
                            &step_labels,
                        )?;
                        let grads = loss.backward()?;
                        let gradient: Vec<Tensor> = current
                            .iter()
                            .zip(&probes)
                            .map(|(t, p)| match grads.get(p.as_tensor()) {
                                Some(g) => Ok(g.clone()),
                                None => t.zeros_like(),
                            })
                            .collect::<candle_core::Result<_>>()?;
                        let (next, step) =
                            self.sgd_step(&current, velocity.as_deref(), gradient, lr)?;
                        current = next;
                        velocity = Some(step);
                    }
                    current
                        .iter()
                        .zip(&start)
                        .map(|(end, begin)| end - begin)
                        .collect::<candle_core::Result<_>>()?
                }
            })
        })
    }

    /// The matching objective alone: the mean over parameter tensors of 1 - cosine(simulated, observed).
    /// Every tensor counts equally, so the patch embedding and early blocks (which carry the image) are
    /// not drowned by the few tensors with the largest gradients.
    pub fn matching(&self, images: &Tensor) -> Result<Tensor> {
        self.matching_with(images, self.known_labels()?)
    }

    /// The known labels, or an error for a matcher whose labels are optimised jointly.
    fn known_labels(&self) -> Result<&Tensor> {
        self.soft_labels.as_ref().ok_or(AttackError::LabelsUnknown {
            attack: self.loss.attack_id(),
        })
    }

    /// [`GradientMatcher::matching`] under the given soft labels (B x classes) instead of the
    /// matcher's own.
    fn matching_with(&self, images: &Tensor, soft_labels: &Tensor) -> Result<Tensor> {
        let simulated = self.simulate(images, soft_labels)?;
        let mut total = Tensor::zeros((), images.dtype(), images.device())?;
        let mut counted = 0usize;
        for ((g, name), &t_norm) in simulated.iter().zip(&self.names).zip(&self.observed_norms) {
            if t_norm == 0.0 {
                continue;
            }
            let t = self.observed[name].to_dtype(g.dtype())?;
            if self.loss == MatchingLoss::SquaredL2 {
                total = (total + (g - &t)?.sqr()?.sum_all()?)?;
                continue;
            }
            let dot = (g * &t)?.sum_all()?;
            let norm = g.sqr()?.sum_all()?.sqrt()?;
            // A floor, not an additive epsilon: small but genuine norms must keep their true cosine.
            let cosine = (dot / (norm * t_norm)?.maximum(1e-30)?)?;
            total = (total + cosine.affine(-1.0, 1.0)?)?;
            counted += 1;
        }
        match self.loss {
            MatchingLoss::Cosine => Ok((total / counted.max(1) as f64)?),
            MatchingLoss::SquaredL2 => Ok(total),
        }
    }

    /// The matching objective (without the prior) and the input gradient of matching + prior.
    pub fn objective_and_gradient(&self, images: &Tensor) -> Result<(f64, Tensor)> {
        self.objective_and_gradient_under(images, &self.prior, 0)
    }

    /// [`GradientMatcher::objective_and_gradient`] as the optimiser's evaluation number `step`
    /// computes it: the same for every input gradient but [`InputGradient::AlternatingDifference`],
    /// whose one-sided step is taken towards `theta + eps u` at even steps and `theta - eps u` at odd
    /// ones.
    pub fn objective_and_gradient_at_step(
        &self,
        images: &Tensor,
        step: usize,
    ) -> Result<(f64, Tensor)> {
        self.objective_and_gradient_under(images, &self.prior, step)
    }

    /// [`GradientMatcher::objective_and_gradient`] with `prior` in place of the matcher's own (a
    /// prior schedule's current weights).
    /// `evaluation` counts the optimiser's evaluations (it sets the side of
    /// [`InputGradient::AlternatingDifference`]'s step).
    fn objective_and_gradient_under(
        &self,
        images: &Tensor,
        prior: &ImagePrior,
        evaluation: usize,
    ) -> Result<(f64, Tensor)> {
        match self.input_gradient {
            InputGradient::CentralDifference
            | InputGradient::ForwardDifference
            | InputGradient::AlternatingDifference => {
                let side = if self.input_gradient == InputGradient::AlternatingDifference
                    && evaluation % 2 == 1
                {
                    -1.0
                } else {
                    1.0
                };
                self.finite_difference(images, prior, side)
            }
            InputGradient::DoubleBackward => {
                let (objective, gradient, _) = self.exact_gradients(images, None, prior)?;
                Ok((objective, gradient))
            }
        }
    }

    /// [`InputGradient::CentralDifference`], [`InputGradient::ForwardDifference`] and
    /// [`InputGradient::AlternatingDifference`] (`side` -1: the one-sided step backwards): first-order
    /// passes only. For a gradient: one pass for the simulated gradient, then one (forward) or two
    /// (central) for the Hessian-vector product. For an unrolled delta of S local steps: S passes
    /// forward through the steps, then an adjoint sweep back through them with one or two passes per
    /// step, each giving the step's mixed (input) and parameter Hessian-vector products at once. An
    /// aggregate does this client by client, each client's sweep starting from its weight times
    /// the objective's direction.
    fn finite_difference(
        &self,
        images: &Tensor,
        prior: &ImagePrior,
        side: f64,
    ) -> Result<(f64, Tensor)> {
        let forward = self.input_gradient != InputGradient::CentralDifference;
        let images = images.detach();
        let labels = self.known_labels()?;
        let clients = self.clients_of(images.dim(0)?);
        let mut sweeps = Vec::with_capacity(clients.len());
        let simulated = self.sum_over_clients(&clients, |client| {
            let (points, update) = self.forward_sweep(client, &images, labels, forward)?;
            sweeps.push(points);
            Ok(update)
        })?;
        let (objective, direction, scale) = self.objective_and_direction(&simulated)?;
        // Parameter-sized: not needed once the direction is known (a ViT-B/16 update is 344 MB).
        drop(simulated);
        let prior = prior.gradient(&images)?;
        let mut matching_gradient = images.zeros_like()?;
        for (client, points) in clients.iter().zip(&sweeps) {
            let adjoint = if client.weight == 1.0 {
                direction.clone()
            } else {
                direction
                    .iter()
                    .map(|d| d * client.weight)
                    .collect::<candle_core::Result<_>>()?
            };
            let sweep = AdjointSweep {
                client,
                points,
                images: &images,
                labels,
                side,
            };
            matching_gradient = self.adjoint_sweep(&sweep, adjoint, matching_gradient)?;
        }
        let gradient = ((matching_gradient * scale)? + prior)?;
        Ok((objective * scale, gradient))
    }

    /// The forward half of [`GradientMatcher::finite_difference`] for one client: the parameters
    /// before each of its local steps (with, for a `forward` difference, the input and parameter
    /// gradients there; one point at the global parameters for a gradient), and its update.
    fn forward_sweep(
        &self,
        client: &ClientSteps,
        images: &Tensor,
        labels: &Tensor,
        forward: bool,
    ) -> Result<(Vec<SweepPoint>, Vec<Tensor>)> {
        let base = self.model.parameters();
        let start: Vec<Tensor> = self.names.iter().map(|n| base[n].clone()).collect();
        let Some((lr, _)) = self.unroll else {
            let (step_images, step_labels) = slice_inputs(images, labels, &client.steps[0])?;
            let (input, gradient) =
                self.first_order(&start, &step_images, &step_labels, forward, true)?;
            // One image-sized tensor: the parameter gradient itself is not a base here (no
            // parameter products for a single gradient).
            let point = SweepPoint {
                theta: start,
                theta_norm: self.start_norm,
                input,
                gradient: None,
            };
            return Ok((vec![point], gradient.unwrap_or_default()));
        };
        // The delta is taken as theta_S - theta_0, as the client computes it.
        let mut trajectory = Vec::with_capacity(client.steps.len());
        let mut current = start.clone();
        let mut velocity: Option<Vec<Tensor>> = None;
        for range in &client.steps {
            let (step_images, step_labels) = slice_inputs(images, labels, range)?;
            let (input, gradient) =
                self.first_order(&current, &step_images, &step_labels, forward, true)?;
            let gradient = gradient.unwrap_or_default();
            let moved = self.momentum_step(velocity.as_deref(), gradient.clone())?;
            let step: Vec<Tensor> = moved
                .iter()
                .map(|v| v * -lr)
                .collect::<candle_core::Result<_>>()?;
            velocity = Some(moved);
            let next = add_all(&current, &step)?;
            let theta_norm = if trajectory.is_empty() {
                self.start_norm
            } else {
                squared_norm(&current)?.sqrt()
            };
            trajectory.push(SweepPoint {
                theta: std::mem::replace(&mut current, next),
                theta_norm,
                input,
                gradient: forward.then_some(gradient),
            });
        }
        let delta: Vec<Tensor> = current
            .iter()
            .zip(&start)
            .map(|(end, begin)| end - begin)
            .collect::<candle_core::Result<_>>()?;
        Ok((trajectory, delta))
    }

    /// The backward half of [`GradientMatcher::finite_difference`] for one client: its images' part
    /// of the matching objective's input gradient, given the adjoint of its update (`adjoint`: the
    /// objective's direction times the client's weight), added into `total`.
    fn adjoint_sweep(
        &self,
        sweep: &AdjointSweep,
        adjoint: Vec<Tensor>,
        mut total: Tensor,
    ) -> Result<Tensor> {
        let (images, labels, side) = (sweep.images, sweep.labels, sweep.side);
        let Some((lr, _)) = self.unroll else {
            let range = &sweep.client.steps[0];
            let (step_images, step_labels) = slice_inputs(images, labels, range)?;
            let (input, _) = self.hessian_products(
                &sweep.points[0],
                &adjoint,
                &step_images,
                &step_labels,
                false,
                side,
            )?;
            return add_into(&total, range, &input);
        };
        // Steps v_{s+1} = m v_s + g(theta_s), theta_{s+1} = theta_s - lr v_{s+1}, adjoints a (of
        // theta) and c (of v), a_S = direction, c_S = 0. Back through step s, with b = c_{s+1} - lr
        // a_{s+1} (v_{s+1}'s whole adjoint): dM/dx += H_x(theta_s) b, a_s = a_{s+1} +
        // H_theta(theta_s) b, c_s = m b. Plain SGD (m = 0): b = -lr a_{s+1}. Each step's product
        // is its own images' part (H_x of step s is zero for the others').
        let mut adjoint = adjoint;
        let mut velocity_adjoint: Option<Vec<Tensor>> = None;
        let steps = sweep.points.iter().zip(&sweep.client.steps).enumerate();
        for (step, (point, range)) in steps.rev() {
            let (step_images, step_labels) = slice_inputs(images, labels, range)?;
            let scaled: Vec<Tensor> = adjoint
                .iter()
                .map(|a| a * -lr)
                .collect::<candle_core::Result<_>>()?;
            let carried = match &velocity_adjoint {
                Some(c) => add_all(c, &scaled)?,
                None => scaled,
            };
            let (input, parameters) =
                self.hessian_products(point, &carried, &step_images, &step_labels, step > 0, side)?;
            total = add_into(&total, range, &input)?;
            if let Some(parameters) = parameters {
                adjoint = add_all(&adjoint, &parameters)?;
            }
            if self.momentum != 0.0 {
                velocity_adjoint = Some(
                    carried
                        .iter()
                        .map(|b| b * self.momentum)
                        .collect::<candle_core::Result<_>>()?,
                );
            }
        }
        Ok(total)
    }

    /// The velocity of one unrolled step: the gradient, plus `momentum` times the previous velocity
    /// (none before the first step).
    fn momentum_step(
        &self,
        velocity: Option<&[Tensor]>,
        gradient: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        match velocity {
            Some(previous) if self.momentum != 0.0 => Ok(previous
                .iter()
                .zip(&gradient)
                .map(|(v, g)| (v * self.momentum)? + g)
                .collect::<candle_core::Result<_>>()?),
            _ => Ok(gradient),
        }
    }

    /// One unrolled SGD step from `theta` with `gradient` at learning rate `lr`: the next parameters
    /// and the step's velocity ([`GradientMatcher::momentum_step`]).
    fn sgd_step(
        &self,
        theta: &[Tensor],
        velocity: Option<&[Tensor]>,
        gradient: Vec<Tensor>,
        lr: f64,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let moved = self.momentum_step(velocity, gradient)?;
        let next = theta
            .iter()
            .zip(&moved)
            .map(|(t, v)| t - (v * lr)?)
            .collect::<candle_core::Result<_>>()?;
        Ok((next, moved))
    }

    /// The gradient of the training loss with respect to the observed parameters, set to `theta`, at
    /// fixed images, kept in the graph (differentiable with respect to the images).
    fn loss_gradient(
        &self,
        theta: &[Tensor],
        images: &Tensor,
        soft_labels: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let vars: Vec<Var> = theta
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = self
            .model
            .loss(&self.params_with(&tensors), images, soft_labels)?
            .backward()?;
        variable_gradients(&grads, &vars)
    }

    /// The objective and u = dObjective/d(simulated update), per tensor, in closed form, and the
    /// scale the objective is averaged with. For 1 - <g,t>/(|g||t|):
    /// d/dg = -(t/(|g||t|) - <g,t> g/(|g|^3 |t|)); for |g - t|^2: 2 (g - t).
    fn objective_and_direction(&self, simulated: &[Tensor]) -> Result<(f64, Vec<Tensor>, f64)> {
        let mut objective = 0f64;
        let mut direction = Vec::with_capacity(simulated.len());
        let mut counted = 0usize;
        for ((g, name), &t_norm) in simulated.iter().zip(&self.names).zip(&self.observed_norms) {
            let t = self.observed[name].to_dtype(g.dtype())?;
            if t_norm == 0.0 {
                direction.push(g.zeros_like()?);
                continue;
            }
            counted += 1;
            if self.loss == MatchingLoss::SquaredL2 {
                // 2 (g - t) in one pass; scaling by 2 is exact, so |2 (g - t)|^2 / 4 = |g - t|^2.
                let doubled_difference = linear_combination(2.0, g, -2.0, &t)?;
                objective += squared_norm(std::slice::from_ref(&doubled_difference))? / 4.0;
                direction.push(doubled_difference);
                continue;
            }
            let (g_squared_norm, dot) = squared_norm_and_dot(g, &t)?;
            let g_norm = g_squared_norm.sqrt();
            if g_norm == 0.0 {
                // cosine 0 (as in `matching`); no direction to follow from a zero gradient.
                objective += 1.0;
                direction.push(g.zeros_like()?);
                continue;
            }
            objective += 1.0 - dot / (g_norm * t_norm);
            let u = linear_combination(
                -1.0 / (g_norm * t_norm),
                &t,
                dot / (g_norm.powi(3) * t_norm),
                g,
            )?;
            direction.push(u);
        }
        let scale = match self.loss {
            MatchingLoss::Cosine => 1.0 / counted.max(1) as f64,
            MatchingLoss::SquaredL2 => 1.0,
        };
        Ok((objective, direction, scale))
    }

    /// One first-order pass of the training loss at parameters `theta` on `images` under `labels`
    /// (one-hot or soft rows): the input gradient when `with_input`, the parameter gradient when
    /// `with_parameters` (both detached; a pass without parameter gradients computes none of the
    /// weight products).
    fn first_order(
        &self,
        theta: &[Tensor],
        images: &Tensor,
        labels: &Tensor,
        with_input: bool,
        with_parameters: bool,
    ) -> Result<(Option<Tensor>, Option<Vec<Tensor>>)> {
        let request = GradientRequest {
            input: with_input,
            parameters: with_parameters,
        };
        if let Some(gradients) =
            self.model
                .loss_gradients(&self.params_with(theta), images, labels, request)?
        {
            let parameters = gradients
                .parameters
                .map(|by_name| {
                    self.names
                        .iter()
                        .zip(theta)
                        .map(|(name, value)| {
                            by_name
                                .get(name)
                                .map_or_else(|| value.zeros_like(), |g| Ok(g.clone()))
                        })
                        .collect::<candle_core::Result<Vec<_>>>()
                })
                .transpose()?;
            return Ok((gradients.input, parameters));
        }
        let vars: Vec<Var> = if with_parameters {
            theta
                .iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        let tensors: Vec<Tensor> = if with_parameters {
            vars.iter().map(|v| v.as_tensor().clone()).collect()
        } else {
            theta.to_vec()
        };
        let x = if with_input {
            Var::from_tensor(images)?.as_tensor().clone()
        } else {
            images.clone()
        };
        let grads = self
            .model
            .loss(&self.params_with(&tensors), &x, labels)?
            .backward()?;
        let input = with_input
            .then(|| {
                grads
                    .get(&x)
                    .map_or_else(|| images.zeros_like(), |g| Ok(g.detach()))
            })
            .transpose()?;
        let parameters = with_parameters
            .then(|| -> Result<Vec<Tensor>> {
                Ok(variable_gradients(&grads, &vars)?
                    .iter()
                    .map(Tensor::detach)
                    .collect())
            })
            .transpose()?;
        Ok((input, parameters))
    }

    /// Hessian-vector products of the training loss on `images` under `labels` (those the point's
    /// step trained on) at a sweep point along `vector`, by finite difference: the input part d/dx
    /// <grad_theta L, vector> and, when `with_parameters`, the parameter part H_theta vector, both
    /// from the same first-order passes: at theta + eps vector against the point's own gradients
    /// (forward; at theta - eps vector when `side` is negative), or at theta +/- eps vector
    /// (central).
    fn hessian_products(
        &self,
        point: &SweepPoint,
        vector: &[Tensor],
        images: &Tensor,
        labels: &Tensor,
        with_parameters: bool,
        side: f64,
    ) -> Result<(Tensor, Option<Vec<Tensor>>)> {
        let (theta, theta_norm) = (&point.theta, point.theta_norm);
        let vector_norm = squared_norm(vector)?.sqrt();
        if vector_norm == 0.0 {
            let parameters = if with_parameters {
                Some(zeros_like_all(theta)?)
            } else {
                None
            };
            return Ok((images.zeros_like()?, parameters));
        }
        let base = match (&point.input, &point.gradient, with_parameters) {
            (Some(input), _, false) => Some((input.clone(), None)),
            (Some(input), Some(gradient), true) => Some((input.clone(), Some(gradient.clone()))),
            _ => None,
        };
        let relative_step = match (&base, self.dtype) {
            (None, _) => CENTRAL_DIFFERENCE_STEP,
            (Some(_), DType::F64) => FORWARD_DIFFERENCE_STEP_F64,
            (Some(_), _) => FORWARD_DIFFERENCE_STEP,
        };
        let eps = relative_step * theta_norm.max(1.0) / vector_norm;
        let gradients_at = |sign: f64| -> Result<(Tensor, Option<Vec<Tensor>>)> {
            let shifted: Vec<Tensor> = theta
                .iter()
                .zip(vector)
                .map(|(t, v)| linear_combination(1.0, t, sign * eps, v))
                .collect::<Result<_>>()?;
            let (input, parameters) =
                self.first_order(&shifted, images, labels, true, with_parameters)?;
            Ok((input.unwrap_or(images.zeros_like()?), parameters))
        };
        let ((input_plus, parameters_plus), (input_minus, parameters_minus), step) = match base {
            // One-sided: theta + side eps vector against the point itself.
            Some(base) if side < 0.0 => (base, gradients_at(-1.0)?, eps),
            Some(base) => (gradients_at(1.0)?, base, eps),
            None => (gradients_at(1.0)?, gradients_at(-1.0)?, 2.0 * eps),
        };
        let inverse = 1.0 / step;
        let input = ((input_plus - input_minus)? * inverse)?;
        let parameters = match (parameters_plus, parameters_minus) {
            (Some(plus), Some(minus)) => Some(
                plus.iter()
                    .zip(&minus)
                    .map(|(p, m)| (p - m)? * inverse)
                    .collect::<candle_core::Result<_>>()?,
            ),
            _ => None,
        };
        Ok((input, parameters))
    }

    /// The matching objective and the gradients of matching + `prior` at a candidate.
    /// `evaluation` counts the optimiser's evaluations (see
    /// [`GradientMatcher::objective_and_gradient_under`]).
    fn evaluate(
        &self,
        candidate: &Candidate,
        prior: &ImagePrior,
        evaluation: usize,
    ) -> Result<(f64, Tensor, Option<Tensor>)> {
        match &candidate.label_logits {
            None => {
                let (objective, gradient) =
                    self.objective_and_gradient_under(&candidate.images, prior, evaluation)?;
                Ok((objective, gradient, None))
            }
            // Joint label optimisation needs the logits' gradient: exact double backward.
            Some(logits) => self.exact_gradients(&candidate.images, Some(logits), prior),
        }
    }

    /// The matching objective and the exact (double-backward) gradients of matching + `prior` with
    /// respect to the images and, for joint label optimisation, to the label logits (B x classes;
    /// the soft labels are their row-wise softmax).
    fn exact_gradients(
        &self,
        images: &Tensor,
        label_logits: Option<&Tensor>,
        prior: &ImagePrior,
    ) -> Result<(f64, Tensor, Option<Tensor>)> {
        if !crate::second_order_gradients_enabled() {
            return Err(AttackError::SecondOrderDisabled {
                attack: self.loss.attack_id(),
            });
        }
        let x = Var::from_tensor(images)?;
        let logits = label_logits.map(Var::from_tensor).transpose()?;
        let matching = match &logits {
            Some(logits) => {
                self.matching_with(x.as_tensor(), &softmax_rows(logits.as_tensor())?)?
            }
            None => self.matching(x.as_tensor())?,
        };
        let objective = if prior.is_active() {
            (&matching + prior.value(x.as_tensor())?)?
        } else {
            matching.clone()
        };
        let grads = objective.backward()?;
        let value = matching.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let gradient_of = |t: &Tensor| -> Result<Tensor> {
            Ok(grads
                .get(t)
                .map_or_else(|| t.zeros_like(), |g| Ok(g.detach()))?)
        };
        let logits_gradient = logits.map(|l| gradient_of(l.as_tensor())).transpose()?;
        Ok((value, gradient_of(x.as_tensor())?, logits_gradient))
    }
}

/// The gradients a backward pass left for each variable (zeros for a variable it did not reach).
fn variable_gradients(
    grads: &candle_core::backprop::GradStore,
    vars: &[Var],
) -> Result<Vec<Tensor>> {
    Ok(vars
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<_>>()?)
}

/// The candidate images and soft labels in `range` (all of them, uncopied, when it covers them).
fn slice_inputs(
    images: &Tensor,
    labels: &Tensor,
    range: &Range<usize>,
) -> Result<(Tensor, Tensor)> {
    if range.start == 0 && range.end == images.dim(0)? {
        return Ok((images.clone(), labels.clone()));
    }
    Ok((
        images.narrow(0, range.start, range.len())?,
        labels.narrow(0, range.start, range.len())?,
    ))
}

/// `total` with `part` added to its rows in `range`.
fn add_into(total: &Tensor, range: &Range<usize>, part: &Tensor) -> Result<Tensor> {
    if range.start == 0 && range.end == total.dim(0)? {
        return Ok((total + part)?);
    }
    let sum = (total.narrow(0, range.start, range.len())? + part)?;
    let mut ranges = vec![range.clone()];
    ranges.extend(total.dims()[1..].iter().map(|&dim| 0..dim));
    Ok(total.slice_assign(&ranges, &sum)?)
}

/// `total` (none yet: zero) plus `weight` times `update`, tensor by tensor.
fn add_weighted(
    total: Option<Vec<Tensor>>,
    update: Vec<Tensor>,
    weight: f64,
) -> Result<Vec<Tensor>> {
    let weighted = if weight == 1.0 {
        update
    } else {
        update
            .iter()
            .map(|u| u * weight)
            .collect::<candle_core::Result<_>>()?
    };
    match total {
        Some(total) => add_all(&total, &weighted),
        None => Ok(weighted),
    }
}

/// Element-wise sums of two parameter lists.
fn add_all(a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| x + y)
        .collect::<candle_core::Result<_>>()?)
}

/// Zeros shaped like each tensor of a parameter list.
fn zeros_like_all(like: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(like
        .iter()
        .map(Tensor::zeros_like)
        .collect::<candle_core::Result<_>>()?)
}

/// The matcher [`invert_gradients`] optimises against for `view` under `labels` and `config`: the
/// update's unrolled steps (with momentum), each client on its own candidates, and the patch
/// refinement where it applies.
fn matcher_for<'a>(
    view: &UpdateView<'a>,
    model: &'a dyn TargetModel,
    labels: Option<&[u32]>,
    config: &InvertingGradientsConfig,
) -> Result<GradientMatcher<'a>> {
    let source = view.source;
    let (unroll, momentum) = match source {
        UpdateSource::Gradient | UpdateSource::OtherDelta { .. } => (None, 0.0),
        UpdateSource::SgdDelta { lr, local_steps } => (Some((*lr, *local_steps)), 0.0),
        UpdateSource::MomentumSgdDelta {
            lr,
            momentum,
            local_steps,
        } => (Some((*lr, *local_steps)), *momentum),
    };
    let matcher = GradientMatcher::new(
        model,
        view.update,
        unroll,
        labels,
        ImagePrior {
            tv_weight: config.tv_weight,
            opponent_tv_weight: config.opponent_tv_weight,
            patch_weight: config.patch_weight,
            patch_size: model
                .patch_embedding()
                .map_or(0, |layout| layout.patch_size),
        },
        config.input_gradient,
    )?
    .with_loss(config.loss)
    .with_momentum(momentum)
    // Each client unrolls its own steps, each on its own slice of the candidates.
    .with_clients(&view.clients)?;
    Ok(match (labels, source) {
        (
            Some(labels),
            UpdateSource::Gradient
            | UpdateSource::SgdDelta { .. }
            | UpdateSource::MomentumSgdDelta { .. },
        ) => matcher.with_patch_refinement(config.patch_refinement, labels),
        _ => matcher,
    })
}

/// Seconds one evaluation of [`invert_gradients`]' objective and input gradient takes on
/// `observation` under known `labels` and `config` (the second of two at random candidates, the
/// first warming up), for telling a user before a long run how long it will be: a run makes
/// about `iterations` evaluations per round of concurrent restarts, plus the patch refinements and,
/// for images in several groups, the candidate search (a forward unroll per move tried). `None`
/// when Inverting Gradients does not apply to the observation or the labels do not fit it.
///
/// # Errors
/// As [`invert_gradients`].
pub fn seconds_per_evaluation(
    observation: &Observation,
    model: &dyn TargetModel,
    labels: &[u32],
    config: &InvertingGradientsConfig,
) -> Result<Option<f64>> {
    let Ok(view) = observation.update_view() else {
        return Ok(None);
    };
    if labels.len() != view.images {
        return Ok(None);
    }
    let matcher = matcher_for(&view, model, Some(labels), config)?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let images = noise_around_grey(model, view.images, config.initial_spread, &mut rng)?;
    matcher.objective_and_gradient_at_step(&images, 0)?;
    let started = Instant::now();
    matcher.objective_and_gradient_at_step(&images, 1)?;
    Ok(Some(started.elapsed().as_secs_f64()))
}

/// The matching objective of [`invert_gradients`] under `config` (its loss, without the prior) at
/// the given images and labels, in the order of the attack's candidates
/// ([`crate::UpdateView::candidate_items`]). At the private images this says how closely the update
/// singles them out, beside the objective an attack reached: a result matching far worse than
/// the private images leaves room for a stronger search; one matching as well or better was
/// stopped by what the update says (or by the precision of the simulation), not by the search.
/// `None` when Inverting Gradients does not apply to the observation or the counts do not fit it.
///
/// # Errors
/// As [`invert_gradients`].
pub fn matching_objective(
    observation: &Observation,
    model: &dyn TargetModel,
    images: &Tensor,
    labels: &[u32],
    config: &InvertingGradientsConfig,
) -> Result<Option<f64>> {
    let Ok(view) = observation.update_view() else {
        return Ok(None);
    };
    if labels.len() != view.images || images.dim(0)? != view.images {
        return Ok(None);
    }
    let matcher = matcher_for(&view, model, Some(labels), config)?;
    let images = images.to_dtype(matcher.dtype)?.to_device(&matcher.device)?;
    Ok(Some(
        matcher
            .matching(&images)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?,
    ))
}

/// Runs Inverting Gradients with the given labels (from iDLG or label-count recovery), or, when
/// `labels` is `None`, optimises soft labels jointly with the images as the original DLG does (from
/// random logits; the returned labels are their argmax, and the gradients are then exact double
/// backward whatever [`InvertingGradientsConfig::input_gradient`] says).
///
/// Applies to a client update or an aggregate (the batch is then clients x batch size images); not to
/// features or ciphertexts. A plain- or momentum-SGD delta whose local steps trained on batches of
/// their own ([`crate::LocalBatches::PerStep`]) is unrolled with each step on its own slice of the
/// candidates (`labels` then in that order, step after step, as [`crate::recover_labels`] returns
/// them), and the patch refinement takes each image's token gradients from its own step; which
/// step held which label is searched ([`GradientMatcher::rearranged_candidates`], relabelling in
/// every second restart). With known labels and an observed gradient or plain- or momentum-SGD delta (not an
/// adaptive optimizer's), candidates are refined by [`crate::refine_patches_after_steps`] at
/// [`InvertingGradientsConfig::patch_refinement`] at each of signed Adam's step decays and, after the
/// restarts, the chosen one's images; the reported objective is then the refined images'.
pub fn invert_gradients(
    observation: &Observation,
    model: &dyn TargetModel,
    labels: Option<&[u32]>,
    config: &InvertingGradientsConfig,
) -> Result<AttackOutcome> {
    let view = match observation.update_view() {
        Ok(view) => view,
        Err(reason) => return Ok(not_applicable(config.loss, &reason)),
    };
    let batch = view.images;
    if let Some(labels) = labels.filter(|l| l.len() != batch) {
        return Ok(not_applicable(
            config.loss,
            &format!("needs {batch} labels (one per image), got {}", labels.len()),
        ));
    }
    let started = Instant::now();
    let matcher = matcher_for(&view, model, labels, config)?;
    let (dtype, device) = (matcher.dtype, matcher.device.clone());
    let mut rng = StdRng::seed_from_u64(config.seed);
    let classes = model.num_classes();
    // Every second restart may relabel (see `GradientMatcher::rearranged_candidates`).
    let starts: Vec<Candidate> = (0..config.restarts.max(1))
        .map(|restart| {
            let images = noise_around_grey(model, batch, config.initial_spread, &mut rng)?;
            let label_logits = match labels {
                Some(_) => None,
                None => {
                    let init: Vec<f32> = (0..batch * classes)
                        .map(|_| rng.sample(rand_distr::StandardNormal))
                        .collect();
                    Some(Tensor::from_vec(init, (batch, classes), &device)?.to_dtype(dtype)?)
                }
            };
            Ok(Candidate {
                images,
                label_logits,
                labels: None,
                relabel: restart % 2 == 1,
            })
        })
        .collect::<Result<_>>()?;
    let mut best: Option<(f64, Candidate)> = None;
    for group in starts.chunks(config.restart_workers.max(1)) {
        let finished: Vec<Result<(f64, Candidate)>> = if group.len() == 1 {
            vec![optimise(&matcher, group[0].clone(), config)]
        } else {
            std::thread::scope(|scope| {
                let running: Vec<_> = group
                    .iter()
                    .map(|start| scope.spawn(|| optimise(&matcher, start.clone(), config)))
                    .collect();
                running
                    .into_iter()
                    .map(|handle| {
                        handle.join().unwrap_or_else(|_| {
                            Err(AttackError::Numerical {
                                attack: config.loss.attack_id(),
                                reason: "a restart's thread panicked".to_string(),
                            })
                        })
                    })
                    .collect()
            })
        };
        for outcome in finished {
            let (objective, candidate) = outcome?;
            if best.as_ref().is_none_or(|(b, _)| objective < *b) {
                best = Some((objective, candidate));
            }
        }
    }
    let (mut objective, best) = best.expect("at least one restart ran");
    let mut images = best.images.clamp(0.0, 1.0)?;
    let labels = match (labels, &best.label_logits) {
        (Some(labels), _) => {
            // Labels the restart moved between local steps with their images, or changed, replace
            // the given ones.
            let (matcher, labels) = match &best.labels {
                Some(moved) => (matcher.clone().with_known_labels(moved)?, moved.clone()),
                None => (matcher, labels.to_vec()),
            };
            // The restart is chosen by the matching objective first; the refinement then moves its
            // images, and the reported objective is that of the refined images.
            if let Some((refined, refined_objective)) = matcher.refine(&images)? {
                objective = refined_objective;
                images = refined;
            }
            labels
        }
        (None, Some(logits)) => logits.argmax(1)?.to_vec1::<u32>()?,
        (None, None) => unreachable!("joint restarts carry label logits"),
    };
    Ok(AttackOutcome::Reconstructed(Reconstruction {
        images: images.to_dtype(DType::F32)?,
        labels: Some(labels),
        attack: config.loss.attack_id(),
        iterations: config.iterations,
        restarts: config.restarts.max(1),
        objective,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// A point the optimisers move: candidate images (B x C x H x W) and, when labels are optimised
/// jointly, label logits (B x classes).
#[derive(Clone)]
struct Candidate {
    images: Tensor,
    label_logits: Option<Tensor>,
    /// Known labels moved with their images between local steps, or changed, by
    /// [`GradientMatcher::rearranged_candidates`]; `None`: the matcher's own.
    labels: Option<Vec<u32>>,
    /// Whether this restart may change known labels, not only move them between steps
    /// ([`GradientMatcher::rearranged_candidates`]).
    relabel: bool,
}

/// Row-wise softmax built from elementary operations (twice differentiable in candle).
fn softmax_rows(logits: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let exp = shifted.exp()?;
    Ok(exp.broadcast_div(&exp.sum_keepdim(1)?)?)
}

fn not_applicable(loss: MatchingLoss, reason: &str) -> AttackOutcome {
    AttackOutcome::NotApplicable {
        attack: loss.attack_id(),
        reason: reason.to_string(),
    }
}

/// Optimises one restart with the configured optimiser; returns the final matching objective and
/// candidate.
fn optimise(
    matcher: &GradientMatcher,
    start: Candidate,
    config: &InvertingGradientsConfig,
) -> Result<(f64, Candidate)> {
    match config.optimizer {
        ImageOptimizer::SignedAdam => signed_adam(matcher, start, config),
        ImageOptimizer::Lbfgs => lbfgs(matcher, start, config),
    }
}

/// Adam with signed gradients, step decay and the box constraint (on the images; label logits are
/// free).
fn signed_adam(
    matcher: &GradientMatcher,
    start: Candidate,
    config: &InvertingGradientsConfig,
) -> Result<(f64, Candidate)> {
    let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
    let mut parts: Vec<Tensor> = std::iter::once(start.images)
        .chain(start.label_logits)
        .collect();
    let mut m: Vec<Tensor> = parts
        .iter()
        .map(Tensor::zeros_like)
        .collect::<candle_core::Result<_>>()?;
    let mut v = m.clone();
    let mut last = f64::INFINITY;
    let milestones = [3, 5, 7].map(|k| config.iterations * k / 8);
    // For images in several groups (local steps on batches of their own, clients of an aggregate),
    // the candidates are moved between groups (with their labels), and in relabelling restarts
    // relabelled, at an eighth of the way and at each step decay, when that lowers the objective.
    let rearrangements = [1, 3, 5, 7].map(|k| config.iterations * k / 8);
    let mut rearranged: Option<(GradientMatcher, Vec<u32>)> = None;
    let relabel = start.relabel;
    let candidate = |parts: &[Tensor]| Candidate {
        images: parts[0].clone(),
        label_logits: parts.get(1).cloned(),
        labels: None,
        relabel,
    };
    for step in 1..=config.iterations {
        // Known labels only: jointly optimised ones (label logits in `parts`) are not moved.
        if parts.len() == 1 && rearrangements.contains(&(step - 1)) {
            let current = rearranged.as_ref().map_or(matcher, |(m, _)| m);
            if let Some((order, labels)) = current.rearranged_candidates(&parts[0], relabel)? {
                let index = Tensor::new(
                    order.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                    parts[0].device(),
                )?;
                parts[0] = parts[0].index_select(&index, 0)?;
                m[0] = m[0].index_select(&index, 0)?;
                v[0] = v[0].index_select(&index, 0)?;
                rearranged = Some((current.clone().with_known_labels(&labels)?, labels));
            }
        }
        let matcher = rearranged.as_ref().map_or(matcher, |(m, _)| m);
        if milestones.contains(&(step - 1)) {
            // At each step decay the images are refined (when the matcher refines): the smaller
            // steps that follow start from there.
            if let Some((refined, _)) = matcher.refine(&parts[0])? {
                parts[0] = refined;
            }
        }
        let decays = milestones.iter().filter(|&&s| step > s).count() as i32;
        let prior = matcher.prior.scaled(config.prior_decay.powi(decays));
        let (objective, images, logits) = matcher.evaluate(&candidate(&parts), &prior, step)?;
        last = objective;
        let lr = config.lr * 0.1f64.powi(decays);
        for (k, grad) in std::iter::once(images).chain(logits).enumerate() {
            let grad = grad.sign()?;
            m[k] = ((&m[k] * beta1)? + (&grad * (1.0 - beta1))?)?;
            v[k] = ((&v[k] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m[k] / (1.0 - beta1.powi(step as i32)))?;
            let v_hat = (&v[k] / (1.0 - beta2.powi(step as i32)))?;
            let moved = (&parts[k] - ((m_hat / (v_hat.sqrt()? + eps)?)? * lr)?)?;
            parts[k] = if k == 0 {
                moved.clamp(0.0, 1.0)?
            } else {
                moved
            };
        }
    }
    Ok((
        last,
        Candidate {
            labels: rearranged.map(|(_, labels)| labels),
            ..candidate(&parts)
        },
    ))
}

/// One evaluation for L-BFGS: the matching objective, matching + prior, and the latter's gradient, at
/// images given as f64 values.
struct Evaluation {
    matching: f64,
    total: f64,
    gradient: Vec<f64>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Projected L-BFGS on the box [0, 1] with a backtracking Armijo line search (see
/// [`ImageOptimizer::Lbfgs`]). The curvature history is reset whenever the model's direction is not a
/// descent direction or the line search fails; two failures in a row end the run (converged to
/// working precision).
fn lbfgs(
    matcher: &GradientMatcher,
    start: Candidate,
    config: &InvertingGradientsConfig,
) -> Result<(f64, Candidate)> {
    // The optimised vector: the pixels (kept in the box), then the label logits if any (free).
    let images_shape = start.images.shape().clone();
    let logits_shape = start.label_logits.as_ref().map(|l| l.shape().clone());
    let (dtype, device) = (start.images.dtype(), start.images.device().clone());
    let pixels = images_shape.elem_count();
    let to_candidate = |values: &[f64]| -> Result<Candidate> {
        let tensor = |values: &[f64], shape: &candle_core::Shape| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, shape.clone(), &device)?.to_dtype(dtype)?)
        };
        Ok(Candidate {
            images: tensor(&values[..pixels], &images_shape)?,
            label_logits: logits_shape
                .as_ref()
                .map(|shape| tensor(&values[pixels..], shape))
                .transpose()?,
            labels: None,
            relabel: false,
        })
    };
    let flat =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let evaluate = |values: &[f64]| -> Result<Evaluation> {
        let candidate = to_candidate(values)?;
        let (matching, images, logits) = matcher.evaluate(&candidate, &matcher.prior, 0)?;
        let prior = if matcher.prior.is_active() {
            matcher
                .prior
                .value(&candidate.images)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        } else {
            0.0
        };
        let mut gradient = flat(&images)?;
        if let Some(logits) = logits {
            gradient.extend(flat(&logits)?);
        }
        Ok(Evaluation {
            matching,
            total: matching + prior,
            gradient,
        })
    };
    let mut x: Vec<f64> = flat(&start.images)?;
    if let Some(logits) = &start.label_logits {
        x.extend(flat(logits)?);
    }
    let mut current = evaluate(&x)?;
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::with_capacity(LBFGS_HISTORY);
    let mut failures = 0;
    for _ in 0..config.iterations {
        // Two-loop recursion: direction = -H g.
        let mut q = current.gradient.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let alpha = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= alpha * yi);
            alphas.push(alpha);
        }
        let gamma = match history.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            None => {
                let largest = q.iter().fold(0f64, |m, v| m.max(v.abs()));
                if largest == 0.0 {
                    break;
                }
                config.lr / largest
            }
        };
        q.iter_mut().for_each(|qi| *qi *= gamma);
        for ((s, y, rho), alpha) in history.iter().zip(alphas.iter().rev()) {
            let beta = rho * dot(y, &q);
            q.iter_mut()
                .zip(s)
                .for_each(|(qi, si)| *qi += (alpha - beta) * si);
        }
        // Backtracking along the projected step, only from a descent direction.
        let mut accepted = None;
        if dot(&q, &current.gradient) > 0.0 {
            let mut step = 1.0;
            for _ in 0..LINE_SEARCH_TRIES {
                let candidate: Vec<f64> = x
                    .iter()
                    .zip(&q)
                    .enumerate()
                    .map(|(i, (xi, di))| {
                        let moved = xi - step * di;
                        if i < pixels {
                            moved.clamp(0.0, 1.0)
                        } else {
                            moved
                        }
                    })
                    .collect();
                let moved: Vec<f64> = candidate.iter().zip(&x).map(|(c, xi)| c - xi).collect();
                let evaluation = evaluate(&candidate)?;
                if evaluation.total <= current.total + 1e-4 * dot(&current.gradient, &moved) {
                    accepted = Some((candidate, moved, evaluation));
                    break;
                }
                step *= 0.5;
            }
        }
        let Some((candidate, moved, evaluation)) = accepted else {
            history.clear();
            failures += 1;
            if failures >= 2 {
                break;
            }
            continue;
        };
        failures = 0;
        let change: Vec<f64> = evaluation
            .gradient
            .iter()
            .zip(&current.gradient)
            .map(|(a, b)| a - b)
            .collect();
        let curvature = dot(&moved, &change);
        if curvature > 1e-12 * dot(&moved, &moved).sqrt() * dot(&change, &change).sqrt() {
            if history.len() == LBFGS_HISTORY {
                history.pop_front();
            }
            history.push_back((moved, change, 1.0 / curvature));
        }
        x = candidate;
        current = evaluation;
    }
    Ok((current.matching, to_candidate(&x)?))
}
