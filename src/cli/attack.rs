//! `fedleak attack`: runs a reconstruction attack on a capture written by `fedleak train` (or by another
//! FL system in the same format), writes the reconstructions, a grid against the private batch when it is
//! known, and one CSV row per image.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::ValueEnum;
use fedleak::audit::{
    attacker_view, private_images, private_matching_objective, search_finding, AttackPrecision,
    PrivateImages,
};
use fedleak::data::{load_data, DataSpec};
use fedleak::fl::read_capture;
use fedleak::model::{AttackStepKind, AttackStepPlan, VitTarget};
use fedleak::report::{image_grid, write_png};
use fedleak_attacks::{
    invert_gradients, reconstruct_april, recover_classifier_input, recover_labels,
    seconds_per_evaluation, unrolled_label_hypotheses, AttackOutcome, FeatureOutcome,
    ImageOptimizer, InputGradient, InvertingGradientsConfig, LabelCountConfig, LabelOutcome,
    Observation, Reconstruction, ReferenceImages, TargetModel,
};
use fedleak_metrics::{
    colour_psnr_db, match_batch, score_labels, score_matched_labels, ImageDims, RecoveredLabel,
};
use serde::Serialize;

use super::{
    at_least_one, refuse_attack_step_beyond_memory, select_device, GlobalArgs, UsageError,
};

/// Which attack to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttackArg {
    /// The strongest applicable attack: the APRIL closed form when it applies, else Inverting Gradients.
    Auto,
    /// The APRIL-style closed form (batch 1, learnable position embedding; a gradient or a plain- or
    /// momentum-SGD delta of any number of local steps on the one image).
    April,
    /// Inverting Gradients (optimisation, second-order autograd).
    Ig,
    /// DLG: squared-L2 gradient matching, no prior, L-BFGS (labels from iDLG / label separation).
    Dlg,
    /// Labels only: iDLG for one image; for a batch, each image the classifier block's gradients
    /// separate, label counts from the classifier bias for the rest.
    Idlg,
    /// The classifier's input (the CLS feature) from the classifier's gradients, one image.
    Linear,
}

/// How Inverting Gradients optimises the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// Adam on the signed input gradient with step decay (Inverting Gradients).
    SignedAdam,
    /// Projected L-BFGS with an Armijo line search and a constant prior.
    Lbfgs,
}

/// How Inverting Gradients computes the input gradient of its matching objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputGradientArg {
    /// The default for the observation: forward difference for one image, alternating for a batch.
    Auto,
    /// Forward-difference Hessian-vector product (two first-order passes).
    Forward,
    /// Central-difference Hessian-vector product (three first-order passes).
    Central,
    /// One-sided difference whose side alternates from step to step (two first-order passes).
    Alternating,
    /// Exact double backward through candle's autograd (slowest, most memory).
    Exact,
}

/// Floating-point precision in which the attacker simulates the client's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// Single precision, as the clients compute.
    F32,
    /// Double precision: slower, but the matching objective resolves far below f32's rounding.
    F64,
}

/// Arguments of `fedleak attack`.
#[derive(Debug, clap::Args)]
pub struct AttackArgs {
    /// A captured update: `captures/round-NNNN/client-K` (or a file in it).
    #[arg(long)]
    pub capture: PathBuf,
    /// The attack.
    #[arg(long, value_enum, default_value_t = AttackArg::Auto)]
    pub attack: AttackArg,
    /// Optimisation iterations per restart [default: for one image 400 under signed Adam and 1000
    /// under L-BFGS (DLG, and Inverting Gradients behind a learnable table), a cap it stops short of
    /// once converged; 3000 for a batch or an aggregate, which keep improving longer].
    #[arg(long, value_parser = at_least_one)]
    pub iterations: Option<usize>,
    /// Random restarts (the best by matching objective is kept, never by ground truth).
    #[arg(long, default_value_t = InvertingGradientsConfig::default().restarts, value_parser = at_least_one)]
    pub restarts: usize,
    /// Restarts run at once, each on its own thread with one kernel thread unless `--threads` says
    /// otherwise [default: the number of cores].
    #[arg(long, value_parser = at_least_one)]
    pub restart_workers: Option<usize>,
    /// How Inverting Gradients optimises the image [default: L-BFGS when the model's position
    /// embedding is learnable (the image dominates its tokens; 31 dB where signed Adam reaches 16 dB
    /// on IHC tiles), signed Adam behind a fixed sin-cos table]. DLG always uses L-BFGS.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Weight of the total-variation prior [default: 3e-2 for several images behind one gradient
    /// step, a FedSGD batch or aggregate, whose gradient mixes the images and leaves their noise
    /// unconstrained; 1e-3 for one image or a FedAvg delta's unrolled local steps].
    #[arg(long, value_parser = non_negative_weight)]
    pub tv_weight: Option<f64>,
    /// Weight of the colour-opponent total variation (0 switches it off).
    #[arg(long, default_value_t = InvertingGradientsConfig::default().opponent_tv_weight, value_parser = non_negative_weight)]
    pub opponent_tv_weight: f64,
    /// Weight of GradViT's patch-border prior (0 switches it off).
    #[arg(long, default_value_t = InvertingGradientsConfig::default().patch_weight, value_parser = non_negative_weight)]
    pub patch_weight: f64,
    /// Ridge of the patch refinement of Inverting Gradients' result (APRIL's linear system for the
    /// patches with token gradients estimated at the result, regularised towards it), relative to the
    /// token gradients' energy; gradients and plain- or momentum-SGD deltas with known labels only; 0
    /// switches it off [default: 3e-6 for one image, 1e-4 for a batch or an aggregate, whose patches
    /// outnumber the equations].
    #[arg(long, value_parser = non_negative_weight)]
    pub patch_refinement: Option<f64>,
    /// Factor applied to the prior weights at each step decay of signed Adam (1: constant prior)
    /// [default: 0.1 for one image, 1 for a batch or an aggregate, which need the prior to the end].
    #[arg(long, value_parser = unit_interval)]
    pub prior_decay: Option<f64>,
    /// Width of the uniform noise every restart starts from, centred on mid-grey (1: noise over
    /// [0, 1]; 0: a flat grey image) [default: 0.02 for `dlg`, which has no prior and leaves what
    /// the gradient does not determine where it started; 1 for Inverting Gradients].
    #[arg(long, value_parser = spread)]
    pub initial_spread: Option<f64>,
    /// For `dlg` and `ig`: optimise soft labels jointly with the images from random logits, as the
    /// original DLG does, instead of recovering the labels first (iDLG, label counts). Exact
    /// double-backward gradients; the reported labels are the argmax of the optimised ones.
    #[arg(long)]
    pub joint_labels: bool,
    /// Precision in which the attacker simulates updates. In f32 the cosine objective bottoms out at
    /// f32 rounding (about 1e-7 at the true image on the tiny ViT); in f64 it goes to about 1e-13.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// How Inverting Gradients computes its input gradient: `auto` (forward difference for one
    /// image, alternating sides for a batch or an aggregate; L-BFGS evaluates every point on the
    /// same side), `forward`, `central`, `alternating`, or `exact` (double backward; DLG and joint
    /// labels always take it).
    #[arg(long, value_enum, default_value_t = InputGradientArg::Auto)]
    pub input_gradient: InputGradientArg,
    /// Labelled images the attacker holds from the clients' distribution, for the label counts of a
    /// batch or an aggregate: a data source (`fixture:NAME`, an image folder, a MedMNIST `.npz`) of
    /// which the held-out (test) split is used, so that pointing it at the training source never
    /// hands the attacker the private images. Without it the counts are estimated from uniform-noise
    /// dummies, which is exact near a fresh model but not on a trained, confident one.
    #[arg(long, value_name = "DATA")]
    pub label_reference: Option<DataSpec>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// A prior weight: a finite number >= 0.
fn non_negative_weight(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!(
            "`{text}` is not a weight: give a finite number >= 0 (0 switches the term off)"
        )),
    }
}

/// A factor in [0, 1].
fn unit_interval(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "`{text}` is not a factor in [0, 1]: give e.g. 0.1, or 1 for a constant prior"
        )),
    }
}

/// A width in [0, 1].
fn spread(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "`{text}` is not a width in [0, 1]: give e.g. 0.02 for a start near grey, or 1 for noise over the whole range"
        )),
    }
}

impl AttackArgs {
    /// Whether the attack takes exact second-order gradients: DLG, joint labels and `--input-gradient
    /// exact` do; the default Inverting Gradients (finite differences, with either optimiser), the
    /// closed form, labels and the linear attack are first-order only.
    pub fn needs_second_order_gradients(&self) -> bool {
        self.exact_step_option().is_some()
    }

    /// The option that makes the attack take an exact double backward, as the user wrote it; `None`
    /// when it takes none.
    pub fn exact_step_option(&self) -> Option<&'static str> {
        if self.attack == AttackArg::Dlg {
            Some("`--attack dlg`")
        } else if self.joint_labels {
            Some("`--joint-labels`")
        } else if self.input_gradient == InputGradientArg::Exact {
            Some("`--input-gradient exact`")
        } else {
            None
        }
    }

    /// How many restarts run at once: `--restart-workers` (default: the number of cores), at most
    /// `--restarts`, at least one.
    pub fn concurrent_restarts(&self) -> usize {
        let workers = self.restart_workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        workers.min(self.restarts).max(1)
    }
}

/// One row of `results.csv`: one reconstructed image.
#[derive(Debug, Serialize)]
struct ResultRow {
    round: usize,
    client: usize,
    attack: &'static str,
    image: usize,
    private_index: Option<usize>,
    psnr_db: Option<f64>,
    /// What the private image's own mean colour scores against it: a reconstruction at or below
    /// this has recovered the colour, not the layout.
    colour_psnr_db: Option<f64>,
    ssim: Option<f64>,
    ssim_skimage: Option<f64>,
    nmi: Option<f64>,
    label: Option<u32>,
    true_label: Option<u32>,
    label_correct: Option<bool>,
    iterations: usize,
    restarts: usize,
    objective: f64,
    /// The same matching objective at the private images (optimisation attacks, when the capture's
    /// private record fits the update's layout): how closely the update singles them out.
    private_objective: Option<f64>,
    attack_seconds: f64,
}

/// The held-out split of `--label-reference`, at the model's input shape.
fn load_label_reference(
    capture: &fedleak::fl::Capture,
    args: &AttackArgs,
    device: &candle_core::Device,
) -> Result<Option<ReferenceImages>> {
    let Some(spec) = &args.label_reference else {
        return Ok(None);
    };
    let shape = capture.global.config.input_shape();
    let held_out = load_data(spec, shape, capture.meta.seed)?.test;
    let model_classes = capture.global.config.class_names();
    if held_out.class_names != model_classes {
        return Err(UsageError(format!(
            "`--label-reference {spec}` has the classes {:?}, the captured model {:?}\nhint: give labelled images of the same classes as the clients' data",
            held_out.class_names, model_classes
        ))
        .into());
    }
    if held_out.is_empty() {
        return Err(UsageError(format!(
            "`--label-reference {spec}` has no held-out (test) images\nhint: give a source with a `test` split, or a folder of labelled images"
        ))
        .into());
    }
    let images = Tensor::from_vec(
        held_out.images,
        (
            held_out.labels.len(),
            shape.channels,
            shape.height,
            shape.width,
        ),
        device,
    )?;
    Ok(Some(ReferenceImages {
        images,
        labels: held_out.labels,
    }))
}

/// Prints the JSON line of an attack that does not apply.
fn print_not_applicable(attack: &str, reason: &str) {
    println!(
        "{}",
        serde_json::json!({"attack": attack, "not_applicable": reason})
    );
}

/// Writes `rows` as a CSV file with a header.
fn write_rows<T: Serialize>(path: &std::path::Path, rows: &[T]) -> Result<()> {
    let mut writer = csv::Writer::from_path(path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    for row in rows {
        writer.serialize(row)?;
    }
    writer.flush()?;
    Ok(())
}

/// Runs `fedleak attack`.
pub fn run(global: &GlobalArgs, args: AttackArgs) -> Result<()> {
    let device = select_device(global.device)?;
    if !args.capture.exists() {
        return Err(UsageError(format!(
            "`--capture {}` does not exist\nhint: point it at `captures/round-NNNN/client-K` in the output of `fedleak train`",
            args.capture.display()
        ))
        .into());
    }
    let capture = read_capture(&args.capture, true, &device)?;
    let precision = match args.precision {
        PrecisionArg::F32 => AttackPrecision::F32,
        PrecisionArg::F64 => AttackPrecision::F64,
    };
    let (target, observation) = attacker_view(&capture, precision, &device)?;
    let reference = load_label_reference(&capture, &args, &device)?;
    // Read before the attack, so that a private record whose data cannot be found (moved since
    // `fedleak train`) stops the run at once, not after the attack.
    let private = private_images(&capture, &device).with_context(|| {
        format!(
            "`{}`'s private record names the data `{}` for scoring, which cannot be loaded: it must stay where `fedleak train` read it (a relative path in the record is read from the working directory)",
            args.capture.display(),
            capture.private.as_ref().map_or("", |p| p.data.as_str()),
        )
    })?;
    let create_out = || {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("cannot create `{}`", args.out.display()))
    };
    match args.attack {
        AttackArg::Idlg => {
            create_out()?;
            return run_labels(
                &capture,
                &observation,
                &target,
                reference.as_ref(),
                private.as_ref(),
                &args,
            );
        }
        AttackArg::Linear => {
            create_out()?;
            return run_linear(&observation, &target, private.as_ref(), &args);
        }
        _ => {}
    }
    let defaults = InvertingGradientsConfig::for_observation(&observation, &target);
    let input_gradient = match args.input_gradient {
        InputGradientArg::Exact => InputGradient::DoubleBackward,
        InputGradientArg::Auto => defaults.input_gradient,
        InputGradientArg::Forward => InputGradient::ForwardDifference,
        InputGradientArg::Central => InputGradient::CentralDifference,
        InputGradientArg::Alternating => InputGradient::AlternatingDifference,
    };
    let optimizer = match args.optimizer {
        None => defaults.optimizer,
        Some(OptimizerArg::SignedAdam) => ImageOptimizer::SignedAdam,
        Some(OptimizerArg::Lbfgs) => ImageOptimizer::Lbfgs,
    };
    let base = match args.attack {
        AttackArg::Dlg => InvertingGradientsConfig::dlg_for_observation(&observation),
        _ => InvertingGradientsConfig {
            tv_weight: args.tv_weight.unwrap_or(defaults.tv_weight),
            opponent_tv_weight: args.opponent_tv_weight,
            patch_weight: args.patch_weight,
            patch_refinement: args.patch_refinement.unwrap_or(defaults.patch_refinement),
            optimizer,
            input_gradient,
            ..defaults
        },
    };
    let config = InvertingGradientsConfig {
        iterations: args.iterations.unwrap_or(base.iterations),
        prior_decay: args.prior_decay.unwrap_or(base.prior_decay),
        initial_spread: args.initial_spread.unwrap_or(base.initial_spread),
        restarts: args.restarts,
        restart_workers: args.concurrent_restarts(),
        seed: global.seed(),
        ..base
    };
    let closed_form = match args.attack {
        AttackArg::Auto | AttackArg::April => Some(reconstruct_april(&observation, &target)?),
        AttackArg::Ig | AttackArg::Dlg | AttackArg::Idlg | AttackArg::Linear => None,
    };
    let optimises = !matches!(closed_form, Some(AttackOutcome::Reconstructed(_)))
        && args.attack != AttackArg::April;
    if let (true, Ok(view)) = (optimises, observation.update_view()) {
        let (kind, what, instead) = match args.exact_step_option() {
            Some(option) => (
                AttackStepKind::Exact,
                option,
                "use Inverting Gradients (`--attack ig` or `auto`) with its default finite-difference input gradient, which needs a fraction of that",
            ),
            None => (
                AttackStepKind::FiniteDifference,
                "Inverting Gradients",
                "run the restarts one after the other (`--restart-workers 1`)",
            ),
        };
        refuse_attack_step_beyond_memory(
            &AttackStepPlan {
                config: &capture.global.config,
                kind,
                images: view.images,
                local_steps: view.unrolled_steps(),
                element_bytes: precision.dtype().size_in_bytes(),
                concurrent: config.restart_workers,
            },
            what,
            instead,
        )?;
    }
    create_out()?;
    let outcome = match (args.attack, closed_form) {
        (AttackArg::April, Some(outcome)) => outcome,
        (_, Some(outcome @ AttackOutcome::Reconstructed(_))) => outcome,
        (_, closed_form) => {
            if let Some(AttackOutcome::NotApplicable { reason, .. }) = closed_form {
                tracing::info!(
                    "closed form not applicable ({reason}); running Inverting Gradients"
                );
            }
            if args.joint_labels {
                invert_gradients(&observation, &target, None, &config)?
            } else {
                announce_label_search(&observation, &target);
                match recover_labels(
                    &observation,
                    &target,
                    &LabelCountConfig::default(),
                    reference.as_ref(),
                )? {
                    LabelOutcome::Recovered(r) => {
                        announce_duration(&observation, &target, &r.labels, &config)?;
                        invert_gradients(&observation, &target, Some(&r.labels), &config)?
                    }
                    LabelOutcome::NotApplicable { attack, reason } => {
                        AttackOutcome::NotApplicable {
                            attack: config.loss.attack_id(),
                            reason: format!("labels could not be recovered ({attack}: {reason})"),
                        }
                    }
                }
            }
        }
    };
    let reconstruction = match outcome {
        AttackOutcome::Reconstructed(r) => r,
        AttackOutcome::NotApplicable { attack, reason } => {
            print_not_applicable(attack, &reason);
            return Ok(());
        }
    };
    // Where the update puts the private images, beside where the attack got (optimisation attacks
    // only: a closed form's objective is its own residual). A supplementary figure: one that cannot
    // be evaluated is left out with a warning rather than losing the attack's outputs.
    let private_objective = match private.as_ref() {
        Some(private) if reconstruction.attack == config.loss.attack_id() => {
            private_matching_objective(&observation, &target, private, &config).unwrap_or_else(
                |e| {
                    tracing::warn!("the private images' matching objective: {e:#}");
                    None
                },
            )
        }
        _ => None,
    };
    if let Some(private_objective) = private_objective {
        tracing::info!(
            "matching objective of the private images {private_objective:.3e}, of the reconstruction {:.3e}: {}",
            reconstruction.objective,
            search_finding(reconstruction.objective, private_objective)
        );
    }
    let rows = write_outputs(
        &capture,
        &reconstruction,
        private.as_ref(),
        private_objective,
        &args,
    )?;
    let summary = serde_json::json!({
        "attack": reconstruction.attack,
        "images": rows.len(),
        "psnr_db_mean": mean(rows.iter().filter_map(|r| r.psnr_db)),
        "colour_psnr_db_mean": mean(rows.iter().filter_map(|r| r.colour_psnr_db)),
        "ssim_mean": mean(rows.iter().filter_map(|r| r.ssim)),
        "label_accuracy": mean(rows.iter().filter_map(|r| r.label_correct.map(f64::from))),
        "attack_seconds": reconstruction.seconds,
        "objective": reconstruction.objective,
        "private_objective": private_objective,
        "out": args.out,
    });
    println!("{summary}");
    Ok(())
}

/// Expected runs longer than this many seconds are announced as a warning, with what shortens them.
const LONG_ATTACK_SECONDS: f64 = 600.0;

/// Logs that the labels of a multi-step SGD delta are about to be chosen by unrolling the local
/// steps under every hypothesis of per-batch counts ([`unrolled_label_hypotheses`]): a first-order
/// pass per simulated step, a minute or more for hundreds of steps.
fn announce_label_search(observation: &Observation, target: &VitTarget) {
    let Ok(view) = observation.update_view() else {
        return;
    };
    if let Some(size) = unrolled_label_hypotheses(&view, target.num_classes()) {
        tracing::info!(
            "labels of {} image(s) behind {} local step(s): scoring {} hypotheses of how many \
             images of each class each batch held, by {} simulated local steps",
            view.images,
            view.unrolled_steps(),
            size.hypotheses,
            size.simulated_steps
        );
    }
}

/// Logs how long Inverting Gradients will take here, from one evaluation of its step timed before
/// the run ([`seconds_per_evaluation`]): a client holding many images unrolls many steps on many
/// candidates, and a run can take hours.
fn announce_duration(
    observation: &Observation,
    target: &VitTarget,
    labels: &[u32],
    config: &InvertingGradientsConfig,
) -> Result<()> {
    let Some(seconds) = seconds_per_evaluation(observation, target, labels, config)? else {
        return Ok(());
    };
    let rounds = config
        .restarts
        .max(1)
        .div_ceil(config.restart_workers.max(1));
    let total = seconds * (config.iterations * rounds) as f64;
    // The optimiser depends on the model (L-BFGS behind a learnable position table), so say which.
    let optimizer = match config.optimizer {
        ImageOptimizer::SignedAdam => "signed Adam",
        ImageOptimizer::Lbfgs => "L-BFGS, which stops once converged",
    };
    let message = format!(
        "Inverting Gradients ({optimizer}) on {} image(s): one evaluation took {seconds:.3} s; {} \
         iterations x {rounds} round(s) of restarts make about {:.0} min (more with restarts \
         running at once; not counting the patch refinements and the search over which step held \
         which candidate)",
        labels.len(),
        config.iterations,
        total / 60.0
    );
    if total > LONG_ATTACK_SECONDS {
        tracing::warn!("{message}; `--iterations` and `--restarts` shorten it");
    } else {
        tracing::info!("{message}");
    }
    Ok(())
}

/// One row of `labels.csv`: one recovered label.
#[derive(Debug, Serialize)]
struct LabelRow {
    round: usize,
    client: usize,
    attack: &'static str,
    image: usize,
    label: u32,
    label_correct: Option<bool>,
    objective: f64,
    attack_seconds: f64,
}

/// `--attack idlg`: labels only (iDLG for one image, separation and counts for a batch), scored as a multiset
/// against the private labels when they are known (counts carry no order).
fn run_labels(
    capture: &fedleak::fl::Capture,
    observation: &Observation,
    target: &VitTarget,
    reference: Option<&ReferenceImages>,
    private: Option<&PrivateImages>,
    args: &AttackArgs,
) -> Result<()> {
    announce_label_search(observation, target);
    let recovery =
        match recover_labels(observation, target, &LabelCountConfig::default(), reference)? {
            LabelOutcome::Recovered(recovery) => recovery,
            LabelOutcome::NotApplicable { attack, reason } => {
                print_not_applicable(attack, &reason);
                return Ok(());
            }
        };
    let scores: Vec<Option<bool>> = match private {
        Some(private) => score_labels(
            &recovery
                .labels
                .iter()
                .map(|&label| RecoveredLabel {
                    label: Some(label),
                    matched: None,
                })
                .collect::<Vec<_>>(),
            &private.labels,
        ),
        None => vec![None; recovery.labels.len()],
    };
    let rows: Vec<LabelRow> = recovery
        .labels
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(image, (&label, label_correct))| LabelRow {
            round: capture.meta.round,
            client: capture.meta.client,
            attack: recovery.attack,
            image,
            label,
            label_correct,
            objective: recovery.objective,
            attack_seconds: recovery.seconds,
        })
        .collect();
    write_rows(&args.out.join("labels.csv"), &rows)?;
    println!(
        "{}",
        serde_json::json!({
            "attack": recovery.attack,
            "labels": recovery.labels,
            "label_accuracy": mean(rows.iter().filter_map(|r| r.label_correct.map(f64::from))),
            "attack_seconds": recovery.seconds,
            "out": args.out,
        })
    );
    Ok(())
}

/// One row of `features.csv`: one entry of the recovered feature vector.
#[derive(Debug, Serialize)]
struct FeatureRow {
    index: usize,
    recovered: f64,
    #[serde(rename = "true")]
    true_value: Option<f64>,
}

/// `--attack linear`: the CLS feature read off the classifier's gradients, written to `features.csv`
/// (one value per line) and scored against the private image's own feature when it is known.
fn run_linear(
    observation: &Observation,
    target: &VitTarget,
    private: Option<&PrivateImages>,
    args: &AttackArgs,
) -> Result<()> {
    let recovery = match recover_classifier_input(observation, target)? {
        FeatureOutcome::Recovered(recovery) => recovery,
        FeatureOutcome::NotApplicable { attack, reason } => {
            print_not_applicable(attack, &reason);
            return Ok(());
        }
    };
    let recovered: Vec<f64> = recovery
        .features
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let truth: Option<Vec<f64>> = match private {
        Some(private) => target
            .features(target.parameters(), &private.images)?
            .map(|f| {
                f.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()
            })
            .transpose()?,
        None => None,
    };
    let (cosine, relative_error) = match &truth {
        Some(t) if t.len() == recovered.len() => {
            let dot: f64 = t.iter().zip(&recovered).map(|(a, b)| a * b).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let diff: Vec<f64> = t.iter().zip(&recovered).map(|(a, b)| a - b).collect();
            (
                Some(dot / (norm(t) * norm(&recovered))),
                Some(norm(&diff) / norm(t)),
            )
        }
        _ => (None, None),
    };
    let rows: Vec<FeatureRow> = recovered
        .iter()
        .enumerate()
        .map(|(index, &recovered)| FeatureRow {
            index,
            recovered,
            true_value: truth.as_ref().and_then(|t| t.get(index).copied()),
        })
        .collect();
    write_rows(&args.out.join("features.csv"), &rows)?;
    println!(
        "{}",
        serde_json::json!({
            "attack": recovery.attack,
            "features": recovered.len(),
            "rank_one_residual": recovery.objective,
            "feature_cosine": cosine,
            "feature_relative_error": relative_error,
            "attack_seconds": recovery.seconds,
            "out": args.out,
        })
    );
    Ok(())
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn image_values(images: &Tensor, index: usize) -> Result<Vec<f32>> {
    Ok(images.get(index)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Writes reconstructions, the grid and `results.csv`; returns the rows.
fn write_outputs(
    capture: &fedleak::fl::Capture,
    reconstruction: &Reconstruction,
    private: Option<&PrivateImages>,
    private_objective: Option<f64>,
    args: &AttackArgs,
) -> Result<Vec<ResultRow>> {
    let images = &reconstruction.images;
    let count = images.dim(0)?;
    let images_dir = args.out.join("reconstructions");
    std::fs::create_dir_all(&images_dir)
        .with_context(|| format!("cannot create `{}`", images_dir.display()))?;
    for i in 0..count {
        write_png(&images.get(i)?, &images_dir.join(format!("image-{i}.png")))?;
    }
    let mut rows: Vec<ResultRow> = (0..count)
        .map(|i| ResultRow {
            round: capture.meta.round,
            client: capture.meta.client,
            attack: reconstruction.attack,
            image: i,
            private_index: None,
            psnr_db: None,
            colour_psnr_db: None,
            ssim: None,
            ssim_skimage: None,
            nmi: None,
            label: reconstruction
                .labels
                .as_ref()
                .and_then(|l| l.get(i).copied()),
            true_label: None,
            label_correct: None,
            iterations: reconstruction.iterations,
            restarts: reconstruction.restarts,
            objective: reconstruction.objective,
            private_objective,
            attack_seconds: reconstruction.seconds,
        })
        .collect();
    if let Some(private) = private {
        let (_, c, h, w) = private.images.dims4()?;
        let dims = ImageDims::new(c, h, w);
        let refs: Vec<Vec<f32>> = (0..private.images.dim(0)?)
            .map(|i| image_values(&private.images, i))
            .collect::<Result<_>>()?;
        let recs: Vec<Vec<f32>> = (0..count)
            .map(|i| image_values(images, i))
            .collect::<Result<_>>()?;
        let matching = match_batch(
            &refs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            &recs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            dims,
        )?;
        // Labels are scored as a multiset over the batch (see `score_labels`).
        let recovered: Vec<Option<u32>> = rows.iter().map(|row| row.label).collect();
        let label_scores = score_matched_labels(&matching, &recovered, &private.labels);
        let mut ordered = Vec::new();
        for (pair, label_correct) in matching.pairs.iter().zip(label_scores) {
            let row = &mut rows[pair.reconstruction];
            row.private_index = Some(pair.reference);
            row.psnr_db = Some(pair.score.psnr_db);
            row.colour_psnr_db = Some(colour_psnr_db(&refs[pair.reference], dims)?);
            row.ssim = Some(pair.score.ssim);
            row.ssim_skimage = Some(pair.score.ssim_skimage);
            row.nmi = Some(pair.score.nmi);
            row.true_label = Some(private.labels[pair.reference]);
            row.label_correct = label_correct;
            ordered.push(pair.reconstruction);
        }
        let matched = Tensor::stack(
            &ordered
                .iter()
                .map(|&j| images.get(j))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let references = Tensor::stack(
            &matching
                .pairs
                .iter()
                .map(|p| private.images.get(p.reference))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        image_grid(&[&references, &matched], 4, &args.out.join("grid.png"))?;
    }
    write_rows(&args.out.join("results.csv"), &rows)?;
    Ok(rows)
}
