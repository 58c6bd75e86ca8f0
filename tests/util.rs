//! Helpers for end-to-end tests: run the built `fedleak` binary in a fresh temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (fixtures live under it).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `fedleak ARGS` in `dir` with progress and colours off.
pub fn fedleak(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedleak"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        .env_remove("FEDLEAK_SKIP_MEMORY_CHECK")
        .output()
        .expect("the fedleak binary runs")
}

/// stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts a bad-input failure: exit code 2, every `needles` in stderr, a hint, and no panic or backtrace.
pub fn assert_bad_input(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "expected exit code 2, stderr:\n{err}"
    );
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    }
    assert!(err.contains("hint:"), "stderr has no hint:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A small ImageFolder (`label/*.png`) copied from the digits fixture: `per_class` images of 3 classes.
pub fn small_image_folder(root: &Path, per_class: usize) -> PathBuf {
    let data = root.join("digits");
    for label in ["0", "1", "2"] {
        let from = repo().join("fixtures/digits-8x8").join(label);
        let to = data.join(label);
        std::fs::create_dir_all(&to).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&from)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files.iter().take(per_class) {
            std::fs::copy(file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
    data
}
