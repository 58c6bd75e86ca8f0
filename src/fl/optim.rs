//! Client-side optimizers over named variables: SGD with momentum and AdamW.
//!
//! A fresh optimizer (zero state) starts every round, as in FedAvg. Parameters are addressed by name.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use super::config::{FlConfig, OptimizerKind};
use crate::Result;

/// One optimizer state per parameter, by Hugging Face name.
#[derive(Debug)]
pub struct LocalOptimizer {
    kind: OptimizerKind,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    step: i32,
    first: BTreeMap<String, Tensor>,
    second: BTreeMap<String, Tensor>,
}

impl LocalOptimizer {
    /// A fresh optimizer with the settings of `cfg`.
    pub fn new(cfg: &FlConfig) -> Self {
        Self {
            kind: cfg.optimizer,
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.applied_weight_decay(),
            step: 0,
            first: BTreeMap::new(),
            second: BTreeMap::new(),
        }
    }

    /// Applies one update to every variable that has a gradient in `grads` (by name).
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.step += 1;
        for (name, var) in vars {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let grad = grad.detach();
            let value = var.as_tensor().detach();
            let updated = match self.kind {
                OptimizerKind::Sgd => {
                    let direction = if self.momentum > 0.0 {
                        let velocity = match self.first.get(name) {
                            Some(v) => ((v * self.momentum)? + &grad)?,
                            None => grad.clone(),
                        };
                        self.first.insert(name.clone(), velocity.clone());
                        velocity
                    } else {
                        grad
                    };
                    (value - (direction * self.lr)?)?
                }
                OptimizerKind::Adamw => {
                    let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
                    let m = match self.first.get(name) {
                        Some(m) => ((m * beta1)? + (&grad * (1.0 - beta1))?)?,
                        None => (&grad * (1.0 - beta1))?,
                    };
                    let v = match self.second.get(name) {
                        Some(v) => ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?,
                        None => (grad.sqr()? * (1.0 - beta2))?,
                    };
                    let m_hat = (&m / (1.0 - beta1.powi(self.step)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(self.step)))?;
                    self.first.insert(name.clone(), m);
                    self.second.insert(name.clone(), v);
                    let decayed = (&value * (1.0 - self.lr * self.weight_decay))?;
                    (decayed - ((m_hat / (v_hat.sqrt()? + eps)?)? * self.lr)?)?
                }
            };
            var.set(&updated)?;
        }
        Ok(())
    }
}
