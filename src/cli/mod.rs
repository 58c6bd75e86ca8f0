//! Command-line definition and glue (binary only): flags, device selection, error rendering.

mod attack;
mod audit;
mod bench;
mod metrics;
mod report;
mod sweep;
mod train;

use std::io::IsTerminal;

use anyhow::Result;
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};

/// Audits privacy in federated learning: trains federated ViTs, captures updates, attacks them, reports.
#[derive(Debug, Parser)]
#[command(name = "fedleak", version, about, propagate_version = true)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    /// Whether the command may take a second-order gradient (a double backward through candle):
    /// DLG, `--input-gradient exact` or joint-label optimisation, the exact bench step, an audit
    /// whose configuration runs DLG, and sweeps (whose runs may). candle then keeps the graph of
    /// *every* backward pass alive until its gradients are dropped, which multiplies the memory of
    /// first-order passes (ViT-B/16 attack step: 6.8 GB peak with it, see the bench README), so
    /// training, labels, the closed form and the finite-difference attack steps (either optimiser)
    /// run without it.
    pub fn needs_second_order_gradients(&self) -> bool {
        match &self.command {
            Command::Attack(a) => a.needs_second_order_gradients(),
            Command::Bench(b) => b.needs_second_order_gradients(),
            Command::Train(_) | Command::Metrics(_) | Command::Report(_) => false,
            // An unreadable configuration is reported by the audit itself; assume the worst here.
            Command::Audit(a) => audit::load_config(a.config.as_ref()).map_or(true, |config| {
                config
                    .attack
                    .kinds
                    .contains(&fedleak::audit::AttackKind::Dlg)
            }),
            Command::Sweep(_) => true,
        }
    }

    /// Worker threads for tensor kernels: `--threads`, else one when the command runs attack restarts
    /// on several threads at once (kernels parallelised over cores on top would only contend), else
    /// `None` (candle's default, all cores).
    pub fn kernel_threads(&self) -> Option<usize> {
        self.global.threads.or(match &self.command {
            Command::Attack(a) if a.concurrent_restarts() > 1 => Some(1),
            Command::Bench(b) if b.concurrent > 1 => Some(1),
            _ => None,
        })
    }
}

/// Options every command takes.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Seed of every random choice (partition, initialisation, batches); same seed, same results
    /// [default: 1, or the audit configuration's `seed`].
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Where tensors live: `cpu`, or `cuda` when fedleak is built with `--features cuda`.
    #[arg(long, global = true, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Worker threads for tensor kernels (default: all cores; one when `attack` runs several restarts
    /// at once, each on its own core). With two or more, a batch's pass runs its two halves at once;
    /// results do not depend on the count.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Only errors on stderr; no progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
}

impl GlobalArgs {
    /// The seed: `--seed`, or 1.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(1)
    }
}

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU (default; what CI tests).
    Cpu,
    /// The first CUDA GPU.
    Cuda,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Audit privacy: train under every protection scheme, attack what every party sees, write the report.
    Audit(audit::AuditArgs),
    /// Train a ViT federatedly (FedSGD or FedAvg) and capture client uploads for attacks.
    Train(train::TrainArgs),
    /// Run a reconstruction attack on a captured update and score it against the private batch.
    Attack(attack::AttackArgs),
    /// Score a reconstruction against a reference image (PSNR, SSIM, NMI) as JSON.
    Metrics(metrics::MetricsArgs),
    /// Time a model step (ms per step, median) in the output format of the PyTorch reference.
    Bench(bench::BenchArgs),
    /// Sweep audit settings over a grid (`[sweep]` table), shardable and resumable; merges the runs.
    Sweep(sweep::SweepArgs),
    /// Merge the runs of sweep outputs (`--merge DIR...`, e.g. shards) into one set of tables and a report.
    Report(report::ReportArgs),
}

/// Runs the parsed command.
pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Audit(a) => audit::run(&args.global, a),
        Command::Train(a) => train::run(&args.global, a),
        Command::Attack(a) => attack::run(&args.global, a),
        Command::Metrics(a) => metrics::run(a),
        Command::Bench(a) => bench::run(&args.global, a),
        Command::Sweep(a) => sweep::run(&args.global, a),
        Command::Report(a) => report::run(a),
    }
}

/// Sets up `tracing` on stderr (level from `RUST_LOG`, `info` by default, `error` with `--quiet`).
pub fn init_logging(quiet: bool) {
    let default = if quiet { "error" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .without_time()
        .init();
}

/// A count of at least one (iterations, restarts, images): the value parser of such options, so that
/// 0 is refused before anything runs (exit 2, naming the option).
pub fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(value) if value >= 1 => Ok(value),
        _ => Err(format!(
            "`{text}` is not a count of at least 1\nhint: give 1 or more, or leave the option out for its default"
        )),
    }
}

/// A finite number > 0 (a learning rate): the value parser of such options.
pub fn positive_number(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!(
            "`{text}` is not a positive number\nhint: give a finite number > 0, e.g. 0.01"
        )),
    }
}

/// The device a command runs on; `cuda` without the `cuda` feature is a usage error.
pub fn select_device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if cfg!(feature = "cuda") => Ok(Device::new_cuda(0)?),
        DeviceArg::Cuda => Err(UsageError(
            "`--device cuda`: this fedleak was built without CUDA support\nhint: rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use `--device cpu`".into(),
        )
        .into()),
    }
}

/// Refuses (exit code 2, before any work) an attack step that would not fit in the memory available
/// now, instead of letting the kernel kill the process part-way (see
/// `fedleak::model::AttackStepPlan`). `what` names what asked for the step, `instead` what to do
/// in its place.
pub fn refuse_attack_step_beyond_memory(
    step: &fedleak::model::AttackStepPlan,
    what: &str,
    instead: &str,
) -> Result<()> {
    let Some((needed, available)) = step.shortfall() else {
        return Ok(());
    };
    let gb = |bytes: u64| bytes as f64 / 1e9;
    let method = match step.kind {
        fedleak::model::AttackStepKind::Exact => "the exact double backward through candle",
        fedleak::model::AttackStepKind::FiniteDifference => {
            "finite-difference Hessian-vector products"
        }
    };
    Err(UsageError(format!(
        "{what} needs about {:.1} GB of memory here ({method} on a model of {} parameters, {} image(s), {} local step(s), {} at once; estimated from measured peak memory), but {:.1} GB is available\nhint: {instead}, use a smaller model, or a machine with more memory; set {}=1 to try anyway",
        gb(needed),
        fedleak::model::parameter_count(step.config),
        step.images,
        step.local_steps,
        step.concurrent,
        gb(available),
        fedleak::model::SKIP_MEMORY_CHECK,
    ))
    .into())
}

/// A usage error raised by the binary itself (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The exit code of an error: 2 when the user's input or usage is at fault, 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let user = error.chain().any(|cause| {
        cause.downcast_ref::<UsageError>().is_some()
            || cause
                .downcast_ref::<fedleak::Error>()
                .is_some_and(fedleak::Error::is_user_error)
            || cause
                .downcast_ref::<fedleak_metrics::MetricsError>()
                .is_some()
    });
    if user {
        2
    } else {
        1
    }
}

/// The error chain as one message: the outermost context first, each cause on its own line.
pub fn render_error(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(&format!("\n  caused by: {cause}"));
        }
    }
    text
}

/// Whether progress bars should be drawn (stderr is a terminal and not `--quiet`).
pub fn show_progress(global: &GlobalArgs) -> bool {
    !global.quiet && std::io::stderr().is_terminal()
}
