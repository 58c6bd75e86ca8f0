//! Running an audit: train under every scheme, attack what every party sees, score, judge.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fedleak_attacks::{
    invert_gradients, reconstruct_april, recover_labels, AttackOutcome, InvertingGradientsConfig,
    LabelCountConfig, LabelOutcome, Observation, Reconstruction, ReferenceImages,
};
use fedleak_metrics::{match_batch, score_matched_labels, score_pair, ImageDims};
use serde::Serialize;

use super::config::{AttackKind, AuditConfig};
use super::observe::{
    attacker_view, private_images_in, private_matching_objective, search_fell_short,
    search_finding, PrivateImages,
};
use crate::data::{load_data, DataSpec, DataSplits};
use crate::fl::{run_federated, Capture, FlConfig, FlObserver, RoundRecord};
use crate::model::{init_parameters, load_checkpoint, Checkpoint, ModelPreset, VitTarget};
use crate::schemes::cls_token_he::{run_cls_token_audit, ClsTokenOutcome, ClsTokenSettings};
use crate::schemes::{build_scheme, SchemeConfig, View};
use crate::Result;
use fedleak_attacks::FeatureInversionConfig;

/// Receives progress messages while an audit runs; the library never prints.
pub trait AuditProgress {
    /// A step started (`training scheme dp`, `attacking ...`).
    fn step(&mut self, message: &str);
}

/// One reconstructed image, scored (a row of `results.csv`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageRow {
    /// Scheme id.
    pub scheme: String,
    /// Threat model id (`server`, ...).
    pub threat_model: String,
    /// Attack id.
    pub attack: String,
    /// 1-based round.
    pub round: usize,
    /// The attacked party's upload (`client-0`, `aggregate`).
    pub party: String,
    /// Index of the reconstruction in its batch.
    pub image: usize,
    /// Index of the matched private image in the attacked batch.
    pub private_index: usize,
    /// PSNR (dB, data range 1).
    pub psnr_db: f64,
    /// SSIM (Wang et al., Gaussian window).
    pub ssim: f64,
    /// Normalised mutual information I/H in [0, 1].
    pub nmi: f64,
    /// PSNR of the uninformed baseline (the training set's mean image) against the same private image.
    pub baseline_psnr_db: f64,
    /// SSIM of the uninformed baseline.
    pub baseline_ssim: f64,
    /// Whether this image counts as leaked under the verdict thresholds.
    pub leaked: bool,
    /// The label the attack recovered, when it recovers labels.
    pub label: Option<u32>,
    /// The true label.
    pub true_label: u32,
    /// Whether the recovered label is one of the batch's: it claims a private label of its class
    /// that no other recovered label has claimed, its own matched image's first
    /// ([`fedleak_metrics::score_labels`]); for one image, whether it is the image's label.
    pub label_correct: Option<bool>,
    /// Wall time of the attack on the whole batch, in seconds.
    pub attack_seconds: f64,
}

/// One scheme x threat model x attack x capture (a row of `summary.csv`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    /// Scheme id.
    pub scheme: String,
    /// The scheme's settings in one line.
    pub scheme_parameters: String,
    /// Attack id (`-` when nothing could be attacked).
    pub attack: String,
    /// Threat model id.
    pub threat_model: String,
    /// 1-based round of the capture.
    pub round: usize,
    /// The attacked party (`client-0`, `aggregate`, `wire`).
    pub party: String,
    /// Images behind the attacked update.
    pub batch_size: usize,
    /// Mean PSNR over the reconstructed images (empty when not attacked).
    pub psnr_db_mean: Option<f64>,
    /// Best PSNR.
    pub psnr_db_max: Option<f64>,
    /// Mean SSIM.
    pub ssim_mean: Option<f64>,
    /// Mean NMI.
    pub nmi_mean: Option<f64>,
    /// Fraction of recovered labels that are right (empty when the attack recovers none).
    pub label_accuracy: Option<f64>,
    /// Mean PSNR of the uninformed baseline on the same private images.
    pub baseline_psnr_db: Option<f64>,
    /// Test accuracy of the global model after this round.
    pub test_accuracy: f64,
    /// Mean exact upload bytes per client in this round.
    pub upload_bytes_per_client_round: usize,
    /// Exact download bytes per client in this round.
    pub download_bytes_per_client_round: usize,
    /// Wall time of the round (training, encoding, aggregation, evaluation).
    pub round_seconds: f64,
    /// Mean client encoding seconds (encryption, noise, sparsification) in this round.
    pub encode_seconds: f64,
    /// Server aggregation seconds in this round.
    pub server_seconds: f64,
    /// Wall time of the attack.
    pub attack_seconds: Option<f64>,
    /// The optimisation attack's matching objective at its reconstruction (empty for a closed form).
    pub objective: Option<f64>,
    /// The same objective at the private images: far below `objective`, the search stopped the
    /// attack; about as low or higher, what the update says did.
    pub private_objective: Option<f64>,
    /// Differential privacy spent up to this round (cumulative epsilon at `dp_delta`), for DP schemes.
    pub dp_epsilon: Option<f64>,
    /// The delta of `dp_epsilon`.
    pub dp_delta: Option<f64>,
    /// `leaks`, `resists` or `not_attacked`.
    pub verdict: String,
    /// Why: the figures behind the verdict, or why no attack applies.
    pub reason: String,
}

impl SummaryRow {
    /// A row for `scheme` at `record`'s round, with the round's costs and nothing attacked yet.
    fn for_round(scheme: &str, parameters: &str, record: &RoundRecord, party: &str) -> Self {
        let uploads = &record.upload_bytes;
        Self {
            scheme: scheme.into(),
            scheme_parameters: parameters.into(),
            attack: "-".into(),
            threat_model: String::new(),
            round: record.round,
            party: party.into(),
            batch_size: 0,
            psnr_db_mean: None,
            psnr_db_max: None,
            ssim_mean: None,
            nmi_mean: None,
            label_accuracy: None,
            baseline_psnr_db: None,
            test_accuracy: record.test_accuracy,
            upload_bytes_per_client_round: uploads.iter().sum::<usize>() / uploads.len().max(1),
            download_bytes_per_client_round: record.download_bytes_per_client,
            round_seconds: record.round_seconds,
            encode_seconds: record.encode_seconds,
            server_seconds: record.server_seconds,
            attack_seconds: None,
            objective: None,
            private_objective: None,
            dp_epsilon: None,
            dp_delta: None,
            verdict: "not_attacked".into(),
            reason: String::new(),
        }
    }
}

/// The verdict on one scheme, over every threat model, attack and capture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemeVerdict {
    /// Scheme id.
    pub scheme: String,
    /// The scheme's settings.
    pub scheme_parameters: String,
    /// `leaks`, `resists` or `not_attacked`.
    pub verdict: String,
    /// Why, in one sentence.
    pub reason: String,
    /// Best PSNR of any attack on any capture.
    pub psnr_db_max: Option<f64>,
    /// Best mean SSIM of any attack on any capture.
    pub ssim_max: Option<f64>,
    /// Best mean NMI.
    pub nmi_max: Option<f64>,
    /// Test accuracy after the last round.
    pub final_test_accuracy: f64,
    /// One-time key material per client (public key or shared secret key), in bytes.
    pub key_bytes_one_time: usize,
    /// Differential privacy spent over the whole run (epsilon at `dp_delta`), for DP schemes.
    pub dp_epsilon: Option<f64>,
    /// The delta of `dp_epsilon`.
    pub dp_delta: Option<f64>,
    /// Mean upload bytes per client per round over the run.
    pub upload_bytes_per_client_round: f64,
    /// Mean download bytes per client per round.
    pub download_bytes_per_client_round: f64,
    /// Mean round wall time.
    pub round_seconds: f64,
    /// Each threat model and what it sees, for the report.
    pub threat_models: Vec<(String, String)>,
    /// Test accuracy after every round.
    pub accuracy_by_round: Vec<f64>,
    /// Whether a *resists* rests on the attack's search: in some optimisation run the update
    /// singled out the private images far better than the reconstruction
    /// ([`crate::audit::search_fell_short`]), so a stronger attack may recover them.
    pub search_limited: bool,
}

/// An image grid (private | reconstruction) to show in the report.
#[derive(Debug, Clone)]
pub struct Figure {
    /// File name under `images/`.
    pub file: String,
    /// Caption.
    pub caption: String,
    /// The rows of the grid: private images, then the matched reconstructions (each B x C x H x W).
    pub rows: Vec<Tensor>,
}

/// Everything an audit produced.
#[derive(Debug, Clone)]
pub struct AuditOutcome {
    /// One row per reconstructed image.
    pub images: Vec<ImageRow>,
    /// One row per scheme x threat model x attack x capture.
    pub summary: Vec<SummaryRow>,
    /// One verdict per scheme.
    pub verdicts: Vec<SchemeVerdict>,
    /// Image grids for the report.
    pub figures: Vec<Figure>,
    /// The round records of every scheme's training, by scheme id.
    pub rounds: BTreeMap<String, Vec<RoundRecord>>,
    /// The model's parameter count.
    pub model_parameters: usize,
    /// Test accuracy after the plain warm-up, when the audit has one.
    pub warmup_test_accuracy: Option<f64>,
    /// Wall time of the whole audit.
    pub seconds: f64,
}

/// Collects the captures the audit attacks.
struct Collector<'a> {
    wanted_clients: &'a [usize],
    captures: Vec<Capture>,
    rounds: Vec<RoundRecord>,
}

impl FlObserver for Collector<'_> {
    fn round_finished(&mut self, record: &RoundRecord) -> Result<()> {
        self.rounds.push(record.clone());
        Ok(())
    }

    fn captured(&mut self, capture: &Capture) -> Result<()> {
        if capture.meta.is_aggregate() || self.wanted_clients.contains(&capture.meta.client) {
            self.captures.push(capture.clone());
        }
        Ok(())
    }
}

/// The image shape the audit's model takes (images are converted to it on load).
fn input_shape(config: &AuditConfig, device: &Device) -> Result<crate::data::ImageShape> {
    let path = std::path::Path::new(&config.model);
    if path.exists() {
        return Ok(load_checkpoint(path, DType::F32, device)?
            .config
            .input_shape());
    }
    let preset = ModelPreset::from_name(&config.model)?;
    Ok(preset.config(&[], config.position_embedding).input_shape())
}

/// The initial global model of the audit: the checkpoint, or a preset initialised from the seed.
fn initial_model(config: &AuditConfig, data: &DataSplits, device: &Device) -> Result<Checkpoint> {
    let path = std::path::Path::new(&config.model);
    if path.exists() {
        return load_checkpoint(path, DType::F32, device);
    }
    let preset = ModelPreset::from_name(&config.model)?;
    let model_config = preset.config(&data.train.class_names, config.position_embedding);
    model_config.validate(preset.name())?;
    let tensors = init_parameters(&model_config, config.seed, DType::F32, device)?;
    Ok(Checkpoint {
        config: model_config,
        tensors,
    })
}

/// The held-out split as the attacker's labelled reference images, when `[attack] label_reference`
/// says so.
fn label_reference(
    config: &AuditConfig,
    data: &DataSplits,
    device: &Device,
) -> Result<Option<ReferenceImages>> {
    if !config.attack.label_reference {
        return Ok(None);
    }
    let held_out = &data.test;
    let shape = held_out.shape;
    let images = Tensor::from_vec(
        held_out.images.clone(),
        (held_out.len(), shape.channels, shape.height, shape.width),
        device,
    )?;
    Ok(Some(ReferenceImages {
        images,
        labels: held_out.labels.clone(),
    }))
}

/// The per-pixel mean of the training images: the uninformed attacker's best constant guess.
fn mean_image(data: &DataSplits) -> Vec<f32> {
    let len = data.train.shape.len();
    let mut sum = vec![0f64; len];
    for i in 0..data.train.len() {
        for (s, &v) in sum.iter_mut().zip(data.train.image(i)) {
            *s += v as f64;
        }
    }
    let n = data.train.len().max(1) as f64;
    sum.into_iter().map(|s| (s / n) as f32).collect()
}

/// The settings of the optimisation attack `kind` on `observation` under the audit's `[attack]`
/// table; `None` for a closed form.
fn optimisation_config(
    kind: AttackKind,
    observation: &Observation,
    target: &VitTarget,
    config: &AuditConfig,
) -> Option<InvertingGradientsConfig> {
    let base = match kind {
        AttackKind::April => return None,
        AttackKind::Dlg => InvertingGradientsConfig::dlg(),
        AttackKind::Ig => {
            let defaults = InvertingGradientsConfig::for_observation(observation, target);
            InvertingGradientsConfig {
                tv_weight: config.attack.tv_weight.unwrap_or(defaults.tv_weight),
                prior_decay: config.attack.prior_decay.unwrap_or(defaults.prior_decay),
                patch_refinement: config
                    .attack
                    .patch_refinement
                    .unwrap_or(defaults.patch_refinement),
                optimizer: config.attack.optimizer.unwrap_or(defaults.optimizer),
                ..defaults
            }
        }
    };
    Some(InvertingGradientsConfig {
        iterations: config.attack.iterations,
        restarts: config.attack.restarts,
        initial_spread: config.attack.initial_spread.unwrap_or(base.initial_spread),
        seed: config.seed,
        ..base
    })
}

/// Runs `kind` on `observation`: the closed form, or the optimisation attack with `settings` (from
/// [`optimisation_config`]) on the labels it recovers.
fn run_attack(
    kind: AttackKind,
    settings: Option<&InvertingGradientsConfig>,
    observation: &Observation,
    target: &VitTarget,
    reference: Option<&ReferenceImages>,
) -> Result<AttackOutcome> {
    Ok(match settings {
        None => reconstruct_april(observation, target)?,
        Some(settings) => {
            match recover_labels(observation, target, &LabelCountConfig::default(), reference)? {
                LabelOutcome::Recovered(recovery) => {
                    invert_gradients(observation, target, Some(&recovery.labels), settings)?
                }
                LabelOutcome::NotApplicable { attack, reason } => AttackOutcome::NotApplicable {
                    attack: kind.id(),
                    reason: format!("labels could not be recovered ({attack}: {reason})"),
                },
            }
        }
    })
}

/// Adds to an optimisation attack's `row` its matching objective and the private images' (see
/// [`private_matching_objective`]), and what they say to its reason. The private images' figure is
/// supplementary: when the attack cannot evaluate it, it is left out with the reason in the log.
fn compare_with_private_images(
    row: &mut SummaryRow,
    reconstruction: &Reconstruction,
    attacked: (
        &Observation,
        &VitTarget,
        &PrivateImages,
        &InvertingGradientsConfig,
    ),
    context: &str,
) -> Result<()> {
    let (observation, target, private, settings) = attacked;
    row.objective = Some(reconstruction.objective);
    row.private_objective = match private_matching_objective(observation, target, private, settings)
    {
        Ok(objective) => objective,
        Err(crate::Error::Attack(e)) => {
            tracing::warn!("{context}: the private images' matching objective: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(private_objective) = row.private_objective {
        row.reason = format!(
            "{}; matching objective {:.1e}, at the private images {:.1e}: {}",
            row.reason,
            reconstruction.objective,
            private_objective,
            search_finding(reconstruction.objective, private_objective)
        );
    }
    Ok(())
}

/// Why `kind` is not run on `observation` when its attack step would not fit in the memory available
/// now (DLG's exact double backward, or any optimisation attack on a large model's big aggregate);
/// `None` when it fits or takes no optimisation step.
fn memory_shortfall(
    kind: AttackKind,
    observation: &Observation,
    capture: &Capture,
    config: &AuditConfig,
) -> Option<String> {
    let step_kind = match kind {
        AttackKind::April => return None,
        AttackKind::Ig => crate::model::AttackStepKind::FiniteDifference,
        AttackKind::Dlg => crate::model::AttackStepKind::Exact,
    };
    let view = observation.update_view().ok()?;
    let (needed, available) = crate::model::AttackStepPlan {
        config: &capture.global.config,
        kind: step_kind,
        images: view.images,
        local_steps: view.unrolled_steps(),
        element_bytes: config.attack.precision.dtype().size_in_bytes(),
        concurrent: 1,
    }
    .shortfall()?;
    Some(format!(
        "not run: it needs about {:.1} GB of memory here, {:.1} GB is available (set {}=1 to try anyway)",
        needed as f64 / 1e9,
        available as f64 / 1e9,
        crate::model::SKIP_MEMORY_CHECK
    ))
}

fn values_of(images: &Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(images
        .get(i)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// What one attack on one capture gave.
struct Scored {
    rows: Vec<ImageRow>,
    figure: Option<Figure>,
}

#[allow(clippy::too_many_arguments)]
fn score(
    reconstruction: &Reconstruction,
    private: &PrivateImages,
    baseline: &[f32],
    context: (&str, &str, usize, &str),
    config: &AuditConfig,
) -> Result<Scored> {
    let (scheme, threat, round, party) = context;
    let (references, labels) = (&private.images, &private.labels);
    let (_, c, h, w) = references.dims4()?;
    let dims = ImageDims::new(c, h, w);
    let refs: Vec<Vec<f32>> = (0..references.dim(0)?)
        .map(|i| values_of(references, i))
        .collect::<Result<_>>()?;
    let recs: Vec<Vec<f32>> = (0..reconstruction.images.dim(0)?)
        .map(|i| values_of(&reconstruction.images, i))
        .collect::<Result<_>>()?;
    let matching = match_batch(
        &refs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        &recs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        dims,
    )?;
    let recovered: Vec<Option<u32>> = (0..recs.len())
        .map(|j| {
            reconstruction
                .labels
                .as_ref()
                .and_then(|l| l.get(j).copied())
        })
        .collect();
    // Labels are scored as a multiset over the batch (see `score_labels`): on an aggregate the
    // matching of poor reconstructions to private images says nothing about where a label belongs.
    let label_scores = score_matched_labels(&matching, &recovered, labels);
    let mut rows = Vec::new();
    for (pair, label_correct) in matching.pairs.iter().zip(label_scores) {
        let base = score_pair(&refs[pair.reference], baseline, dims)?;
        let label = recovered[pair.reconstruction];
        let true_label = labels[pair.reference];
        rows.push(ImageRow {
            scheme: scheme.into(),
            threat_model: threat.into(),
            attack: reconstruction.attack.into(),
            round,
            party: party.into(),
            image: pair.reconstruction,
            private_index: pair.reference,
            psnr_db: pair.score.psnr_db,
            ssim: pair.score.ssim,
            nmi: pair.score.nmi,
            baseline_psnr_db: base.psnr_db,
            baseline_ssim: base.ssim,
            leaked: pair.score.psnr_db >= base.psnr_db + config.verdict.psnr_margin_db
                && pair.score.ssim >= config.verdict.ssim_min,
            label,
            true_label,
            label_correct,
            attack_seconds: reconstruction.seconds,
        });
    }
    let shown = matching.pairs.len().min(8);
    let figure = if shown > 0 {
        let pick = |images: &Tensor, index: &dyn Fn(usize) -> usize| -> Result<Tensor> {
            let chosen = (0..shown)
                .map(|k| images.get(index(k)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&chosen, 0)?)
        };
        let private_row = pick(references, &|k| matching.pairs[k].reference)?;
        let recon_row = pick(&reconstruction.images, &|k| {
            matching.pairs[k].reconstruction
        })?;
        Some(Figure {
            file: format!("{scheme}-{threat}-round{round}-{party}-{}.png", reconstruction.attack),
            caption: format!(
                "{scheme}: {threat} attacks the {party} upload of round {round} with {} (top: private, bottom: reconstruction)",
                reconstruction.attack
            ),
            rows: vec![private_row, recon_row],
        })
    } else {
        None
    };
    Ok(Scored { rows, figure })
}

/// Runs the audit `config` on `device`, reporting progress to `progress`.
pub fn run_audit(
    config: &AuditConfig,
    device: &Device,
    progress: &mut dyn AuditProgress,
) -> Result<AuditOutcome> {
    let started = Instant::now();
    config.validate()?;
    let spec = DataSpec::parse(&config.data)?;
    progress.step(&format!("loading {}", config.data));
    let data = load_data(&spec, input_shape(config, device)?, config.seed)?;
    let mut initial = initial_model(config, &data, device)?;
    let mut warmup_accuracy = None;
    if let Some(warmup) = &config.warmup {
        let warmup = FlConfig {
            capture_rounds: Vec::new(),
            ..warmup.clone()
        };
        progress.step(&format!(
            "warm-up: {} rounds of plain federated training",
            warmup.rounds
        ));
        let trained = run_federated(
            &warmup,
            &initial,
            &data,
            &spec.to_string(),
            config.seed,
            &mut crate::schemes::PlainScheme,
            &mut Collector {
                wanted_clients: &[],
                captures: Vec::new(),
                rounds: Vec::new(),
            },
        )?;
        warmup_accuracy = trained.rounds.last().map(|r| r.test_accuracy);
        initial = trained.global;
    }
    let model_parameters = initial.tensors.values().map(Tensor::elem_count).sum();
    let baseline = mean_image(&data);
    let reference = label_reference(config, &data, device)?;
    let mut outcome = AuditOutcome {
        images: Vec::new(),
        summary: Vec::new(),
        verdicts: Vec::new(),
        figures: Vec::new(),
        rounds: BTreeMap::new(),
        model_parameters,
        warmup_test_accuracy: warmup_accuracy,
        seconds: 0.0,
    };
    let mut federated_model: Option<Checkpoint> = None;
    for scheme_config in &config.schemes {
        if let SchemeConfig::ClsTokenHe {
            per_image,
            iterations,
            restarts,
        } = scheme_config
        {
            let backbone = federated_model.as_ref().unwrap_or(&initial);
            progress
                .step("CLS-token HE: encrypted prototypes, encrypted inference, feature inversion");
            let settings = ClsTokenSettings {
                per_image: *per_image,
                inversion: FeatureInversionConfig {
                    iterations: *iterations,
                    restarts: *restarts,
                    seed: config.seed,
                    ..FeatureInversionConfig::default()
                },
                seed: config.seed,
                ..ClsTokenSettings::default()
            };
            let partition = crate::data::partition_labels(
                &data.train.labels,
                config.fl.clients,
                config.fl.partition,
                config.seed,
            )?;
            let cls = run_cls_token_audit(backbone, &data, &partition, &settings, device)?;
            let trained_note = if federated_model.is_some() {
                "the federated model of the `none` run"
            } else {
                "the initial model"
            };
            audit_cls_token(&cls, trained_note, config, &mut outcome)?;
            continue;
        }
        let mut scheme = build_scheme(scheme_config, config.seed)?;
        let id = scheme.id().to_string();
        progress.step(&format!(
            "training under `{id}` ({} rounds)",
            config.fl.rounds
        ));
        let mut collector = Collector {
            wanted_clients: &config.attack.clients,
            captures: Vec::new(),
            rounds: Vec::new(),
        };
        let trained = run_federated(
            &config.fl,
            &initial,
            &data,
            &spec.to_string(),
            config.seed,
            scheme.as_mut(),
            &mut collector,
        )?;
        let parameters = scheme.parameters();
        let threat_models = scheme.threat_models();
        let (sampling_rate, steps_per_round) = local_sampling(&config.fl, &trained.partition);
        let guarantee =
            |rounds: usize| scheme.dp_guarantee(rounds as u64, sampling_rate, steps_per_round);
        let mut scheme_rows: Vec<SummaryRow> = Vec::new();
        for capture in &collector.captures {
            let party = capture.meta.party();
            let round = capture.meta.round;
            let record = &trained.rounds[round - 1];
            let base_row = SummaryRow {
                dp_epsilon: guarantee(round).map(|g| g.0),
                dp_delta: guarantee(round).map(|g| g.1),
                ..SummaryRow::for_round(&id, &parameters, record, &party)
            };
            let is_aggregate = capture.meta.is_aggregate();
            for threat in &threat_models {
                let applies = match &threat.view {
                    View::ClientUpdates => !is_aggregate,
                    View::Aggregate => is_aggregate,
                    View::Ciphertext { .. } => false,
                };
                if !applies {
                    continue;
                }
                let (target, observation) =
                    attacker_view(capture, config.attack.precision, device)?;
                let private = private_images_in(capture, &data, device)?;
                for &kind in &config.attack.kinds {
                    progress.step(&format!(
                        "`{id}`: {} attacks the {} upload of round {round} with {}",
                        threat.id,
                        party,
                        kind.id()
                    ));
                    let mut row = SummaryRow {
                        threat_model: threat.id.clone(),
                        attack: kind.id().into(),
                        batch_size: private.labels.len(),
                        ..base_row.clone()
                    };
                    // An attack too large for this machine's memory would get the whole audit
                    // killed: it is skipped, with the reason.
                    if let Some(reason) = memory_shortfall(kind, &observation, capture, config) {
                        row.reason = reason;
                        scheme_rows.push(row);
                        continue;
                    }
                    // An attack that breaks down on what this party sees (e.g. the closed form on a
                    // pruned gradient whose token gradients are zero) is a finding, not an audit failure.
                    let settings = optimisation_config(kind, &observation, &target, config);
                    match run_attack(
                        kind,
                        settings.as_ref(),
                        &observation,
                        &target,
                        reference.as_ref(),
                    ) {
                        Err(crate::Error::Attack(e)) => {
                            row.reason = format!("attack failed: {e}");
                        }
                        Err(e) => return Err(e),
                        Ok(AttackOutcome::NotApplicable { reason, .. }) => {
                            row.reason = format!("not applicable: {reason}");
                        }
                        Ok(AttackOutcome::Reconstructed(reconstruction)) => {
                            let scored = score(
                                &reconstruction,
                                &private,
                                &baseline,
                                (&id, &threat.id, round, &party),
                                config,
                            )?;
                            let psnr: Vec<f64> = scored.rows.iter().map(|r| r.psnr_db).collect();
                            let ssim: Vec<f64> = scored.rows.iter().map(|r| r.ssim).collect();
                            let nmi: Vec<f64> = scored.rows.iter().map(|r| r.nmi).collect();
                            let base: Vec<f64> =
                                scored.rows.iter().map(|r| r.baseline_psnr_db).collect();
                            let labels: Vec<f64> = scored
                                .rows
                                .iter()
                                .filter_map(|r| r.label_correct.map(f64::from))
                                .collect();
                            let leaked = scored.rows.iter().filter(|r| r.leaked).count();
                            row.psnr_db_mean = mean(&psnr);
                            row.psnr_db_max = psnr.iter().copied().reduce(f64::max);
                            row.ssim_mean = mean(&ssim);
                            row.nmi_mean = mean(&nmi);
                            row.label_accuracy = mean(&labels);
                            row.baseline_psnr_db = mean(&base);
                            row.attack_seconds = Some(reconstruction.seconds);
                            row.verdict = if leaked > 0 { "leaks" } else { "resists" }.into();
                            row.reason = format!(
                                "{leaked} of {} images beat the mean-image baseline by >= {} dB with SSIM >= {}",
                                scored.rows.len(),
                                config.verdict.psnr_margin_db,
                                config.verdict.ssim_min
                            );
                            // Beside an optimisation attack's result, where the update puts the
                            // private images: whether the search or the update stopped it.
                            if let Some(settings) = settings
                                .as_ref()
                                .filter(|s| s.loss.attack_id() == reconstruction.attack)
                            {
                                let context = format!("`{id}`, {party} of round {round}");
                                compare_with_private_images(
                                    &mut row,
                                    &reconstruction,
                                    (&observation, &target, &private, settings),
                                    &context,
                                )?;
                            }
                            outcome.images.extend(scored.rows);
                            outcome.figures.extend(scored.figure);
                        }
                    }
                    scheme_rows.push(row);
                }
            }
        }
        for threat in &threat_models {
            if let View::Ciphertext { security } = &threat.view {
                if let Some(last) = trained.rounds.last() {
                    scheme_rows.push(SummaryRow {
                        threat_model: threat.id.clone(),
                        reason: format!("not attacked: ciphertext under {security}"),
                        ..SummaryRow::for_round(&id, &parameters, last, "wire")
                    });
                }
            }
        }
        let mut verdict = judge(
            &id,
            &parameters,
            &scheme_rows,
            &trained.rounds,
            &threat_models,
        );
        verdict.key_bytes_one_time = scheme.key_bytes();
        if let Some((epsilon, delta)) = guarantee(config.fl.rounds) {
            verdict.dp_epsilon = Some(epsilon);
            verdict.dp_delta = Some(delta);
        }
        outcome.verdicts.push(verdict);
        outcome.summary.extend(scheme_rows);
        if id == "none" {
            federated_model = Some(trained.global.clone());
        }
        outcome.rounds.insert(id, trained.rounds);
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// A client's sampling rate (batch over local data; the smallest client, the worst case) and local
/// steps per round, for the DP accountant.
fn local_sampling(fl: &crate::fl::FlConfig, partition: &crate::data::Partition) -> (f64, u64) {
    let smallest = partition
        .clients
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(1)
        .max(1);
    let batch = fl.batch_size.min(smallest);
    let steps = match (fl.algorithm, fl.local_work()) {
        (crate::fl::Algorithm::Fedsgd, _) => 1,
        (_, crate::fl::LocalWork::Steps(s)) => s,
        (_, crate::fl::LocalWork::Epochs(e)) => e * smallest.div_ceil(batch),
    };
    (batch as f64 / smallest as f64, steps as u64)
}

/// The verdict on one scheme from its summary rows.
fn judge(
    id: &str,
    parameters: &str,
    rows: &[SummaryRow],
    rounds: &[RoundRecord],
    threat_models: &[crate::schemes::ThreatModel],
) -> SchemeVerdict {
    let attacked: Vec<&SummaryRow> = rows.iter().filter(|r| r.psnr_db_mean.is_some()).collect();
    let leaking: Vec<&SummaryRow> = attacked
        .iter()
        .copied()
        .filter(|r| r.verdict == "leaks")
        .collect();
    let best =
        |f: fn(&SummaryRow) -> Option<f64>| attacked.iter().filter_map(|r| f(r)).reduce(f64::max);
    // Whether the optimisation attacks stopped where the update stops singling out the private
    // images, or short of that (a verdict of resists then rests on the search).
    let judged: Vec<bool> = attacked
        .iter()
        .filter_map(|r| Some(search_fell_short(r.objective?, r.private_objective?)))
        .collect();
    let short = judged.iter().filter(|&&short| short).count();
    let (verdict, reason) = if let Some(worst) = leaking.iter().max_by(|a, b| {
        a.psnr_db_max
            .partial_cmp(&b.psnr_db_max)
            .unwrap_or(std::cmp::Ordering::Equal)
    }) {
        (
            "leaks",
            format!(
                "{} recovers private images from the {} upload of round {} with {}: best {:.1} dB PSNR against a {:.1} dB mean-image baseline ({})",
                worst.threat_model,
                worst.party,
                worst.round,
                worst.attack,
                worst.psnr_db_max.unwrap_or(f64::NAN),
                worst.baseline_psnr_db.unwrap_or(f64::NAN),
                worst.reason
            ),
        )
    } else if !attacked.is_empty() {
        let search = if short > 0 {
            format!(
                "; in {short} of {} optimisation runs the update singles out the private images far better than the reconstruction (matching objective): the verdict rests on the attack's search, and a stronger attack may recover them",
                judged.len()
            )
        } else if !judged.is_empty() {
            format!(
                "; in each of the {} optimisation runs the reconstruction matches the update about as well as the private images: the update, as simulated, does not single them out",
                judged.len()
            )
        } else {
            String::new()
        };
        (
            "resists",
            format!(
                "{} attack runs, none beat the mean-image baseline by the margin with enough structure (best {:.1} dB PSNR){search}",
                attacked.len(),
                best(|r| r.psnr_db_max).unwrap_or(f64::NAN)
            ),
        )
    } else {
        let reasons: Vec<String> = rows
            .iter()
            .map(|r| format!("{}: {}", r.threat_model, r.reason))
            .collect();
        ("not_attacked", reasons.join("; "))
    };
    let count = rounds.len().max(1) as f64;
    SchemeVerdict {
        scheme: id.into(),
        scheme_parameters: parameters.into(),
        verdict: verdict.into(),
        reason,
        psnr_db_max: best(|r| r.psnr_db_max),
        ssim_max: best(|r| r.ssim_mean),
        nmi_max: best(|r| r.nmi_mean),
        final_test_accuracy: rounds.last().map(|r| r.test_accuracy).unwrap_or(0.0),
        key_bytes_one_time: 0,
        dp_epsilon: None,
        dp_delta: None,
        upload_bytes_per_client_round: rounds
            .iter()
            .map(|r| {
                r.upload_bytes.iter().sum::<usize>() as f64 / r.upload_bytes.len().max(1) as f64
            })
            .sum::<f64>()
            / count,
        download_bytes_per_client_round: rounds
            .iter()
            .map(|r| r.download_bytes_per_client as f64)
            .sum::<f64>()
            / count,
        round_seconds: rounds.iter().map(|r| r.round_seconds).sum::<f64>() / count,
        threat_models: threat_models
            .iter()
            .map(|t| (t.id.clone(), t.description.clone()))
            .collect(),
        accuracy_by_round: rounds.iter().map(|r| r.test_accuracy).collect(),
        search_limited: verdict == "resists" && short > 0,
    }
}

/// Turns the CLS-token HE protocol's outcome into summary rows, image rows, figures and a verdict.
fn audit_cls_token(
    cls: &ClsTokenOutcome,
    backbone: &str,
    config: &AuditConfig,
    outcome: &mut AuditOutcome,
) -> Result<()> {
    let id = "cls_token_he".to_string();
    let bytes = &cls.bytes;
    let parameters = format!(
        "backbone: {backbone}; {} class prototypes of width {} in {} GLWE ciphertext(s); nearest class mean; plain {:.1} % vs encrypted {:.1} %; encrypted inference max logit error {:.1e}; CKKS size model {} B",
        cls.classes,
        cls.feature_width,
        bytes.cls_ciphertexts,
        cls.accuracy_plain * 100.0,
        cls.accuracy_decrypted * 100.0,
        cls.inference.max_error_quantised,
        bytes.ckks_cls.1
    );
    let seconds = &cls.seconds;
    let round = RoundRecord {
        round: 1,
        test_accuracy: cls.accuracy_decrypted,
        train_loss: 0.0,
        upload_bytes: vec![bytes.cls_upload; cls.clients],
        download_bytes_per_client: bytes.cls_download,
        encode_seconds: seconds.encrypt_per_client,
        server_seconds: seconds.aggregate,
        decode_seconds: seconds.decrypt,
        round_seconds: seconds.features_per_client
            + seconds.encrypt_per_client
            + seconds.aggregate
            + seconds.decrypt,
    };
    let base_row = SummaryRow::for_round(&id, &parameters, &round, "");
    let mut rows = vec![SummaryRow {
        threat_model: "server".into(),
        party: "wire".into(),
        reason: format!("not attacked: ciphertext under {}", cls.security),
        ..base_row.clone()
    }];
    for case in &cls.inversions {
        let mut images = Vec::new();
        for (i, (score, base)) in case.scores.iter().zip(&case.baseline_scores).enumerate() {
            images.push(ImageRow {
                scheme: id.clone(),
                threat_model: case.threat.clone(),
                attack: "feature_inversion".into(),
                round: 1,
                party: case.case.into(),
                image: i,
                private_index: i,
                psnr_db: score.psnr_db,
                ssim: score.ssim,
                nmi: score.nmi,
                baseline_psnr_db: base.psnr_db,
                baseline_ssim: base.ssim,
                leaked: score.psnr_db >= base.psnr_db + config.verdict.psnr_margin_db
                    && score.ssim >= config.verdict.ssim_min,
                label: None,
                true_label: case.labels.get(i).copied().unwrap_or(0),
                label_correct: None,
                attack_seconds: case.seconds,
            });
        }
        let psnr: Vec<f64> = images.iter().map(|r| r.psnr_db).collect();
        let ssim: Vec<f64> = images.iter().map(|r| r.ssim).collect();
        let nmi: Vec<f64> = images.iter().map(|r| r.nmi).collect();
        let base: Vec<f64> = images.iter().map(|r| r.baseline_psnr_db).collect();
        let leaked = images.iter().filter(|r| r.leaked).count();
        let recovery = case
            .feature_recovery_error
            .map(|e| format!("; the CLS vector was first recovered exactly from the head gradient (max error {e:.1e})"))
            .unwrap_or_default();
        rows.push(SummaryRow {
            threat_model: case.threat.clone(),
            attack: "feature_inversion".into(),
            party: case.case.into(),
            batch_size: images.len(),
            psnr_db_mean: mean(&psnr),
            psnr_db_max: psnr.iter().copied().reduce(f64::max),
            ssim_mean: mean(&ssim),
            nmi_mean: mean(&nmi),
            baseline_psnr_db: mean(&base),
            attack_seconds: Some(case.seconds),
            verdict: if leaked > 0 { "leaks" } else { "resists" }.into(),
            reason: format!(
                "{leaked} of {} images beat the mean-image baseline by >= {} dB with SSIM >= {}{recovery}",
                images.len(),
                config.verdict.psnr_margin_db,
                config.verdict.ssim_min
            ),
            ..base_row.clone()
        });
        let shown = images.len().min(8);
        if shown > 0 {
            outcome.figures.push(Figure {
                file: format!("{id}-{}-{}-feature_inversion.png", case.threat, case.case),
                caption: format!(
                    "{id}: {} inverts {} CLS features (top: private, bottom: reconstruction)",
                    case.threat,
                    case.case.replace('_', " ")
                ),
                rows: vec![
                    case.references.narrow(0, 0, shown)?,
                    case.reconstructions.narrow(0, 0, shown)?,
                ],
            });
        }
        outcome.images.extend(images);
    }
    let verdict = judge(
        &id,
        &parameters,
        &rows,
        std::slice::from_ref(&round),
        &cls.threat_models,
    );
    outcome.verdicts.push(verdict);
    outcome.summary.extend(rows);
    outcome.rounds.insert(id, vec![round]);
    Ok(())
}
