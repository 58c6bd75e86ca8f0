//! What an attack returns.

use candle_core::Tensor;

/// Reconstructed images and labels, with the attack's own measure of fit and cost.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// Images (B x C x H x W, f32, clamped to [0, 1]).
    pub images: Tensor,
    /// Recovered labels, one per image (when the attack recovers them).
    pub labels: Option<Vec<u32>>,
    /// Name of the attack (`april`, `ig`, ...).
    pub attack: &'static str,
    /// Optimisation iterations used (0 for closed forms).
    pub iterations: usize,
    /// Restarts run (1 for closed forms).
    pub restarts: usize,
    /// The attack's own objective at the returned images (matching loss, residual); never a score
    /// against ground truth, which the attack does not have.
    pub objective: f64,
    /// Wall time of the attack in seconds.
    pub seconds: f64,
}

/// The result of running an attack.
#[derive(Debug, Clone)]
pub enum AttackOutcome {
    /// The attack ran and produced a reconstruction.
    Reconstructed(Reconstruction),
    /// The attack does not apply to this observation; the reason goes into the report.
    NotApplicable {
        /// The attack.
        attack: &'static str,
        /// Why not.
        reason: String,
    },
}
