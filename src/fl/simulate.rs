//! The federated training loop.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::capture::{Capture, CaptureMeta, PrivateBatch, UpdateKind};
use super::config::{Algorithm, FlConfig, LocalWork};
use super::optim::LocalOptimizer;
use super::transmission::Transmission;
use crate::data::{partition_labels, DataSplits, Dataset, Partition};
use crate::model::{cross_entropy, loss_gradients, one_hot, Checkpoint, Vit};
use crate::schemes::{LocalTraining, Scheme, Upload};
use crate::{Error, Result};
use fedleak_attacks::GradientRequest;

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundRecord {
    /// 1-based round.
    pub round: usize,
    /// Accuracy of the aggregated global model on the test split after the round, in [0, 1].
    pub test_accuracy: f64,
    /// Mean training loss over every local step of every client in the round.
    pub train_loss: f64,
    /// Exact bytes each client uploaded, by client.
    pub upload_bytes: Vec<usize>,
    /// Bytes each client downloaded to learn the round's aggregate (the model, or the aggregate
    /// ciphertext under secure aggregation).
    pub download_bytes_per_client: usize,
    /// Mean seconds a client spent encoding its upload (encryption, noise, sparsification).
    pub encode_seconds: f64,
    /// Seconds the server spent aggregating.
    pub server_seconds: f64,
    /// Seconds a client spent decoding the aggregate (decryption).
    pub decode_seconds: f64,
    /// Wall time of the round (local training, aggregation and evaluation), in seconds.
    pub round_seconds: f64,
}

/// Receives what the simulation produces while it runs (progress, captures); the library never prints.
pub trait FlObserver {
    /// Called after every round.
    fn round_finished(&mut self, record: &RoundRecord) -> Result<()>;
    /// Called for every capture, in client order, during a capture round.
    fn captured(&mut self, capture: &Capture) -> Result<()>;
}

/// The result of a federated run.
#[derive(Debug, Clone)]
pub struct TrainingOutcome {
    /// The final global model.
    pub global: Checkpoint,
    /// One record per round.
    pub rounds: Vec<RoundRecord>,
    /// How the training images were split among clients.
    pub partition: Partition,
}

/// A 64-bit mix (SplitMix64) so every (round, client) gets an independent, reproducible stream.
fn stream_seed(seed: u64, round: usize, client: usize) -> u64 {
    let mut z = seed
        ^ (round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (client as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stacks images of `data` into a batch tensor (B x C x H x W, f32).
pub(crate) fn batch_images(data: &Dataset, indices: &[usize], device: &Device) -> Result<Tensor> {
    let shape = data.shape;
    let mut values = Vec::with_capacity(indices.len() * shape.len());
    for &i in indices {
        values.extend_from_slice(data.image(i));
    }
    Ok(Tensor::from_vec(
        values,
        (indices.len(), shape.channels, shape.height, shape.width),
        device,
    )?)
}

/// Accuracy of `model` on every image of `data`, in [0, 1].
pub fn evaluate_accuracy(model: &Vit, data: &Dataset, device: &Device) -> Result<f64> {
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut correct = 0usize;
    for chunk in indices.chunks(128) {
        let logits = model.forward(&batch_images(data, chunk, device)?)?;
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        correct += chunk
            .iter()
            .zip(predicted)
            .filter(|(&i, p)| data.labels[i] == *p)
            .count();
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

fn vars_from(params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Var>> {
    params
        .iter()
        .map(|(k, v)| Ok((k.clone(), Var::from_tensor(v)?)))
        .collect()
}

fn model_over_vars(
    cfg: &crate::model::VitConfig,
    vars: &BTreeMap<String, Var>,
    device: &Device,
) -> Result<Vit> {
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    Ok(Vit::new(
        cfg,
        VarBuilder::from_tensors(map, DType::F32, device),
    )?)
}

/// The batches one client trains on this round (indices into the training split).
fn local_batches(fl: &FlConfig, own: &[usize], rng: &mut StdRng) -> Vec<Vec<usize>> {
    let batch = fl.batch_size.min(own.len());
    match (fl.algorithm, fl.local_work()) {
        (Algorithm::Fedsgd, _) => {
            let mut shuffled = own.to_vec();
            shuffled.shuffle(rng);
            vec![shuffled[..batch].to_vec()]
        }
        (Algorithm::Fedavg, LocalWork::Steps(steps)) => (0..steps)
            .map(|_| {
                let mut shuffled = own.to_vec();
                shuffled.shuffle(rng);
                shuffled[..batch].to_vec()
            })
            .collect(),
        (Algorithm::Fedavg, LocalWork::Epochs(epochs)) => (0..epochs)
            .flat_map(|_| {
                let mut shuffled = own.to_vec();
                shuffled.shuffle(rng);
                shuffled
                    .chunks(batch)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect(),
    }
}

fn check_finite(update: &BTreeMap<String, Tensor>, whose: &str) -> Result<()> {
    for (name, tensor) in update {
        let sum = tensor
            .abs()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Err(Error::Training(format!(
                "{whose}: non-finite update for `{name}`; hint: lower `lr`"
            )));
        }
    }
    Ok(())
}

/// The gradient of the batch-mean loss for every parameter, by name: by the hand-written backward
/// where it runs (the CPU, f32 and f64), by candle's autograd elsewhere.
fn batch_gradient(
    model: &Vit,
    vars: &BTreeMap<String, Var>,
    images: &Tensor,
    target: &Tensor,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let params: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    let request = GradientRequest {
        input: false,
        parameters: true,
    };
    if let Some(gradients) = loss_gradients(model.config(), &params, images, target, request)? {
        return Ok((gradients.loss, gradients.parameters.unwrap_or_default()));
    }
    let loss = cross_entropy(&model.forward(images)?, target)?;
    let grads = loss.backward()?;
    let named = vars
        .iter()
        .filter_map(|(name, var)| {
            grads
                .get(var.as_tensor())
                .map(|g| (name.clone(), g.detach()))
        })
        .collect();
    Ok((loss.to_scalar::<f32>()? as f64, named))
}

/// DP-SGD (Abadi et al. 2016): every per-sample gradient clipped to L2 norm `clip_norm`, summed,
/// Gaussian noise of standard deviation `noise_multiplier * clip_norm` added to every coordinate, divided
/// by the batch size. Per-sample gradients come from one backward pass per image.
fn dp_sgd_gradient(
    model: &Vit,
    vars: &BTreeMap<String, Var>,
    images: &Tensor,
    target: &Tensor,
    (clip_norm, noise_multiplier): (f64, f64),
    rng: &mut StdRng,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let batch = images.dim(0)?;
    let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut loss_sum = 0.0;
    for i in 0..batch {
        let (loss, grads) = batch_gradient(
            model,
            vars,
            &images.narrow(0, i, 1)?,
            &target.narrow(0, i, 1)?,
        )?;
        loss_sum += loss;
        let mut squared = 0.0;
        for g in grads.values() {
            squared += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let scale = (clip_norm / squared.sqrt().max(1e-30)).min(1.0);
        for (name, g) in grads {
            let clipped = (g * scale)?;
            let total = match sum.remove(&name) {
                Some(s) => (s + clipped)?,
                None => clipped,
            };
            sum.insert(name, total);
        }
    }
    let normal =
        rand_distr::Normal::new(0.0f32, (noise_multiplier * clip_norm) as f32).map_err(|e| {
            Error::InvalidSetting {
                key: "noise_multiplier".into(),
                reason: e.to_string(),
                hint: "use a finite, non-negative noise multiplier and clipping norm".into(),
            }
        })?;
    let mut noisy = BTreeMap::new();
    for (name, s) in sum {
        let noise: Vec<f32> = (0..s.elem_count())
            .map(|_| rand_distr::Distribution::sample(&normal, rng))
            .collect();
        let noise = Tensor::from_vec(noise, s.shape(), s.device())?;
        noisy.insert(name, ((s + noise)? / batch as f64)?);
    }
    Ok((loss_sum / batch as f64, noisy))
}

/// What one client did in a round.
struct ClientRound {
    samples: usize,
    upload: Upload,
    batches: Vec<Vec<usize>>,
}

/// Runs `fl.rounds` rounds of federated training from `initial` on `data` under `scheme`, reporting to
/// `observer`.
///
/// Every random choice (partition, batches, noise) flows from `seed`. Each client's plain update goes
/// through [`Scheme::encode`]; the server aggregates with [`Scheme::aggregate`]. At capture rounds the
/// observer receives, for every client whose upload the server can read, the server's decoded view, and
/// for every round the aggregate (what a secure-aggregation server learns).
pub fn run_federated(
    fl: &FlConfig,
    initial: &Checkpoint,
    data: &DataSplits,
    data_name: &str,
    seed: u64,
    scheme: &mut dyn Scheme,
    observer: &mut dyn FlObserver,
) -> Result<TrainingOutcome> {
    fl.validate()?;
    let cfg = &initial.config;
    let device = initial
        .tensors
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let partition = partition_labels(&data.train.labels, fl.clients, fl.partition, seed)?;
    let num_labels = cfg.num_labels();
    if let Some(&bad) = data
        .train
        .labels
        .iter()
        .chain(&data.test.labels)
        .find(|&&l| l as usize >= num_labels)
    {
        return Err(Error::InvalidSetting {
            key: "model".into(),
            reason: format!("label {bad} does not fit a model with {num_labels} classes"),
            hint: "use a model whose id2label covers every class of the data".into(),
        });
    }
    let local_training = scheme.local_training();
    let mut global = initial.tensors.clone();
    let mut rounds = Vec::with_capacity(fl.rounds);
    for round in 1..=fl.rounds {
        let started = Instant::now();
        let capture_round = fl.capture_rounds.contains(&round);
        let mut clients: Vec<ClientRound> = Vec::with_capacity(fl.clients);
        let (mut loss_sum, mut loss_count) = (0f64, 0usize);
        for (client, own) in partition.clients.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(stream_seed(seed, round, client));
            let batches = local_batches(fl, own, &mut rng);
            let vars = vars_from(&global)?;
            let model = model_over_vars(cfg, &vars, &device)?;
            let mut optimizer = LocalOptimizer::new(fl);
            let mut update = BTreeMap::new();
            for batch in &batches {
                let images = batch_images(&data.train, batch, &device)?;
                let labels: Vec<u32> = batch.iter().map(|&i| data.train.labels[i]).collect();
                let target = one_hot(&labels, num_labels, DType::F32, &device)?;
                let (loss, grads) = match local_training {
                    LocalTraining::Standard => batch_gradient(&model, &vars, &images, &target)?,
                    LocalTraining::PerSampleDp {
                        clip_norm,
                        noise_multiplier,
                    } => dp_sgd_gradient(
                        &model,
                        &vars,
                        &images,
                        &target,
                        (clip_norm, noise_multiplier),
                        &mut rng,
                    )?,
                };
                loss_sum += loss;
                loss_count += 1;
                match fl.algorithm {
                    Algorithm::Fedsgd => update = grads,
                    Algorithm::Fedavg => optimizer.step(&vars, &grads)?,
                }
            }
            if fl.algorithm == Algorithm::Fedavg {
                for (name, var) in &vars {
                    update.insert(name.clone(), (var.as_tensor().detach() - &global[name])?);
                }
            }
            check_finite(&update, &format!("client {client} in round {round}"))?;
            let upload = scheme.encode(client, &update, &mut rng)?;
            clients.push(ClientRound {
                samples: own.len(),
                upload,
                batches,
            });
        }
        let weighted: Vec<(usize, &Upload)> =
            clients.iter().map(|c| (c.samples, &c.upload)).collect();
        let aggregate = scheme.aggregate(&weighted, &global)?;
        check_finite(
            &aggregate.mean_update,
            &format!("the aggregate of round {round}"),
        )?;
        if capture_round {
            let context = CaptureContext {
                fl,
                cfg,
                global: &global,
                data,
                data_name,
                seed,
                round,
                scheme: &*scheme,
            };
            for (client, own) in clients.iter().enumerate() {
                let Some(view) = scheme.server_reads(&own.upload.transmission, &global)? else {
                    continue;
                };
                observer.captured(&context.capture(
                    false,
                    &[client],
                    &[own],
                    &view,
                    own.upload.transmission.len(),
                )?)?;
            }
            let all: Vec<usize> = (0..clients.len()).collect();
            let everyone: Vec<&ClientRound> = clients.iter().collect();
            observer.captured(&context.capture(
                true,
                &all,
                &everyone,
                &aggregate.mean_update,
                aggregate.download_bytes_per_client,
            )?)?;
        }
        global = apply_aggregate(fl, &global, &aggregate.mean_update)?;
        let model = Checkpoint {
            config: cfg.clone(),
            tensors: global.clone(),
        }
        .model()?;
        let record = RoundRecord {
            round,
            test_accuracy: evaluate_accuracy(&model, &data.test, &device)?,
            train_loss: loss_sum / loss_count.max(1) as f64,
            upload_bytes: clients
                .iter()
                .map(|c| c.upload.transmission.len())
                .collect(),
            download_bytes_per_client: aggregate.download_bytes_per_client,
            encode_seconds: clients.iter().map(|c| c.upload.encode_seconds).sum::<f64>()
                / clients.len().max(1) as f64,
            server_seconds: aggregate.server_seconds,
            decode_seconds: aggregate.decode_seconds,
            round_seconds: started.elapsed().as_secs_f64(),
        };
        observer.round_finished(&record)?;
        rounds.push(record);
    }
    Ok(TrainingOutcome {
        global: Checkpoint {
            config: cfg.clone(),
            tensors: global,
        },
        rounds,
        partition,
    })
}

/// What every capture of a round shares.
struct CaptureContext<'a> {
    fl: &'a FlConfig,
    cfg: &'a crate::model::VitConfig,
    global: &'a BTreeMap<String, Tensor>,
    data: &'a DataSplits,
    data_name: &'a str,
    seed: u64,
    round: usize,
    scheme: &'a dyn Scheme,
}

impl CaptureContext<'_> {
    /// A capture of `view`, the update the party reads, produced by `members` (one client, or all of
    /// them for the aggregate). The private batch of step s is the union of the members' step-s batches.
    /// `aggregate` marks the server's aggregate, also when it averages a single client (it is then
    /// written beside that client's own capture, not over it).
    fn capture(
        &self,
        aggregate: bool,
        member_ids: &[usize],
        members: &[&ClientRound],
        view: &BTreeMap<String, Tensor>,
        bytes: usize,
    ) -> Result<Capture> {
        let fl = self.fl;
        let steps = members.iter().map(|m| m.batches.len()).max().unwrap_or(0);
        let step_indices: Vec<Vec<usize>> = (0..steps)
            .map(|s| {
                members
                    .iter()
                    .filter_map(|m| m.batches.get(s))
                    .flatten()
                    .copied()
                    .collect()
            })
            .collect();
        let meta = CaptureMeta {
            round: self.round,
            client: member_ids.first().copied().unwrap_or(0),
            algorithm: fl.algorithm,
            update_kind: match fl.algorithm {
                Algorithm::Fedsgd => UpdateKind::Gradient,
                Algorithm::Fedavg => UpdateKind::WeightDelta,
            },
            optimizer: fl.optimizer,
            lr: fl.lr,
            momentum: fl.momentum,
            // Only FedAvg's AdamW decays weights; a sidecar states what was applied.
            weight_decay: fl.applied_weight_decay(),
            // Under local epochs, clients of unequal holdings take different numbers of steps:
            // an aggregate's sidecar states the most, and the clients' holdings give each count.
            local_steps: steps,
            local_epochs: match (fl.algorithm, fl.local_work()) {
                (Algorithm::Fedavg, LocalWork::Epochs(epochs)) => Some(epochs),
                _ => None,
            },
            // The plan's batch size, capped by the largest holding (a client holding less trains on
            // all it holds): not the first client's batch, which a smaller holding would shrink.
            batch_size: fl
                .batch_size
                .min(members.iter().map(|m| m.samples).max().unwrap_or(0)),
            num_samples: members.iter().map(|m| m.samples).sum(),
            scheme: self.scheme.id().to_string(),
            seed: self.seed,
            upload_bytes: bytes,
            aggregate_of: if aggregate {
                member_ids.to_vec()
            } else {
                Vec::new()
            },
            aggregate_samples: if aggregate {
                members.iter().map(|m| m.samples).collect()
            } else {
                Vec::new()
            },
        };
        let private = PrivateBatch {
            data: self.data_name.to_string(),
            step_labels: step_indices
                .iter()
                .map(|b| b.iter().map(|&i| self.data.train.labels[i]).collect())
                .collect(),
            step_indices,
        };
        Ok(Capture {
            origin: format!("capture of round {} client {}", meta.round, meta.client),
            meta,
            transmission: Transmission::plain(view, None)?,
            global: Checkpoint {
                config: self.cfg.clone(),
                tensors: self.global.clone(),
            },
            private: Some(private),
        })
    }
}

/// The server step: the aggregated update applied to the global model.
fn apply_aggregate(
    fl: &FlConfig,
    global: &BTreeMap<String, Tensor>,
    mean_update: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut next = BTreeMap::new();
    for (name, value) in global {
        let updated = match (mean_update.get(name), fl.algorithm) {
            (None, _) => value.clone(),
            (Some(m), Algorithm::Fedsgd) => (value - (m * fl.lr)?)?,
            (Some(m), Algorithm::Fedavg) => (value + m)?,
        };
        next.insert(name.clone(), updated);
    }
    Ok(next)
}
