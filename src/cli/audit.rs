//! `fedleak audit`: trains under every scheme of an audit configuration, attacks what every party sees,
//! and writes the report (CSV, JSON, HTML).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use fedleak::audit::{run_audit, AuditConfig, AuditProgress, DEFAULT_AUDIT_TOML};
use fedleak::report::{write_audit_report, RunMetadata};
use indicatif::{ProgressBar, ProgressStyle};

use super::{select_device, show_progress, GlobalArgs, UsageError};

/// Arguments of `fedleak audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Audit configuration (TOML); without it the embedded default audit runs.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output directory (default `reports/audit-<UTC timestamp>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

/// A UTC timestamp `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, Howard Hinnant's algorithm).
pub(super) fn utc_timestamp(now: SystemTime) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The git revision fedleak was built from (`FEDLEAK_GIT_REVISION`, else `git rev-parse`), or `unknown`.
pub(super) fn git_revision() -> String {
    option_env!("FEDLEAK_GIT_REVISION")
        .map(str::to_string)
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

struct Progress(ProgressBar);

impl AuditProgress for Progress {
    fn step(&mut self, message: &str) {
        if self.0.is_hidden() {
            tracing::info!("{message}");
        } else {
            self.0.set_message(message.to_string());
        }
    }
}

/// Loads the configuration `fedleak audit` runs: `--config FILE`, else the embedded default; `--seed`
/// overrides the file's seed when given explicitly.
pub fn load_config(path: Option<&PathBuf>) -> Result<AuditConfig> {
    Ok(match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                UsageError(format!(
                    "cannot read `--config {}`: {e}\nhint: give the path of a TOML audit file; `fedleak audit --print-default-config` prints a template",
                    path.display()
                ))
            })?;
            AuditConfig::from_toml(&text, &path.display().to_string())?
        }
        None => AuditConfig::embedded_default()?,
    })
}

/// Runs `fedleak audit`.
pub fn run(global: &GlobalArgs, args: AuditArgs) -> Result<()> {
    if args.print_default_config {
        print!("{DEFAULT_AUDIT_TOML}");
        return Ok(());
    }
    let device = select_device(global.device)?;
    let mut config = load_config(args.config.as_ref())?;
    if let Some(seed) = global.seed {
        config.seed = seed;
    }
    let started = SystemTime::now();
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("reports").join(format!("audit-{}", utc_timestamp(started).replace(':', "")))
    });
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the output directory `{}`", out.display()))?;
    let bar = if show_progress(global) {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("a valid progress template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut progress = Progress(bar);
    let outcome = run_audit(&config, &device, &mut progress)?;
    progress.0.finish_and_clear();
    let meta = RunMetadata {
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
    };
    write_audit_report(&out, &config, &outcome, &meta)?;
    let verdicts: Vec<serde_json::Value> = outcome
        .verdicts
        .iter()
        .map(|v| {
            serde_json::json!({
                "scheme": v.scheme,
                "verdict": v.verdict,
                "psnr_db_max": v.psnr_db_max,
                "final_test_accuracy": v.final_test_accuracy,
                "upload_bytes_per_client_round": v.upload_bytes_per_client_round,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "out": out,
            "report": out.join("report.html"),
            "seconds": outcome.seconds,
            "verdicts": verdicts,
        })
    );
    Ok(())
}
