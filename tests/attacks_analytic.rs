//! The closed-form attacks (APRIL, linear-layer inversion, iDLG, label counts) on true gradients of real
//! fixture images through fedleak's ViT, scored against the private images and labels here, outside the
//! attacks crate.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use fedleak::data::{load_data, DataSpec, Dataset};
use fedleak::model::{
    init_parameters, one_hot, Checkpoint, ModelPreset, PositionEmbeddingKind, VitConfig, VitTarget,
};
use fedleak_attacks::{
    count_labels, infer_label_idlg, invert_patch_embedding, reconstruct_april,
    recover_classifier_input, refine_patches, refine_patches_after_client_steps,
    refine_patches_after_steps, refine_patches_after_steps_on_batches, AttackOutcome, ClientShare,
    FeatureOutcome, GradientMatcher, ImagePrior, InputGradient, LabelCountConfig, LabelOutcome,
    LocalBatches, Observation, ParamMap, ReferenceImages, RefinementStep, TargetModel,
    UpdateSource, BATCH_PATCH_REFINEMENT, SINGLE_IMAGE_PATCH_REFINEMENT,
};
use fedleak_attacks::{
    place_labels_by_unrolling, recover_batch_labels, recover_labels, separate_batch_labels,
    unrolled_label_hypotheses, Separation,
};
use fedleak_metrics::{psnr_db, ImageDims};

fn dataset(spec: &str, cfg: &VitConfig) -> Dataset {
    load_data(&DataSpec::parse(spec).unwrap(), cfg.input_shape(), 1)
        .unwrap()
        .train
}

fn config(preset: ModelPreset, data: &Dataset, positions: PositionEmbeddingKind) -> VitConfig {
    preset.config(&data.class_names, positions)
}

fn target(cfg: &VitConfig, dtype: DType) -> VitTarget {
    VitTarget::new(&Checkpoint {
        config: cfg.clone(),
        tensors: init_parameters(cfg, 5, dtype, &Device::Cpu).unwrap(),
    })
}

/// Images `indices` of `data` as a B x C x H x W tensor.
fn batch(data: &Dataset, indices: &[usize], dtype: DType) -> Tensor {
    let s = data.shape;
    let values: Vec<f32> = indices
        .iter()
        .flat_map(|&i| data.image(i).to_vec())
        .collect();
    Tensor::from_vec(
        values,
        (indices.len(), s.channels, s.height, s.width),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap()
}

/// The true gradient of the mean cross-entropy of `images` with `labels`, by parameter name.
fn true_gradient(target: &VitTarget, images: &Tensor, labels: &[u32]) -> ParamMap {
    gradient_at(target, target.parameters(), images, labels)
}

/// [`true_gradient`] at the parameters `at` instead of the model's own.
fn gradient_at(target: &VitTarget, at: &ParamMap, images: &Tensor, labels: &[u32]) -> ParamMap {
    let vars: BTreeMap<String, Var> = at
        .iter()
        .map(|(name, t)| (name.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let params: ParamMap = vars
        .iter()
        .map(|(name, v)| (name.clone(), v.as_tensor().clone()))
        .collect();
    let targets = one_hot(labels, target.num_classes(), images.dtype(), &Device::Cpu).unwrap();
    let grads = target
        .loss(&params, images, &targets)
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|(name, v)| (name.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

fn fedsgd(update: ParamMap, batch_size: usize) -> Observation {
    Observation::ClientUpdate {
        update,
        source: UpdateSource::Gradient,
        batch_size,
        local_batches: LocalBatches::Repeated,
    }
}

/// The first index of each label in `wanted`, never reusing an index.
fn pick(data: &Dataset, wanted: &[u32]) -> Vec<usize> {
    let mut used = vec![false; data.len()];
    wanted
        .iter()
        .map(|&label| {
            let i = (0..data.len())
                .find(|&i| !used[i] && data.labels[i] == label)
                .unwrap();
            used[i] = true;
            i
        })
        .collect()
}

fn f32_values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn reconstruction(outcome: AttackOutcome) -> fedleak_attacks::Reconstruction {
    match outcome {
        AttackOutcome::Reconstructed(r) => r,
        AttackOutcome::NotApplicable { reason, .. } => panic!("not applicable: {reason}"),
    }
}

fn not_applicable_reason(outcome: AttackOutcome) -> String {
    match outcome {
        AttackOutcome::NotApplicable { attack, reason } => {
            assert_eq!(attack, "april");
            reason
        }
        AttackOutcome::Reconstructed(_) => panic!("expected not applicable"),
    }
}

/// Fraction of `truth` matched by `recovered` as multisets (sum over classes of the smaller count).
fn count_overlap(truth: &[u32], recovered: &[u32], classes: usize) -> usize {
    let counts = |labels: &[u32]| {
        let mut c = vec![0usize; classes];
        labels.iter().for_each(|&l| c[l as usize] += 1);
        c
    };
    let (a, b) = (counts(truth), counts(recovered));
    a.iter().zip(&b).map(|(x, y)| x.min(y)).sum()
}

#[test]
fn april_recovers_a_real_ihc_tile_through_vit_tiny_in_f32() {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(
        ModelPreset::VitTiny32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    let target = target(&cfg, DType::F32);
    let index = 3;
    let image = batch(&data, &[index], DType::F32);
    let label = data.labels[index];
    let gradient = true_gradient(&target, &image, &[label]);
    let dims = ImageDims::new(3, 32, 32);

    let r = reconstruction(reconstruct_april(&fedsgd(gradient.clone(), 1), &target).unwrap());
    assert_eq!(r.images.dims(), &[1, 3, 32, 32]);
    let psnr = psnr_db(data.image(index), &f32_values(&r.images), dims).unwrap();
    println!(
        "april f32 vit-tiny-32: psnr {psnr:.1} dB, bias residual {:.2e}",
        r.objective
    );
    assert!(psnr >= 80.0, "APRIL reached only {psnr} dB");
    assert!(r.objective < 1e-3, "bias residual {}", r.objective);
    assert_eq!(r.labels, Some(vec![label]));

    // The one-step FedAvg delta of plain SGD is -lr times the gradient: the same image.
    let lr = 0.05;
    let delta: ParamMap = gradient
        .iter()
        .map(|(k, g)| (k.clone(), (g * -lr).unwrap()))
        .collect();
    let observation = Observation::ClientUpdate {
        update: delta,
        source: UpdateSource::SgdDelta { lr, local_steps: 1 },
        batch_size: 1,
        local_batches: LocalBatches::Repeated,
    };
    let r = reconstruction(reconstruct_april(&observation, &target).unwrap());
    let psnr_delta = psnr_db(data.image(index), &f32_values(&r.images), dims).unwrap();
    println!("april f32 vit-tiny-32 from a one-step SGD delta: psnr {psnr_delta:.1} dB");
    assert!(psnr_delta >= 80.0, "APRIL on the delta: {psnr_delta} dB");
    assert_eq!(r.labels, Some(vec![label]));

    // Three local steps on the image: each step's token gradients differ, the patches do not, so
    // the summed system is exact again.
    let labels = [label];
    let (_, delta) = sgd_steps(&target, &[(&image, &labels[..]); 3], lr, 0.0);
    let observation = Observation::ClientUpdate {
        update: delta,
        source: UpdateSource::SgdDelta { lr, local_steps: 3 },
        batch_size: 1,
        local_batches: LocalBatches::Repeated,
    };
    let r = reconstruction(reconstruct_april(&observation, &target).unwrap());
    let psnr_steps = psnr_db(data.image(index), &f32_values(&r.images), dims).unwrap();
    println!("april f32 vit-tiny-32 from a 3-step SGD delta: psnr {psnr_steps:.1} dB");
    assert!(
        psnr_steps >= 60.0,
        "APRIL on the 3-step delta: {psnr_steps} dB"
    );
    assert_eq!(r.labels, Some(vec![label]));

    // With momentum the delta is another fixed combination of the steps' gradients, the same in
    // every parameter: exact as well.
    let momentum = 0.9;
    let (_, delta) = sgd_steps(&target, &[(&image, &labels[..]); 3], lr, momentum);
    let observation = Observation::ClientUpdate {
        update: delta,
        source: UpdateSource::MomentumSgdDelta {
            lr,
            momentum,
            local_steps: 3,
        },
        batch_size: 1,
        local_batches: LocalBatches::Repeated,
    };
    let r = reconstruction(reconstruct_april(&observation, &target).unwrap());
    let psnr_momentum = psnr_db(data.image(index), &f32_values(&r.images), dims).unwrap();
    println!("april f32 vit-tiny-32 from a 3-step momentum-SGD delta: psnr {psnr_momentum:.1} dB");
    assert!(
        psnr_momentum >= 60.0,
        "APRIL on the momentum delta: {psnr_momentum} dB"
    );
    assert_eq!(r.labels, Some(vec![label]));

    // Steps on two different images: no one image explains the delta; refused with the reason.
    let other = batch(&data, &[index + 1], DType::F32);
    let other_labels = [data.labels[index + 1]];
    let steps = [
        (&image, &labels[..]),
        (&other, &other_labels[..]),
        (&image, &labels[..]),
    ];
    let (_, mixed) = sgd_steps(&target, &steps, lr, 0.0);
    let observation = Observation::ClientUpdate {
        update: mixed,
        source: UpdateSource::SgdDelta { lr, local_steps: 3 },
        batch_size: 1,
        local_batches: LocalBatches::Repeated,
    };
    let reason = not_applicable_reason(reconstruct_april(&observation, &target).unwrap());
    assert!(reason.contains("not one image's"), "{reason}");
}

/// SGD steps at learning rate `lr` with heavy-ball `momentum` (0: plain SGD) from the model's
/// parameters, step `s` on the images and labels `steps[s]`: the parameters each step took its
/// gradient at, and the delta.
fn sgd_steps(
    target: &VitTarget,
    steps: &[(&Tensor, &[u32])],
    lr: f64,
    momentum: f64,
) -> (Vec<ParamMap>, ParamMap) {
    let mut step_parameters = Vec::new();
    let mut current = target.parameters().clone();
    let mut velocity: ParamMap = current
        .iter()
        .map(|(name, value)| (name.clone(), value.zeros_like().unwrap()))
        .collect();
    for (images, labels) in steps {
        let gradient = gradient_at(target, &current, images, labels);
        step_parameters.push(current.clone());
        velocity = velocity
            .iter()
            .map(|(name, v)| {
                (
                    name.clone(),
                    ((v * momentum).unwrap() + &gradient[name]).unwrap(),
                )
            })
            .collect();
        current = current
            .iter()
            .map(|(name, value)| {
                (
                    name.clone(),
                    (value - (&velocity[name] * lr).unwrap()).unwrap(),
                )
            })
            .collect();
    }
    let delta = current
        .iter()
        .map(|(name, value)| (name.clone(), (value - &target.parameters()[name]).unwrap()))
        .collect();
    (step_parameters, delta)
}

#[test]
fn april_is_exact_to_float_precision_in_f64_also_away_from_initialisation() {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(
        ModelPreset::VitTiny32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    let fresh = target(&cfg, DType::F64);
    // A state away from initialisation: every parameter moved by a deterministic perturbation as
    // large as the initial weights.
    let mut moved = fresh.parameters().clone();
    for (i, value) in moved.values_mut().enumerate() {
        let ramp = Tensor::arange(0u32, value.elem_count() as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .reshape(value.shape())
            .unwrap();
        let wiggle = ((ramp * (0.7 + i as f64)).unwrap().sin().unwrap() * 0.03).unwrap();
        *value = (value.clone() + wiggle).unwrap();
    }
    let moved = VitTarget::new(&Checkpoint {
        config: cfg.clone(),
        tensors: moved,
    });
    for (state, target) in [("initial", &fresh), ("perturbed", &moved)] {
        let index = 10;
        let image = batch(&data, &[index], DType::F64);
        let gradient = true_gradient(target, &image, &[data.labels[index]]);
        let layout = target.patch_embedding().unwrap();
        let inversion = invert_patch_embedding(
            &gradient[&layout.weight],
            &gradient[&layout.bias],
            &gradient[layout.position_embedding.as_ref().unwrap()],
            &layout,
            target.input_dims(),
        )
        .unwrap();
        let truth: Vec<f64> = image.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f64> = inversion.image.flatten_all().unwrap().to_vec1().unwrap();
        let max_err = truth
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!(
            "april f64 vit-tiny-32 ({state}): max abs error {max_err:.2e}, bias residual {:.2e}, \
             condition {:.2e}",
            inversion.bias_residual, inversion.condition
        );
        assert!(max_err < 1e-9, "{state}: max abs error {max_err}");
        assert!(inversion.bias_residual < 1e-12, "{state}");
    }
}

#[test]
fn april_refuses_fixed_positions_batches_and_more_patches_than_width() {
    let probe = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);

    let cfg = config(
        ModelPreset::VitMicro32,
        &data,
        PositionEmbeddingKind::Sincos,
    );
    let sincos = target(&cfg, DType::F32);
    let image = batch(&data, &[0], DType::F32);
    let observation = fedsgd(true_gradient(&sincos, &image, &[data.labels[0]]), 1);
    let reason = not_applicable_reason(reconstruct_april(&observation, &sincos).unwrap());
    assert_eq!(
        reason,
        "fixed sin-cos position embedding: its gradient is not observed"
    );

    let cfg = config(
        ModelPreset::VitMicro32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    let learnable = target(&cfg, DType::F32);
    let images = batch(&data, &[0, 1], DType::F32);
    let labels = [data.labels[0], data.labels[1]];
    let observation = fedsgd(true_gradient(&learnable, &images, &labels), 2);
    let reason = not_applicable_reason(reconstruct_april(&observation, &learnable).unwrap());
    assert!(
        reason.starts_with("batch > 1 mixes patches of several images"),
        "{reason}"
    );

    let mut cfg = config(
        ModelPreset::VitMicro32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    cfg.patch_size = 4;
    cfg.hidden_size = 8;
    let narrow = target(&cfg, DType::F32);
    let observation = fedsgd(true_gradient(&narrow, &image, &[data.labels[0]]), 1);
    let reason = not_applicable_reason(reconstruct_april(&observation, &narrow).unwrap());
    assert!(
        reason.starts_with("64 patches exceed the embedding width 8"),
        "{reason}"
    );

    let observation = Observation::Aggregate {
        update: true_gradient(&learnable, &image, &[data.labels[0]]),
        source: UpdateSource::Gradient,
        clients: ClientShare::even(3, 1),
    };
    let reason = not_applicable_reason(reconstruct_april(&observation, &learnable).unwrap());
    assert!(reason.contains("aggregate of 3 clients"), "{reason}");
}

#[test]
fn linear_inversion_recovers_the_cls_feature() {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(ModelPreset::VitTiny32, &data, PositionEmbeddingKind::Sincos);
    let target = target(&cfg, DType::F32);
    let index = 7;
    let image = batch(&data, &[index], DType::F32);
    let observation = fedsgd(true_gradient(&target, &image, &[data.labels[index]]), 1);
    let recovered = match recover_classifier_input(&observation, &target).unwrap() {
        FeatureOutcome::Recovered(r) => r,
        FeatureOutcome::NotApplicable { reason, .. } => panic!("{reason}"),
    };
    let truth = target
        .model(target.parameters())
        .unwrap()
        .cls_features(&image)
        .unwrap();
    assert_eq!(recovered.features.dims(), truth.dims());
    let (t, r) = (f32_values(&truth), f32_values(&recovered.features));
    let diff: f64 = t
        .iter()
        .zip(&r)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = t.iter().map(|a| (*a as f64).powi(2)).sum();
    let rel = (diff / norm).sqrt();
    println!(
        "linear: CLS feature relative error {rel:.2e}, rank-one residual {:.2e}, {:.4} s",
        recovered.objective, recovered.seconds
    );
    assert!(rel < 1e-4, "relative error {rel}");

    // Two images: the weight gradient is a sum of two rank-one terms; refused.
    let images = batch(&data, &[0, 1], DType::F32);
    let observation = fedsgd(
        true_gradient(&target, &images, &[data.labels[0], data.labels[1]]),
        2,
    );
    match recover_classifier_input(&observation, &target).unwrap() {
        FeatureOutcome::NotApplicable { reason, .. } => {
            assert!(reason.starts_with("batch > 1"), "{reason}")
        }
        FeatureOutcome::Recovered(_) => panic!("a batch of two is not rank one"),
    }
}

#[test]
fn idlg_labels_every_single_tile() {
    let probe = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(
        ModelPreset::VitMicro32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    let target = target(&cfg, DType::F32);
    let mut indices = Vec::new();
    for class in 0..2u32 {
        indices.extend((0..data.len()).filter(|&i| data.labels[i] == class).take(8));
    }
    let mut correct = 0;
    let mut seconds = 0.0;
    for &i in &indices {
        let image = batch(&data, &[i], DType::F32);
        let observation = fedsgd(true_gradient(&target, &image, &[data.labels[i]]), 1);
        match infer_label_idlg(&observation, &target).unwrap() {
            LabelOutcome::Recovered(r) => {
                seconds += r.seconds;
                assert!(r.objective < 1e-5, "sum of p - onehot: {}", r.objective);
                correct += usize::from(r.labels == vec![data.labels[i]]);
            }
            LabelOutcome::NotApplicable { reason, .. } => panic!("{reason}"),
        }
    }
    println!(
        "idlg: {correct}/{} labels correct, {:.2e} s per attack",
        indices.len(),
        seconds / indices.len() as f64
    );
    assert_eq!(correct, indices.len());

    let images = batch(&data, &indices[..2], DType::F32);
    let labels = [data.labels[indices[0]], data.labels[indices[1]]];
    let observation = fedsgd(true_gradient(&target, &images, &labels), 2);
    match infer_label_idlg(&observation, &target).unwrap() {
        LabelOutcome::NotApplicable { reason, .. } => {
            assert!(reason.starts_with("batch > 1"), "{reason}")
        }
        LabelOutcome::Recovered(_) => panic!("iDLG must refuse a batch of two"),
    }
}

/// Runs the label-count attack on FedSGD batches of 8 with the given label multisets, from noise
/// dummies or, with `with_reference`, from the held-out split as reference images; returns the
/// number of labels matched and the number of labels.
fn label_count_accuracy(spec: &str, batches: &[Vec<u32>], with_reference: bool) -> (usize, usize) {
    let probe = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset(spec, &probe);
    let held_out = load_data(&DataSpec::parse(spec).unwrap(), probe.input_shape(), 1)
        .unwrap()
        .test;
    let reference = ReferenceImages {
        images: batch(
            &held_out,
            &(0..held_out.len()).collect::<Vec<_>>(),
            DType::F32,
        ),
        labels: held_out.labels.clone(),
    };
    let cfg = config(
        ModelPreset::VitMicro32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    let classes = cfg.num_labels();
    let target = target(&cfg, DType::F32);
    let (mut matched, mut total, mut seconds) = (0, 0, 0.0);
    for wanted in batches {
        let indices = pick(&data, wanted);
        let images = batch(&data, &indices, DType::F32);
        let observation = fedsgd(true_gradient(&target, &images, wanted), wanted.len());
        let reference = with_reference.then_some(&reference);
        match count_labels(
            &observation,
            &target,
            &LabelCountConfig::default(),
            reference,
        )
        .unwrap()
        {
            LabelOutcome::Recovered(r) => {
                assert_eq!(r.labels.len(), wanted.len());
                assert!(r.labels.windows(2).all(|w| w[0] <= w[1]), "sorted");
                matched += count_overlap(wanted, &r.labels, classes);
                total += wanted.len();
                seconds += r.seconds;
            }
            LabelOutcome::NotApplicable { reason, .. } => panic!("{reason}"),
        }
    }
    println!(
        "label counts on {spec} ({classes} classes, reference images: {with_reference}): \
         {matched}/{total} labels ({:.1} %), {:.3} s per batch",
        100.0 * matched as f64 / total as f64,
        seconds / batches.len() as f64
    );
    (matched, total)
}

#[test]
fn label_counts_recover_mixed_mnist_batches_of_eight() {
    let batches: Vec<Vec<u32>> = vec![
        vec![0, 0, 1, 2, 3, 3, 3, 9],
        vec![4, 4, 4, 4, 5, 6, 7, 8],
        vec![1, 1, 1, 1, 1, 1, 1, 1],
        vec![0, 1, 2, 3, 4, 5, 6, 7],
        vec![2, 2, 5, 5, 8, 8, 9, 9],
        vec![6, 6, 6, 7, 7, 7, 3, 0],
    ];
    for with_reference in [false, true] {
        let (matched, total) = label_count_accuracy("fixture:mnist5k", &batches, with_reference);
        assert!(
            matched as f64 >= 0.95 * total as f64,
            "{matched}/{total} labels (reference images: {with_reference})"
        );
    }
}

#[test]
fn label_counts_recover_ihc_batches_of_eight() {
    let batches: Vec<Vec<u32>> = vec![
        vec![0, 0, 0, 1, 1, 1, 1, 1],
        vec![0, 0, 0, 0, 0, 0, 0, 1],
        vec![1, 1, 1, 1, 1, 1, 1, 1],
        vec![0, 0, 0, 0, 1, 1, 1, 1],
    ];
    for with_reference in [false, true] {
        let (matched, total) =
            label_count_accuracy("fixture:ihc-tiles-32", &batches, with_reference);
        assert!(
            matched as f64 >= 0.95 * total as f64,
            "{matched}/{total} labels (reference images: {with_reference})"
        );
    }
}

#[test]
fn label_counts_read_deltas_and_aggregates() {
    let probe = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:mnist5k", &probe);
    let cfg = config(
        ModelPreset::VitMicro32,
        &data,
        PositionEmbeddingKind::Learnable,
    );
    let target = target(&cfg, DType::F32);
    let first: Vec<u32> = vec![0, 0, 1, 2, 3, 3, 3, 9];
    let second: Vec<u32> = vec![5, 5, 5, 6, 7, 8, 9, 9];
    let all = pick(&data, &[first.clone(), second.clone()].concat());
    let g1 = true_gradient(&target, &batch(&data, &all[..8], DType::F32), &first);
    let g2 = true_gradient(&target, &batch(&data, &all[8..], DType::F32), &second);
    let lr = 0.1;

    // A one-step plain-SGD delta: -lr times the gradient.
    let delta: ParamMap = g1
        .iter()
        .map(|(k, g)| (k.clone(), (g * -lr).unwrap()))
        .collect();
    let observation = Observation::ClientUpdate {
        update: delta,
        source: UpdateSource::SgdDelta { lr, local_steps: 1 },
        batch_size: 8,
        local_batches: LocalBatches::Repeated,
    };
    let LabelOutcome::Recovered(r) =
        count_labels(&observation, &target, &LabelCountConfig::default(), None).unwrap()
    else {
        panic!("a one-step SGD delta is a gradient")
    };
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(r.labels, sorted);

    // Three momentum-SGD steps on the batch: read as the weighted mean of the steps' gradients.
    let images = batch(&data, &all[..8], DType::F32);
    let (small_lr, momentum, steps) = (0.01, 0.9, 3);
    let (_, delta) = sgd_steps(&target, &[(&images, &first[..]); 3], small_lr, momentum);
    // Read as three plain-SGD steps (the wrong weights) the raw counts sit farther from integers.
    let as_plain_sgd = Observation::ClientUpdate {
        update: delta.clone(),
        source: UpdateSource::SgdDelta {
            lr: small_lr,
            local_steps: steps,
        },
        batch_size: 8,
        local_batches: LocalBatches::Repeated,
    };
    let LabelOutcome::Recovered(plain) =
        count_labels(&as_plain_sgd, &target, &LabelCountConfig::default(), None).unwrap()
    else {
        panic!("a plain-SGD delta is read as a gradient")
    };
    let observation = Observation::ClientUpdate {
        update: delta,
        source: UpdateSource::MomentumSgdDelta {
            lr: small_lr,
            momentum,
            local_steps: steps,
        },
        batch_size: 8,
        local_batches: LocalBatches::Repeated,
    };
    let LabelOutcome::Recovered(r) =
        count_labels(&observation, &target, &LabelCountConfig::default(), None).unwrap()
    else {
        panic!("a momentum-SGD delta is read as a gradient")
    };
    // Measured: residual 0.142 with the momentum weights, 0.638 read as plain SGD.
    println!(
        "label counts from a 3-step momentum-SGD delta: residual {:.3} ({:.3} read as plain SGD)",
        r.objective, plain.objective
    );
    assert_eq!(r.labels, sorted);
    assert!(
        r.objective < 0.5 * plain.objective,
        "momentum weights {:.3}, plain SGD {:.3}",
        r.objective,
        plain.objective
    );

    // What a secure-aggregation server sees: the mean of two clients' gradients, 16 labels.
    let mean: ParamMap = g1
        .iter()
        .map(|(k, g)| (k.clone(), ((g + &g2[k]).unwrap() * 0.5).unwrap()))
        .collect();
    let observation = Observation::Aggregate {
        update: mean,
        source: UpdateSource::Gradient,
        clients: ClientShare::even(2, 8),
    };
    let LabelOutcome::Recovered(r) =
        count_labels(&observation, &target, &LabelCountConfig::default(), None).unwrap()
    else {
        panic!("label counts apply to aggregates")
    };
    let truth = [first, second].concat();
    let matched = count_overlap(&truth, &r.labels, cfg.num_labels());
    println!(
        "label counts from an aggregate of 2 clients: {matched}/16 labels, residual {:.3}",
        r.objective
    );
    assert!(matched >= 15, "{matched}/16 labels from the aggregate");

    let observation = Observation::ClientUpdate {
        update: g1,
        source: UpdateSource::OtherDelta { lr, local_steps: 1 },
        batch_size: 8,
        local_batches: LocalBatches::Repeated,
    };
    match count_labels(&observation, &target, &LabelCountConfig::default(), None).unwrap() {
        LabelOutcome::NotApplicable { attack, reason } => {
            assert_eq!(attack, "label-counts");
            assert!(reason.contains("adaptive optimizer"), "{reason}");
        }
        LabelOutcome::Recovered(_) => panic!("an Adam delta has lost the gradient's magnitudes"),
    }
}

/// Token gradients of `images` under the model, as f64 rows (B x T x D flattened).
fn token_gradients(target: &VitTarget, images: &Tensor, labels: &[u32]) -> Vec<f64> {
    let targets = one_hot(labels, target.num_classes(), images.dtype(), &Device::Cpu).unwrap();
    let tokens = target
        .token_gradients(target.parameters(), images, &targets)
        .unwrap()
        .expect("the ViT exposes its token gradients");
    tokens
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn f64_values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn relative_difference(a: &[f64], b: &[f64]) -> f64 {
    let difference: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let scale: f64 = b.iter().map(|y| y * y).sum();
    (difference / scale).sqrt()
}

#[test]
fn token_gradients_are_what_the_patch_embedding_and_position_gradients_are_made_of() {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let indices = pick(&data, &[0, 1]);
    let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
    let images = batch(&data, &indices, DType::F64);
    let (n, d, k, p) = (64, 192, 48, 4);
    for positions in [
        PositionEmbeddingKind::Sincos,
        PositionEmbeddingKind::Learnable,
    ] {
        let cfg = config(ModelPreset::VitTiny32, &data, positions);
        let model = target(&cfg, DType::F64);
        let observed = true_gradient(&model, &images, &labels);
        let tokens = token_gradients(&model, &images, &labels);
        assert_eq!(tokens.len(), 2 * (n + 1) * d);
        // dW = sum over images and patch tokens of g_i x_i^T; db = sum of g_i (CLS excluded).
        let pixels = f64_values(&images);
        let mut dw = vec![0f64; d * k];
        let mut db = vec![0f64; d];
        for image in 0..2 {
            for token in 0..n {
                let g = &tokens[(image * (n + 1) + 1 + token) * d..][..d];
                let (gy, gx) = (token / 8, token % 8);
                for (j, &gj) in g.iter().enumerate() {
                    db[j] += gj;
                    for index in 0..k {
                        let (ch, rest) = (index / (p * p), index % (p * p));
                        let (y, x) = (gy * p + rest / p, gx * p + rest % p);
                        let value = pixels[((image * 3 + ch) * 32 + y) * 32 + x];
                        dw[j * k + index] += gj * value;
                    }
                }
            }
        }
        let observed_dw =
            f64_values(&observed["vit.embeddings.patch_embeddings.projection.weight"]);
        let observed_db = f64_values(&observed["vit.embeddings.patch_embeddings.projection.bias"]);
        let dw_error = relative_difference(&dw, &observed_dw);
        let db_error = relative_difference(&db, &observed_db);
        assert!(
            dw_error < 1e-12,
            "{positions:?}: dW differs by {dw_error:e}"
        );
        assert!(
            db_error < 1e-12,
            "{positions:?}: db differs by {db_error:e}"
        );
        if positions == PositionEmbeddingKind::Learnable {
            let position = f64_values(&observed["vit.embeddings.position_embeddings"]);
            let summed: Vec<f64> = (0..(n + 1) * d)
                .map(|i| tokens[i] + tokens[(n + 1) * d + i])
                .collect();
            let error = relative_difference(&summed, &position);
            assert!(error < 1e-12, "position gradient differs by {error:e}");
        }
    }
}

/// Deterministic perturbation of images: a colour offset per patch and channel (amplitude
/// `offset`) plus pixel noise (amplitude `noise`), clamped to [0, 1].
fn perturbed(images: &Tensor, offset: f64, noise: f64, seed: u64) -> Tensor {
    let (b, c, h, w) = images.dims4().unwrap();
    let values = f32_values(images);
    let offsets = uniform(b * c * 64, seed);
    let jitter = uniform(values.len(), seed + 1);
    let moved: Vec<f64> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (image, ch, y, x) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
            let patch = (y / 4) * 8 + x / 4;
            let o = offsets[(image * c + ch) * 64 + patch] - 0.5;
            (v as f64 + 2.0 * offset * o + 2.0 * noise * (jitter[i] - 0.5)).clamp(0.0, 1.0)
        })
        .collect();
    Tensor::from_vec(moved, (b, c, h, w), &Device::Cpu).unwrap()
}

/// `count` deterministic values in [0, 1).
fn uniform(count: usize, seed: u64) -> Vec<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count).map(|_| rng.random()).collect()
}

fn mean_psnr(images: &Tensor, truth: &Tensor) -> f64 {
    let (b, c, h, w) = images.dims4().unwrap();
    let (a, t) = (f32_values(images), f32_values(truth));
    let size = c * h * w;
    (0..b)
        .map(|i| {
            psnr_db(
                &a[i * size..(i + 1) * size],
                &t[i * size..(i + 1) * size],
                ImageDims {
                    channels: c,
                    height: h,
                    width: w,
                },
            )
            .unwrap()
        })
        .sum::<f64>()
        / b as f64
}

#[test]
fn patch_refinement_keeps_the_private_images_and_moves_perturbed_ones_towards_them() {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(ModelPreset::VitTiny32, &data, PositionEmbeddingKind::Sincos);
    let model = target(&cfg, DType::F64);
    for (wanted, ridge) in [
        (vec![1], SINGLE_IMAGE_PATCH_REFINEMENT),
        (vec![1, 0], BATCH_PATCH_REFINEMENT),
    ] {
        let indices = pick(&data, &wanted);
        let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
        let images = batch(&data, &indices, DType::F64);
        let update = true_gradient(&model, &images, &labels);
        let refined = refine_patches(&model, &update, &images, &labels, ridge)
            .unwrap()
            .expect("applies to a sin-cos ViT's gradient");
        // At the private images the token gradients are the true ones and the observed gradient is
        // explained exactly: the solve must return the images themselves.
        let kept = relative_difference(&f64_values(&refined), &f64_values(&images));
        assert!(
            kept < 1e-9,
            "batch {}: the private images moved by {kept:e}",
            wanted.len()
        );
        // Measured: batch 1 23.71 -> 24.93 and 18.80 -> 21.10 dB; batch 2 23.78 -> 24.06 and 18.91
        // -> 19.17 dB.
        let margin = if wanted.len() == 1 { 0.5 } else { 0.15 };
        for (offset, noise) in [(0.1, 0.05), (0.2, 0.0)] {
            let start = perturbed(&images, offset, noise, 7);
            let moved = refine_patches(&model, &update, &start, &labels, ridge)
                .unwrap()
                .expect("applies");
            let (before, after) = (mean_psnr(&start, &images), mean_psnr(&moved, &images));
            println!(
                "batch {} offset {offset} noise {noise}: {before:.2} -> {after:.2} dB",
                wanted.len()
            );
            assert!(
                after > before + margin,
                "batch {} offset {offset} noise {noise}: {before:.2} -> {after:.2} dB",
                wanted.len()
            );
        }
    }
}

#[test]
fn patch_refinement_of_a_multi_step_sgd_delta_keeps_the_private_image_and_moves_a_perturbed_one_towards_it(
) {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(ModelPreset::VitTiny32, &data, PositionEmbeddingKind::Sincos);
    let model = target(&cfg, DType::F64);
    let indices = pick(&data, &[1]);
    let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
    let images = batch(&data, &indices, DType::F64);
    let ridge = SINGLE_IMAGE_PATCH_REFINEMENT;
    let (lr, steps) = (0.05, 3);
    for momentum in [0.0, 0.9] {
        // The client's three SGD steps on its image, and the delta it sends; step s's gradient
        // enters it with -lr c_s, c_s = sum_{t >= s} momentum^(t - s).
        let (step_parameters, delta) =
            sgd_steps(&model, &[(&images, &labels[..]); 3], lr, momentum);
        let weighted: Vec<(ParamMap, f64)> = step_parameters
            .into_iter()
            .enumerate()
            .map(|(s, parameters)| {
                let c: f64 = (0..steps - s).map(|k| momentum.powi(k as i32)).sum();
                (parameters, -lr * c)
            })
            .collect();

        // With the steps' true parameters and factors the delta is explained exactly: the image
        // stays. (Taken at the global parameters for all three steps instead, the plain-SGD solve
        // returns an 8 dB image; with plain-SGD factors for the momentum delta the image moves by
        // 0.65: the check sees the unrolling and the weights.)
        let refined =
            refine_patches_after_steps(&model, &delta, &weighted, &images, &labels, ridge)
                .unwrap()
                .expect("applies to a sin-cos ViT's SGD delta");
        let kept = relative_difference(&f64_values(&refined), &f64_values(&images));
        assert!(
            kept < 1e-9,
            "momentum {momentum}: the private image moved by {kept:e}"
        );
        // Read as a gradient, the delta points the other way: the refinement refuses it.
        let as_gradient = refine_patches(&model, &delta, &images, &labels, ridge).unwrap();
        assert!(as_gradient.is_none(), "a delta was refined as a gradient");

        // The attacker unrolls the steps at its candidate (GradientMatcher::refine). Measured:
        // 23.71 -> 24.92 and 18.80 -> 21.10 dB, plain SGD and momentum 0.9 alike.
        let matcher = GradientMatcher::new(
            &model,
            &delta,
            Some((lr, steps)),
            Some(&labels),
            ImagePrior::default(),
            InputGradient::CentralDifference,
        )
        .unwrap()
        .with_momentum(momentum)
        .with_patch_refinement(ridge, &labels);
        assert_refinement_moves_towards(
            &matcher,
            &images,
            0.5,
            &format!("delta of {steps} steps at momentum {momentum}"),
        );
    }
}

#[test]
fn patch_refinement_of_local_steps_on_batches_of_their_own_keeps_the_private_images_and_moves_perturbed_ones_towards_them(
) {
    // Three local steps, each on an image of its own (a client holding more than a batch of 1).
    let (model, labels, images) = sincos_tiles(&[1, 0, 1]);
    let (lr, sizes) = (0.05, [1usize, 1, 1]);
    let own: Vec<Tensor> = (0..3).map(|s| images.narrow(0, s, 1).unwrap()).collect();
    let steps: Vec<(&Tensor, &[u32])> = (0..3).map(|s| (&own[s], &labels[s..=s])).collect();
    let (step_parameters, delta) = sgd_steps(&model, &steps, lr, 0.0);
    let weighted: Vec<(ParamMap, f64)> = step_parameters.into_iter().map(|p| (p, -lr)).collect();
    let ridge = BATCH_PATCH_REFINEMENT;

    // Each image through its own step's token gradients explains the delta exactly: the images
    // stay. Every step on all three instead does not (it refuses or moves them).
    let refined = refine_patches_after_steps_on_batches(
        &model,
        &delta,
        &weighted,
        Some(&sizes),
        &images,
        &labels,
        ridge,
    )
    .unwrap()
    .expect("applies to a sin-cos ViT's SGD delta");
    let kept = relative_difference(&f64_values(&refined), &f64_values(&images));
    assert!(kept < 1e-9, "the private images moved by {kept:e}");
    let repeated = refine_patches_after_steps(&model, &delta, &weighted, &images, &labels, ridge)
        .unwrap()
        .map(|moved| relative_difference(&f64_values(&moved), &f64_values(&images)));
    println!("every step on all three images: {repeated:?}");
    assert!(repeated.is_none_or(|moved| moved > 1e-3), "{repeated:?}");
    let wrong = refine_patches_after_steps_on_batches(
        &model,
        &delta,
        &weighted,
        Some(&[2, 1]),
        &images,
        &labels,
        ridge,
    );
    assert!(wrong.is_err(), "two batches for three steps");

    // The attacker unrolls the steps at its candidates, each on its own slice.
    let matcher = GradientMatcher::new(
        &model,
        &delta,
        Some((lr, 3)),
        Some(&labels),
        ImagePrior::default(),
        InputGradient::ForwardDifference,
    )
    .unwrap()
    .with_step_batches(&sizes)
    .unwrap()
    .with_patch_refinement(ridge, &labels);
    assert_refinement_moves_towards(&matcher, &images, 0.15, "three steps on their own images");
}

#[test]
fn patch_refinement_of_an_aggregate_takes_each_clients_own_trajectory_and_weight() {
    // Two FedAvg clients, two local steps each from the global model: client A holds one image
    // (both steps on it), client B three times as many, one image per step. The server averages
    // their deltas with weights 1/4 and 3/4.
    let (model, labels, images) = sincos_tiles(&[1, 0, 1]);
    let own: Vec<Tensor> = (0..3).map(|k| images.narrow(0, k, 1).unwrap()).collect();
    let lr = 0.05;
    let (a_steps, a_delta) = sgd_steps(&model, &[(&own[0], &labels[..1]); 2], lr, 0.0);
    let b_batches = [(&own[1], &labels[1..2]), (&own[2], &labels[2..])];
    let (b_steps, b_delta) = sgd_steps(&model, &b_batches, lr, 0.0);
    let aggregate: ParamMap = a_delta
        .iter()
        .map(|(name, a)| {
            let mean = ((a * 0.25).unwrap() + (&b_delta[name] * 0.75).unwrap()).unwrap();
            (name.clone(), mean)
        })
        .collect();
    let ridge = BATCH_PATCH_REFINEMENT;
    let step =
        |parameters: &ParamMap, weight: f64, images: std::ops::Range<usize>| RefinementStep {
            parameters: parameters.clone(),
            factor: -lr * weight,
            images,
        };
    let steps = [
        step(&a_steps[0], 0.25, 0..1),
        step(&a_steps[1], 0.25, 0..1),
        step(&b_steps[0], 0.75, 1..2),
        step(&b_steps[1], 0.75, 2..3),
    ];
    let refined =
        refine_patches_after_client_steps(&model, &aggregate, &steps, &images, &labels, ridge)
            .unwrap()
            .expect("applies to a sin-cos ViT's aggregate of SGD deltas");
    let kept = relative_difference(&f64_values(&refined), &f64_values(&images));
    assert!(kept < 1e-9, "the private images moved by {kept:e}");
    // Equal weights (the clients' batches, not their holdings) do not explain it.
    let unweighted: Vec<RefinementStep> = steps
        .iter()
        .map(|s| RefinementStep {
            factor: -lr,
            ..s.clone()
        })
        .collect();
    let moved =
        refine_patches_after_client_steps(&model, &aggregate, &unweighted, &images, &labels, ridge)
            .unwrap()
            .map(|moved| relative_difference(&f64_values(&moved), &f64_values(&images)));
    println!("clients weighted equally: {moved:?}");
    assert!(moved.is_none_or(|moved| moved > 1e-3), "{moved:?}");
    let outside = [step(&a_steps[0], 1.0, 2..4)];
    let refused =
        refine_patches_after_client_steps(&model, &aggregate, &outside, &images, &labels, ridge);
    assert!(refused.is_err(), "a step on images 2..4 of 3");

    // The attacker's matcher, from the server's view of the aggregate, unrolls each client from
    // the global model at its candidates.
    let observation = Observation::Aggregate {
        update: aggregate.clone(),
        source: UpdateSource::SgdDelta { lr, local_steps: 2 },
        clients: vec![
            ClientShare {
                weight: 0.25,
                batch_size: 1,
                local_steps: 2,
                local_batches: LocalBatches::Repeated,
            },
            ClientShare {
                weight: 0.75,
                batch_size: 1,
                local_steps: 2,
                local_batches: LocalBatches::PerStep(vec![1, 1]),
            },
        ],
    };
    let view = observation.update_view().unwrap();
    assert_eq!(view.images, 3);
    let matcher = GradientMatcher::new(
        &model,
        &aggregate,
        Some((lr, 2)),
        Some(&labels),
        ImagePrior::default(),
        InputGradient::ForwardDifference,
    )
    .unwrap()
    .with_clients(&view.clients)
    .unwrap()
    .with_patch_refinement(ridge, &labels);
    assert_refinement_moves_towards(&matcher, &images, 0.15, "an aggregate of two clients");
}

/// A fresh f64 `vit-tiny-32` with a fixed sin-cos table on the IHC fixture, and IHC training tiles
/// of the given classes (see `pick`) with their labels.
fn sincos_tiles(wanted: &[u32]) -> (VitTarget, Vec<u32>, Tensor) {
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(ModelPreset::VitTiny32, &data, PositionEmbeddingKind::Sincos);
    let indices = pick(&data, wanted);
    let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
    let images = batch(&data, &indices, DType::F64);
    (target(&cfg, DType::F64), labels, images)
}

/// `matcher`'s refinement of `images` offset and perturbed two ways must raise their mean PSNR
/// against `images` by more than `margin` dB.
fn assert_refinement_moves_towards(
    matcher: &GradientMatcher,
    images: &Tensor,
    margin: f64,
    case: &str,
) {
    for (offset, noise) in [(0.1, 0.05), (0.2, 0.0)] {
        let start = perturbed(images, offset, noise, 7);
        let (moved, _) = matcher
            .refine(&start)
            .unwrap()
            .expect("applies and does not raise the objective threefold");
        let (before, after) = (mean_psnr(&start, images), mean_psnr(&moved, images));
        println!("{case}, offset {offset} noise {noise}: {before:.2} -> {after:.2} dB");
        assert!(
            after > before + margin,
            "{case}, offset {offset} noise {noise}: {before:.2} -> {after:.2} dB"
        );
    }
}

/// Whether every label of `part` can be matched to a distinct label of `whole`.
fn is_sub_multiset(part: &[u32], whole: &[u32], classes: usize) -> bool {
    count_overlap(whole, part, classes) == part.len()
}

/// SGD on `images` with `labels` from `target`'s parameters until the mean loss is below `loss`
/// (at most `max_steps` steps): a model that has fitted the batch it is then attacked on.
fn fit_batch(
    target: &VitTarget,
    images: &Tensor,
    labels: &[u32],
    lr: f64,
    loss: f64,
    max_steps: usize,
) -> (ParamMap, f64, usize) {
    let targets = one_hot(labels, target.num_classes(), images.dtype(), &Device::Cpu).unwrap();
    let mut current = target.parameters().clone();
    for step in 0..max_steps {
        let value = target
            .loss(&current, images, &targets)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        if value < loss {
            return (current, value, step);
        }
        let gradient = gradient_at(target, &current, images, labels);
        current = current
            .iter()
            .map(|(name, value)| {
                (
                    name.clone(),
                    (value - (&gradient[name] * lr).unwrap()).unwrap(),
                )
            })
            .collect();
    }
    panic!("the batch was not fitted to loss {loss} in {max_steps} steps");
}

#[test]
fn label_separation_labels_each_image_of_a_batch_also_where_the_model_fits_it() {
    // (data, labels, SGD learning rate and loss of the fit)
    let cases: [(&str, Vec<u32>, f64, f64); 2] = [
        (
            "fixture:ihc-tiles-32",
            vec![0, 0, 0, 1, 1, 1, 1, 1],
            0.5,
            0.02,
        ),
        ("fixture:mnist5k", vec![0, 0, 1, 2, 3, 3, 3, 9], 0.2, 0.1),
    ];
    for (spec, wanted, lr, fit_loss) in cases {
        let probe = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], Default::default());
        let data = dataset(spec, &probe);
        let cfg = config(
            ModelPreset::VitMicro32,
            &data,
            PositionEmbeddingKind::Learnable,
        );
        let classes = cfg.num_labels();
        let fresh = target(&cfg, DType::F32);
        let images = batch(&data, &pick(&data, &wanted), DType::F32);
        let mut sorted = wanted.clone();
        sorted.sort();
        let (fitted, loss, steps) = fit_batch(&fresh, &images, &wanted, lr, fit_loss, 1000);
        let fitted = VitTarget::new(&Checkpoint {
            config: cfg.clone(),
            tensors: fitted,
        });
        for (what, model) in [("fresh", &fresh), ("fitted", &fitted)] {
            let observation = fedsgd(true_gradient(model, &images, &wanted), wanted.len());
            let Separation::Separated(separated) =
                separate_batch_labels(&observation, model, 0).unwrap()
            else {
                panic!("separation applies to a FedSGD batch")
            };
            let LabelOutcome::Recovered(counted) =
                count_labels(&observation, model, &LabelCountConfig::default(), None).unwrap()
            else {
                panic!("label counts apply")
            };
            let LabelOutcome::Recovered(recovered) =
                recover_batch_labels(&observation, model, &LabelCountConfig::default(), None)
                    .unwrap()
            else {
                panic!("label recovery applies")
            };
            println!(
                "{spec}, {what} model (fitted: loss {loss:.3} after {steps} steps): {} of 8 \
                 images separated ({:?}), residuals {:.1e}..{:.1e}; counts alone {}/8, with \
                 separation {}/8",
                separated.labels.len(),
                separated.labels,
                separated
                    .residuals
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min),
                separated.residuals.iter().copied().fold(0.0, f64::max),
                count_overlap(&wanted, &counted.labels, classes),
                count_overlap(&wanted, &recovered.labels, classes),
            );
            assert!(
                is_sub_multiset(&separated.labels, &wanted, classes),
                "{spec}, {what}: separated {:?} from {wanted:?}",
                separated.labels
            );
            let (alone, with) = (
                count_overlap(&wanted, &counted.labels, classes),
                count_overlap(&wanted, &recovered.labels, classes),
            );
            if what == "fresh" {
                assert!(separated.labels.len() >= 6, "{spec}: {separated:?}");
                assert_eq!(recovered.labels, sorted, "{spec}, {what}");
            } else {
                assert!(separated.labels.len() >= 3, "{spec}: {separated:?}");
                assert!(
                    with > alone,
                    "{spec}: {with}/8 with separation, {alone}/8 without"
                );
            }

            // A one-step SGD delta is -lr times the gradient: the same images, the same labels
            // (read with the wrong sign, two classes would come back swapped).
            let Observation::ClientUpdate { update, .. } = &observation else {
                unreachable!()
            };
            let lr = 0.05;
            let delta: ParamMap = update
                .iter()
                .map(|(k, g)| (k.clone(), (g * -lr).unwrap()))
                .collect();
            let as_delta = |local_steps, adaptive: bool| Observation::ClientUpdate {
                update: delta.clone(),
                source: if adaptive {
                    UpdateSource::OtherDelta { lr, local_steps }
                } else {
                    UpdateSource::SgdDelta { lr, local_steps }
                },
                batch_size: wanted.len(),
                local_batches: LocalBatches::Repeated,
            };
            match separate_batch_labels(&as_delta(1, false), model, 0).unwrap() {
                Separation::Separated(from_delta) => {
                    let mut a = from_delta.labels.clone();
                    let mut b = separated.labels.clone();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "{spec}, {what}: delta against gradient");
                }
                Separation::NotApplicable { reason } => panic!("{reason}"),
            }
            for (observation, why) in [
                (as_delta(2, false), "local steps"),
                (as_delta(1, true), "adaptive optimizer"),
                (
                    fedsgd(
                        true_gradient(model, &images.narrow(0, 0, 1).unwrap(), &wanted[..1]),
                        1,
                    ),
                    "iDLG",
                ),
            ] {
                match separate_batch_labels(&observation, model, 0).unwrap() {
                    Separation::NotApplicable { reason } => {
                        assert!(reason.contains(why), "{reason}")
                    }
                    Separation::Separated(s) => panic!("{why}: separated {s:?}"),
                }
            }
        }
    }
}

/// Plain-SGD steps at `lr` of `target` on batches of two of `data`'s images (`indices`, in order)
/// with the labels of `steps`: each step's images (f32) and the delta.
fn sgd_on_batches_of_two(
    target: &VitTarget,
    data: &Dataset,
    indices: &[usize],
    steps: &[[u32; 2]],
    lr: f64,
) -> (Vec<Tensor>, ParamMap) {
    let images: Vec<Tensor> = indices
        .chunks(2)
        .map(|pair| batch(data, pair, DType::F32))
        .collect();
    let unrolled: Vec<(&Tensor, &[u32])> =
        images.iter().zip(steps).map(|(x, y)| (x, &y[..])).collect();
    let (_, delta) = sgd_steps(target, &unrolled, lr, 0.0);
    (images, delta)
}

#[test]
fn labels_of_local_steps_on_batches_of_their_own_are_placed_by_unrolling_the_drift() {
    // Three local SGD steps at lr 0.01 on batches of two IHC tiles each (sin-cos vit-tiny-32, its
    // initial weights, f32): the logits move about one unit per step, so the counts read off the
    // summed classifier bias as three gradients at the global weights come out wrong (three of
    // class 0 where one was: the first two steps, all class 1, shrink the last one's pull). Unrolling
    // the steps on stand-ins under each of the 27 hypotheses of per-step counts, the classifier's
    // delta picks the private labels, step by step, with noise and with reference stand-ins.
    let probe = ModelPreset::VitTiny32.config(&["a".into(), "b".into()], Default::default());
    let data = dataset("fixture:ihc-tiles-32", &probe);
    let cfg = config(ModelPreset::VitTiny32, &data, PositionEmbeddingKind::Sincos);
    let target = target(&cfg, DType::F32);
    let steps: [[u32; 2]; 3] = [[1, 1], [1, 1], [0, 1]];
    let other_steps: [[u32; 2]; 3] = [[0, 0], [0, 1], [1, 1]];
    let truth: Vec<u32> = steps.as_flattened().to_vec();
    let both: Vec<u32> = [steps, other_steps].as_flattened().as_flattened().to_vec();
    let indices = pick(&data, &both);
    let lr = 0.01;
    let (images, delta) = sgd_on_batches_of_two(&target, &data, &indices[..6], &steps, lr);
    let (_, other_delta) = sgd_on_batches_of_two(&target, &data, &indices[6..], &other_steps, lr);
    let observation = Observation::ClientUpdate {
        update: delta.clone(),
        source: UpdateSource::SgdDelta { lr, local_steps: 3 },
        batch_size: 2,
        local_batches: LocalBatches::PerStep(vec![2, 2, 2]),
    };
    let LabelOutcome::Recovered(counted) =
        count_labels(&observation, &target, &LabelCountConfig::default(), None).unwrap()
    else {
        panic!("a plain-SGD delta is read as a gradient")
    };
    println!("counts read as three gradients: {:?}", counted.labels);
    assert_ne!(
        count_overlap(&truth, &counted.labels, 2),
        6,
        "no drift to correct"
    );
    let test_split = load_data(
        &DataSpec::parse("fixture:ihc-tiles-32").unwrap(),
        cfg.input_shape(),
        1,
    )
    .unwrap()
    .test;
    let all: Vec<usize> = (0..test_split.len()).collect();
    let reference = ReferenceImages {
        images: batch(&test_split, &all, DType::F32),
        labels: test_split.labels.clone(),
    };
    for stand_ins in [None, Some(&reference)] {
        let LabelOutcome::Recovered(placed) = recover_labels(
            &observation,
            &target,
            &LabelCountConfig::default(),
            stand_ins,
        )
        .unwrap() else {
            panic!("labels of a plain-SGD delta")
        };
        println!(
            "{}: {:?}, distance {:e}",
            placed.attack, placed.labels, placed.objective
        );
        assert_eq!(placed.attack, "unrolled-label-counts");
        assert_eq!(
            placed.labels,
            truth,
            "reference given: {}",
            stand_ins.is_some()
        );
    }
    // An aggregate of that client (weight 1/4) and another one whose three steps held other
    // labels (weight 3/4): each client is unrolled apart, and the 729 combinations of their 27
    // hypotheses each are scored by the weighted sum of their classifier deltas.
    let aggregate = Observation::Aggregate {
        update: delta
            .iter()
            .map(|(name, a)| {
                let mean = ((a * 0.25).unwrap() + (&other_delta[name] * 0.75).unwrap()).unwrap();
                (name.clone(), mean)
            })
            .collect(),
        source: UpdateSource::SgdDelta { lr, local_steps: 3 },
        clients: [0.25, 0.75]
            .map(|weight| ClientShare {
                weight,
                batch_size: 2,
                local_steps: 3,
                local_batches: LocalBatches::PerStep(vec![2, 2, 2]),
            })
            .to_vec(),
    };
    let view = aggregate.update_view().unwrap();
    let size = unrolled_label_hypotheses(&view, 2).expect("an aggregate of SGD deltas");
    assert_eq!(
        (size.hypotheses, size.simulated_steps),
        (729, 2 * (3 + 9 + 27))
    );
    let placed = place_labels_by_unrolling(&view, &target, None, 0)
        .unwrap()
        .expect("applies to an aggregate of SGD deltas");
    println!(
        "aggregate: {:?}, distance {:e}",
        placed.labels, placed.objective
    );
    assert_eq!(placed.labels, both);

    // A gradient does not drift: the counts stand.
    let view = fedsgd(true_gradient(&target, &images[0], &steps[0]), 2);
    let view = view.update_view().unwrap();
    assert!(place_labels_by_unrolling(&view, &target, None, 0)
        .unwrap()
        .is_none());
}
