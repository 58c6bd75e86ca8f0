//! `fedleak sweep`: expands a sweep file (an audit configuration plus a `[sweep]` table of axes) into a
//! grid of audits, runs this shard's part of it (skipping finished runs with `--resume`), and merges the
//! finished runs into `results.csv`, `summary.csv` and `report.html`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Result;
use fedleak::audit::sweep::{
    merge_runs, prepare_output, run_and_write, runs_dir, write_merged, Shard, Sweep,
};
use fedleak::audit::AuditProgress;
use fedleak::report::RunMetadata;

use super::audit::{git_revision, utc_timestamp};
use super::{select_device, GlobalArgs, UsageError};

/// Arguments of `fedleak sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Sweep file (TOML): an audit configuration plus a `[sweep]` table of axes, e.g.
    /// `"fl.batch_size" = [1, 4]` or `"schemes.1.noise_multiplier" = [0.1, 1.0]`.
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory: finished runs go to `DIR/runs/<run id>/`, the merged tables to `DIR`
    /// (default `reports/sweep-<UTC timestamp>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only shard K of N (1-based): the runs whose 0-based grid index i has i % N == K - 1.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Skip the runs already finished in `--out` (after a crash, a kill or a time limit).
    #[arg(long)]
    pub resume: bool,
}

/// What the reports record about this process (version, revision, machine, start time).
pub fn run_metadata(started: SystemTime) -> RunMetadata {
    RunMetadata {
        version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git_revision(),
        machine: format!(
            "{} {}, {} logical cores",
            std::env::consts::OS,
            std::env::consts::ARCH,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        ),
        started: utc_timestamp(started),
    }
}

/// Progress of one run, on stderr through `tracing`.
struct RunProgress<'a> {
    id: &'a str,
}

impl AuditProgress for RunProgress<'_> {
    fn step(&mut self, message: &str) {
        tracing::info!("[{}] {message}", self.id);
    }
}

fn read_sweep(path: &Path, seed: Option<u64>) -> Result<Sweep> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        UsageError(format!(
            "cannot read `--config {}`: {e}\nhint: give the path of a TOML sweep file: an audit configuration (`fedleak audit --print-default-config`) plus a `[sweep]` table",
            path.display()
        ))
    })?;
    Ok(Sweep::from_toml(&text, &path.display().to_string(), seed)?)
}

/// Runs `fedleak sweep`.
pub fn run(global: &GlobalArgs, args: SweepArgs) -> Result<()> {
    let sweep = read_sweep(&args.config, global.seed)?;
    let shard = match &args.shard {
        Some(text) => text.parse::<Shard>()?,
        None => Shard::ALL,
    };
    if args.resume && args.out.is_none() {
        return Err(UsageError(
            "`--resume` needs the `--out` directory of the sweep to resume\nhint: pass the same `--out DIR` as the interrupted run".into(),
        )
        .into());
    }
    let device = select_device(global.device)?;
    let started = SystemTime::now();
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("reports").join(format!("sweep-{}", utc_timestamp(started).replace(':', "")))
    });
    let selected = sweep.shard(shard);
    let state = prepare_output(&out, &sweep, shard, args.resume)?;
    for id in &state.removed_partial {
        tracing::info!("removed the unfinished run `{id}` left by an earlier sweep");
    }
    if !state.foreign.is_empty() {
        tracing::warn!(
            "{} finished run(s) in `{}` are not part of this sweep; they are left alone and not merged",
            state.foreign.len(),
            runs_dir(&out).display()
        );
    }
    if selected.is_empty() {
        tracing::warn!(
            "shard {shard} holds no run: the grid has only {} runs",
            sweep.runs.len()
        );
    }
    tracing::info!(
        "sweep of {} runs over {} axes; shard {shard}: {} runs, {} already finished",
        sweep.runs.len(),
        sweep.axes.len(),
        selected.len(),
        state.finished.len()
    );
    let meta = run_metadata(started);
    let (mut ran, mut skipped) = (0usize, 0usize);
    let mut finished_dirs = Vec::with_capacity(selected.len());
    for (position, run) in selected.iter().enumerate() {
        if state.finished.contains(&run.id) {
            tracing::info!(
                "run {}/{} `{}`: finished, skipped",
                position + 1,
                selected.len(),
                run.id
            );
            skipped += 1;
            finished_dirs.push(runs_dir(&out).join(&run.id));
            continue;
        }
        tracing::info!("run {}/{} `{}`", position + 1, selected.len(), run.id);
        let mut progress = RunProgress { id: &run.id };
        finished_dirs.push(run_and_write(&out, run, &device, &mut progress, &meta)?);
        ran += 1;
    }
    let merged = merge_runs(&finished_dirs)?;
    write_merged(&out, &merged, &run_metadata(SystemTime::now()))?;
    println!(
        "{}",
        serde_json::json!({
            "out": out,
            "runs": selected.len(),
            "skipped": skipped,
            "ran": ran,
            "grid": sweep.runs.len(),
            "shard": shard.to_string(),
            "summary": out.join("summary.csv"),
            "results": out.join("results.csv"),
            "report": out.join("report.html"),
        })
    );
    Ok(())
}
