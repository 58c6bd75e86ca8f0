//! `fedleak train` and `fedleak metrics` end to end: learning, determinism, captures, checkpoints.

mod util;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fedleak::data::{load_data, DataSpec};
use fedleak::fl::read_capture;
use fedleak::model::{cross_entropy, init_parameters, one_hot, ModelPreset, PositionEmbeddingKind};
use util::{fedleak, stderr, stdout};

fn read_rows(path: &Path) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn fedavg_on_ihc_learns_and_captures_what_clients_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "train",
            "--model",
            "vit-micro-32",
            "--rounds",
            "8",
            "--lr",
            "5e-4",
            "--capture-rounds",
            "1,8",
            "--out",
            "run",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let accuracy = summary["final_test_accuracy"].as_f64().unwrap();
    assert!(
        accuracy >= 0.85,
        "FedAvg on ihc-tiles-32 reached only {accuracy}"
    );
    let rows = read_rows(&tmp.path().join("run/rounds.csv"));
    assert_eq!(rows.len(), 8);
    for column in [
        "test_accuracy",
        "upload_bytes_per_client",
        "download_bytes_per_client",
        "round_seconds",
    ] {
        assert!(rows[0].contains_key(column), "rounds.csv lacks {column}");
    }
    for round in ["round-0001", "round-0008"] {
        for client in 0..3 {
            let dir = tmp
                .path()
                .join(format!("run/captures/{round}/client-{client}"));
            let meta: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("update.json")).unwrap())
                    .unwrap();
            let bytes = std::fs::metadata(dir.join("update.safetensors"))
                .unwrap()
                .len();
            assert_eq!(
                meta["upload_bytes"].as_u64().unwrap(),
                bytes,
                "upload cost is the wire size"
            );
            assert_eq!(meta["update_kind"], "weight_delta");
            assert_eq!(meta["scheme"], "none");
            assert!(tmp
                .path()
                .join(format!("run/private/{round}/client-{client}.json"))
                .is_file());
        }
    }
    let upload: u64 = rows[0]["upload_bytes_per_client"].parse().unwrap();
    let update = std::fs::metadata(
        tmp.path()
            .join("run/captures/round-0001/client-0/update.safetensors"),
    )
    .unwrap();
    assert_eq!(upload, update.len());
    let private_in_captures = walk(&tmp.path().join("run/captures"))
        .into_iter()
        .any(|p| p.to_string_lossy().contains("private"));
    assert!(
        !private_in_captures,
        "the private batch must stay out of captures/"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

#[test]
fn same_seed_gives_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = fedleak(
            tmp.path(),
            &[
                "--seed",
                "5",
                "train",
                "--data",
                "fixture:digits-8x8",
                "--model",
                "vit-micro-32",
                "--rounds",
                "2",
                "--partition",
                "dirichlet:0.5",
                "--out",
                name,
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let mut rows = read_rows(&tmp.path().join(name).join("rounds.csv"));
        for row in &mut rows {
            row.remove("round_seconds");
        }
        let update = std::fs::read(
            tmp.path()
                .join(name)
                .join("captures/round-0001/client-2/update.safetensors"),
        )
        .unwrap();
        let partition =
            std::fs::read_to_string(tmp.path().join(name).join("partition.json")).unwrap();
        (rows, update, partition)
    };
    let (a, b) = (run("a"), run("b"));
    assert_eq!(a.0, b.0);
    assert!(a.1 == b.1, "captured updates differ between identical runs");
    assert_eq!(a.2, b.2);
}

#[test]
fn the_attacker_derives_each_local_steps_batch_size_as_the_client_trained() {
    // What the optimisation attacks unroll (CaptureMeta::step_batch_sizes, from the sidecar alone)
    // against the batches the client really took (its private record): epochs end on a remainder
    // batch (111 images in batches of 8: 13 of 8 and one of 7), fixed steps draw a full batch each.
    let tmp = tempfile::tempdir().unwrap();
    for (work, value, steps) in [("--local-epochs", "2", 28), ("--local-steps", "3", 3)] {
        let out = fedleak(
            tmp.path(),
            &[
                "train",
                "--model",
                "vit-nano-32",
                "--clients",
                "4",
                "--rounds",
                "1",
                "--algorithm",
                "fedavg",
                "--optimizer",
                "sgd",
                "--batch-size",
                "8",
                work,
                value,
                "--capture-rounds",
                "1",
                "--out",
                value,
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let capture = read_capture(
            &tmp.path().join(value).join("captures/round-0001/client-0"),
            true,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(capture.meta.num_samples, 111, "{:?}", capture.meta);
        let derived = capture
            .meta
            .step_batch_sizes(capture.meta.num_samples)
            .expect("the steps drew batches of their own");
        let taken: Vec<usize> = capture
            .private
            .unwrap()
            .step_indices
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(derived, taken, "{work} {value}");
        assert_eq!(derived.len(), steps, "{work} {value}");
        let epochs = (work == "--local-epochs").then_some(2);
        assert_eq!(capture.meta.local_epochs, epochs);
        if epochs.is_some() {
            assert_eq!(derived[13], 7, "{derived:?}");
        }
    }
}

#[test]
fn a_single_client_keeps_its_own_capture_beside_the_aggregate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "train",
            "--model",
            "vit-tiny-32",
            "--clients",
            "1",
            "--rounds",
            "1",
            "--algorithm",
            "fedsgd",
            "--batch-size",
            "1",
            "--out",
            "run",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let listed: Vec<&str> = summary["captures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed[0].ends_with("client-0") && listed[1].ends_with("aggregate"));
    let round = tmp.path().join("run/captures/round-0001");
    let sidecar = |party: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(round.join(party).join("update.json")).unwrap(),
        )
        .unwrap()
    };
    assert!(sidecar("client-0").get("aggregate_of").is_none());
    assert_eq!(sidecar("aggregate")["aggregate_of"], serde_json::json!([0]));
    assert_eq!(
        sidecar("aggregate")["aggregate_samples"],
        serde_json::json!([sidecar("client-0")["num_samples"]])
    );
    // FedSGD applies no weight decay (whatever `--weight-decay` says, AdamW's setting).
    assert_eq!(sidecar("client-0")["weight_decay"], serde_json::json!(0.0));
    assert!(tmp
        .path()
        .join("run/private/round-0001/aggregate.json")
        .is_file());
    // The aggregate of one client is that client's update: the single-image closed form applies.
    let attack = fedleak(
        tmp.path(),
        &[
            "--quiet",
            "attack",
            "--capture",
            "run/captures/round-0001/aggregate",
            "--attack",
            "april",
            "--out",
            "april",
        ],
    );
    assert_eq!(attack.status.code(), Some(0), "{}", stderr(&attack));
    let result: serde_json::Value = serde_json::from_str(stdout(&attack).trim()).unwrap();
    assert!(result["psnr_db_mean"].as_f64().unwrap() > 60.0, "{result}");
}

#[test]
fn fedsgd_capture_is_exactly_the_gradient_of_the_private_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "train",
            "--model",
            "vit-micro-32",
            "--algorithm",
            "fedsgd",
            "--rounds",
            "2",
            "--batch-size",
            "4",
            "--capture-rounds",
            "2",
            "--out",
            "run",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let device = Device::Cpu;
    let capture = read_capture(
        &tmp.path().join("run/captures/round-0002/client-1"),
        true,
        &device,
    )
    .unwrap();
    let private = capture.private.clone().expect("private batch recorded");
    assert_eq!(private.step_indices.len(), 1);
    let data = load_data(
        &DataSpec::parse(&private.data).unwrap(),
        capture.global.config.input_shape(),
        1,
    )
    .unwrap();
    let indices = &private.step_indices[0];
    let mut pixels = Vec::new();
    for &i in indices {
        pixels.extend_from_slice(data.train.image(i));
    }
    let images = Tensor::from_vec(pixels, (indices.len(), 3, 32, 32), &device).unwrap();
    let vars: BTreeMap<String, candle_core::Var> = capture
        .global
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), candle_core::Var::from_tensor(v).unwrap()))
        .collect();
    let model = fedleak::model::Checkpoint {
        config: capture.global.config.clone(),
        tensors: vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
    }
    .model()
    .unwrap();
    let target = one_hot(&private.step_labels[0], 2, DType::F32, &device).unwrap();
    let grads = cross_entropy(&model.forward(&images).unwrap(), &target)
        .unwrap()
        .backward()
        .unwrap();
    let sent = capture
        .transmission
        .decode_plain("capture", &device)
        .unwrap();
    assert_eq!(sent.len(), vars.len(), "one gradient per parameter");
    for (name, var) in &vars {
        let expected = grads.get(var.as_tensor()).unwrap();
        let diff = (expected - &sent[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-6,
            "`{name}` differs from the recomputed gradient by {diff}"
        );
    }
}

#[test]
fn huggingface_layout_checkpoint_loads_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf-vit");
    std::fs::create_dir_all(&dir).unwrap();
    // config.json exactly as transformers' ViTConfig.save_pretrained writes it (keys fedleak ignores included).
    let config = r#"{
  "_name_or_path": "my-org/vit-ihc",
  "architectures": ["ViTForImageClassification"],
  "attention_probs_dropout_prob": 0.0,
  "encoder_stride": 8,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.0,
  "hidden_size": 64,
  "id2label": {"0": "dab_negative", "1": "dab_positive"},
  "image_size": 32,
  "initializer_range": 0.02,
  "intermediate_size": 128,
  "label2id": {"dab_negative": 0, "dab_positive": 1},
  "layer_norm_eps": 1e-12,
  "model_type": "vit",
  "num_attention_heads": 4,
  "num_channels": 3,
  "num_hidden_layers": 2,
  "patch_size": 8,
  "problem_type": "single_label_classification",
  "qkv_bias": true,
  "torch_dtype": "float32",
  "transformers_version": "4.46.3"
}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let cfg = ModelPreset::VitMicro32.config(
        &["dab_negative".into(), "dab_positive".into()],
        PositionEmbeddingKind::Learnable,
    );
    let mut tensors: std::collections::HashMap<String, Tensor> =
        init_parameters(&cfg, 3, DType::F32, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    // A tensor the classifier does not use (as in checkpoints exported from ViTModel with a pooler).
    tensors.insert(
        "vit.pooler.dense.bias".into(),
        Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "train", "--model", "hf-vit", "--rounds", "1", "--out", "run",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("run/model/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["hidden_size"], 64);
    assert_eq!(saved["id2label"]["1"], "dab_positive");
    let weights = candle_core::safetensors::load(
        tmp.path().join("run/model/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(weights.contains_key("vit.encoder.layer.1.attention.attention.query.weight"));
}

#[test]
fn metrics_command_reproduces_the_scikit_image_oracle() {
    let oracles = util::repo().join("fixtures/oracles");
    let out = fedleak(
        &oracles,
        &["metrics", "rgb_ref.png", "rgb_gauss_noise_0.05.png"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("{\"psnr_db\":"),
        "documented key order: {text}"
    );
    let got: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(oracles.join("oracles.json")).unwrap())
            .unwrap();
    let pair = oracle["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["test_png"] == "rgb_gauss_noise_0.05.png")
        .unwrap();
    let expect = &pair["u8"];
    let close = |a: &serde_json::Value, b: &serde_json::Value, tol: f64| {
        (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < tol
    };
    assert!(close(&got["psnr_db"], &expect["psnr_dr1"], 1e-3));
    assert!(close(&got["ssim"], &expect["ssim_wang_gaussian"], 1e-4));
    assert!(close(
        &got["ssim_skimage"],
        &expect["ssim_skimage_default"],
        1e-4
    ));
    assert!(close(
        &got["nmi_studholme"],
        &expect["nmi_skimage_studholme_bins100"],
        1e-4
    ));
    let identical = fedleak(&oracles, &["metrics", "rgb_ref.png", "rgb_ref.png"]);
    assert!(stdout(&identical).contains("\"psnr_db\":\"inf\""));
}

#[test]
fn an_aggregate_of_unequal_holdings_under_local_epochs_is_modelled_with_each_clients_own_steps() {
    // Dirichlet(0.3) over four clients deals them 32, 162, 51 and 199 of the fixture's 444 training
    // tiles (seed 1): with batches of 64 and two epochs the first and third train twice on one
    // batch of all they hold, the others pass over theirs in batches of 64, 64 and 34 (six steps)
    // and 64, 64, 64 and 7 (eight). The server's view of the aggregate must unroll each client
    // exactly as its own capture records its steps.
    let tmp = tempfile::tempdir().unwrap();
    let out = fedleak(
        tmp.path(),
        &[
            "train",
            "--model",
            "vit-micro-32",
            "--clients",
            "4",
            "--rounds",
            "1",
            "--algorithm",
            "fedavg",
            "--optimizer",
            "sgd",
            "--lr",
            "0.01",
            "--local-epochs",
            "2",
            "--batch-size",
            "64",
            "--partition",
            "dirichlet:0.3",
            "--out",
            "run",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let round = tmp.path().join("run/captures/round-0001");
    let device = Device::Cpu;
    let aggregate = read_capture(&round.join("aggregate"), false, &device).unwrap();
    let held = aggregate.meta.client_samples();
    assert_eq!(held, vec![32, 162, 51, 199], "the partition changed");
    // The plan's batch size, not the first client's (it holds 32), and the most steps any took.
    assert_eq!(aggregate.meta.batch_size, 64);
    assert_eq!(aggregate.meta.local_steps, 8);
    let observation = fedleak::audit::observation_of(&aggregate, &device).unwrap();
    let view = observation.update_view().unwrap();
    assert_eq!(view.clients.len(), 4);
    for (k, client) in view.clients.iter().enumerate() {
        let own = read_capture(&round.join(format!("client-{k}")), true, &device).unwrap();
        let own_batches: Vec<usize> = own
            .private
            .unwrap()
            .step_indices
            .iter()
            .map(Vec::len)
            .collect();
        let modelled: Vec<usize> = client.steps.iter().map(|range| range.len()).collect();
        assert_eq!(modelled, own_batches, "client {k}");
        assert_eq!(own.meta.local_steps, modelled.len(), "client {k}");
        assert_eq!(aggregate.meta.client_local_steps(held[k]), modelled.len());
        assert!((client.weight - held[k] as f64 / 444.0).abs() < 1e-12);
    }
    // A Repeated client's steps all train on its one batch; the others' on batches of their own.
    assert!(view.clients[0].steps.iter().all(|r| *r == (0..32)));
    assert_eq!(view.images, 32 + 2 * 162 + 51 + 2 * 199);
}
