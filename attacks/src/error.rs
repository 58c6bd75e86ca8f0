//! The one error type of the attacks crate.

/// Result alias of the attacks crate.
pub type Result<T> = std::result::Result<T, AttackError>;

/// What can go wrong while attacking (an attack that does not apply is not an error; see
/// [`crate::AttackOutcome::NotApplicable`]).
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// The observation lacks a tensor the attack needs, or it has the wrong shape.
    #[error("observation tensor `{name}`: {reason}")]
    Observation {
        /// Parameter name (Hugging Face naming).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A numerical failure (singular system, non-finite values).
    #[error("numerical failure in {attack}: {reason}")]
    Numerical {
        /// The attack.
        attack: &'static str,
        /// What happened.
        reason: String,
    },
    /// Exact second-order gradients were asked for in a process that did not enable them (see
    /// [`crate::enable_second_order_gradients`]).
    #[error(
        "{attack} needs exact second-order gradients, which this process did not enable: call \
         `enable_second_order_gradients()` before the first backward pass"
    )]
    SecondOrderDisabled {
        /// The attack.
        attack: &'static str,
    },
    /// An evaluation that needs known labels was asked of a matcher whose labels are optimised
    /// jointly with the images.
    #[error("{attack}: the labels are optimised jointly with the images, so there are no known labels to match under")]
    LabelsUnknown {
        /// The attack.
        attack: &'static str,
    },
    /// An attack was set up inconsistently with the update it attacks (e.g. step batches for a
    /// different number of local steps than the update has).
    #[error("{attack}: {reason}")]
    Configuration {
        /// The attack.
        attack: &'static str,
        /// What does not fit.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
