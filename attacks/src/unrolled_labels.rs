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
//! 16, unrolled 16 / 15 / 16 / 16 with noise stand-ins and with reference ones alike. With its
//! private labels Inverting Gradients reaches 19.59 dB on client 0 where the counts' labels left
//! it at 9.70 dB; with the unrolled labels, `fedleak attack --attack auto` (defaults) reached
//! 19.24 dB / SSIM 0.304 at objective 1.4e-6.
//!
//! Aggregates (2026-12-05, release build): four clients of the same training (4 local steps at lr
//! 0.01, one or two images per step, equal weights), the server's average: the labels as a
//! multiset over the aggregate 87.5 % / 84.4 % right by the counts, 100 % / 100 % unrolled (65 536
//! hypotheses by 120 simulated steps in 2.7 s; 43 046 721 by 480 in 19 s). Which client held
//! which label is weakly identifiable when the clients weigh alike: 12 of 16 and 22 of 32 slots
//! right, and with two images per step no client's multiset right, though their sum is.
//!
//! Measured and ruled out (scratch probes on the same capture): a local search (single
//! relabels, swaps between steps, or each step's counts enumerated in turn) from the counts dealt
//! over the steps stays at them (distance 3.2e-2, a local minimum); unrolling only the classifier
//! on frozen stand-in features (microseconds per hypothesis) puts every hypothesis at a distance
//! of about 0.2 and the private one nowhere near first: the features drift too.

use std::ops::Range;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};

use crate::feature_inversion::random_images;
use crate::idlg::LabelRecovery;
use crate::inverting_gradients::{GradientMatcher, InputGradient, SimulatedSgd};
use crate::label_counts::ReferenceImages;
use crate::linear::{observed_tensor, tensor_to_f64};
use crate::model::TargetModel;
use crate::observation::{ClientSteps, UpdateSource, UpdateView};
use crate::prior::ImagePrior;
use crate::{AttackError, Result};

/// Name of the attack in reports.
const ATTACK: &str = "unrolled-label-counts";

/// The most local steps one search simulates (one first-order pass each; hypotheses that share
/// their first steps share them once). The capture of the module docs (625 hypotheses of 4 steps
/// of 4 images of the tiny ViT) takes 780 simulated steps: 57 - 63 s per client with an attack
/// sharing the two cores, where unrolling every hypothesis from the start (2500 steps) took 178 s
/// alongside (2026-12-05, release build; the same labels and distances).
pub const MAX_SIMULATED_STEPS: usize = 4096;

/// The most combinations of the clients' simulated deltas either half of an aggregate's clients
/// may have. Each client's steps are simulated apart, and the search pairs every weighted sum of
/// one half's deltas with every one of the other's (meet in the middle: one matrix product), so an
/// aggregate's hypotheses cost sums of classifier-sized vectors, not simulations, up to the square
/// of this.
pub const MAX_HALF_COMBINATIONS: usize = 8192;

/// What [`place_labels_by_unrolling`] is about to do for an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelSearchSize {
    /// Label hypotheses scored: every combination of per-batch class counts over all clients.
    pub hypotheses: usize,
    /// Local steps simulated, one first-order pass each (at most [`MAX_SIMULATED_STEPS`]).
    pub simulated_steps: usize,
}

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
/// The search walks each client's hypotheses depth first, so hypotheses that agree on a client's
/// first batches share the simulation of those steps, and simulates each client apart; an
/// aggregate's hypotheses are then the combinations of its clients' simulated deltas, weighted as
/// the aggregate weights them.
///
/// `None` when it does not apply: a gradient, an adaptive optimizer's delta, clients that each
/// took one step (nothing drifts), or a search beyond [`MAX_SIMULATED_STEPS`] or
/// [`MAX_HALF_COMBINATIONS`] (many classes or large batches; the counts then stand). The objective
/// is the winner's distance, relative to the observed classifier delta's squared norm.
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
    let Some(search) = LabelSearch::of(view, model.num_classes()) else {
        return Ok(None);
    };
    let classifier = model.classifier();
    let names = [classifier.weight.as_str(), classifier.bias.as_str()];
    let mut observed = Vec::new();
    for name in names {
        observed.extend(tensor_to_f64(observed_tensor(view.update, name)?)?);
    }
    let observed_energy: f64 = observed.iter().map(|v| v * v).sum();
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
    let mut per_client = Vec::with_capacity(search.clients.len());
    for plan in &search.clients {
        let mut walk = ClientWalk {
            matcher: &matcher,
            stand_ins: &stand_ins,
            names,
            plan,
            chosen: vec![None; plan.groups.len()],
            outcomes: Vec::new(),
        };
        walk.descend(0, &matcher.sgd_start())?;
        per_client.push(walk.outcomes);
    }
    let weights: Vec<f64> = view.clients.iter().map(|client| client.weight).collect();
    let Some((distance, picks)) = closest_combination(&per_client, &weights, &observed)? else {
        return Ok(None);
    };
    let mut labels = vec![0; view.images];
    for ((plan, outcomes), pick) in search.clients.iter().zip(&per_client).zip(picks) {
        for (group, &choice) in outcomes[pick].choice.iter().enumerate() {
            labels[plan.groups[group].clone()].copy_from_slice(&plan.multisets[group][choice]);
        }
    }
    Ok(Some(LabelRecovery {
        labels,
        attack: ATTACK,
        objective: distance / observed_energy,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// How large [`place_labels_by_unrolling`]'s search is for `view` under `classes` classes, or
/// `None` when it does not apply; for telling the user what the label recovery is about to cost.
pub fn unrolled_label_hypotheses(view: &UpdateView<'_>, classes: usize) -> Option<LabelSearchSize> {
    LabelSearch::of(view, classes).map(|search| search.size)
}

/// The hypotheses of a search: each client's plan and the search's size.
struct LabelSearch {
    clients: Vec<ClientPlan>,
    size: LabelSearchSize,
}

impl LabelSearch {
    /// The search for `view`, when the unrolled placement applies: an SGD delta, some client with
    /// more than one step, within [`MAX_SIMULATED_STEPS`] and [`MAX_HALF_COMBINATIONS`].
    fn of(view: &UpdateView<'_>, classes: usize) -> Option<Self> {
        if !view.source.unrolls() || view.unrolled_steps() <= view.clients.len() || view.images == 0
        {
            return None;
        }
        let clients: Vec<ClientPlan> = view
            .clients
            .iter()
            .map(|client| ClientPlan::of(client, classes as u32))
            .collect::<Option<_>>()?;
        let simulated_steps = clients
            .iter()
            .try_fold(0usize, |sum, plan| sum.checked_add(plan.simulated_steps))
            .filter(|&steps| steps <= MAX_SIMULATED_STEPS)?;
        let counts: Vec<usize> = clients.iter().map(|plan| plan.hypotheses).collect();
        balanced_split(&counts)?;
        let hypotheses = counts.iter().product();
        Some(Self {
            clients,
            size: LabelSearchSize {
                hypotheses,
                simulated_steps,
            },
        })
    }
}

/// One client's hypotheses: the groups of images its steps trained on and their label multisets.
struct ClientPlan {
    /// The distinct image ranges of the client's steps, in the order the steps first use them.
    groups: Vec<Range<usize>>,
    /// For each step, the index of its group.
    step_groups: Vec<usize>,
    /// For each group, every multiset of labels its images may hold.
    multisets: Vec<Vec<Vec<u32>>>,
    /// The client's hypotheses (the product of its groups' multisets).
    hypotheses: usize,
    /// The steps a depth-first walk over them simulates: after each step, as many states as
    /// hypotheses of the groups used so far.
    simulated_steps: usize,
}

impl ClientPlan {
    /// The plan of `client` under `classes` classes; `None` beyond [`MAX_SIMULATED_STEPS`].
    fn of(client: &ClientSteps, classes: u32) -> Option<Self> {
        let mut groups: Vec<Range<usize>> = Vec::new();
        let mut step_groups = Vec::with_capacity(client.steps.len());
        let mut multisets = Vec::new();
        let mut hypotheses = 1usize;
        let mut simulated_steps = 0usize;
        for range in &client.steps {
            let group = match groups.iter().position(|g| g == range) {
                Some(group) => group,
                None => {
                    let sets = class_multisets(range.len(), classes);
                    hypotheses = hypotheses.checked_mul(sets.len())?;
                    multisets.push(sets);
                    groups.push(range.clone());
                    groups.len() - 1
                }
            };
            step_groups.push(group);
            simulated_steps = simulated_steps
                .checked_add(hypotheses)
                .filter(|&steps| steps <= MAX_SIMULATED_STEPS)?;
        }
        Some(Self {
            groups,
            step_groups,
            multisets,
            hypotheses,
            simulated_steps,
        })
    }
}

/// One client's simulated classifier delta under one of its hypotheses.
struct Simulated {
    /// For each of the client's groups, the index of its multiset.
    choice: Vec<usize>,
    /// The classifier's weight and bias deltas, flattened one after the other.
    change: Vec<f64>,
}

/// A depth-first walk over one client's hypotheses, simulating each step once per distinct
/// prefix of label choices.
struct ClientWalk<'a, 'm> {
    matcher: &'a GradientMatcher<'m>,
    stand_ins: &'a StandIns<'a>,
    /// The classifier's weight and bias, whose deltas are compared.
    names: [&'a str; 2],
    plan: &'a ClientPlan,
    /// The multiset chosen so far for each group.
    chosen: Vec<Option<usize>>,
    /// Every finite simulated delta found.
    outcomes: Vec<Simulated>,
}

impl ClientWalk<'_, '_> {
    /// Simulates the client's steps from `step` on, from `state`, under every choice of the groups
    /// not chosen yet.
    fn descend(&mut self, step: usize, state: &SimulatedSgd) -> Result<()> {
        let Some(&group) = self.plan.step_groups.get(step) else {
            return self.record(state);
        };
        let range = &self.plan.groups[group];
        let fixed = self.chosen[group];
        let choices = match fixed {
            Some(choice) => choice..choice + 1,
            None => 0..self.plan.multisets[group].len(),
        };
        for choice in choices {
            self.chosen[group] = Some(choice);
            let labels = &self.plan.multisets[group][choice];
            let images = self.stand_ins.images(range.clone(), labels)?;
            let next = self.matcher.simulated_sgd_step(state, &images, labels)?;
            self.descend(step + 1, &next)?;
        }
        self.chosen[group] = fixed;
        Ok(())
    }

    /// Keeps the classifier's delta at `state` (the end of the client's steps), if it is finite:
    /// a hypothesis whose unroll diverges explains nothing.
    fn record(&mut self, state: &SimulatedSgd) -> Result<()> {
        let mut change = Vec::new();
        for name in self.names {
            change.extend(tensor_to_f64(&self.matcher.simulated_change(state, name)?)?);
        }
        if change.iter().all(|v| v.is_finite()) {
            let choice = self.chosen.iter().map(|c| c.unwrap_or(0)).collect();
            self.outcomes.push(Simulated { choice, change });
        }
        Ok(())
    }
}

/// The combination of one simulated delta per client whose weighted sum is closest to `observed`:
/// its squared distance and each client's pick; `None` when some client has none or the clients
/// do not split into two halves of at most [`MAX_HALF_COMBINATIONS`] combinations each.
///
/// Meet in the middle: every weighted sum of the first half's picks and of the second half's is
/// formed, and each pair's distance `|observed - a - b|^2 = |r_a|^2 - 2 r_a . b + |b|^2` (with
/// `r_a = observed - a`) comes from one matrix product, so the pairs are scored without forming
/// their sums; the winner's distance is then taken directly.
fn closest_combination(
    per_client: &[Vec<Simulated>],
    weights: &[f64],
    observed: &[f64],
) -> Result<Option<(f64, Vec<usize>)>> {
    let counts: Vec<usize> = per_client.iter().map(Vec::len).collect();
    if counts.contains(&0) {
        return Ok(None);
    }
    let Some(split) = balanced_split(&counts) else {
        return Ok(None);
    };
    let width = observed.len();
    let (left_picks, left_sums) = weighted_sums(&per_client[..split], &weights[..split], width);
    let (right_picks, right_sums) = weighted_sums(&per_client[split..], &weights[split..], width);
    let residuals: Vec<f64> = left_sums
        .chunks(width)
        .flat_map(|sum| observed.iter().zip(sum).map(|(o, s)| o - s))
        .collect();
    let squared_norms = |rows: &[f64]| -> Vec<f64> {
        rows.chunks(width)
            .map(|row| row.iter().map(|v| v * v).sum())
            .collect()
    };
    let residual_norms = squared_norms(&residuals);
    let right_norms = squared_norms(&right_sums);
    let device = Device::Cpu;
    let right = Tensor::from_slice(&right_sums, (right_picks.len(), width), &device)?;
    let mut best: Option<(f64, usize, usize)> = None;
    for (chunk, rows) in residuals.chunks(PAIR_CHUNK * width).enumerate() {
        let count = rows.len() / width;
        let cross: Vec<Vec<f64>> = Tensor::from_slice(rows, (count, width), &device)?
            .matmul(&right.t()?)?
            .to_vec2()?;
        for (row, products) in cross.iter().enumerate() {
            let left = chunk * PAIR_CHUNK + row;
            for (right, product) in products.iter().enumerate() {
                let distance = residual_norms[left] - 2.0 * product + right_norms[right];
                if best.is_none_or(|(b, _, _)| distance < b) {
                    best = Some((distance, left, right));
                }
            }
        }
    }
    let Some((_, left, right)) = best else {
        return Ok(None);
    };
    let residual = &residuals[left * width..(left + 1) * width];
    let sum = &right_sums[right * width..(right + 1) * width];
    let distance = residual.iter().zip(sum).map(|(r, s)| (r - s).powi(2)).sum();
    let mut picks = left_picks[left].clone();
    picks.extend(&right_picks[right]);
    Ok(Some((distance, picks)))
}

/// Rows of the first half's residuals scored against the second half at once (bounds the memory of
/// one matrix product to this many rows by [`MAX_HALF_COMBINATIONS`] columns).
const PAIR_CHUNK: usize = 512;

/// Where to split clients with `counts` hypotheses each into two halves of at most
/// [`MAX_HALF_COMBINATIONS`] combinations each, as evenly as possible; `None` if no split fits.
fn balanced_split(counts: &[usize]) -> Option<usize> {
    let product = |counts: &[usize]| counts.iter().try_fold(1usize, |p, &c| p.checked_mul(c));
    (0..=counts.len())
        .filter_map(|split| {
            let larger = product(&counts[..split])?.max(product(&counts[split..])?);
            (larger <= MAX_HALF_COMBINATIONS).then_some((larger, split))
        })
        .min()
        .map(|(_, split)| split)
}

/// Every combination of one simulated delta per client of `clients`: each one's picks, and the
/// sums of their changes weighted by `weights`, one row of `width` values per combination (one
/// all-zero row with no picks for no clients).
fn weighted_sums(
    clients: &[Vec<Simulated>],
    weights: &[f64],
    width: usize,
) -> (Vec<Vec<usize>>, Vec<f64>) {
    let mut picks: Vec<Vec<usize>> = vec![Vec::new()];
    let mut sums = vec![0.0; width];
    for (options, &weight) in clients.iter().zip(weights) {
        let mut next_picks = Vec::with_capacity(picks.len() * options.len());
        let mut next_sums = Vec::with_capacity(sums.len() * options.len());
        for (pick, sum) in picks.iter().zip(sums.chunks(width)) {
            for (index, option) in options.iter().enumerate() {
                let mut extended = pick.clone();
                extended.push(index);
                next_picks.push(extended);
                next_sums.extend(sum.iter().zip(&option.change).map(|(s, c)| s + weight * c));
            }
        }
        picks = next_picks;
        sums = next_sums;
    }
    (picks, sums)
}

/// Every multiset of `size` labels over `classes` classes, each sorted ascending (stops growing
/// past [`MAX_SIMULATED_STEPS`], which no search may exceed).
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
        if all.len() > MAX_SIMULATED_STEPS {
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

    /// The stand-in images of the slots `range` under `labels`, one per slot (N x C x H x W).
    fn images(&self, range: Range<usize>, labels: &[u32]) -> Result<Tensor> {
        Ok(match self {
            StandIns::Noise(images) => images.narrow(0, range.start, range.len())?,
            StandIns::Reference {
                reference,
                by_class,
            } => {
                let picks: Vec<u32> = range
                    .zip(labels)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// `clients` clients with `options` random simulated deltas of `width` values each.
    fn random_clients(
        rng: &mut StdRng,
        clients: usize,
        options: usize,
        width: usize,
    ) -> Vec<Vec<Simulated>> {
        (0..clients)
            .map(|_| {
                (0..options)
                    .map(|index| Simulated {
                        choice: vec![index],
                        change: (0..width).map(|_| rng.random_range(-1.0..1.0)).collect(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_meet_in_the_middle_finds_the_combination_an_exhaustive_search_finds() {
        let mut rng = StdRng::seed_from_u64(7);
        for clients in 1..=4 {
            let per_client = random_clients(&mut rng, clients, 5, 12);
            let weights: Vec<f64> = (0..clients).map(|k| 0.5 + k as f64).collect();
            let observed: Vec<f64> = (0..12).map(|_| rng.random_range(-2.0..2.0)).collect();
            // Every combination, its weighted sum formed and compared.
            let mut exhaustive: Option<(f64, Vec<usize>)> = None;
            for index in 0..5usize.pow(clients as u32) {
                let picks: Vec<usize> = (0..clients)
                    .map(|k| index / 5usize.pow(k as u32) % 5)
                    .collect();
                let distance: f64 = (0..12)
                    .map(|i| {
                        let sum: f64 = picks
                            .iter()
                            .enumerate()
                            .map(|(k, &p)| weights[k] * per_client[k][p].change[i])
                            .sum();
                        (observed[i] - sum).powi(2)
                    })
                    .sum();
                if exhaustive.as_ref().is_none_or(|(b, _)| distance < *b) {
                    exhaustive = Some((distance, picks));
                }
            }
            let (expected, expected_picks) = exhaustive.unwrap();
            let (distance, picks) = closest_combination(&per_client, &weights, &observed)
                .unwrap()
                .unwrap();
            assert_eq!(picks, expected_picks, "{clients} client(s)");
            assert!(
                (distance - expected).abs() <= 1e-12 * expected,
                "{distance} vs {expected}"
            );
        }
        // A client whose every hypothesis diverged leaves nothing to combine.
        let mut per_client = random_clients(&mut rng, 2, 3, 4);
        per_client[1].clear();
        assert_eq!(
            closest_combination(&per_client, &[0.5, 0.5], &[0.0; 4]).unwrap(),
            None
        );
    }

    #[test]
    fn clients_split_into_the_most_even_halves_that_fit() {
        assert_eq!(balanced_split(&[16; 4]), Some(2));
        assert_eq!(balanced_split(&[81; 4]), Some(2));
        assert_eq!(balanced_split(&[4096]), Some(0));
        assert_eq!(balanced_split(&[9000]), None);
        assert_eq!(balanced_split(&[625; 4]), None);
        assert_eq!(balanced_split(&[]), Some(0));
    }
}
