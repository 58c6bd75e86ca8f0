//! Turning what was captured into what each party observes, running attacks on it, scoring them, and
//! judging every scheme: the `fedleak audit` pipeline.
//!
//! The private batch travels beside an observation only to be scored; attacks never receive it.

mod config;
mod observe;
mod run;
pub mod sweep;

pub use config::{AttackKind, AttackSettings, AuditConfig, VerdictThresholds, DEFAULT_AUDIT_TOML};
pub use observe::{
    attacker_view, observation_of, private_images, private_images_in, private_matching_objective,
    search_fell_short, search_finding, AttackPrecision, PrivateImages, SEARCH_SHORTFALL,
};
pub use run::{
    run_audit, AuditOutcome, AuditProgress, Figure, ImageRow, SchemeVerdict, SummaryRow,
};
