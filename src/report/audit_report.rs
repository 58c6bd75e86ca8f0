//! The audit's output directory: `results.csv`, `summary.csv`, `audit.json`, `report.html`, `images/`.
//!
//! Every file is written to a temporary name and renamed into place, so a crash never leaves a
//! half-written file under its final name.

use std::path::Path;

use base64::Engine;
use serde::Serialize;

use super::images::image_grid;
use super::plots::{Chart, ChartKind, Series};
use crate::audit::{AuditConfig, AuditOutcome};
use crate::{Error, Result};

/// The HTML template (`reports/templates/report.html.j2`), compiled in so the binary is self-contained.
pub const REPORT_TEMPLATE: &str = include_str!("../../reports/templates/report.html.j2");

/// Facts about the run that the library cannot know by itself (the binary fills them in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunMetadata {
    /// fedleak's version.
    pub version: String,
    /// The git revision fedleak was built from, or `unknown`.
    pub git_revision: String,
    /// OS, architecture and core count.
    pub machine: String,
    /// When the audit started (RFC 3339, UTC).
    pub started: String,
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.partial",
        path.extension().and_then(|e| e.to_str()).unwrap_or("out")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn csv_bytes<T: Serialize>(rows: &[T], what: &str) -> Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer
            .serialize(row)
            .map_err(|e| Error::Training(format!("cannot write {what}: {e}")))?;
    }
    writer
        .into_inner()
        .map_err(|e| Error::Training(format!("cannot write {what}: {e}")))
}

fn fmt_opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

fn fmt_bytes(bytes: f64) -> String {
    match bytes {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

/// Writes every output of an audit under `out`.
pub fn write_audit_report(
    out: &Path,
    config: &AuditConfig,
    outcome: &AuditOutcome,
    meta: &RunMetadata,
) -> Result<()> {
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    let mut figures = Vec::new();
    for figure in &outcome.figures {
        let path = images_dir.join(&figure.file);
        let rows: Vec<&candle_core::Tensor> = figure.rows.iter().collect();
        image_grid(&rows, 3, &path)?;
        let png = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        figures.push(serde_json::json!({
            "scheme": figure.file.split('-').next().unwrap_or_default(),
            "file": figure.file,
            "caption": figure.caption,
            "data_uri": format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png)),
        }));
    }
    write_atomically(
        &out.join("results.csv"),
        &csv_bytes(&outcome.images, "results.csv")?,
    )?;
    write_atomically(
        &out.join("summary.csv"),
        &csv_bytes(&outcome.summary, "summary.csv")?,
    )?;
    let json = serde_json::json!({
        "fedleak_version": meta.version,
        "git_revision": meta.git_revision,
        "machine": meta.machine,
        "started": meta.started,
        "seconds": outcome.seconds,
        "seed": config.seed,
        "config": config,
        "model_parameters": outcome.model_parameters,
        "warmup_test_accuracy": outcome.warmup_test_accuracy,
        "verdicts": outcome.verdicts,
        "summary": outcome.summary,
        "rounds": outcome.rounds,
        "images": outcome.images,
    });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::Training(format!("cannot write audit.json: {e}")))?;
    write_atomically(&out.join("audit.json"), text.as_bytes())?;
    let html = render_html(config, outcome, meta, &figures)?;
    write_atomically(&out.join("report.html"), html.as_bytes())
}

fn render_html(
    config: &AuditConfig,
    outcome: &AuditOutcome,
    meta: &RunMetadata,
    figures: &[serde_json::Value],
) -> Result<String> {
    let verdicts: Vec<serde_json::Value> = outcome
        .verdicts
        .iter()
        .map(|v| {
            serde_json::json!({
                "scheme": v.scheme,
                "scheme_parameters": v.scheme_parameters,
                "verdict": v.verdict,
                "reason": v.reason,
                "psnr": fmt_opt(v.psnr_db_max, 1),
                "ssim": fmt_opt(v.ssim_max, 3),
                "nmi": fmt_opt(v.nmi_max, 3),
                "accuracy": format!("{:.1} %", v.final_test_accuracy * 100.0),
                "epsilon": match (v.dp_epsilon, v.dp_delta) {
                    (Some(e), Some(d)) => format!("{e:.2} (δ={d:e})"),
                    _ => "–".into(),
                },
                "upload": fmt_bytes(v.upload_bytes_per_client_round),
                "download": fmt_bytes(v.download_bytes_per_client_round),
                "keys": if v.key_bytes_one_time > 0 { fmt_bytes(v.key_bytes_one_time as f64) } else { "–".into() },
                "seconds": format!("{:.2}", v.round_seconds),
                "threat_models": v.threat_models,
            })
        })
        .collect();
    let summary: Vec<serde_json::Value> = outcome
        .summary
        .iter()
        .map(|r| {
            serde_json::json!({
                "scheme": r.scheme, "threat_model": r.threat_model, "party": r.party, "round": r.round,
                "attack": r.attack, "batch_size": r.batch_size,
                "psnr": match (r.psnr_db_mean, r.psnr_db_max) {
                    (Some(m), Some(x)) => format!("{m:.1} / {x:.1}"),
                    _ => "–".into(),
                },
                "baseline": fmt_opt(r.baseline_psnr_db, 1),
                "ssim": fmt_opt(r.ssim_mean, 3),
                "nmi": fmt_opt(r.nmi_mean, 3),
                "labels": r.label_accuracy.map_or("–".into(), |a| format!("{:.0} %", a * 100.0)),
                "seconds": fmt_opt(r.attack_seconds, 2),
                "verdict": r.verdict,
                "reason": r.reason,
            })
        })
        .collect();
    let baseline: Vec<f64> = outcome.images.iter().map(|r| r.baseline_psnr_db).collect();
    let best_of = |scheme: &str, f: &dyn Fn(&crate::audit::SummaryRow) -> Option<(f64, f64)>| {
        outcome
            .summary
            .iter()
            .filter(|r| r.scheme == scheme)
            .filter_map(f)
            .collect::<Vec<_>>()
    };
    let series = |f: &dyn Fn(&crate::audit::SchemeVerdict) -> Vec<(f64, f64)>| -> Vec<Series> {
        outcome
            .verdicts
            .iter()
            .map(|v| Series {
                label: v.scheme.clone(),
                points: f(v),
            })
            .collect()
    };
    let plots = serde_json::json!({
        "quality_vs_accuracy": Chart {
            title: "Best reconstruction vs final test accuracy".into(),
            x_label: "final test accuracy".into(),
            y_label: "best PSNR (dB)".into(),
            log_x: false,
            kind: ChartKind::Scatter,
            series: series(&|v| v.psnr_db_max.map(|p| vec![(v.final_test_accuracy, p)]).unwrap_or_default()),
        }.to_svg(),
        "quality_vs_bytes": Chart {
            title: "Best reconstruction vs upload per client per round".into(),
            x_label: "upload bytes per client per round (log scale)".into(),
            y_label: "best PSNR (dB)".into(),
            log_x: true,
            kind: ChartKind::Scatter,
            series: series(&|v| v.psnr_db_max.map(|p| vec![(v.upload_bytes_per_client_round, p)]).unwrap_or_default()),
        }.to_svg(),
        "quality_by_round": Chart {
            title: "Best reconstruction per captured round".into(),
            x_label: "round".into(),
            y_label: "best PSNR (dB)".into(),
            log_x: false,
            kind: ChartKind::Lines,
            series: series(&|v| {
                let mut by_round: std::collections::BTreeMap<usize, f64> = Default::default();
                for (round, psnr) in best_of(&v.scheme, &|r| r.psnr_db_max.map(|p| (r.round as f64, p))) {
                    let e = by_round.entry(round as usize).or_insert(f64::MIN);
                    *e = e.max(psnr);
                }
                by_round.into_iter().map(|(r, p)| (r as f64, p)).collect()
            }),
        }.to_svg(),
        "accuracy_by_round": Chart {
            title: "Test accuracy per round".into(),
            x_label: "round".into(),
            y_label: "test accuracy".into(),
            log_x: false,
            kind: ChartKind::Lines,
            series: series(&|v| v.accuracy_by_round.iter().enumerate().map(|(i, a)| ((i + 1) as f64, *a)).collect()),
        }.to_svg(),
    });
    let plots: serde_json::Map<String, serde_json::Value> =
        plots.as_object().cloned().unwrap_or_default();
    let plots: std::collections::BTreeMap<String, minijinja::Value> = plots
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                minijinja::Value::from_safe_string(v.as_str().unwrap_or_default().to_string()),
            )
        })
        .collect();
    let meta_json = serde_json::json!({
        "data": config.data,
        "model": config.model,
        "model_parameters": outcome.model_parameters,
        "clients": config.fl.clients,
        "rounds": config.fl.rounds,
        "algorithm": serde_json::to_value(config.fl.algorithm).unwrap_or_default(),
        "batch_size": config.fl.batch_size,
        "warmup": config.warmup.as_ref().map(|w| format!(
            "{} rounds of plain {} ({} accuracy after it)",
            w.rounds,
            serde_json::to_value(w.algorithm).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            fmt_opt(outcome.warmup_test_accuracy.map(|a| a * 100.0), 1) + " %"
        )),
        "search_limited": outcome
            .verdicts
            .iter()
            .filter(|v| v.search_limited)
            .map(|v| v.scheme.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        "psnr_margin_db": config.verdict.psnr_margin_db,
        "ssim_min": config.verdict.ssim_min,
        "baseline_psnr": fmt_opt((!baseline.is_empty()).then(|| baseline.iter().sum::<f64>() / baseline.len() as f64), 1),
        "version": meta.version,
        "git_revision": meta.git_revision,
        "machine": meta.machine,
        "started": meta.started,
        "seed": config.seed,
        "seconds": format!("{:.1}", outcome.seconds),
    });
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", REPORT_TEMPLATE)
        .map_err(|e| Error::Training(format!("the report template is invalid: {e}")))?;
    let template = env
        .get_template("report.html")
        .map_err(|e| Error::Training(format!("the report template is missing: {e}")))?;
    template
        .render(minijinja::context! {
            meta => meta_json,
            verdicts => verdicts,
            summary => summary,
            figures => figures,
            plots => plots,
        })
        .map_err(|e| Error::Training(format!("cannot render report.html: {e}")))
}
