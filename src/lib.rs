//! fedleak: audits how much private training data a federated-learning deployment leaks.
//!
//! The flow runs one way (see `DESIGN.md` of the project): configuration -> [`data`] (real labelled
//! images, split among clients) -> [`fl`] (federated training of a [`model::Vit`], capturing what each
//! party transmits) -> attacks (crate `fedleak-attacks`) -> metrics (crate `fedleak-metrics`) -> reports.
//! This library never prints and never depends on the command line; the `fedleak` binary does both.

#![deny(missing_docs)]

pub mod accountant;
pub mod audit;
pub mod data;
pub mod error;
pub mod fl;
pub mod he;
pub mod model;
pub mod report;
pub mod schemes;

pub use error::{Error, Result};
