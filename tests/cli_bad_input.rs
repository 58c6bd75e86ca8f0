//! Every bad input named in the foundation issue gives a clear message naming the file or option, a hint,
//! exit code 2, and no panic.

mod util;

use std::io::{Read, Write};
use std::path::Path;

use util::{assert_bad_input, fedleak, small_image_folder};

const FAST: &[&str] = &["--rounds", "1", "--batch-size", "4"];

fn train_on(dir: &std::path::Path, data: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--data", data, "--out", "out"];
    args.extend_from_slice(FAST);
    if !extra.contains(&"--model") {
        args.extend_from_slice(&["--model", "vit-micro-32"]);
    }
    args.extend_from_slice(extra);
    fedleak(dir, &args)
}

#[test]
fn corrupt_png_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_image_folder(tmp.path(), 5);
    let bad = data.join("1").join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n this is not a png").unwrap();
    let out = train_on(tmp.path(), data.to_str().unwrap(), &[]);
    assert_bad_input(&out, &["broken.png", "cannot decode image"]);
}

#[test]
fn directory_without_images_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("cats")).unwrap();
    std::fs::write(empty.join("cats").join("notes.txt"), "no images here").unwrap();
    let out = train_on(tmp.path(), empty.to_str().unwrap(), &[]);
    assert_bad_input(&out, &["empty"]);
}

#[test]
fn one_unreadable_file_in_a_class_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_image_folder(tmp.path(), 5);
    let bad = data.join("2").join("truncated.jpg");
    std::fs::write(&bad, [0xFF, 0xD8, 0xFF, 0xE0, 0x00]).unwrap();
    let out = train_on(tmp.path(), data.to_str().unwrap(), &[]);
    assert_bad_input(&out, &["truncated.jpg"]);
}

#[test]
fn npz_missing_a_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let source = util::repo().join("fixtures/mnist5k-medmnist-layout.npz");
    let mut reader = zip::ZipArchive::new(std::fs::File::open(source).unwrap()).unwrap();
    let target = tmp.path().join("partial.npz");
    let mut writer = zip::ZipWriter::new(std::fs::File::create(&target).unwrap());
    for i in 0..reader.len() {
        let mut entry = reader.by_index(i).unwrap();
        if entry.name() == "test_labels.npy" {
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        writer
            .start_file(
                entry.name().to_string(),
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
        writer.write_all(&bytes).unwrap();
    }
    writer.finish().unwrap();
    let out = train_on(tmp.path(), "medmnist:partial.npz", &[]);
    assert_bad_input(&out, &["partial.npz", "test_labels"]);
}

#[test]
fn more_clients_than_images_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_image_folder(tmp.path(), 5);
    let out = train_on(tmp.path(), data.to_str().unwrap(), &["--clients", "50"]);
    assert_bad_input(&out, &["`clients`", "50"]);
}

#[test]
fn unknown_fixture_lists_the_choices() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_on(tmp.path(), "fixture:ihc-tiles", &[]);
    assert_bad_input(&out, &["ihc-tiles-32"]);
}

#[test]
fn unknown_model_lists_the_presets() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fedleak(tmp.path(), &["train", "--model", "vit-huge", "--out", "o"]);
    assert_bad_input(&out, &["vit-huge", "vit-tiny-32"]);
}

#[test]
fn cuda_without_the_feature_says_how_to_build() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fedleak(tmp.path(), &["--device", "cuda", "train", "--out", "o"]);
    assert_bad_input(&out, &["--device cuda", "--features cuda"]);
}

/// Writes a vit-micro-32 checkpoint with `fedleak train` and returns its directory.
fn trained_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    let data = small_image_folder(dir, 6);
    let out = train_on(dir, data.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", util::stderr(&out));
    dir.join("out").join("model")
}

#[test]
fn checkpoint_with_wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trained_checkpoint(tmp.path());
    let config_path = model.join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let data = tmp.path().join("digits");
    let out = train_on(
        tmp.path(),
        data.to_str().unwrap(),
        &["--model", model.to_str().unwrap()],
    );
    assert_bad_input(
        &out,
        &["model.safetensors", "shape mismatch", "intermediate.dense"],
    );
}

#[test]
fn checkpoint_with_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trained_checkpoint(tmp.path());
    let weights = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    tensors.remove("classifier.bias").unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let data = tmp.path().join("digits");
    let out = train_on(
        tmp.path(),
        data.to_str().unwrap(),
        &["--model", model.to_str().unwrap()],
    );
    assert_bad_input(&out, &["missing tensor `classifier.bias`"]);
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trained_checkpoint(tmp.path());
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let data = tmp.path().join("digits");
    let out = train_on(
        tmp.path(),
        data.to_str().unwrap(),
        &["--model", model.to_str().unwrap()],
    );
    assert_bad_input(&out, &["model.safetensors", "truncated"]);
}

#[test]
fn invalid_partition_and_rounds_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_on(tmp.path(), "fixture:digits-8x8", &["--partition", "zipf"]);
    assert_bad_input(&out, &["zipf"]);
    let out = train_on(tmp.path(), "fixture:digits-8x8", &["--capture-rounds", "5"]);
    assert_bad_input(&out, &["capture-rounds"]);
}

#[test]
fn optimizer_settings_the_plan_would_not_apply_are_refused() {
    // AdamW's weight decay under local SGD or FedSGD, and momentum under AdamW or FedSGD, would be
    // silently dropped: a reviewer reading the command would believe they shaped the updates.
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--optimizer", "sgd", "--weight-decay", "0.1"],
            &["weight-decay", "FedAvg with local SGD decays no weights"],
        ),
        (
            &["--algorithm", "fedsgd", "--weight-decay", "0.05"],
            &["weight-decay", "FedSGD"],
        ),
        (
            &["--optimizer", "adamw", "--momentum", "0.9"],
            &["momentum", "FedAvg with local AdamW takes no momentum"],
        ),
        (
            &["--algorithm", "fedsgd", "--momentum", "0.5"],
            &["momentum", "FedSGD"],
        ),
    ];
    for (extra, needles) in cases {
        let out = train_on(tmp.path(), "fixture:digits-8x8", extra);
        assert_bad_input(&out, needles);
        assert!(!tmp.path().join("out").exists(), "{extra:?} wrote output");
    }
    // What each plan applies is accepted, zero included.
    let out = train_on(
        tmp.path(),
        "fixture:digits-8x8",
        &[
            "--optimizer",
            "sgd",
            "--momentum",
            "0.9",
            "--weight-decay",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", util::stderr(&out));
}

#[test]
fn bench_settings_with_nothing_to_time_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    for (option, value) in [
        ("--batch", "0"),
        ("--iters", "0"),
        ("--concurrent", "0"),
        ("--local-lr", "0"),
    ] {
        let out = fedleak(
            tmp.path(),
            &[
                "bench",
                "--step",
                "attack",
                "--model",
                "vit-nano-32",
                option,
                value,
            ],
        );
        assert_bad_input(&out, &[option]);
    }
}

/// An attack step far beyond any machine's memory (ViT-B/16 at batch 256 for the exact double
/// backward, at batch 4096 for the finite-difference step: terabytes by the measured estimates) is
/// refused before anything is allocated, naming the step and the way around the check, instead of
/// being killed by the kernel part-way.
#[cfg(target_os = "linux")]
#[test]
fn an_attack_step_beyond_memory_is_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    for (step, batch) in [("attack-exact", "256"), ("attack", "4096")] {
        let out = fedleak(
            tmp.path(),
            &[
                "bench",
                "--step",
                step,
                "--model",
                "vit-b16-224",
                "--batch",
                batch,
            ],
        );
        assert_bad_input(&out, &["--step", "GB", "FEDLEAK_SKIP_MEMORY_CHECK"]);
    }
}

#[test]
fn a_corrupt_capture_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_on(tmp.path(), "fixture:digits-8x8", &["--clients", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let capture = tmp.path().join("out/captures/round-0001/client-0");
    let sidecar = capture.join("update.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    meta["momentum"] = serde_json::json!(1.5);
    std::fs::write(&sidecar, meta.to_string()).unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "attack",
            "--capture",
            "out/captures/round-0001/client-0",
            "--attack",
            "april",
            "--out",
            "refused",
        ],
    );
    assert_bad_input(&out, &["update.json", "momentum 1.5"]);
    assert!(!tmp.path().join("refused").exists());

    // A truncated upload is named by its file, whichever attack reads it.
    let weights = tmp
        .path()
        .join("out/captures/round-0001/client-1/update.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    for attack in ["auto", "idlg"] {
        let out = fedleak(
            tmp.path(),
            &[
                "attack",
                "--capture",
                "out/captures/round-0001/client-1",
                "--attack",
                attack,
                "--out",
                "refused",
            ],
        );
        assert_bad_input(
            &out,
            &["client-1/update.safetensors", "not a readable safetensors"],
        );
        assert!(!tmp.path().join("refused").exists());
    }

    // An aggregate's holdings that do not fit its clients (its attack weights).
    let aggregate = tmp
        .path()
        .join("out/captures/round-0001/aggregate/update.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&aggregate).unwrap()).unwrap();
    meta["aggregate_samples"] = serde_json::json!([3]);
    std::fs::write(&aggregate, meta.to_string()).unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "attack",
            "--capture",
            "out/captures/round-0001/aggregate",
            "--out",
            "refused",
        ],
    );
    assert_bad_input(&out, &["aggregate/update.json", "aggregate_samples [3]"]);
    assert!(!tmp.path().join("refused").exists());
}

#[test]
fn private_data_is_recorded_absolute_and_moved_data_stops_the_attack_before_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_image_folder(tmp.path(), 5);
    // Given relative, recorded absolute.
    let out = train_on(
        tmp.path(),
        "digits",
        &["--clients", "2", "--algorithm", "fedsgd"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/train.json")).unwrap())
            .unwrap();
    let recorded = record["data"]
        .as_str()
        .unwrap()
        .strip_prefix("folder:")
        .unwrap();
    assert!(Path::new(recorded).is_absolute(), "{recorded}");
    // Compared resolved: the working directory fedleak reads may spell a symlinked temp dir
    // differently.
    assert_eq!(
        std::fs::canonicalize(recorded).unwrap(),
        std::fs::canonicalize(&data).unwrap()
    );
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let attack = |out_dir: &str| {
        fedleak(
            &elsewhere,
            &[
                "attack",
                "--capture",
                "../out/captures/round-0001/client-0",
                "--attack",
                "ig",
                "--iterations",
                "1",
                "--restarts",
                "1",
                "--quiet",
                "--out",
                out_dir,
            ],
        )
    };
    // From another directory the private images are found and the result scored.
    let scored = attack("scored");
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&scored.stdout).trim()).unwrap();
    assert!(summary["psnr_db_mean"].is_number(), "{summary}");
    // Data moved away after training: the run stops before the attack, nothing written.
    std::fs::rename(&data, tmp.path().join("moved")).unwrap();
    let refused = attack("refused");
    assert_bad_input(&refused, &["digits", "where `fedleak train` read it"]);
    assert!(!elsewhere.join("refused").exists(), "the attack ran first");
}
