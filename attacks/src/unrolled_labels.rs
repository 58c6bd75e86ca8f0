//! Which labels the images of a multi-step SGD delta had, and at which local step, from the
//! classifier's delta with the drift of the steps simulated.
//!
//! [`crate::count_labels`] reads a delta of `S` local steps as `S` times one gradient at the global
//! parameters. After the first step the parameters have moved: at a learning rate the clients train
//! with, the classifier's logits move by about `lr |f|^2` per step (`f` the layer-normed CLS feature,
//! `|f|^2` about its width), so each later step's `p - y` is smaller for the labels already seen, and
//! the counts read off the summed bias come out wrong. Measured on a FedAvg capture (sin-cos
//! `vit-tiny-32`, IHC tiles, 4 local SGD steps at lr 0.01 on batches of 4 of their own, 2026-12-05):
//! the classifier-bias delta was 0.26 of what four gradients at the global parameters give, and the
//! counts read from it were 7 / 9 where the private batches held 3 / 13 (12 of 16 labels right when
//! dealt over the steps).
//!
//! The attacker can simulate the drift: it knows the global parameters, the learning rate, the
//! momentum and which images each step trained on ([`crate::UpdateView::clients`]). Only the images
//! are unknown, and the classifier's delta depends on them mostly through the labels (a fresh ViT's
//! CLS features are nearly alike across images). So the clients' steps are unrolled on *stand-in*
//! images (seeded uniform noise, or the attacker's reference images of each slot's class) under a
//! hypothesis of labels, and the hypothesis whose simulated classifier delta (weight and bias) is
//! closest to the observed one wins. Every hypothesis of per-batch class counts is scored
//! ([`place_labels_by_unrolling`]): on the capture above, with the four batches' counts all 625
//! ways, the private one scored best (relative distance 5.2e-3, next 1.4e-2; the counts dealt over
//! the steps 3.2e-2), by the classifier weight's part (by the bias's alone it ranked eighth: both
//! are matched). Over the capture's four clients, labels right by the counts 12 / 13 / 11 / 12 of
//! 16, unrolled 16 / 15 / 16 / 16 with noise stand-ins and with reference ones alike (about 2 min
//! per client, release build, a busy machine). With its private labels Inverting Gradients
//! reaches 19.59 dB on client 0 where the counts' labels left it at 9.70 dB; with the unrolled
//! labels, `fedleak attack --attack auto` (defaults) reached 19.24 dB / SSIM 0.304 at objective
//! 1.4e-6.
//!
//! Measured and ruled out (scratch probes on the same capture): a local search (single
//! relabels, swaps between steps, or each step's counts enumerated in turn) from the counts dealt
//! over the steps stays at them (distance 3.2e-2, a local minimum); unrolling only the classifier
//! on frozen stand-in features (microseconds per hypothesis) puts every hypothesis at a distance
//! of about 0.2 and the private one nowhere near first: the features drift too.

use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, SeedableRng};

use crate::feature_inversion::random_images;
use crate::idlg::LabelRecovery;
use crate::inverting_gradients::{GradientMatcher, InputGradient};
use crate::label_counts::ReferenceImages;
use crate::linear::observed_tensor;
use crate::model::TargetModel;
use crate::observation::{UpdateSource, UpdateView};
use crate::prior::ImagePrior;
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "unrolled-label-counts";

/// The most label hypotheses one search scores (each costs a first-order unroll of every
/// client's steps; 625 took 2 - 4 min for 4 steps of 4 images of the tiny ViT on this machine).
pub const MAX_LABEL_HYPOTHESES: usize = 1024;

/// The labels of the images behind a multi-step SGD delta, one per image in the view's order (each
/// step's batch after the one before, client after client, as [`crate::invert_gradients`] takes
/// them), chosen by matching the classifier's delta with the clients' steps unrolled on stand-in
/// images (see the module documentation): uniform noise seeded by `seed`, or, with `reference`, the
/// reference images of each image's hypothesised class. Every hypothesis of how many images of
/// each class each batch held is scored (within a batch the order does not matter), and the
/// closest wins; the landscape is too rugged for a local search (measured: from the counts dealt
/// over the steps, neither single relabels, swaps between steps nor a step-by-step exhaustive
/// descent reached the private labels, which scored best of all 625).
///
/// `None` when it does not apply: a gradient, an adaptive optimizer's delta, clients that each
/// took one step (nothing drifts), or more than [`MAX_LABEL_HYPOTHESES`] hypotheses (many classes
/// or large batches; the counts then stand). The objective is the winner's distance, relative to
/// the observed classifier delta's squared norm.
///
/// # Errors
/// [`AttackError::Observation`] when the update lacks the classifier or `reference` lacks a class;
/// candle errors of the unroll.
pub fn place_labels_by_unrolling(
    view: &UpdateView<'_>,
    model: &dyn TargetModel,
    reference: Option<&ReferenceImages>,
    seed: u64,
) -> Result<Option<LabelRecovery>> {
    let start = Instant::now();
    let (lr, steps, momentum) = match view.source {
        UpdateSource::SgdDelta { lr, local_steps } => (*lr, *local_steps, 0.0),
        UpdateSource::MomentumSgdDelta {
            lr,
            momentum,
            local_steps,
        } => (*lr, *local_steps, *momentum),
        UpdateSource::Gradient | UpdateSource::OtherDelta { .. } => return Ok(None),
    };
    let Some((hypotheses, groups)) = hypotheses_of(view, model.num_classes()) else {
        return Ok(None);
    };
    let classifier = model.classifier();
    let observed = [
        observed_tensor(view.update, &classifier.weight)?.to_dtype(DType::F64)?,
        observed_tensor(view.update, &classifier.bias)?.to_dtype(DType::F64)?,
    ];
    let observed_energy: f64 = observed
        .iter()
        .map(|t| Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?))
        .sum::<Result<f64>>()?;
    if !(observed_energy > 0.0 && observed_energy.is_finite()) {
        return Ok(None);
    }
    let matcher = GradientMatcher::new(
        model,
        view.update,
        Some((lr, steps)),
        None,
        ImagePrior::default(),
        InputGradient::ForwardDifference,
    )?
    .with_momentum(momentum)
    .with_clients(&view.clients)?;
    let stand_ins = StandIns::new(model, view.images, reference, seed)?;
    let distance = |labels: &[u32]| -> Result<f64> {
        let simulated = matcher.simulated_update(&stand_ins.images(labels)?, labels)?;
        let mut sum = 0.0;
        for (name, observed) in [&classifier.weight, &classifier.bias].iter().zip(&observed) {
            let simulated = observed_tensor(&simulated, name)?.to_dtype(DType::F64)?;
            sum += (simulated - observed)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(sum / observed_energy)
    };
    let mut best: Option<(f64, Vec<u32>)> = None;
    for index in 0..hypotheses {
        // Hypothesis `index` in mixed radix over the groups' multisets.
        let mut rest = index;
        let labels: Vec<u32> = groups
            .iter()
            .flat_map(|group| {
                let pick = &group[rest % group.len()];
                rest /= group.len();
                pick.iter().copied()
            })
            .collect();
        let d = distance(&labels)?;
        // A hypothesis whose unroll diverges (not finite) explains nothing.
        if d.is_finite() && best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, labels));
        }
    }
    Ok(best.map(|(objective, labels)| LabelRecovery {
        labels,
        attack: ATTACK,
        objective,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// How many label hypotheses [`place_labels_by_unrolling`] scores for `view` under `classes`
/// classes (each a first-order unroll of every client's steps), or `None` when it does not apply;
/// for telling the user what the label recovery is about to cost.
pub fn unrolled_label_hypotheses(view: &UpdateView<'_>, classes: usize) -> Option<usize> {
    hypotheses_of(view, classes).map(|(count, _)| count)
}

/// The number of hypotheses and each image group's label multisets, when the unrolled placement
/// applies: an SGD delta, some client with more than one step, at most [`MAX_LABEL_HYPOTHESES`].
fn hypotheses_of(view: &UpdateView<'_>, classes: usize) -> Option<(usize, Vec<Vec<Vec<u32>>>)> {
    if !view.source.unrolls() || view.unrolled_steps() <= view.clients.len() || view.images == 0 {
        return None;
    }
    let groups: Vec<Vec<Vec<u32>>> = view
        .group_ranges()
        .iter()
        .map(|range| class_multisets(range.len(), classes as u32))
        .collect();
    let count = groups
        .iter()
        .try_fold(1usize, |product, group| product.checked_mul(group.len()))
        .filter(|&count| count <= MAX_LABEL_HYPOTHESES)?;
    Some((count, groups))
}

/// Every multiset of `size` labels over `classes` classes, each sorted ascending.
///
/// ```text
/// class_multisets(2, 2) == [[0, 0], [0, 1], [1, 1]]
/// ```
fn class_multisets(size: usize, classes: u32) -> Vec<Vec<u32>> {
    let mut all = vec![Vec::new()];
    for _ in 0..size {
        all = all
            .into_iter()
            .flat_map(|partial: Vec<u32>| {
                let from = partial.last().copied().unwrap_or(0);
                (from..classes).map(move |class| {
                    let mut next = partial.clone();
                    next.push(class);
                    next
                })
            })
            .collect();
        if all.len() > MAX_LABEL_HYPOTHESES {
            break;
        }
    }
    all
}

/// The images the unroll trains on in place of the private ones.
enum StandIns<'a> {
    /// One seeded uniform-noise image per slot, whatever its label.
    Noise(Tensor),
    /// For the slot `i` of class `c`, the `i`-th (cyclically) reference image of class `c`.
    Reference {
        reference: &'a ReferenceImages,
        by_class: Vec<Vec<u32>>,
    },
}

impl<'a> StandIns<'a> {
    fn new(
        model: &dyn TargetModel,
        images: usize,
        reference: Option<&'a ReferenceImages>,
        seed: u64,
    ) -> Result<Self> {
        let Some(reference) = reference else {
            let mut rng = StdRng::seed_from_u64(seed);
            return Ok(StandIns::Noise(random_images(model, images, &mut rng)?));
        };
        let by_class: Vec<Vec<u32>> = (0..model.num_classes() as u32)
            .map(|class| {
                (0..reference.labels.len() as u32)
                    .filter(|&i| reference.labels[i as usize] == class)
                    .collect()
            })
            .collect();
        if let Some(class) = by_class.iter().position(Vec::is_empty) {
            return Err(AttackError::Observation {
                name: "reference images".to_string(),
                reason: format!("no reference image of class {class}"),
            });
        }
        Ok(StandIns::Reference {
            reference,
            by_class,
        })
    }

    /// The stand-in images of `labels`' slots (N x C x H x W).
    fn images(&self, labels: &[u32]) -> Result<Tensor> {
        Ok(match self {
            StandIns::Noise(images) => images.clone(),
            StandIns::Reference {
                reference,
                by_class,
            } => {
                let picks: Vec<u32> = labels
                    .iter()
                    .enumerate()
                    .map(|(slot, &class)| {
                        let pool = &by_class[class as usize];
                        pool[slot % pool.len()]
                    })
                    .collect();
                let index = Tensor::new(picks.as_slice(), reference.images.device())?;
                reference.images.index_select(&index, 0)?
            }
        })
    }
}
