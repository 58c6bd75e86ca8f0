//! Federated learning simulation: K clients, R rounds of FedSGD or FedAvg, server aggregation weighted by
//! sample count, global test accuracy after every round, and capture of what each party sees.
//!
//! FedSGD and FedAvg follow McMahan et al., "Communication-Efficient Learning of Deep Networks from
//! Decentralized Data" (AISTATS 2017). What a client uploads is a [`Transmission`] whose exact serialized
//! length is the upload cost. At capture rounds the simulation hands a [`Capture`] (the transmission, the
//! global model the client started from, and, kept apart, the private batch) to a [`FlObserver`]; the
//! private batch exists only so that reconstructions can be scored.
//!
//! This module knows the model and the data, but nothing of attacks, metrics, reports or the CLI.

mod capture;
mod config;
mod optim;
mod simulate;
mod transmission;

pub use capture::{
    read_capture, write_capture, Capture, CaptureMeta, CaptureWriter, PrivateBatch, UpdateKind,
};
pub use config::{Algorithm, FlConfig, LocalWork, OptimizerKind};
pub use optim::LocalOptimizer;
pub use simulate::{evaluate_accuracy, run_federated, FlObserver, RoundRecord, TrainingOutcome};
pub use transmission::Transmission;
