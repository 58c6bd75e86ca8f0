//! Gradient checks of the ViT against central finite differences in f64, both orders, and checkpoint
//! round trips.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use super::*;
use fedleak_attacks::GradientRequest;

/// A ViT small enough for finite differences: 8x8 RGB, patch 4 (4 patches), width 8, one block, 2 heads.
fn micro_config(position_embedding: PositionEmbeddingKind) -> VitConfig {
    let mut cfg =
        ModelPreset::VitMicro32.config(&["a".into(), "b".into(), "c".into()], position_embedding);
    cfg.image_size = 8;
    cfg.patch_size = 4;
    cfg.hidden_size = 8;
    cfg.num_hidden_layers = 1;
    cfg.num_attention_heads = 2;
    cfg.intermediate_size = 16;
    cfg
}

/// Deterministic pseudo-random values in [0, 1) (a fixed LCG), so tests need no RNG crate.
fn lcg_values(count: usize, seed: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn image_batch(cfg: &VitConfig, batch: usize, seed: u64) -> Tensor {
    let shape = (batch, cfg.num_channels, cfg.image_size, cfg.image_size);
    let n = batch * cfg.num_channels * cfg.image_size * cfg.image_size;
    Tensor::from_vec(lcg_values(n, seed), shape, &Device::Cpu).unwrap()
}

/// Parameters in f64, with non-trivial layer-norm affine values so their gradients are exercised.
fn parameters(cfg: &VitConfig) -> BTreeMap<String, Tensor> {
    let mut params = init_parameters(cfg, 3, DType::F64, &Device::Cpu).unwrap();
    for (i, (name, value)) in params.iter_mut().enumerate() {
        let n = value.elem_count();
        let jitter =
            Tensor::from_vec(lcg_values(n, 100 + i as u64), value.shape(), &Device::Cpu).unwrap();
        // Scale every parameter up so the model is far from its near-linear initial regime.
        let scale = if name.contains("norm") { 0.5 } else { 0.6 };
        *value = (value.clone() * 10.0 + ((jitter - 0.5).unwrap() * scale).unwrap()).unwrap();
    }
    params
}

/// Every parameter as a variable, and the variables' tensors by name (for a model autograd tracks).
fn variables(
    params: &BTreeMap<String, Tensor>,
) -> (BTreeMap<String, Var>, BTreeMap<String, Tensor>) {
    let vars: BTreeMap<String, Var> = params
        .iter()
        .map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap()))
        .collect();
    let tracked = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    (vars, tracked)
}

fn model_over(cfg: &VitConfig, params: &BTreeMap<String, Tensor>) -> Vit {
    let map: HashMap<String, Tensor> = params.clone().into_iter().collect();
    Vit::new(cfg, VarBuilder::from_tensors(map, DType::F64, &Device::Cpu)).unwrap()
}

fn loss_of(cfg: &VitConfig, params: &BTreeMap<String, Tensor>, x: &Tensor, labels: &[u32]) -> f64 {
    let target = one_hot(labels, cfg.num_labels(), DType::F64, &Device::Cpu).unwrap();
    let logits = model_over(cfg, params).forward(x).unwrap();
    cross_entropy(&logits, &target)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn with_entry(t: &Tensor, index: usize, delta: f64) -> Tensor {
    let mut values = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    values[index] += delta;
    Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap()
}

/// Five-point central difference (error O(h^4)). With the steps used below it agrees with exact
/// derivatives to ~1e-10, sharp enough to expose candle's six-digit GELU-erf derivative (off by ~1e-7).
fn five_point(f: &impl Fn(f64) -> f64, h: f64) -> f64 {
    (-f(2.0 * h) + 8.0 * f(h) - 8.0 * f(-h) + f(-2.0 * h)) / (12.0 * h)
}

fn enable_second_order() {
    // Read once per thread by candle, before the first backward on the thread.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
}

#[test]
fn first_order_gradients_match_finite_differences_for_every_parameter() {
    enable_second_order();
    for kind in [
        PositionEmbeddingKind::Learnable,
        PositionEmbeddingKind::Sincos,
    ] {
        let cfg = micro_config(kind);
        let params = parameters(&cfg);
        let (vars, tracked) = variables(&params);
        let x = image_batch(&cfg, 2, 9);
        let labels = [2, 0];
        let target = one_hot(&labels, 3, DType::F64, &Device::Cpu).unwrap();
        let loss =
            cross_entropy(&model_over(&cfg, &tracked).forward(&x).unwrap(), &target).unwrap();
        let grads = loss.backward().unwrap();
        let mut worst = 0f64;
        for (name, value) in &params {
            let grad = grads
                .get(vars[name].as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached `{name}`"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let n = value.elem_count();
            for index in [0, n / 2, n - 1] {
                let shifted = |delta: f64| {
                    let mut moved = params.clone();
                    moved.insert(name.clone(), with_entry(value, index, delta));
                    loss_of(&cfg, &moved, &x, &labels)
                };
                let numeric = five_point(&shifted, 1e-5);
                let error = (grad[index] - numeric).abs() / numeric.abs().max(1.0);
                worst = worst.max(error);
                assert!(
                    error < 1e-8,
                    "{kind:?} `{name}`[{index}]: autograd {} vs finite difference {numeric}",
                    grad[index]
                );
            }
        }
        println!("{kind:?}: worst relative error of first-order gradients {worst:.2e}");
    }
}

/// The gradient-matching loss sum_p |dL/dp(x) - target_p|^2 of a DLG attack, as a function of the input.
fn matching_loss(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    x: &Tensor,
    labels: &[u32],
    target_grads: &BTreeMap<String, Tensor>,
) -> (Tensor, BTreeMap<String, Tensor>) {
    let (vars, tracked) = variables(params);
    let onehot = one_hot(labels, cfg.num_labels(), DType::F64, &Device::Cpu).unwrap();
    let loss = cross_entropy(&model_over(cfg, &tracked).forward(x).unwrap(), &onehot).unwrap();
    let grads = loss.backward().unwrap();
    let param_grads: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    let mut total = Tensor::new(0f64, &Device::Cpu).unwrap();
    for (name, g) in &param_grads {
        if let Some(t) = target_grads.get(name) {
            total = (total + (g - t).unwrap().sqr().unwrap().sum_all().unwrap()).unwrap();
        }
    }
    (total, param_grads)
}

#[test]
fn second_order_input_gradient_of_gradient_matching_matches_finite_differences() {
    enable_second_order();
    for kind in [
        PositionEmbeddingKind::Learnable,
        PositionEmbeddingKind::Sincos,
    ] {
        let cfg = micro_config(kind);
        let params = parameters(&cfg);
        let labels = [1u32];
        let x_true = image_batch(&cfg, 1, 21);
        let (_, target) = matching_loss(&cfg, &params, &x_true, &labels, &BTreeMap::new());
        let target: BTreeMap<String, Tensor> =
            target.into_iter().map(|(k, v)| (k, v.detach())).collect();
        let x0 = image_batch(&cfg, 1, 22);
        let x_var = Var::from_tensor(&x0).unwrap();
        let (loss, _) = matching_loss(&cfg, &params, x_var.as_tensor(), &labels, &target);
        let grad_x = loss.backward().unwrap();
        let grad_x = grad_x
            .get(x_var.as_tensor())
            .expect("no second-order gradient reached the input")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = x0.elem_count();
        let mut worst = 0f64;
        for index in [0, 7, n / 3, n / 2 + 5, n - 1] {
            let value = |delta: f64| {
                let (l, _) = matching_loss(
                    &cfg,
                    &params,
                    &with_entry(&x0, index, delta),
                    &labels,
                    &target,
                );
                l.to_scalar::<f64>().unwrap()
            };
            let numeric = five_point(&value, 1e-3);
            let error = (grad_x[index] - numeric).abs() / numeric.abs().max(1.0);
            worst = worst.max(error);
            assert!(
                error < 5e-8,
                "{kind:?} pixel {index}: double backward {} vs finite difference {numeric}",
                grad_x[index]
            );
        }
        println!("{kind:?}: worst relative error of second-order input gradients {worst:.2e}");
    }
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let cfg = ModelPreset::VitMicro32.config(
        &["neg".into(), "pos".into()],
        PositionEmbeddingKind::Learnable,
    );
    let tensors = init_parameters(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let checkpoint = Checkpoint {
        config: cfg.clone(),
        tensors,
    };
    let dir = tempfile::tempdir().unwrap();
    save_checkpoint(dir.path(), &checkpoint).unwrap();
    let loaded = load_checkpoint(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config, cfg);
    let x = image_batch(&cfg, 3, 5).to_dtype(DType::F32).unwrap();
    let a = checkpoint
        .model()
        .unwrap()
        .forward(&x)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = loaded
        .model()
        .unwrap()
        .forward(&x)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn a_constant_weight_takes_the_frozen_matmul_with_the_same_value_and_input_gradient() {
    // x (2 x 3 tokens x 4 features) through a constant 5 x 4 weight: the frozen-weight op must give
    // candle's matmul value exactly and the input gradient dL/dx = C W for L = sum(C * y).
    let dev = Device::Cpu;
    let x =
        Var::from_tensor(&Tensor::from_vec(lcg_values(24, 1), (2, 3, 4), &dev).unwrap()).unwrap();
    let weight = Tensor::from_vec(lcg_values(20, 2), (5, 4), &dev).unwrap();
    let bias = Tensor::from_vec(lcg_values(5, 3), 5, &dev).unwrap();
    let coefficients = Tensor::from_vec(lcg_values(30, 4), (2, 3, 5), &dev).unwrap();
    let y = layers::linear(x.as_tensor(), &weight, Some(&bias)).unwrap();
    let reference = x
        .as_tensor()
        .broadcast_matmul(&weight.t().unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let largest_difference = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let difference = largest_difference(&y, &reference);
    assert!(difference < 1e-12, "value differs by {difference}");
    let grads = (&y * &coefficients)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gradient = grads.get(x.as_tensor()).unwrap();
    let expected = coefficients.broadcast_matmul(&weight).unwrap();
    let difference = largest_difference(gradient, &expected);
    assert!(difference < 1e-12, "input gradient differs by {difference}");
    // Nothing weight-shaped was computed: candle's own matmul would have left a 4 x 5 gradient for
    // the transposed weight in the store.
    let weight_shaped = grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| g.dims() == [4, 5] || g.dims() == [5, 4])
        .count();
    assert_eq!(weight_shaped, 0);
}

/// The hand-written backward (`loss_gradients`) against candle's autograd through the composite
/// layers, in f64: every parameter's gradient and the input's, with learnable and sin-cos positions,
/// with and without query/key/value biases, with one block (the last, CLS-only block alone) and
/// three, for soft targets; and each request returns only what it asked for.
#[test]
fn hand_written_backward_matches_autograd_for_every_parameter_and_the_input() {
    let cases = [
        (PositionEmbeddingKind::Learnable, true, 1),
        (PositionEmbeddingKind::Learnable, false, 3),
        (PositionEmbeddingKind::Sincos, true, 3),
        (PositionEmbeddingKind::Sincos, false, 1),
    ];
    for (kind, qkv_bias, layers) in cases {
        let mut cfg = micro_config(kind);
        cfg.qkv_bias = qkv_bias;
        cfg.num_hidden_layers = layers;
        // Initial values plus jitter: a model in its working range, where every gradient is of
        // order one (the tenfold scale of `parameters` saturates it and the input gradient vanishes).
        let mut params = init_parameters(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
        for (i, value) in params.values_mut().enumerate() {
            let jitter = lcg_values(value.elem_count(), 200 + i as u64);
            let jitter = Tensor::from_vec(jitter, value.shape(), &Device::Cpu).unwrap();
            *value = (value.clone() + ((jitter - 0.5).unwrap() * 0.8).unwrap()).unwrap();
        }
        let (vars, tracked) = variables(&params);
        let x = Var::from_tensor(&image_batch(&cfg, 3, 11)).unwrap();
        let target = Tensor::new(
            &[[0.7f64, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let loss = cross_entropy(
            &model_over(&cfg, &tracked).forward(x.as_tensor()).unwrap(),
            &target,
        )
        .unwrap();
        let autograd = loss.backward().unwrap();
        let expected_loss = loss.to_scalar::<f64>().unwrap();
        let both = GradientRequest {
            input: true,
            parameters: true,
        };
        let manual = loss_gradients(&cfg, &params, x.as_tensor(), &target, both)
            .unwrap()
            .unwrap();
        assert!((manual.loss - expected_loss).abs() <= 1e-13 * expected_loss.abs().max(1.0));
        let max_difference = |a: &Tensor, b: &Tensor| -> (f64, f64) {
            assert_eq!(a.dims(), b.dims());
            let difference = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap();
            (
                difference.to_scalar::<f64>().unwrap(),
                scale.to_scalar::<f64>().unwrap(),
            )
        };
        let (difference, scale) = max_difference(
            manual.input.as_ref().unwrap(),
            autograd.get(x.as_tensor()).unwrap(),
        );
        assert!(
            scale > 1e-6,
            "{kind:?}: the input gradient is trivially small ({scale:.2e}, {difference:.2e})"
        );
        assert!(
            difference <= 1e-12 * scale.max(1.0),
            "{kind:?} input: {difference:.2e}"
        );
        let manual_params = manual.parameters.unwrap();
        assert_eq!(
            manual_params.keys().collect::<Vec<_>>(),
            params.keys().collect::<Vec<_>>()
        );
        for (name, grad) in &manual_params {
            let reference = autograd
                .get(vars[name].as_tensor())
                .unwrap_or_else(|| panic!("autograd has no gradient for `{name}`"));
            let (difference, scale) = max_difference(grad, reference);
            if name.ends_with("key.bias") {
                // Zero in exact arithmetic (softmax ignores a per-row shift): both are rounding.
                assert!(scale < 1e-15 && difference < 1e-15, "`{name}`: {scale:.2e}");
                continue;
            }
            assert!(
                    difference <= 1e-12 * scale.max(1e-3),
                    "{kind:?}, qkv bias {qkv_bias}, `{name}`: differs by {difference:.2e} (scale {scale:.2e})"
                );
        }
        let input_only = GradientRequest {
            input: true,
            parameters: false,
        };
        let only = loss_gradients(&cfg, &params, x.as_tensor(), &target, input_only)
            .unwrap()
            .unwrap();
        assert!(only.parameters.is_none());
        assert_eq!(
            max_difference(only.input.as_ref().unwrap(), manual.input.as_ref().unwrap()).0,
            0.0
        );
        let parameters_only = GradientRequest {
            input: false,
            parameters: true,
        };
        let only = loss_gradients(&cfg, &params, x.as_tensor(), &target, parameters_only)
            .unwrap()
            .unwrap();
        assert!(only.input.is_none());
        assert_eq!(only.parameters.unwrap().len(), manual_params.len());
    }
}

#[test]
fn a_batch_gives_the_same_gradients_whether_its_halves_run_at_once_or_in_turn() {
    let cfg = micro_config(PositionEmbeddingKind::Sincos);
    let params = init_parameters(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let images = image_batch(&cfg, 5, 3).to_dtype(DType::F32).unwrap();
    let targets = Tensor::new(
        &[
            [1f32, 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.],
            [1., 0., 0.],
            [0.5, 0.5, 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let both = GradientRequest {
        input: true,
        parameters: true,
    };
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| loss_gradients(&cfg, &params, &images, &targets, both))
            .unwrap()
            .unwrap()
    };
    let (in_turn, at_once) = (on(1), on(2));
    assert_eq!(in_turn.loss.to_bits(), at_once.loss.to_bits());
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        flat(in_turn.input.as_ref().unwrap()),
        flat(at_once.input.as_ref().unwrap())
    );
    let (in_turn, at_once) = (in_turn.parameters.unwrap(), at_once.parameters.unwrap());
    assert_eq!(in_turn.len(), at_once.len());
    for (name, gradient) in &in_turn {
        assert_eq!(flat(gradient), flat(&at_once[name]), "`{name}`");
    }
}
