//! Feature inversion on a real fixture image: optimising an image so that a seeded-init `vit-micro-32`'s
//! CLS feature matches the private image's CLS feature lowers the feature loss and raises the PSNR over
//! the random start; and the attack declines what it cannot use.

use candle_core::{DType, Device, Tensor};
use fedleak::data::{load_data, DataSpec};
use fedleak::model::{init_parameters, Checkpoint, ModelPreset, PositionEmbeddingKind, VitTarget};
use fedleak_attacks::{
    invert_features, random_images, AttackOutcome, FeatureInversionConfig, FeatureLoss,
    FeatureMatcher, Observation, TargetModel,
};
use fedleak_metrics::{score_pair, ImageDims};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn micro_target(class_names: &[String]) -> VitTarget {
    let cfg = ModelPreset::VitMicro32.config(class_names, PositionEmbeddingKind::Learnable);
    let tensors = init_parameters(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    VitTarget::new(&Checkpoint {
        config: cfg,
        tensors,
    })
}

fn psnr(reference: &Tensor, test: &Tensor) -> f64 {
    let r = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let t = test.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    score_pair(&r, &t, ImageDims::new(3, 32, 32))
        .unwrap()
        .psnr_db
}

#[test]
fn inverting_a_cls_feature_lowers_the_feature_loss_and_raises_psnr_over_the_start() {
    let spec = DataSpec::parse("fixture:ihc-tiles-32").unwrap();
    let cfg = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], Default::default());
    let data = load_data(&spec, cfg.input_shape(), 0).unwrap();
    let target = micro_target(&data.train.class_names);
    let private = Tensor::from_slice(data.train.image(0), (1, 3, 32, 32), &Device::Cpu).unwrap();
    let features = target
        .features(target.parameters(), &private)
        .unwrap()
        .expect("a ViT exposes its CLS features");
    assert_eq!(features.dims(), &[1, 64]);

    let config = FeatureInversionConfig {
        iterations: 200,
        restarts: 1,
        seed: 3,
        ..Default::default()
    };
    // The attack's own start (restart 0 draws from the same seeded stream).
    let start = random_images(&target, 1, &mut StdRng::seed_from_u64(config.seed)).unwrap();
    let matcher = FeatureMatcher::new(&target, &features, config.loss, config.tv_weight)
        .unwrap()
        .unwrap();
    let start_loss = matcher.feature_loss(&start).unwrap();

    let observation = Observation::Features {
        features: features.clone(),
    };
    let AttackOutcome::Reconstructed(rec) =
        invert_features(&observation, &target, &config).unwrap()
    else {
        panic!("feature inversion applies to features");
    };
    assert_eq!(rec.images.dims(), &[1, 3, 32, 32]);
    assert!(rec.labels.is_none());
    let start_psnr = psnr(&private, &start);
    let end_psnr = psnr(&private, &rec.images);
    eprintln!(
        "feature loss {start_loss:.4} -> {:.4}; PSNR {start_psnr:.2} -> {end_psnr:.2} dB in {:.2} s",
        rec.objective, rec.seconds
    );
    assert!(
        rec.objective < 0.2 * start_loss,
        "feature loss {start_loss} -> {}",
        rec.objective
    );
    assert!(
        end_psnr > start_psnr + 3.0,
        "PSNR {start_psnr} -> {end_psnr} dB"
    );
}

#[test]
fn cosine_loss_also_decreases_and_restarts_keep_the_best_row() {
    let spec = DataSpec::parse("fixture:ihc-tiles-32").unwrap();
    let cfg = ModelPreset::VitNano32.config(&["a".into(), "b".into()], Default::default());
    let data = load_data(&spec, cfg.input_shape(), 0).unwrap();
    let tensors = init_parameters(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let target = VitTarget::new(&Checkpoint {
        config: cfg,
        tensors,
    });
    let mut pixels = data.train.image(0).to_vec();
    pixels.extend_from_slice(data.train.image(1));
    let private = Tensor::from_vec(pixels, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let features = target
        .features(target.parameters(), &private)
        .unwrap()
        .unwrap();
    let config = FeatureInversionConfig {
        iterations: 80,
        restarts: 2,
        loss: FeatureLoss::Cosine,
        seed: 5,
        ..Default::default()
    };
    let matcher = FeatureMatcher::new(&target, &features, config.loss, config.tv_weight)
        .unwrap()
        .unwrap();
    let start = random_images(&target, 2, &mut StdRng::seed_from_u64(5)).unwrap();
    let start_loss = matcher.feature_loss(&start).unwrap();
    let AttackOutcome::Reconstructed(rec) =
        invert_features(&Observation::Features { features }, &target, &config).unwrap()
    else {
        panic!("feature inversion applies to features");
    };
    assert_eq!(rec.images.dims(), &[2, 3, 32, 32]);
    assert_eq!(rec.restarts, 2);
    // The reported objective is the feature loss of the returned images.
    let recomputed = matcher.feature_loss(&rec.images).unwrap();
    assert!(
        (recomputed - rec.objective).abs() < 1e-4,
        "{recomputed} vs {}",
        rec.objective
    );
    assert!(
        rec.objective < 0.5 * start_loss,
        "{start_loss} -> {}",
        rec.objective
    );
}

#[test]
fn ciphertexts_updates_and_mismatched_features_are_declined() {
    let target = micro_target(&["a".into(), "b".into()]);
    let config = FeatureInversionConfig::default();
    let seen = Observation::Ciphertext {
        description: "GLWE N=2048".into(),
    };
    assert!(matches!(
        invert_features(&seen, &target, &config).unwrap(),
        AttackOutcome::NotApplicable { .. }
    ));
    let wrong = Observation::Features {
        features: Tensor::ones((1, 5), DType::F32, &Device::Cpu).unwrap(),
    };
    let err = invert_features(&wrong, &target, &config).unwrap_err();
    assert!(err.to_string().contains("64"), "{err}");
    let zero = Observation::Features {
        features: Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap(),
    };
    assert!(invert_features(&zero, &target, &config).is_err());
}
