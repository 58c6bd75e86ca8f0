//! `fedleak train`: federated training with update capture; writes per-round accuracy and bytes to CSV.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use clap::ValueEnum;
use fedleak::data::{load_data, DataSpec, PartitionScheme};
use fedleak::fl::{
    run_federated, Algorithm, Capture, CaptureWriter, FlConfig, FlObserver, OptimizerKind,
    RoundRecord,
};
use fedleak::model::{
    init_parameters, load_checkpoint, save_checkpoint, Checkpoint, ModelPreset,
    PositionEmbeddingKind,
};
use fedleak::schemes::PlainScheme;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{select_device, show_progress, GlobalArgs};

/// FedSGD or FedAvg, as a flag value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AlgorithmArg {
    /// Each client uploads the gradient of one batch.
    Fedsgd,
    /// Each client trains locally and uploads the weight delta.
    Fedavg,
}

/// A local optimizer, as a flag value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OptimizerArg {
    /// SGD (with `--momentum`).
    Sgd,
    /// AdamW (with `--weight-decay`).
    Adamw,
}

/// Position-embedding kind, as a flag value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PositionArg {
    /// Trained (Hugging Face default).
    Learnable,
    /// Fixed 2-D sine-cosine (a defence against closed-form attacks).
    Sincos,
}

/// Arguments of `fedleak train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Data: `fixture:NAME` (ihc-tiles-32, mnist5k, digits-8x8, lfw-subset-25x25), `medmnist:PATH.npz`,
    /// or an ImageFolder directory `DIR/[split/]label/*.png`.
    #[arg(long, default_value = "fixture:ihc-tiles-32")]
    pub data: String,
    /// A preset (vit-nano-32, vit-micro-32, vit-tiny-32, vit-b16-224) or a Hugging Face checkpoint directory.
    #[arg(long, default_value = "vit-tiny-32")]
    pub model: String,
    /// Position embedding of a preset model.
    #[arg(long, value_enum, default_value_t = PositionArg::Learnable)]
    pub position_embedding: PositionArg,
    /// Number of clients.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Number of rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// FedSGD or FedAvg.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::Fedavg)]
    pub algorithm: AlgorithmArg,
    /// Images per local batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Learning rate (client optimizer for FedAvg, server step for FedSGD).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Local optimizer (FedAvg).
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adamw)]
    pub optimizer: OptimizerArg,
    /// SGD momentum (FedAvg with `--optimizer sgd` only).
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// AdamW decoupled weight decay (FedAvg with `--optimizer adamw` only) [default: 0.05].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// FedAvg local steps per round (instead of epochs).
    #[arg(long, conflicts_with = "local_epochs")]
    pub local_steps: Option<usize>,
    /// FedAvg local epochs per round (1 when neither this nor `--local-steps` is given).
    #[arg(long)]
    pub local_epochs: Option<usize>,
    /// Split among clients: `iid` or `dirichlet:ALPHA`.
    #[arg(long, default_value = "iid")]
    pub partition: String,
    /// Rounds (1-based, comma-separated) whose uploads are captured for attacks.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub capture_rounds: Vec<usize>,
    /// Output directory (created; existing files of the same name are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// What `train.json` records: everything needed to reproduce the run.
#[derive(Debug, Serialize)]
struct TrainRecord<'a> {
    fedleak_version: &'a str,
    seed: u64,
    data: String,
    model: &'a str,
    model_config: &'a fedleak::model::VitConfig,
    fl: &'a FlConfig,
    train_images: usize,
    test_images: usize,
}

/// A row of `rounds.csv`.
#[derive(Debug, Serialize)]
struct RoundRow {
    round: usize,
    test_accuracy: f64,
    train_loss: f64,
    upload_bytes_per_client: usize,
    upload_bytes_total: usize,
    download_bytes_per_client: usize,
    round_seconds: f64,
}

/// Writes `rounds.csv` row by row (flushed each round, so a crash loses nothing finished), captures, and
/// drives the progress bar.
struct TrainObserver {
    rows: csv::Writer<std::fs::File>,
    captures: CaptureWriter,
    progress: ProgressBar,
}

impl FlObserver for TrainObserver {
    fn round_finished(&mut self, record: &RoundRecord) -> fedleak::Result<()> {
        let total: usize = record.upload_bytes.iter().sum();
        self.rows
            .serialize(RoundRow {
                round: record.round,
                test_accuracy: record.test_accuracy,
                train_loss: record.train_loss,
                upload_bytes_per_client: total / record.upload_bytes.len().max(1),
                upload_bytes_total: total,
                download_bytes_per_client: record.download_bytes_per_client,
                round_seconds: record.round_seconds,
            })
            .and_then(|()| self.rows.flush().map_err(csv::Error::from))
            .map_err(|e| fedleak::Error::Training(format!("cannot write rounds.csv: {e}")))?;
        tracing::info!(
            round = record.round,
            test_accuracy = format!("{:.4}", record.test_accuracy),
            train_loss = format!("{:.4}", record.train_loss),
            seconds = format!("{:.1}", record.round_seconds),
            "round finished"
        );
        self.progress.inc(1);
        Ok(())
    }

    fn captured(&mut self, capture: &Capture) -> fedleak::Result<()> {
        self.captures.write(capture)
    }
}

/// Resolves `--model`: a preset name, or an existing checkpoint directory.
fn resolve_model(
    model: &str,
    device: &candle_core::Device,
) -> Result<Result<Checkpoint, ModelPreset>> {
    if Path::new(model).exists() {
        return Ok(Ok(load_checkpoint(Path::new(model), DType::F32, device)?));
    }
    Ok(Err(ModelPreset::from_name(model)?))
}

fn position_kind(arg: PositionArg) -> PositionEmbeddingKind {
    match arg {
        PositionArg::Learnable => PositionEmbeddingKind::Learnable,
        PositionArg::Sincos => PositionEmbeddingKind::Sincos,
    }
}

/// Runs `fedleak train`.
pub fn run(global: &GlobalArgs, args: TrainArgs) -> Result<()> {
    let device = select_device(global.device)?;
    // Recorded absolute: the capture's private records name it for scoring wherever an attack
    // runs from.
    let spec = DataSpec::parse(&args.data)?.absolute()?;
    let partition: PartitionScheme = args.partition.parse()?;
    let fl = FlConfig {
        clients: args.clients,
        rounds: args.rounds,
        algorithm: match args.algorithm {
            AlgorithmArg::Fedsgd => Algorithm::Fedsgd,
            AlgorithmArg::Fedavg => Algorithm::Fedavg,
        },
        batch_size: args.batch_size,
        lr: args.lr,
        optimizer: match args.optimizer {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adamw => OptimizerKind::Adamw,
        },
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        local_steps: args.local_steps,
        local_epochs: args.local_epochs,
        partition,
        capture_rounds: args.capture_rounds.clone(),
    };
    fl.validate()?;
    let resolved = resolve_model(&args.model, &device)?;
    let shape = match &resolved {
        Ok(checkpoint) => checkpoint.config.input_shape(),
        Err(preset) => preset
            .config(&[], position_kind(args.position_embedding))
            .input_shape(),
    };
    let data = load_data(&spec, shape, global.seed())?;
    let initial = match resolved {
        Ok(checkpoint) => checkpoint,
        Err(preset) => {
            let config = preset.config(
                &data.train.class_names,
                position_kind(args.position_embedding),
            );
            config.validate(preset.name())?;
            let tensors = init_parameters(&config, global.seed(), DType::F32, &device)?;
            Checkpoint { config, tensors }
        }
    };
    std::fs::create_dir_all(&args.out).with_context(|| {
        format!(
            "cannot create the output directory `{}`",
            args.out.display()
        )
    })?;
    let record = TrainRecord {
        fedleak_version: env!("CARGO_PKG_VERSION"),
        seed: global.seed(),
        data: spec.to_string(),
        model: &args.model,
        model_config: &initial.config,
        fl: &fl,
        train_images: data.train.len(),
        test_images: data.test.len(),
    };
    let train_json = args.out.join("train.json");
    std::fs::write(&train_json, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("cannot write `{}`", train_json.display()))?;
    let rounds_csv = args.out.join("rounds.csv");
    let rows = csv::Writer::from_path(&rounds_csv)
        .with_context(|| format!("cannot create `{}`", rounds_csv.display()))?;
    let progress = if show_progress(global) {
        ProgressBar::new(fl.rounds as u64).with_style(
            ProgressStyle::with_template(
                "{bar:30} round {pos}/{len} [{elapsed_precise}, eta {eta}]",
            )
            .expect("a valid progress template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let mut observer = TrainObserver {
        rows,
        captures: CaptureWriter::new(&args.out),
        progress,
    };
    let outcome = run_federated(
        &fl,
        &initial,
        &data,
        &spec.to_string(),
        global.seed(),
        &mut PlainScheme,
        &mut observer,
    )?;
    observer.progress.finish_and_clear();
    save_checkpoint(&args.out.join("model"), &outcome.global)?;
    let partition_json = args.out.join("partition.json");
    std::fs::write(
        &partition_json,
        serde_json::to_string_pretty(&outcome.partition)?,
    )
    .with_context(|| format!("cannot write `{}`", partition_json.display()))?;
    let last = outcome.rounds.last();
    let summary = serde_json::json!({
        "out": args.out,
        "rounds": outcome.rounds.len(),
        "final_test_accuracy": last.map(|r| r.test_accuracy),
        "train_seconds": outcome.rounds.iter().map(|r| r.round_seconds).sum::<f64>(),
        "upload_bytes_per_client_round": last.map(|r| r.upload_bytes.iter().sum::<usize>() / r.upload_bytes.len().max(1)),
        "captures": observer.captures.written(),
    });
    println!("{summary}");
    Ok(())
}
