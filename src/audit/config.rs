//! The audit configuration (`fedleak audit --config FILE`, TOML) and the embedded default.

use fedleak_attacks::ImageOptimizer;
use serde::{Deserialize, Serialize};

use super::observe::AttackPrecision;
use crate::fl::FlConfig;
use crate::model::PositionEmbeddingKind;
use crate::schemes::SchemeConfig;
use crate::{Error, Result};

/// The embedded default audit, printed by `fedleak audit --print-default-config`.
pub const DEFAULT_AUDIT_TOML: &str = include_str!("default_audit.toml");

/// Which attacks the audit runs on every observation they apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// The APRIL-style closed form (batch 1, learnable position embedding).
    April,
    /// Inverting Gradients (optimisation with second-order autograd), labels from iDLG / label separation and counts.
    Ig,
    /// DLG: squared-L2 gradient matching without a prior, labels from iDLG / label separation and counts.
    Dlg,
}

impl AttackKind {
    /// The id used in reports.
    pub fn id(self) -> &'static str {
        match self {
            AttackKind::April => "april",
            AttackKind::Ig => "ig",
            AttackKind::Dlg => "dlg",
        }
    }
}

/// Attack settings (`[attack]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackSettings {
    /// The attacks to run, strongest first.
    pub kinds: Vec<AttackKind>,
    /// Clients whose individual uploads are attacked when a party reads them (0-based).
    pub clients: Vec<usize>,
    /// Inverting Gradients: optimisation iterations per restart.
    pub iterations: usize,
    /// Inverting Gradients: random restarts (the best by matching loss is kept).
    pub restarts: usize,
    /// Inverting Gradients: weight of the total-variation prior (`>= 0`); unset, the attack's
    /// default for the observation (3e-2 for several images behind one gradient step, a FedSGD
    /// batch or aggregate; 1e-3 for one image or a FedAvg delta's unrolled local steps).
    pub tv_weight: Option<f64>,
    /// Inverting Gradients: factor on the image prior at each step decay, in [0, 1]; unset, the
    /// attack's default for the observation (0.1 for one image, 1 for a batch or an aggregate).
    pub prior_decay: Option<f64>,
    /// Inverting Gradients: ridge of the patch refinement of its result (`>= 0`, 0 switches it off);
    /// unset, the attack's default for the observation (3e-6 for one image, 1e-4 for a batch).
    pub patch_refinement: Option<f64>,
    /// Inverting Gradients: how the image is optimised (`"signed_adam"` or `"lbfgs"`); unset, the
    /// attack's default for the model (L-BFGS behind a learnable position table, signed Adam
    /// behind a sin-cos one).
    pub optimizer: Option<ImageOptimizer>,
    /// Optimisation attacks: width of the noise around grey that each restart starts from, in
    /// [0, 1]; unset, the attack's default (1, noise over the whole range, for Inverting
    /// Gradients, whose prior fills what the gradient leaves open; 0.02 for DLG, which has no
    /// prior and leaves those directions where they started).
    pub initial_spread: Option<f64>,
    /// Precision in which the attacker simulates the updates (`"f32"` or `"f64"`).
    pub precision: AttackPrecision,
    /// Label counts (batches, aggregates): the attacker holds the data's held-out (test) split as
    /// labelled reference images and estimates the batch's outputs class by class from them, as
    /// `fedleak attack --label-reference` does; off, from uniform-noise dummies.
    pub label_reference: bool,
}

impl Default for AttackSettings {
    fn default() -> Self {
        Self {
            kinds: vec![AttackKind::April, AttackKind::Ig],
            clients: vec![0],
            iterations: 200,
            restarts: 1,
            tv_weight: None,
            prior_decay: None,
            patch_refinement: None,
            optimizer: None,
            initial_spread: None,
            precision: AttackPrecision::F32,
            label_reference: false,
        }
    }
}

/// When a scheme is judged to leak (`[verdict]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerdictThresholds {
    /// An image leaks when its PSNR beats the uninformed baseline (the dataset's mean image scored
    /// against the same private image) by at least this many dB ...
    pub psnr_margin_db: f64,
    /// ... and its SSIM reaches at least this.
    pub ssim_min: f64,
}

impl Default for VerdictThresholds {
    fn default() -> Self {
        Self {
            psnr_margin_db: 3.0,
            ssim_min: 0.5,
        }
    }
}

/// A whole audit: data, model, federated setting, the schemes to compare, attacks and verdict rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Data source: `fixture:NAME`, `medmnist:PATH.npz` or `folder:DIR`.
    pub data: String,
    /// Model preset name or checkpoint directory.
    pub model: String,
    /// Position embedding of a preset model.
    #[serde(default)]
    pub position_embedding: PositionEmbeddingKind,
    /// Seed of every random choice.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Optional plain federated pre-training (no scheme, nothing captured) before the audited rounds, so
    /// the audit looks at a deployment mid-training rather than at a random initialisation. Its
    /// `capture_rounds` are ignored.
    #[serde(default)]
    pub warmup: Option<FlConfig>,
    /// The federated run every scheme is trained with (after the warm-up).
    #[serde(default)]
    pub fl: FlConfig,
    /// The protection schemes to compare (`none` is the baseline).
    pub schemes: Vec<SchemeConfig>,
    /// The attacks.
    #[serde(default)]
    pub attack: AttackSettings,
    /// Verdict thresholds.
    #[serde(default)]
    pub verdict: VerdictThresholds,
}

fn default_seed() -> u64 {
    1
}

impl AuditConfig {
    /// The embedded default audit.
    pub fn embedded_default() -> Result<Self> {
        Self::from_toml(DEFAULT_AUDIT_TOML, "the embedded default audit")
    }

    /// Parses a TOML audit configuration; `origin` names it in errors (the file path).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let config: AuditConfig = toml::from_str(text).map_err(|e| Error::InvalidSetting {
            key: origin.to_string(),
            reason: e.message().to_string()
                + &e.span()
                    .map(|span| {
                        let line = text[..span.start].matches('\n').count() + 1;
                        let content = text.lines().nth(line - 1).unwrap_or_default().trim();
                        format!(" (line {line}: `{content}`)")
                    })
                    .unwrap_or_default(),
            hint: "compare with `fedleak audit --print-default-config`; keys are case-sensitive"
                .to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings that serde cannot.
    pub fn validate(&self) -> Result<()> {
        self.fl.validate()?;
        let bad = |key: &str, reason: &str, hint: &str| Error::InvalidSetting {
            key: key.into(),
            reason: reason.into(),
            hint: hint.into(),
        };
        if self.schemes.is_empty() {
            return Err(bad(
                "schemes",
                "no scheme to audit",
                "add at least `[[schemes]] id = \"none\"`",
            ));
        }
        if self.attack.iterations == 0 || self.attack.restarts == 0 {
            return Err(bad(
                "attack.iterations",
                "iterations and restarts must be at least 1",
                "e.g. iterations = 200, restarts = 1",
            ));
        }
        if let Some(decay) = self.attack.prior_decay.filter(|d| !(0.0..=1.0).contains(d)) {
            return Err(bad(
                "attack.prior_decay",
                &format!("{decay} is not in [0, 1]"),
                "e.g. prior_decay = 0.1 (the prior gives way), or 1 (constant); leave it out for the default",
            ));
        }
        if let Some(spread) = self
            .attack
            .initial_spread
            .filter(|s| !(0.0..=1.0).contains(s))
        {
            return Err(bad(
                "attack.initial_spread",
                &format!("{spread} is not a width in [0, 1]"),
                "e.g. initial_spread = 0.02 for a start near grey, or 1 for noise over the whole range; leave it out for the default",
            ));
        }
        let non_negative = [
            (
                "attack.patch_refinement",
                self.attack.patch_refinement,
                "ridge",
                "e.g. patch_refinement = 3e-6, or 0 to switch the refinement off; leave it out for the default",
            ),
            (
                "attack.tv_weight",
                self.attack.tv_weight,
                "weight",
                "e.g. tv_weight = 1e-3, or 0 to switch the prior off; leave it out for the default",
            ),
        ];
        for (key, value, what, hint) in non_negative {
            if let Some(value) = value.filter(|v| !(*v >= 0.0 && v.is_finite())) {
                return Err(bad(
                    key,
                    &format!("{value} is not a finite {what} >= 0"),
                    hint,
                ));
            }
        }
        if let Some(&c) = self.attack.clients.iter().find(|&&c| c >= self.fl.clients) {
            return Err(bad(
                "attack.clients",
                &format!(
                    "client {c} does not exist with fl.clients = {}",
                    self.fl.clients
                ),
                "list 0-based client indices below fl.clients",
            ));
        }
        Ok(())
    }
}
