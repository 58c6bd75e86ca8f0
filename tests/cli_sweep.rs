//! `fedleak sweep` and `fedleak report --merge` end to end: resuming after a SIGKILL, sharding and merging,
//! and bad sweep files or options.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::{assert_bad_input, fedleak, stderr, stdout};

/// A cheap audit (nano model, two schemes, the closed-form attack) swept over 3 noise levels: 3 runs of
/// about half a second each (5 rounds, so that a run is long enough to be killed in the middle of).
const SWEEP: &str = r#"
data = "fixture:ihc-tiles-32"
model = "vit-nano-32"
seed = 7

[fl]
clients = 3
rounds = 5
algorithm = "fedsgd"
batch_size = 1
lr = 0.05
capture_rounds = [1]

[attack]
kinds = ["april"]
clients = [0]

[[schemes]]
id = "none"

[[schemes]]
id = "dp"
clip_norm = 1.0
noise_multiplier = 1.0

[sweep]
"schemes.1.noise_multiplier" = [0.01, 0.1, 1.0]
"fl.batch_size" = [1]
"#;

fn write_sweep(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn sweep(dir: &Path, config: &str, out: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["sweep", "--config", config, "--out", out];
    args.extend_from_slice(extra);
    let output = fedleak(dir, &args);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(stdout(&output).trim()).unwrap()
}

/// Finished run directories (names not starting with `.`) and leftover `.partial` ones under `runs/`.
fn run_dirs(out: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut finished = BTreeSet::new();
    let mut partial = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(out.join("runs")) else {
        return (finished, partial);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            partial.insert(name);
        } else {
            finished.insert(name);
        }
    }
    (finished, partial)
}

type Table = (Vec<String>, Vec<Vec<String>>);

fn read_csv(path: &Path) -> Table {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader.headers().unwrap().iter().map(String::from).collect();
    let rows = reader
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

/// The table without its timing columns (names ending `_seconds`), which differ between executions.
fn without_timings((header, rows): Table) -> Table {
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !header[i].ends_with("_seconds"))
        .collect();
    (
        keep.iter().map(|&i| header[i].clone()).collect(),
        rows.iter()
            .map(|row| keep.iter().map(|&i| row[i].clone()).collect())
            .collect(),
    )
}

fn assert_same_tables(a: &Path, b: &Path) {
    for file in ["results.csv", "summary.csv"] {
        let (left, right) = (
            without_timings(read_csv(&a.join(file))),
            without_timings(read_csv(&b.join(file))),
        );
        assert_eq!(left.0, right.0, "{file}: headers differ");
        assert!(!left.1.is_empty(), "{file} of {} is empty", a.display());
        assert_eq!(left.1, right.1, "{file}: rows differ");
    }
}

#[test]
fn sigkilled_sweep_resumes_skipping_finished_runs_and_matches_a_fresh_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_sweep(tmp.path(), "sweep.toml", SWEEP);
    let killed = tmp.path().join("killed");

    let mut child = Command::new(env!("CARGO_BIN_EXE_fedleak"))
        .args(["--quiet", "sweep", "--config", &config, "--out", "killed"])
        .current_dir(tmp.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let finished_at_kill = loop {
        let (finished, _) = run_dirs(&killed);
        if !finished.is_empty() {
            child.kill().unwrap(); // SIGKILL on Unix: no cleanup of any kind.
            child.wait().unwrap();
            break finished;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the sweep exited ({status}) before finishing a run");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no run finished in 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        finished_at_kill.len() < 3,
        "the sweep finished before it was killed"
    );
    // Every run directory under its final name is complete.
    for id in &finished_at_kill {
        for file in [
            "run.json",
            "results.csv",
            "summary.csv",
            "audit.json",
            "report.html",
        ] {
            assert!(
                killed.join("runs").join(id).join(file).is_file(),
                "{id}/{file}"
            );
        }
    }

    // Without --resume the finished runs are never overwritten.
    let refused = fedleak(
        tmp.path(),
        &["sweep", "--config", &config, "--out", "killed"],
    );
    assert_bad_input(&refused, &["--out", "--resume"]);

    let resumed = sweep(tmp.path(), &config, "killed", &["--resume"]);
    assert_eq!(resumed["runs"], 3);
    assert_eq!(resumed["skipped"], finished_at_kill.len());
    assert_eq!(resumed["ran"], 3 - finished_at_kill.len());
    let (finished, partial) = run_dirs(&killed);
    assert_eq!(finished.len(), 3);
    assert!(finished_at_kill.is_subset(&finished));
    assert!(partial.is_empty(), "leftover partial runs: {partial:?}");

    // Every run exactly once in the merged summary, with exactly its own rows.
    let (header, rows) = read_csv(&killed.join("summary.csv"));
    assert_eq!(
        header[..3],
        ["run_id", "fl.batch_size", "schemes.1.noise_multiplier"]
    );
    let mut rows_per_run: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        *rows_per_run.entry(row[0].clone()).or_default() += 1;
    }
    assert_eq!(
        rows_per_run.keys().cloned().collect::<BTreeSet<_>>(),
        finished
    );
    for (id, count) in &rows_per_run {
        let own = read_csv(&killed.join("runs").join(id).join("summary.csv")).1;
        assert_eq!(*count, own.len(), "{id}");
    }

    // Same rows as a fresh, uninterrupted sweep, timings aside.
    let fresh = sweep(tmp.path(), &config, "fresh", &[]);
    assert_eq!(
        (fresh["ran"].as_u64(), fresh["skipped"].as_u64()),
        (Some(3), Some(0))
    );
    assert_same_tables(&killed, &tmp.path().join("fresh"));
}

#[test]
fn shards_merged_with_report_equal_the_unsharded_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_sweep(tmp.path(), "sweep.toml", SWEEP);
    sweep(tmp.path(), &config, "whole", &[]);
    let mut shard_ids = BTreeSet::new();
    for k in 1..=3 {
        let json = sweep(
            tmp.path(),
            &config,
            &format!("d{k}"),
            &["--shard", &format!("{k}/3")],
        );
        assert_eq!(json["runs"], 1, "{json}");
        let (finished, _) = run_dirs(&tmp.path().join(format!("d{k}")));
        assert_eq!(finished.len(), 1);
        shard_ids.extend(finished);
    }
    assert_eq!(shard_ids, run_dirs(&tmp.path().join("whole")).0);

    // d1 twice: an identical copy of a run is merged once.
    let merged = fedleak(
        tmp.path(),
        &["report", "--merge", "d1", "d2", "d3", "d1", "--out", "m"],
    );
    assert!(merged.status.success(), "{}", stderr(&merged));
    let json: serde_json::Value = serde_json::from_str(stdout(&merged).trim()).unwrap();
    assert_eq!(json["runs"], 3);
    let m = tmp.path().join("m");
    assert_same_tables(&m, &tmp.path().join("whole"));
    let html = std::fs::read_to_string(m.join("report.html")).unwrap();
    for id in &shard_ids {
        assert!(html.contains(id.as_str()), "report.html lacks {id}");
    }

    // The same run id with other contents (another execution) is refused.
    let other = tmp.path().join("other/runs");
    std::fs::create_dir_all(&other).unwrap();
    let first = shard_ids.iter().next().unwrap();
    let copy: PathBuf = other.join(first);
    util::copy_tree(&tmp.path().join("whole/runs").join(first), &copy);
    let summary = std::fs::read_to_string(copy.join("summary.csv")).unwrap();
    std::fs::write(
        copy.join("summary.csv"),
        summary.replace("leaks", "resists"),
    )
    .unwrap();
    let clash = fedleak(
        tmp.path(),
        &[
            "report", "--merge", "d1", "d2", "d3", "other", "--out", "m2",
        ],
    );
    assert_bad_input(&clash, &["--merge", first.as_str()]);
}

#[test]
fn bad_sweeps_exit_2_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let base = SWEEP.split("[sweep]").next().unwrap();
    let cases = [
        ("[sweep]\n\"fl.batch_sizee\" = [1]\n", "fl.batch_sizee"),
        (
            "[sweep]\n\"schemes.9.noise_multiplier\" = [0.1]\n",
            "schemes.9.noise_multiplier",
        ),
        (
            "[sweep]\n\"fl.batch_size\" = [1, \"four\"]\n",
            "fl.batch_size",
        ),
        ("[sweep]\n\"fl.batch_size\" = []\n", "sweep"),
        ("[sweep]\n", "sweep"),
        ("", "sweep"),
    ];
    for (i, (table, key)) in cases.iter().enumerate() {
        let config = write_sweep(
            tmp.path(),
            &format!("bad{i}.toml"),
            &format!("{base}{table}"),
        );
        let out = fedleak(tmp.path(), &["sweep", "--config", &config, "--out", "bad"]);
        assert_bad_input(&out, &[key]);
    }
    let config = write_sweep(tmp.path(), "good.toml", SWEEP);
    for shard in ["4/3", "0/3", "two/3"] {
        let out = fedleak(
            tmp.path(),
            &[
                "sweep", "--config", &config, "--shard", shard, "--out", "bad",
            ],
        );
        assert_bad_input(&out, &["--shard"]);
    }
    let out = fedleak(tmp.path(), &["report", "--merge", "nothing", "--out", "m"]);
    assert_bad_input(&out, &["--merge", "nothing"]);
    assert!(
        !tmp.path().join("bad/runs").exists(),
        "bad input started runs"
    );
}
