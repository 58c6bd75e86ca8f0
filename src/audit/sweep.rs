//! Parameter sweeps over the audit (`fedleak sweep`) and merging their outputs (`fedleak report --merge`).
//!
//! A sweep file is an audit configuration plus a `[sweep]` table whose keys are dotted paths into that
//! configuration (`fl.batch_size`, `schemes.1.noise_multiplier`: a number indexes a list) and whose values
//! are lists. Nested tables (`[sweep.fl]`, or unquoted dotted keys) are flattened to the same paths.
//!
//! **Order.** Axes are sorted by path; the grid is their cartesian product with the last axis varying
//! fastest, and run `i` (0-based) is the `i`-th assignment in that order. `--shard K/N` runs the runs with
//! `i % N == K - 1`.
//!
//! **Run ids.** A run's id depends only on its axis values, never on its position in the grid, so adding
//! a value to an axis keeps the ids (and resumability) of the runs already done: the assignment written
//! as `path=value` pairs joined by `,` (lists as `a+b`, characters outside `[A-Za-z0-9._=,+-]` replaced
//! by `_`, at most 80 characters), then `-` and 8 hex digits of the FNV-1a 64 hash of the canonical JSON
//! of the assignment (`[[path, value], ...]`), which keeps ids distinct when labels collide, e.g.
//! `fl.batch_size=4,schemes.1.noise_multiplier=0.1-1f3a09c2`.
//!
//! **Layout.** Every finished run is the directory `DIR/runs/<id>/` (the audit outputs plus `run.json`),
//! written as `DIR/runs/.<id>.partial/` and renamed into place, so a directory under its final name is
//! always complete. Merging concatenates the runs' `results.csv` and `summary.csv` behind a `run_id`
//! column and one column per axis, runs sorted by id.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::config::AuditConfig;
use super::run::{run_audit, AuditProgress};
use crate::report::{write_atomically, write_audit_report, RunMetadata};
use crate::{Error, Result};

/// The name of the sweep table in a sweep file.
pub const SWEEP_TABLE: &str = "sweep";

/// The HTML template of a merged report (`reports/templates/merged.html.j2`), compiled in.
pub const MERGED_TEMPLATE: &str = include_str!("../../reports/templates/merged.html.j2");

/// The file of a run directory that describes the run.
pub const RUN_FILE: &str = "run.json";

/// The most runs a sweep may expand to.
pub const MAX_RUNS: usize = 100_000;

const SWEEP_HINT: &str = "`[sweep]` keys are dotted paths into the audit configuration (a number indexes a list), each with a list of values, e.g. `\"fl.batch_size\" = [1, 4]` or `\"schemes.1.noise_multiplier\" = [0.1, 1.0]`";

fn invalid(key: impl Into<String>, reason: impl Into<String>, hint: impl Into<String>) -> Error {
    Error::InvalidSetting {
        key: key.into(),
        reason: reason.into(),
        hint: hint.into(),
    }
}

/// FNV-1a, 64 bits: a stable hash (unlike `std`'s, the same in every build and on every machine).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One axis of the grid: a dotted configuration path and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepAxis {
    /// Dotted path into the audit configuration (`fl.batch_size`, `schemes.1.noise_multiplier`).
    pub path: String,
    /// The values, in the order of the sweep file.
    pub values: Vec<toml::Value>,
}

/// One point of the grid: its axis values and the audit configuration they give.
#[derive(Debug, Clone)]
pub struct SweepRun {
    /// 0-based position in the grid (what `--shard` partitions).
    pub index: usize,
    /// The stable id (see the module documentation).
    pub id: String,
    /// `(path, value)` for every axis, in axis order.
    pub assignment: Vec<(String, toml::Value)>,
    /// The audit configuration of this run.
    pub config: AuditConfig,
    /// FNV-1a 64 (hex) of the configuration as JSON: `--resume` refuses a run made with another one.
    pub config_hash: String,
}

/// A sweep file, expanded.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The axes, sorted by path.
    pub axes: Vec<SweepAxis>,
    /// Every run of the grid, in grid order.
    pub runs: Vec<SweepRun>,
}

/// The canonical JSON of an assignment, `[[path, value], ...]`: what run ids hash.
fn canonical_assignment(assignment: &[(String, toml::Value)]) -> String {
    let pairs: Vec<serde_json::Value> = assignment
        .iter()
        .map(|(path, value)| serde_json::json!([path, toml_to_json(value)]))
        .collect();
    serde_json::Value::Array(pairs).to_string()
}

fn toml_to_json(value: &toml::Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()))
}

fn value_label(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) if items.is_empty() => "empty".into(),
        toml::Value::Array(items) => items.iter().map(value_label).collect::<Vec<_>>().join("+"),
        toml::Value::Table(_) => "table".into(),
        other => other.to_string(),
    }
}

/// The stable id of a run with these axis values (see the module documentation).
pub fn run_id(assignment: &[(String, toml::Value)]) -> String {
    let hash = fnv1a64(canonical_assignment(assignment).as_bytes());
    let label = assignment
        .iter()
        .map(|(path, value)| format!("{path}={}", value_label(value)))
        .collect::<Vec<_>>()
        .join(",");
    let mut label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._=,+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    if label.starts_with('.') || label.is_empty() {
        label.insert(0, 'r');
    }
    format!("{label}-{:08x}", hash >> 32)
}

/// Sets `value` at the dotted `path` of `root`, creating missing tables; numbers index lists.
fn set_path(
    root: &mut toml::Table,
    path: &str,
    value: toml::Value,
) -> std::result::Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err("the path has an empty segment".into());
    }
    let mut node = toml::Value::Table(std::mem::take(root));
    let result = set_in(&mut node, "", &segments, value);
    if let toml::Value::Table(table) = node {
        *root = table;
    }
    result
}

fn set_in(
    node: &mut toml::Value,
    walked: &str,
    segments: &[&str],
    value: toml::Value,
) -> std::result::Result<(), String> {
    let Some((segment, rest)) = segments.split_first() else {
        *node = value;
        return Ok(());
    };
    let child_path = if walked.is_empty() {
        (*segment).to_string()
    } else {
        format!("{walked}.{segment}")
    };
    match node {
        toml::Value::Table(table) => {
            if rest.is_empty() {
                table.insert((*segment).to_string(), value);
                return Ok(());
            }
            let child = table
                .entry((*segment).to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            set_in(child, &child_path, rest, value)
        }
        toml::Value::Array(items) => {
            let len = items.len();
            let index: usize = segment.parse().map_err(|_| {
                format!(
                    "`{walked}` is a list, so `{segment}` must be an index (0 to {})",
                    len.saturating_sub(1)
                )
            })?;
            let item = items.get_mut(index).ok_or_else(|| {
                format!("`{walked}` has {len} entries in the base configuration, so there is no index {index}")
            })?;
            set_in(item, &child_path, rest, value)
        }
        other => Err(format!(
            "`{walked}` is a {}, not a table or a list",
            other.type_str()
        )),
    }
}

/// Parses a configuration tree into an [`AuditConfig`] and validates it.
fn parse_tree(tree: &toml::Table, origin: &str) -> Result<AuditConfig> {
    let config = deserialize_tree(tree, origin)?;
    config.validate()?;
    Ok(config)
}

/// Parses a configuration tree into an [`AuditConfig`] without validating it; errors keep serde's message.
fn deserialize_tree(tree: &toml::Table, origin: &str) -> Result<AuditConfig> {
    let config: AuditConfig =
        toml::Value::Table(tree.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                invalid(
                    origin,
                    e.message().trim().to_string(),
                    "compare with `fedleak audit --print-default-config`; keys are case-sensitive",
                )
            })?;
    Ok(config)
}

/// Whether `path` names a setting of the parsed configuration (serde ignores some unknown keys, such as
/// settings of a scheme that has none): the configuration, serialised back, must hold the path.
fn path_is_used(config: &AuditConfig, path: &str) -> bool {
    let Ok(mut node) = toml::Value::try_from(config) else {
        return true;
    };
    for segment in path.split('.') {
        let child = match node {
            toml::Value::Table(mut table) => table.remove(segment),
            toml::Value::Array(mut items) => segment
                .parse::<usize>()
                .ok()
                .filter(|&i| i < items.len())
                .map(|i| items.swap_remove(i)),
            _ => None,
        };
        match child {
            Some(child) => node = child,
            None => return false,
        }
    }
    true
}

/// Error of one axis value: the key names the axis.
fn axis_error(path: &str, value: &toml::Value, error: Error) -> Error {
    let (reason, hint) = match error {
        Error::InvalidSetting { key, reason, hint } if key == path => (reason, hint),
        Error::InvalidSetting { key, reason, hint } => (format!("`{key}`: {reason}"), hint),
        other => (other.to_string(), String::new()),
    };
    let hint = if hint.is_empty() {
        SWEEP_HINT.to_string()
    } else {
        format!("{hint}; {SWEEP_HINT}")
    };
    invalid(
        format!("[sweep] {path}"),
        format!("with the value {value}: {reason}"),
        hint,
    )
}

fn collect_axes(prefix: &str, table: &toml::Table, axes: &mut Vec<SweepAxis>) -> Result<()> {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Array(values) => axes.push(SweepAxis {
                path,
                values: values.clone(),
            }),
            toml::Value::Table(inner) => collect_axes(&path, inner, axes)?,
            other => {
                return Err(invalid(
                    format!("[sweep] {path}"),
                    format!("is a {}, not a list of values", other.type_str()),
                    format!("write the values as a list, e.g. `\"{path}\" = [{other}]`"),
                ))
            }
        }
    }
    Ok(())
}

impl Sweep {
    /// Parses and expands a sweep file; `origin` names it in errors, `seed` (from `--seed`) replaces the
    /// base configuration's seed (a `seed` axis still wins). Every run's configuration is parsed and
    /// validated here, so a bad axis fails before anything runs.
    pub fn from_toml(text: &str, origin: &str, seed: Option<u64>) -> Result<Self> {
        let mut tree: toml::Table = toml::from_str(text).map_err(|e: toml::de::Error| {
            let place = e
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    let content = text.lines().nth(line - 1).unwrap_or_default().trim();
                    format!(" (line {line}: `{content}`)")
                })
                .unwrap_or_default();
            invalid(
                origin,
                format!("{}{place}", e.message().trim()),
                "a sweep file is TOML: an audit configuration plus a `[sweep]` table",
            )
        })?;
        let sweep = match tree.remove(SWEEP_TABLE) {
            Some(toml::Value::Table(table)) => table,
            Some(other) => {
                return Err(invalid(
                    SWEEP_TABLE,
                    format!("`sweep` in {origin} is a {}, not a table", other.type_str()),
                    SWEEP_HINT,
                ))
            }
            None => {
                return Err(invalid(
                    SWEEP_TABLE,
                    format!("{origin} has no `[sweep]` table, so the grid is empty"),
                    format!("{SWEEP_HINT}; to run one configuration use `fedleak audit`"),
                ))
            }
        };
        if let Some(seed) = seed {
            let seed = i64::try_from(seed).map_err(|_| {
                invalid(
                    "--seed",
                    format!("{seed} does not fit a TOML integer"),
                    "use a seed below 2^63",
                )
            })?;
            tree.insert("seed".into(), toml::Value::Integer(seed));
        }
        parse_tree(&tree, origin)?;

        let mut axes = Vec::new();
        collect_axes("", &sweep, &mut axes)?;
        axes.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(pair) = axes.windows(2).find(|pair| pair[0].path == pair[1].path) {
            return Err(invalid(
                format!("[sweep] {}", pair[0].path),
                "the axis is given twice (quoted and as a nested table)",
                "keep one of them",
            ));
        }
        if axes.is_empty() {
            return Err(invalid(
                SWEEP_TABLE,
                format!("the `[sweep]` table of {origin} has no axis, so the grid is empty"),
                SWEEP_HINT,
            ));
        }
        if let Some(axis) = axes.iter().find(|a| a.values.is_empty()) {
            return Err(invalid(
                SWEEP_TABLE,
                format!(
                    "the axis `{}` has an empty list of values, so the grid is empty",
                    axis.path
                ),
                "give every axis at least one value, or remove it",
            ));
        }
        // Every value of every axis on its own, so a wrong key or type names its axis.
        for axis in &axes {
            for value in &axis.values {
                let mut one = tree.clone();
                set_path(&mut one, &axis.path, value.clone()).map_err(|reason| {
                    invalid(format!("[sweep] {}", axis.path), reason, SWEEP_HINT)
                })?;
                // Types and keys only: settings that depend on other axes are validated per run below.
                let config = deserialize_tree(&one, &axis.path)
                    .map_err(|e| axis_error(&axis.path, value, e))?;
                if !path_is_used(&config, &axis.path) {
                    return Err(invalid(
                        format!("[sweep] {}", axis.path),
                        format!(
                            "the audit configuration has no such setting: the value {value} would be ignored"
                        ),
                        format!("e.g. a `none` scheme has no settings; {SWEEP_HINT}"),
                    ));
                }
            }
        }
        let total = axes.iter().try_fold(1usize, |n, a| {
            n.checked_mul(a.values.len()).filter(|&n| n <= MAX_RUNS)
        });
        let total = total.ok_or_else(|| {
            invalid(
                SWEEP_TABLE,
                format!("the grid has more than {MAX_RUNS} runs"),
                "sweep fewer values, or split the sweep into several files",
            )
        })?;
        let mut runs = Vec::with_capacity(total);
        for index in 0..total {
            let mut rest = index;
            let mut assignment = vec![(String::new(), toml::Value::Boolean(false)); axes.len()];
            for (slot, axis) in assignment.iter_mut().zip(&axes).rev() {
                let n = axis.values.len();
                *slot = (axis.path.clone(), axis.values[rest % n].clone());
                rest /= n;
            }
            let id = run_id(&assignment);
            let mut run_tree = tree.clone();
            for (path, value) in &assignment {
                set_path(&mut run_tree, path, value.clone())
                    .map_err(|reason| invalid(format!("[sweep] {path}"), reason, SWEEP_HINT))?;
            }
            let config = parse_tree(&run_tree, &id).map_err(|e| {
                let (key, reason, hint) = match e {
                    Error::InvalidSetting { key, reason, hint } => (key, reason, hint),
                    other => (id.clone(), other.to_string(), String::new()),
                };
                invalid(
                    SWEEP_TABLE,
                    format!(
                        "the combination {} is invalid: `{key}`: {reason}",
                        canonical_assignment(&assignment)
                    ),
                    format!(
                        "{hint}; drop that combination by splitting the sweep into several files"
                    ),
                )
            })?;
            let config_hash = format!(
                "{:016x}",
                fnv1a64(
                    serde_json::to_string(&config)
                        .map_err(|e| Error::Training(format!(
                            "cannot serialise a configuration: {e}"
                        )))?
                        .as_bytes()
                )
            );
            runs.push(SweepRun {
                index,
                id,
                assignment,
                config,
                config_hash,
            });
        }
        let ids: BTreeSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        if ids.len() != runs.len() {
            return Err(invalid(
                SWEEP_TABLE,
                "two runs of the grid have the same id (an axis lists a value twice)",
                "list every value of an axis once",
            ));
        }
        Ok(Sweep { axes, runs })
    }

    /// The runs of one shard, in grid order.
    pub fn shard(&self, shard: Shard) -> Vec<&SweepRun> {
        self.runs
            .iter()
            .filter(|r| shard.contains(r.index))
            .collect()
    }
}

/// A slice of the grid: `K/N` holds the runs whose 0-based index `i` has `i % N == K - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// K, 1-based.
    pub index: usize,
    /// N.
    pub count: usize,
}

impl Shard {
    /// The whole grid (`1/1`).
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Whether the run with this 0-based grid index belongs to the shard.
    pub fn contains(&self, run_index: usize) -> bool {
        run_index % self.count == self.index - 1
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `K/N` with `1 <= K <= N`.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: String| {
            invalid(
                "--shard",
                reason,
                "write `K/N` with 1 <= K <= N, e.g. `--shard 2/8` (Slurm: `$SLURM_ARRAY_TASK_ID/N` with `--array=1-N`)",
            )
        };
        let (k, n) = text
            .split_once('/')
            .ok_or_else(|| bad(format!("`{text}` is not of the form K/N")))?;
        let parse = |s: &str| s.trim().parse::<usize>().ok();
        match (parse(k), parse(n)) {
            (Some(k), Some(n)) if 1 <= k && k <= n => Ok(Shard { index: k, count: n }),
            (Some(k), Some(n)) => Err(bad(format!(
                "shard {k} of {n} does not exist (K counts from 1 to N)"
            ))),
            _ => Err(bad(format!(
                "`{text}` is not of the form K/N with whole numbers"
            ))),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One axis value as recorded in `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AxisValue {
    /// The dotted configuration path.
    pub path: String,
    /// The value.
    pub value: serde_json::Value,
}

/// `run.json`: what a finished run directory holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run id (the directory name).
    pub id: String,
    /// Position in the grid the run was made from.
    pub index: usize,
    /// The axis values.
    pub axes: Vec<AxisValue>,
    /// The seed of the run.
    pub seed: u64,
    /// FNV-1a 64 of the run's configuration as JSON (see [`SweepRun::config_hash`]).
    pub config_hash: String,
    /// The fedleak version that made it.
    pub fedleak_version: String,
    /// Wall time of the audit, in seconds.
    pub seconds: f64,
}

/// `DIR/runs`.
pub fn runs_dir(out: &Path) -> PathBuf {
    out.join("runs")
}

fn partial_dir(runs: &Path, id: &str) -> PathBuf {
    runs.join(format!(".{id}.partial"))
}

fn dir_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let is_dir = entry
            .file_type()
            .map_err(|e| Error::io(entry.path(), e))?
            .is_dir();
        if is_dir {
            if let Some(name) = entry.file_name().to_str() {
                entries.push((name.to_string(), entry.path()));
            }
        }
    }
    entries.sort();
    Ok(entries)
}

/// The finished run directories under `DIR/runs` (every directory whose name does not start with `.`),
/// sorted by id; an error when `DIR/runs` does not exist.
pub fn finished_runs(out: &Path) -> Result<Vec<PathBuf>> {
    let runs = runs_dir(out);
    if !runs.is_dir() {
        return Err(invalid(
            "--merge",
            format!(
                "`{}` is not a sweep output: it has no `runs/` directory",
                out.display()
            ),
            "give the `--out` directories of `fedleak sweep` runs (e.g. its shards)",
        ));
    }
    Ok(dir_entries(&runs)?
        .into_iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(_, path)| path)
        .collect())
}

/// What [`prepare_output`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputState {
    /// Ids of finished runs of this shard (they are skipped).
    pub finished: BTreeSet<String>,
    /// Finished runs in `DIR/runs` that belong to no run of this sweep (left alone, not merged).
    pub foreign: Vec<String>,
    /// Leftover `.partial` directories that were removed.
    pub removed_partial: Vec<String>,
}

/// Gets `DIR/runs` ready for a shard of a sweep: refuses finished runs without `resume` (never overwrite),
/// refuses resuming a run made with another configuration, and removes leftover `.partial` directories of
/// this shard's runs and of no run of the grid (a concurrent shard's work in progress stays).
pub fn prepare_output(
    out: &Path,
    sweep: &Sweep,
    shard: Shard,
    resume: bool,
) -> Result<OutputState> {
    let runs = runs_dir(out);
    std::fs::create_dir_all(&runs).map_err(|e| Error::io(&runs, e))?;
    let entries = dir_entries(&runs)?;
    let finished: Vec<&(String, PathBuf)> = entries
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    if !resume && !finished.is_empty() {
        return Err(invalid(
            "--out",
            format!(
                "`{}` already holds {} finished run(s), e.g. `{}`",
                runs.display(),
                finished.len(),
                finished[0].0
            ),
            "pass `--resume` to keep them and run only the missing runs, or choose a new `--out`",
        ));
    }
    let grid: BTreeMap<&str, &SweepRun> = sweep.runs.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut state = OutputState::default();
    for (name, path) in &finished {
        match grid.get(name.as_str()) {
            Some(run) => {
                let record = read_record(path)?;
                if record.config_hash != run.config_hash {
                    return Err(invalid(
                        "--resume",
                        format!(
                            "the finished run `{name}` was made with another configuration (base settings or `--seed` changed since)"
                        ),
                        format!(
                            "choose a new `--out`, or delete `{}` to rerun it",
                            path.display()
                        ),
                    ));
                }
                if shard.contains(run.index) {
                    state.finished.insert(name.clone());
                }
            }
            None => state.foreign.push(name.clone()),
        }
    }
    for (name, path) in &entries {
        let Some(id) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            continue;
        };
        if grid.get(id).is_none_or(|run| shard.contains(run.index)) {
            std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
            state.removed_partial.push(id.to_string());
        }
    }
    Ok(state)
}

fn read_record(dir: &Path) -> Result<RunRecord> {
    let path = dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        invalid(
            path.display().to_string(),
            format!("not a run description: {e}"),
            "the run directory is damaged: delete it and rerun the sweep with `--resume`",
        )
    })
}

/// Runs one run of a sweep and writes it atomically as `DIR/runs/<id>/`; returns that directory.
pub fn run_and_write(
    out: &Path,
    run: &SweepRun,
    device: &Device,
    progress: &mut dyn AuditProgress,
    meta: &RunMetadata,
) -> Result<PathBuf> {
    let runs = runs_dir(out);
    let partial = partial_dir(&runs, &run.id);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    let outcome = run_audit(&run.config, device, progress)?;
    write_audit_report(&partial, &run.config, &outcome, meta)?;
    let record = RunRecord {
        id: run.id.clone(),
        index: run.index,
        axes: run
            .assignment
            .iter()
            .map(|(path, value)| AxisValue {
                path: path.clone(),
                value: toml_to_json(value),
            })
            .collect(),
        seed: run.config.seed,
        config_hash: run.config_hash.clone(),
        fedleak_version: meta.version.clone(),
        seconds: outcome.seconds,
    };
    let json = serde_json::to_string_pretty(&record)
        .map_err(|e| Error::Training(format!("cannot write {RUN_FILE}: {e}")))?;
    write_atomically(&partial.join(RUN_FILE), json.as_bytes())?;
    let done = runs.join(&run.id);
    std::fs::rename(&partial, &done).map_err(|e| Error::io(&done, e))?;
    Ok(done)
}

/// A merged CSV table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedTable {
    /// `run_id`, one column per axis, then the runs' own columns.
    pub header: Vec<String>,
    /// The rows, runs sorted by id, each run's rows in their order.
    pub rows: Vec<Vec<String>>,
}

/// Several runs merged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedRuns {
    /// The runs, sorted by id.
    pub runs: Vec<RunRecord>,
    /// The axis paths (the axis columns), in order of first appearance.
    pub axes: Vec<String>,
    /// Every run's `results.csv`.
    pub results: MergedTable,
    /// Every run's `summary.csv`.
    pub summary: MergedTable,
}

struct LoadedRun {
    dir: PathBuf,
    record: RunRecord,
    files: [Vec<u8>; 3],
}

fn read_csv(bytes: &[u8], path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let bad = |e: csv::Error| {
        invalid(
            path.display().to_string(),
            format!("not a readable CSV file: {e}"),
            "the run directory is damaged: delete it and rerun the sweep with `--resume`",
        )
    };
    let mut reader = csv::Reader::from_reader(bytes);
    let header = reader
        .headers()
        .map_err(bad)?
        .iter()
        .map(String::from)
        .collect();
    let rows = reader
        .records()
        .map(|r| r.map(|r| r.iter().map(String::from).collect()))
        .collect::<std::result::Result<_, _>>()
        .map_err(bad)?;
    Ok((header, rows))
}

fn axis_cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn merge_table(
    runs: &[LoadedRun],
    file: usize,
    name: &str,
    axes: &[String],
) -> Result<MergedTable> {
    let mut parsed = Vec::with_capacity(runs.len());
    let mut columns: Vec<String> = Vec::new();
    for run in runs {
        let (header, rows) = read_csv(&run.files[file], &run.dir.join(name))?;
        for column in &header {
            if !columns.contains(column) {
                columns.push(column.clone());
            }
        }
        parsed.push((header, rows));
    }
    let axis_columns: Vec<String> = axes
        .iter()
        .map(|a| {
            if columns.contains(a) || a == "run_id" {
                format!("sweep:{a}")
            } else {
                a.clone()
            }
        })
        .collect();
    let mut header = vec!["run_id".to_string()];
    header.extend(axis_columns);
    header.extend(columns.iter().cloned());
    let mut rows = Vec::new();
    for (run, (run_header, run_rows)) in runs.iter().zip(parsed) {
        let position: Vec<Option<usize>> = columns
            .iter()
            .map(|c| run_header.iter().position(|h| h == c))
            .collect();
        let axis_cells: Vec<String> = axes
            .iter()
            .map(|a| {
                run.record
                    .axes
                    .iter()
                    .find(|v| &v.path == a)
                    .map(|v| axis_cell(&v.value))
                    .unwrap_or_default()
            })
            .collect();
        for row in run_rows {
            let mut merged = vec![run.record.id.clone()];
            merged.extend(axis_cells.iter().cloned());
            merged.extend(
                position
                    .iter()
                    .map(|p| p.and_then(|p| row.get(p).cloned()).unwrap_or_default()),
            );
            rows.push(merged);
        }
    }
    Ok(MergedTable { header, rows })
}

/// Merges finished run directories (`.../runs/<id>/`): a run id found twice is kept once when both copies
/// are identical and is an error otherwise.
pub fn merge_runs(run_dirs: &[PathBuf]) -> Result<MergedRuns> {
    let mut by_id: BTreeMap<String, LoadedRun> = BTreeMap::new();
    for dir in run_dirs {
        let record = read_record(dir)?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if record.id != name {
            return Err(invalid(
                dir.display().to_string(),
                format!("the directory holds run `{}` ({RUN_FILE})", record.id),
                "run directories keep the name `fedleak sweep` gave them; rename it back",
            ));
        }
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| Error::io(&path, e))
        };
        let files = [read(RUN_FILE)?, read("results.csv")?, read("summary.csv")?];
        if let Some(seen) = by_id.get(&record.id) {
            if seen.files != files {
                return Err(invalid(
                    "--merge",
                    format!(
                        "run `{}` is in `{}` and in `{}` with different contents",
                        record.id,
                        seen.dir.display(),
                        dir.display()
                    ),
                    "merge the outputs of one sweep (its shards); to compare two executions, merge each separately",
                ));
            }
            continue;
        }
        by_id.insert(
            record.id.clone(),
            LoadedRun {
                dir: dir.clone(),
                record,
                files,
            },
        );
    }
    let runs: Vec<LoadedRun> = by_id.into_values().collect();
    let mut axes: Vec<String> = Vec::new();
    for run in &runs {
        for axis in &run.record.axes {
            if !axes.contains(&axis.path) {
                axes.push(axis.path.clone());
            }
        }
    }
    Ok(MergedRuns {
        results: merge_table(&runs, 1, "results.csv", &axes)?,
        summary: merge_table(&runs, 2, "summary.csv", &axes)?,
        runs: runs.into_iter().map(|r| r.record).collect(),
        axes,
    })
}

fn table_csv(table: &MergedTable, what: &str) -> Result<Vec<u8>> {
    let fail = |e: &dyn std::fmt::Display| Error::Training(format!("cannot write {what}: {e}"));
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(&table.header).map_err(|e| fail(&e))?;
    for row in &table.rows {
        writer.write_record(row).map_err(|e| fail(&e))?;
    }
    writer.into_inner().map_err(|e| fail(&e))
}

/// Writes `results.csv`, `summary.csv` and `report.html` (a table of the merged summary) under `out`.
pub fn write_merged(out: &Path, merged: &MergedRuns, meta: &RunMetadata) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_atomically(
        &out.join("results.csv"),
        &table_csv(&merged.results, "results.csv")?,
    )?;
    write_atomically(
        &out.join("summary.csv"),
        &table_csv(&merged.summary, "summary.csv")?,
    )?;
    let runs: Vec<serde_json::Value> = merged
        .runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.id,
                "seed": r.seed,
                "seconds": format!("{:.1}", r.seconds),
                "axes": merged.axes.iter().map(|a| {
                    r.axes.iter().find(|v| &v.path == a).map(|v| axis_cell(&v.value)).unwrap_or_default()
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut env = minijinja::Environment::new();
    env.add_template("merged.html", MERGED_TEMPLATE)
        .map_err(|e| Error::Training(format!("the merged report template is invalid: {e}")))?;
    let html = env
        .get_template("merged.html")
        .and_then(|t| {
            t.render(minijinja::context! {
                meta => meta,
                axes => merged.axes,
                runs => runs,
                header => merged.summary.header,
                rows => merged.summary.rows,
            })
        })
        .map_err(|e| Error::Training(format!("cannot render the merged report.html: {e}")))?;
    write_atomically(&out.join("report.html"), html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
data = "fixture:ihc-tiles-32"
model = "vit-nano-32"
[fl]
rounds = 1
[[schemes]]
id = "none"
[[schemes]]
id = "dp"
"#;

    #[test]
    fn grid_order_ids_and_shards() {
        let text = format!(
            "{BASE}\n[sweep]\n\"schemes.1.noise_multiplier\" = [0.1, 1.0]\nfl.batch_size = [1, 2, 4]\n"
        );
        let sweep = Sweep::from_toml(&text, "s.toml", None).unwrap();
        assert_eq!(sweep.runs.len(), 6);
        // Sorted axes, last fastest.
        assert_eq!(sweep.axes[0].path, "fl.batch_size");
        assert_eq!(sweep.runs[1].config.fl.batch_size, 1);
        assert_eq!(sweep.runs[2].config.fl.batch_size, 2);
        assert!(sweep.runs[1]
            .id
            .starts_with("fl.batch_size=1,schemes.1.noise_multiplier=1.0-"));
        // Ids do not depend on the grid position.
        let bigger =
            Sweep::from_toml(&text.replace("[1, 2, 4]", "[8, 1, 2, 4]"), "s.toml", None).unwrap();
        assert!(bigger.runs.iter().any(|r| r.id == sweep.runs[0].id));
        let shards: Vec<usize> = (1..=4)
            .map(|k| sweep.shard(Shard { index: k, count: 4 }).len())
            .collect();
        assert_eq!(shards, [2, 2, 1, 1]);
        assert!("0/3".parse::<Shard>().is_err());
        assert!("4/3".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        assert_eq!(
            "3/3".parse::<Shard>().unwrap(),
            Shard { index: 3, count: 3 }
        );
    }

    #[test]
    fn bad_axes_name_the_axis() {
        for (axis, needle) in [
            ("\"fl.batch_sizee\" = [1]", "fl.batch_sizee"),
            (
                "\"schemes.5.noise_multiplier\" = [1.0]",
                "schemes.5.noise_multiplier",
            ),
            ("\"seed.x\" = [1]", "seed.x"),
            ("\"fl.batch_size\" = [\"four\"]", "fl.batch_size"),
            ("\"fl.batch_size\" = [0]", "sweep"),
            ("\"fl.batch_size\" = []", "sweep"),
            (
                "\"schemes.0.noise_multiplier\" = [1.0]",
                "schemes.0.noise_multiplier",
            ),
        ] {
            let text = format!("{BASE}\n[sweep]\n{axis}\n");
            let err = Sweep::from_toml(&text, "s.toml", None).unwrap_err();
            assert!(err.is_user_error());
            assert!(err.to_string().contains(needle), "{axis}: {err}");
        }
        let err = Sweep::from_toml(BASE, "s.toml", None).unwrap_err();
        assert!(err.to_string().contains("`sweep`"), "{err}");
    }
}
