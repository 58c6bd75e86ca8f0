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
use crate::model::{cross_entropy, one_hot, Checkpoint, Vit};
use crate::{Error, Result};

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
    /// Bytes of the global model each client downloaded at the start of the round.
    pub download_bytes_per_client: usize,
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

fn check_finite(update: &BTreeMap<String, Tensor>, round: usize, client: usize) -> Result<()> {
    for (name, tensor) in update {
        let sum = tensor
            .abs()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Err(Error::Training(format!(
                "client {client} produced a non-finite update for `{name}` in round {round}; hint: lower `lr`"
            )));
        }
    }
    Ok(())
}

/// Runs `fl.rounds` rounds of federated training from `initial` on `data`, reporting to `observer`.
///
/// Every random choice (partition, batches) flows from `seed`. The server aggregates what it decodes
/// from each client's [`Transmission`], weighted by the clients' sample counts.
pub fn run_federated(
    fl: &FlConfig,
    initial: &Checkpoint,
    data: &DataSplits,
    data_name: &str,
    seed: u64,
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
    let mut global = initial.tensors.clone();
    let download_bytes = Transmission::plain(&global, None)?.len();
    let mut rounds = Vec::with_capacity(fl.rounds);
    for round in 1..=fl.rounds {
        let started = Instant::now();
        let capture_round = fl.capture_rounds.contains(&round);
        let mut received: Vec<(usize, BTreeMap<String, Tensor>)> = Vec::new();
        let mut upload_bytes = Vec::with_capacity(fl.clients);
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
                let loss = cross_entropy(&model.forward(&images)?, &target)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                loss_count += 1;
                let grads = loss.backward()?;
                match fl.algorithm {
                    Algorithm::Fedsgd => {
                        for (name, var) in &vars {
                            if let Some(g) = grads.get(var.as_tensor()) {
                                update.insert(name.clone(), g.detach());
                            }
                        }
                    }
                    Algorithm::Fedavg => optimizer.step(&vars, &grads)?,
                }
            }
            if fl.algorithm == Algorithm::Fedavg {
                for (name, var) in &vars {
                    update.insert(name.clone(), (var.as_tensor().detach() - &global[name])?);
                }
            }
            check_finite(&update, round, client)?;
            let transmission = Transmission::plain(&update, None)?;
            upload_bytes.push(transmission.len());
            if capture_round {
                let meta = CaptureMeta {
                    round,
                    client,
                    algorithm: fl.algorithm,
                    update_kind: match fl.algorithm {
                        Algorithm::Fedsgd => UpdateKind::Gradient,
                        Algorithm::Fedavg => UpdateKind::WeightDelta,
                    },
                    optimizer: fl.optimizer,
                    lr: fl.lr,
                    momentum: fl.momentum,
                    weight_decay: fl.weight_decay,
                    local_steps: batches.len(),
                    batch_size: fl.batch_size.min(own.len()),
                    num_samples: own.len(),
                    scheme: "none".into(),
                    seed,
                    upload_bytes: transmission.len(),
                };
                let private = PrivateBatch {
                    data: data_name.to_string(),
                    step_labels: batches
                        .iter()
                        .map(|b| b.iter().map(|&i| data.train.labels[i]).collect())
                        .collect(),
                    step_indices: batches,
                };
                observer.captured(&Capture {
                    meta,
                    transmission: transmission.clone(),
                    global: Checkpoint {
                        config: cfg.clone(),
                        tensors: global.clone(),
                    },
                    private: Some(private),
                })?;
            }
            let decoded = transmission.decode_plain(&format!("client {client} upload"), &device)?;
            received.push((own.len(), decoded));
        }
        global = aggregate(fl, &global, &received)?;
        let model = Checkpoint {
            config: cfg.clone(),
            tensors: global.clone(),
        }
        .model()?;
        let record = RoundRecord {
            round,
            test_accuracy: evaluate_accuracy(&model, &data.test, &device)?,
            train_loss: loss_sum / loss_count.max(1) as f64,
            upload_bytes,
            download_bytes_per_client: download_bytes,
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

/// The server step: the sample-weighted mean of the received updates, applied to the global model.
fn aggregate(
    fl: &FlConfig,
    global: &BTreeMap<String, Tensor>,
    received: &[(usize, BTreeMap<String, Tensor>)],
) -> Result<BTreeMap<String, Tensor>> {
    let total: usize = received.iter().map(|(n, _)| n).sum();
    let mut next = BTreeMap::new();
    for (name, value) in global {
        let mut mean: Option<Tensor> = None;
        for (samples, update) in received {
            let Some(u) = update.get(name) else { continue };
            let weighted = (u * (*samples as f64 / total as f64))?;
            mean = Some(match mean {
                Some(m) => (m + weighted)?,
                None => weighted,
            });
        }
        let updated = match (mean, fl.algorithm) {
            (None, _) => value.clone(),
            (Some(m), Algorithm::Fedsgd) => (value - (m * fl.lr)?)?,
            (Some(m), Algorithm::Fedavg) => (value + m)?,
        };
        next.insert(name.clone(), updated);
    }
    Ok(next)
}
