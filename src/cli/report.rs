//! `fedleak report --merge`: merges the finished runs of sweep outputs (the shards of one sweep, or
//! several sweeps) into one `results.csv`, `summary.csv` and `report.html`.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Result;
use fedleak::audit::sweep::{finished_runs, merge_runs, write_merged};

use super::sweep::run_metadata;
use super::UsageError;

/// Arguments of `fedleak report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Sweep output directories to merge (each the `--out` of a `fedleak sweep`, holding `runs/`).
    #[arg(long, num_args = 1.., required = true, value_name = "DIR")]
    pub merge: Vec<PathBuf>,
    /// Where the merged `results.csv`, `summary.csv` and `report.html` go.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `fedleak report`.
pub fn run(args: ReportArgs) -> Result<()> {
    let mut run_dirs = Vec::new();
    for input in &args.merge {
        let found = finished_runs(input)?;
        tracing::info!("{}: {} finished runs", input.display(), found.len());
        run_dirs.extend(found);
    }
    if run_dirs.is_empty() {
        return Err(UsageError(format!(
            "`--merge`: no finished run under {}\nhint: merge the `--out` directories of sweeps that finished at least one run",
            args.merge
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into());
    }
    let merged = merge_runs(&run_dirs)?;
    write_merged(&args.out, &merged, &run_metadata(SystemTime::now()))?;
    println!(
        "{}",
        serde_json::json!({
            "out": args.out,
            "inputs": args.merge.len(),
            "runs": merged.runs.len(),
            "summary": args.out.join("summary.csv"),
            "results": args.out.join("results.csv"),
            "report": args.out.join("report.html"),
        })
    );
    Ok(())
}
