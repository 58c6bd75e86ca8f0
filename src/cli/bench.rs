//! `fedleak bench`: times a model step in the output format of the PyTorch reference harness
//! (`tests/bench/torch_vit_ig.py`), so `tests/bench/compare_torch.sh` can alternate the two and report
//! ratios measured in the same run. Timing lives here, never in tests.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::ValueEnum;
use fedleak::model::{
    cross_entropy, init_parameters, loss_gradients, one_hot, AttackStepKind, AttackStepPlan,
    Checkpoint, ModelPreset, PositionEmbeddingKind, VitTarget,
};
use fedleak_attacks::{
    GradientMatcher, GradientRequest, ImagePrior, InputGradient, InvertingGradientsConfig,
    TargetModel,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    at_least_one, positive_number, refuse_attack_step_beyond_memory, select_device, GlobalArgs,
};

/// Which step to time.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StepArg {
    /// One first-order forward + backward of the cross-entropy (a local training step's gradient).
    Train,
    /// One Inverting-Gradients step as `fedleak attack` runs it for this batch size: the matching
    /// objective and its input gradient by a forward-difference Hessian-vector product for one image
    /// (two first-order passes), by an alternating one-sided difference for a batch (two; timed at
    /// its forward side, the backward side costs the same).
    Attack,
    /// The step by a forward difference, whatever the batch size.
    AttackForward,
    /// The step by a central difference, whatever the batch size.
    AttackCentral,
    /// The same step with the exact double backward, as the reference computes it.
    AttackExact,
}

/// How the first-order passes compute their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackwardArg {
    /// fedleak's hand-written ViT backward (fused element-wise kernels), as training and the
    /// finite-difference attack step run it.
    HandWritten,
    /// candle's autograd through the composite layers.
    Autograd,
}

/// Arguments of `fedleak bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The step to time.
    #[arg(long, value_enum, default_value_t = StepArg::Train)]
    pub step: StepArg,
    /// Model preset (10 classes, as in the reference).
    #[arg(long, default_value = "vit-tiny-32")]
    pub model: String,
    /// Images per batch.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch: usize,
    /// Timed iterations.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Attack steps run at once on their own threads, as concurrent restarts run (with one kernel
    /// thread each unless `--threads` says otherwise); an iteration's time is then the wall time of
    /// the round divided by this, the effective time per step.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub concurrent: usize,
    /// For the attack steps: match a FedAvg weight delta of this many local SGD steps (unrolled by
    /// the attack) instead of a gradient; 0 matches a gradient.
    #[arg(long, default_value_t = 0)]
    pub local_steps: usize,
    /// Learning rate of those local steps.
    #[arg(long, default_value_t = 0.01, value_parser = positive_number)]
    pub local_lr: f64,
    /// How `--step train` and the finite-difference attack steps compute first-order gradients
    /// (`--step attack-exact` always uses autograd).
    #[arg(long, value_enum, default_value_t = BackwardArg::HandWritten)]
    pub backward: BackwardArg,
}

impl BenchArgs {
    /// Whether the timed step is the exact double backward.
    pub fn needs_second_order_gradients(&self) -> bool {
        matches!(self.step, StepArg::AttackExact)
    }
}

/// Prints `RESULT impl=fedleak model=.. batch=.. iters=.. fwd_bwd1_median_ms=.. all=[..]`.
pub fn run(global: &GlobalArgs, args: BenchArgs) -> Result<()> {
    let device = select_device(global.device)?;
    let preset = ModelPreset::from_name(&args.model)?;
    let classes: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let config = preset.config(&classes, PositionEmbeddingKind::Learnable);
    let planned = match args.step {
        StepArg::Train => None,
        StepArg::AttackExact => Some((
            AttackStepKind::Exact,
            "lower `--batch` or `--concurrent`, or time `--step attack` (the finite-difference step)",
        )),
        StepArg::Attack | StepArg::AttackForward | StepArg::AttackCentral => Some((
            AttackStepKind::FiniteDifference,
            "lower `--batch` or `--concurrent`",
        )),
    };
    if let Some((kind, instead)) = planned {
        refuse_attack_step_beyond_memory(
            &AttackStepPlan {
                config: &config,
                kind,
                images: args.batch,
                local_steps: args.local_steps.max(1),
                element_bytes: DType::F32.size_in_bytes(),
                concurrent: args.concurrent,
            },
            "this `--step`",
            instead,
        )?;
    }
    let tensors = init_parameters(&config, global.seed(), DType::F32, &device)?;
    let mut rng = StdRng::seed_from_u64(global.seed());
    let side = config.image_size;
    let pixels: Vec<f32> = (0..args.batch * 3 * side * side)
        .map(|_| rng.random())
        .collect();
    let images = Tensor::from_vec(pixels, (args.batch, 3, side, side), &device)?;
    let labels: Vec<u32> = (0..args.batch).map(|i| ((i * 7 + 3) % 10) as u32).collect();
    let checkpoint = Checkpoint { config, tensors };
    // Each step builds only what it needs: ViT-B/16 parameters are 344 MB a copy.
    let times = match args.step {
        StepArg::Train => time_train(&args, checkpoint, &images, &labels)?,
        StepArg::Attack
        | StepArg::AttackForward
        | StepArg::AttackCentral
        | StepArg::AttackExact => {
            let guess: Vec<f32> = (0..args.batch * 3 * side * side)
                .map(|_| rng.random())
                .collect();
            let guess = Tensor::from_vec(guess, (args.batch, 3, side, side), &device)?;
            let target_model = match args.backward {
                BackwardArg::HandWritten => VitTarget::new(&checkpoint),
                BackwardArg::Autograd => VitTarget::new(&checkpoint).with_autograd_only(),
            };
            time_attack(&args, &target_model, &images, &labels, &guess)?
        }
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let model_name = match preset {
        ModelPreset::VitB16_224 => "vitb16",
        _ => "small",
    };
    let metric = match args.step {
        StepArg::Train => "fwd_bwd1_median_ms",
        StepArg::Attack
        | StepArg::AttackForward
        | StepArg::AttackCentral
        | StepArg::AttackExact => "attack_iter_median_ms",
    };
    println!(
        "RESULT impl=fedleak model={model_name} batch={} iters={} {metric}={median:.2} all={:?}",
        args.batch,
        args.iters,
        times
            .iter()
            .map(|t| (t * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Runs `warmup + iters` iterations of `step`, returning the timed ones in ms (per step when
/// `concurrent` steps run in one iteration).
fn time_iterations(args: &BenchArgs, mut step: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(args.iters);
    for i in 0..args.warmup + args.iters {
        let started = Instant::now();
        step()?;
        if i >= args.warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3 / args.concurrent.max(1) as f64);
        }
    }
    Ok(times)
}

/// Times one first-order forward + backward of the cross-entropy over variables.
fn time_train(
    args: &BenchArgs,
    checkpoint: Checkpoint,
    images: &Tensor,
    labels: &[u32],
) -> Result<Vec<f64>> {
    let target = one_hot(labels, 10, DType::F32, images.device())?;
    let vars: Vec<(String, candle_core::Var)> = checkpoint
        .tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), candle_core::Var::from_tensor(v)?)))
        .collect::<Result<_>>()?;
    let model = Checkpoint {
        config: checkpoint.config,
        tensors: vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
    }
    .model()?;
    if args.backward == BackwardArg::HandWritten {
        let request = GradientRequest {
            input: false,
            parameters: true,
        };
        let params: fedleak_attacks::ParamMap = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        return time_iterations(args, || {
            loss_gradients(model.config(), &params, images, &target, request)?.ok_or_else(
                || fedleak::Error::InvalidSetting {
                    key: "--backward".into(),
                    reason: "the hand-written backward runs on the CPU only".into(),
                    hint: "pass `--backward autograd`".into(),
                },
            )?;
            Ok(())
        });
    }
    time_iterations(args, || {
        let grads = cross_entropy(&model.forward(images)?, &target)?.backward()?;
        // Touch one gradient so the work cannot be skipped.
        if let Some((_, first)) = vars.first() {
            grads
                .get(first.as_tensor())
                .map(|g| g.sum_all())
                .transpose()?;
        }
        Ok(())
    })
}

/// Times one attack step (the matching objective and its input gradient) against a gradient, or
/// against the delta of `--local-steps` SGD steps, of the true images.
fn time_attack(
    args: &BenchArgs,
    target_model: &VitTarget,
    images: &Tensor,
    labels: &[u32],
    guess: &Tensor,
) -> Result<Vec<f64>> {
    let target = one_hot(labels, 10, DType::F32, images.device())?;
    let gradient_at = |params: &fedleak_attacks::ParamMap| -> Result<fedleak_attacks::ParamMap> {
        let tracked: Vec<(String, candle_core::Var)> = params
            .iter()
            .map(|(k, v)| Ok((k.clone(), candle_core::Var::from_tensor(v)?)))
            .collect::<Result<_>>()?;
        let grads = target_model
            .loss(
                &tracked
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                    .collect(),
                images,
                &target,
            )?
            .backward()?;
        Ok(tracked
            .iter()
            .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k.clone(), g.detach())))
            .collect())
    };
    // A gradient, or the delta theta_S - theta_0 of S local SGD steps.
    let (observed, unroll) = if args.local_steps == 0 {
        (gradient_at(target_model.parameters())?, None)
    } else {
        let mut params = target_model.parameters().clone();
        for _ in 0..args.local_steps {
            for (name, g) in gradient_at(&params)? {
                let updated = (&params[&name] - (g * args.local_lr)?)?;
                params.insert(name, updated);
            }
        }
        let start = target_model.parameters();
        let delta = params
            .iter()
            .map(|(k, v)| Ok((k.clone(), (v - &start[k])?)))
            .collect::<Result<_>>()?;
        (delta, Some((args.local_lr, args.local_steps)))
    };
    let input_gradient = match args.step {
        StepArg::AttackExact => InputGradient::DoubleBackward,
        StepArg::AttackForward => InputGradient::ForwardDifference,
        StepArg::AttackCentral => InputGradient::CentralDifference,
        _ => InvertingGradientsConfig::default_input_gradient(args.batch),
    };
    let matcher = GradientMatcher::new(
        target_model,
        &observed,
        unroll,
        Some(labels),
        ImagePrior {
            tv_weight: 1e-4,
            ..ImagePrior::default()
        },
        input_gradient,
    )?;
    time_iterations(args, || {
        if args.concurrent > 1 {
            std::thread::scope(|scope| {
                let running: Vec<_> = (0..args.concurrent)
                    .map(|_| scope.spawn(|| matcher.objective_and_gradient(guess)))
                    .collect();
                running.into_iter().try_for_each(|handle| {
                    handle
                        .join()
                        .map_err(|_| anyhow::anyhow!("a concurrent attack step panicked"))?
                        .map(drop)
                        .map_err(anyhow::Error::from)
                })
            })
        } else {
            matcher.objective_and_gradient(guess).map(drop)?;
            Ok(())
        }
    })
}
