//! Settings of a federated run (`[fl]` in a config file; the same names as `fedleak train` flags).

use serde::{Deserialize, Serialize};

use crate::data::PartitionScheme;
use crate::{Error, Result};

/// What a client computes and uploads each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// The gradient of one local batch; the server takes one step with it.
    Fedsgd,
    /// Several local optimizer steps; the client uploads the weight delta.
    Fedavg,
}

/// The optimizer a client runs locally (FedAvg) — FedSGD clients only compute a gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD, with heavy-ball momentum when `momentum` > 0.
    Sgd,
    /// AdamW (Loshchilov & Hutter) with betas (0.9, 0.999), eps 1e-8 and decoupled weight decay.
    Adamw,
}

/// How much local work a FedAvg client does per round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalWork {
    /// A fixed number of mini-batch steps.
    Steps(usize),
    /// Full passes over the client's shuffled data.
    Epochs(usize),
}

/// The federated run: clients, rounds, algorithm, local optimisation, partition and capture rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlConfig {
    /// Number of clients K (3, as in the CLS-token paper's three hospitals).
    pub clients: usize,
    /// Number of communication rounds R.
    pub rounds: usize,
    /// FedSGD or FedAvg.
    pub algorithm: Algorithm,
    /// Images per local batch.
    pub batch_size: usize,
    /// Learning rate: the client optimizer's (FedAvg) or the server step's (FedSGD).
    pub lr: f64,
    /// The local optimizer (FedAvg).
    pub optimizer: OptimizerKind,
    /// Momentum of FedAvg's local SGD (0 for plain SGD; no other plan applies momentum).
    pub momentum: f64,
    /// Decoupled weight decay of FedAvg's local AdamW ([`DEFAULT_WEIGHT_DECAY`] when not given; no
    /// other plan decays weights).
    pub weight_decay: Option<f64>,
    /// FedAvg: local steps per round (exclusive with `local_epochs`).
    pub local_steps: Option<usize>,
    /// FedAvg: local epochs per round (exclusive with `local_steps`; 1 when neither is given).
    pub local_epochs: Option<usize>,
    /// How training images are spread over clients.
    pub partition: PartitionScheme,
    /// Rounds (1-based) at which transmissions are captured for attacks.
    pub capture_rounds: Vec<usize>,
}

impl Default for FlConfig {
    fn default() -> Self {
        Self {
            clients: 3,
            rounds: 10,
            algorithm: Algorithm::Fedavg,
            batch_size: 16,
            lr: 1e-3,
            optimizer: OptimizerKind::Adamw,
            momentum: 0.0,
            weight_decay: None,
            local_steps: None,
            local_epochs: None,
            partition: PartitionScheme::Iid,
            capture_rounds: vec![1],
        }
    }
}

/// AdamW's decoupled weight decay when a FedAvg plan with AdamW does not give one.
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.05;

impl FlConfig {
    /// The weight decay training applies: AdamW's under FedAvg, none otherwise.
    pub fn applied_weight_decay(&self) -> f64 {
        match (self.algorithm, self.optimizer) {
            (Algorithm::Fedavg, OptimizerKind::Adamw) => {
                self.weight_decay.unwrap_or(DEFAULT_WEIGHT_DECAY)
            }
            _ => 0.0,
        }
    }

    /// The plan's name for a message: what it applies instead of `optimizer`'s settings.
    fn plan(&self) -> &'static str {
        match (self.algorithm, self.optimizer) {
            (Algorithm::Fedsgd, _) => "FedSGD (a plain server step)",
            (Algorithm::Fedavg, OptimizerKind::Sgd) => "FedAvg with local SGD",
            (Algorithm::Fedavg, OptimizerKind::Adamw) => "FedAvg with local AdamW",
        }
    }
    /// The local work of a FedAvg client.
    pub fn local_work(&self) -> LocalWork {
        match (self.local_steps, self.local_epochs) {
            (Some(steps), _) => LocalWork::Steps(steps),
            (None, Some(epochs)) => LocalWork::Epochs(epochs),
            (None, None) => LocalWork::Epochs(1),
        }
    }

    /// Checks every setting is usable, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String, hint: &str| Error::InvalidSetting {
            key: key.to_string(),
            reason,
            hint: hint.to_string(),
        };
        if self.clients == 0 {
            return Err(bad(
                "clients",
                "must be at least 1".into(),
                "use e.g. `--clients 3`",
            ));
        }
        if self.rounds == 0 {
            return Err(bad(
                "rounds",
                "must be at least 1".into(),
                "use e.g. `--rounds 10`",
            ));
        }
        if self.batch_size == 0 {
            return Err(bad(
                "batch-size",
                "must be at least 1".into(),
                "use e.g. `--batch-size 16`",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "lr",
                format!("{} is not a positive number", self.lr),
                "use e.g. `--lr 0.001`",
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad(
                "momentum",
                format!("{} is outside [0, 1)", self.momentum),
                "use e.g. `--momentum 0.9`",
            ));
        }
        if self.momentum > 0.0
            && (self.algorithm, self.optimizer) != (Algorithm::Fedavg, OptimizerKind::Sgd)
        {
            return Err(bad(
                "momentum",
                format!(
                    "{} would not be applied: {} takes no momentum",
                    self.momentum,
                    self.plan()
                ),
                "drop it, or train FedAvg with `--optimizer sgd` (`optimizer = \"sgd\"`)",
            ));
        }
        match self.weight_decay {
            Some(decay) if !(decay.is_finite() && decay >= 0.0) => {
                return Err(bad(
                    "weight-decay",
                    format!("{decay} is negative or not a number"),
                    "use e.g. `--weight-decay 0.05`",
                ))
            }
            Some(decay)
                if decay > 0.0
                    && (self.algorithm, self.optimizer)
                        != (Algorithm::Fedavg, OptimizerKind::Adamw) =>
            {
                return Err(bad(
                    "weight-decay",
                    format!(
                        "{decay} would not be applied: {} decays no weights",
                        self.plan()
                    ),
                    "drop it, or train FedAvg with `--optimizer adamw` (`optimizer = \"adamw\"`)",
                ))
            }
            _ => {}
        }
        if self.local_steps.is_some() && self.local_epochs.is_some() {
            return Err(bad(
                "local-steps",
                "both `local-steps` and `local-epochs` are set".into(),
                "give one of them",
            ));
        }
        if self.local_steps == Some(0) || self.local_epochs == Some(0) {
            return Err(bad(
                "local-steps",
                "local work of zero steps or epochs".into(),
                "use at least 1",
            ));
        }
        if let Some(&round) = self
            .capture_rounds
            .iter()
            .find(|&&r| r == 0 || r > self.rounds)
        {
            return Err(bad(
                "capture-rounds",
                format!("round {round} is outside 1..={}", self.rounds),
                "capture rounds are 1-based and at most `rounds`",
            ));
        }
        Ok(())
    }
}
