//! Splitting the training images among K federated clients: IID or Dirichlet(alpha) non-IID.
//!
//! IID shuffles the indices and deals equal shares. Dirichlet follows Hsu, Qi and Brown, "Measuring
//! the effects of non-identical data distribution for federated visual classification" (2019): for
//! every class, client proportions are drawn from Dir(alpha) (normalised Gamma(alpha, 1) samples) and
//! that class's shuffled images are cut accordingly; small alpha gives each client few classes. Every
//! client then gets at least one image (taken from the largest client). Every random choice comes from
//! `StdRng::seed_from_u64(seed)`, so a [`Partition`] is reproducible and serialisable for the record.
//!
//! This module sees only labels: it knows nothing of pixels, files, models or the FL simulation.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma};

use crate::{Error, Result};

/// How training images are spread over clients.
///
/// In a config: `{ kind = "iid" }` or `{ kind = "dirichlet", alpha = 0.5 }`; as a string (a flag):
/// `iid` or `dirichlet:0.5`.
///
/// ```
/// use fedleak::data::PartitionScheme;
/// let scheme: PartitionScheme = "dirichlet:0.5".parse()?;
/// assert_eq!(scheme, PartitionScheme::Dirichlet { alpha: 0.5 });
/// assert_eq!(scheme.to_string(), "dirichlet:0.5");
/// assert_eq!("iid".parse::<PartitionScheme>()?, PartitionScheme::Iid);
/// # Ok::<(), fedleak::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PartitionScheme {
    /// Shuffle, then equal shares (sizes differ by at most one).
    Iid,
    /// Per class, proportions drawn from a symmetric Dirichlet with concentration `alpha` (> 0).
    Dirichlet {
        /// Concentration: small (0.1) is very skewed, large (100) close to IID.
        alpha: f64,
    },
}

impl fmt::Display for PartitionScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionScheme::Iid => f.write_str("iid"),
            PartitionScheme::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
        }
    }
}

impl FromStr for PartitionScheme {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: String| Error::InvalidSetting {
            key: "partition".into(),
            reason,
            hint: "use `iid` or `dirichlet:ALPHA` with ALPHA > 0, e.g. `dirichlet:0.5`".into(),
        };
        if text == "iid" {
            return Ok(PartitionScheme::Iid);
        }
        match text.split_once(':') {
            Some(("dirichlet", alpha)) => {
                let alpha: f64 = alpha
                    .parse()
                    .map_err(|_| bad(format!("`{alpha}` is not a number")))?;
                check_alpha(alpha)?;
                Ok(PartitionScheme::Dirichlet { alpha })
            }
            _ => Err(bad(format!("unknown partition scheme `{text}`"))),
        }
    }
}

/// Which training images each client holds, and how that was decided.
///
/// ```
/// use fedleak::data::{partition_labels, PartitionScheme};
/// let labels = [0, 0, 1, 1, 1, 1];
/// let partition = partition_labels(&labels, 3, PartitionScheme::Iid, 7)?;
/// assert_eq!(partition.num_clients(), 3);
/// assert!(partition.clients.iter().all(|c| c.len() == 2));
/// let json = serde_json::to_string(&partition).unwrap();
/// assert!(json.starts_with(r#"{"scheme":{"kind":"iid"},"seed":7,"clients":[["#));
/// # Ok::<(), fedleak::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// The scheme (with its alpha) that produced the split.
    pub scheme: PartitionScheme,
    /// The seed of the random choices.
    pub seed: u64,
    /// Each client's indices into the training set, sorted ascending; every index in exactly one.
    pub clients: Vec<Vec<usize>>,
}

impl Partition {
    /// Number of clients.
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// Per client, the number of images of each class (`num_classes` entries per client).
    ///
    /// ```
    /// use fedleak::data::{Partition, PartitionScheme};
    /// let p = Partition { scheme: PartitionScheme::Iid, seed: 0, clients: vec![vec![0, 2], vec![1]] };
    /// assert_eq!(p.label_counts(&[1, 0, 1], 2), vec![vec![0, 2], vec![1, 0]]);
    /// ```
    pub fn label_counts(&self, labels: &[u32], num_classes: usize) -> Vec<Vec<usize>> {
        self.clients
            .iter()
            .map(|indices| {
                let mut counts = vec![0; num_classes];
                for &i in indices {
                    if let Some(count) = counts.get_mut(labels[i] as usize) {
                        *count += 1;
                    }
                }
                counts
            })
            .collect()
    }
}

/// Splits the images with `labels` among `num_clients` clients by `scheme`, all random choices drawn
/// from `StdRng::seed_from_u64(seed)`. Every index lands with exactly one client and every client gets
/// at least one image.
///
/// Fails with [`Error::InvalidSetting`] (key `clients`) when `num_clients` is 0 or exceeds the number
/// of images, and (key `alpha`) when a Dirichlet alpha is not a positive finite number.
///
/// ```
/// use fedleak::data::{partition_labels, PartitionScheme};
/// let labels: Vec<u32> = (0..100).map(|i| i % 4).collect();
/// let p = partition_labels(&labels, 5, PartitionScheme::Dirichlet { alpha: 0.5 }, 1)?;
/// let mut all: Vec<usize> = p.clients.concat();
/// all.sort();
/// assert_eq!(all, (0..100).collect::<Vec<_>>());
/// assert!(p.clients.iter().all(|c| !c.is_empty()));
/// assert!(partition_labels(&labels, 101, PartitionScheme::Iid, 1).is_err());
/// # Ok::<(), fedleak::Error>(())
/// ```
pub fn partition_labels(
    labels: &[u32],
    num_clients: usize,
    scheme: PartitionScheme,
    seed: u64,
) -> Result<Partition> {
    let n = labels.len();
    if num_clients == 0 || num_clients > n {
        return Err(Error::InvalidSetting {
            key: "clients".into(),
            reason: format!(
                "cannot split {n} training images among {num_clients} clients; every client needs \
                 at least one image"
            ),
            hint: format!("set `clients` between 1 and {n}"),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut clients = match scheme {
        PartitionScheme::Iid => split_iid(n, num_clients, &mut rng),
        PartitionScheme::Dirichlet { alpha } => {
            check_alpha(alpha)?;
            split_dirichlet(labels, num_clients, alpha, &mut rng)
        }
    };
    for client in &mut clients {
        client.sort_unstable();
    }
    Ok(Partition {
        scheme,
        seed,
        clients,
    })
}

fn check_alpha(alpha: f64) -> Result<()> {
    if alpha.is_finite() && alpha > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidSetting {
            key: "alpha".into(),
            reason: format!("the Dirichlet concentration must be a positive number, got {alpha}"),
            hint: "use e.g. 0.1 (very skewed), 0.5, or 100 (close to IID)".into(),
        })
    }
}

fn split_iid(n: usize, num_clients: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let (base, extra) = (n / num_clients, n % num_clients);
    let mut rest = &order[..];
    (0..num_clients)
        .map(|k| {
            let (share, tail) = rest.split_at(base + usize::from(k < extra));
            rest = tail;
            share.to_vec()
        })
        .collect()
}

fn split_dirichlet(
    labels: &[u32],
    num_clients: usize,
    alpha: f64,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &label) in labels.iter().enumerate() {
        by_class[label as usize].push(i);
    }
    let gamma = Gamma::new(alpha, 1.0).expect("alpha checked positive and finite");
    let mut clients = vec![Vec::new(); num_clients];
    for mut indices in by_class.into_iter().filter(|c| !c.is_empty()) {
        indices.shuffle(rng);
        let mut weights: Vec<f64> = (0..num_clients).map(|_| gamma.sample(rng)).collect();
        let total: f64 = weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            // Every sample underflowed (tiny alpha): the class goes to one client.
            weights = vec![0.0; num_clients];
            weights[rng.random_range(0..num_clients)] = 1.0;
        }
        let total: f64 = weights.iter().sum();
        let n = indices.len();
        let mut cumulative = 0.0;
        let mut start = 0;
        for (k, weight) in weights.iter().enumerate() {
            cumulative += weight;
            let end = if k + 1 == num_clients {
                n
            } else {
                ((cumulative / total * n as f64).round() as usize).clamp(start, n)
            };
            clients[k].extend_from_slice(&indices[start..end]);
            start = end;
        }
    }
    // Every client needs data: move one image from the largest client (lowest id on ties).
    for k in 0..num_clients {
        if clients[k].is_empty() {
            let donor = (0..num_clients)
                .max_by_key(|&j| (clients[j].len(), std::cmp::Reverse(j)))
                .expect("at least one client");
            let moved = clients[donor]
                .pop()
                .expect("some client holds two images when one is empty and clients <= images");
            clients[k].push(moved);
        }
    }
    clients
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_fixture, FixtureName, ImageShape};

    fn assert_covers_once(p: &Partition, n: usize) {
        let mut all = p.clients.concat();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert!(p.clients.iter().all(|c| !c.is_empty()));
    }

    fn mnist_train_labels() -> Vec<u32> {
        load_fixture(FixtureName::Mnist5k, ImageShape::new(1, 28, 28), 0)
            .unwrap()
            .train
            .labels
    }

    #[test]
    fn iid_covers_each_index_once_with_equal_shares() {
        let labels: Vec<u32> = (0..103).map(|i| i % 3).collect();
        let p = partition_labels(&labels, 10, PartitionScheme::Iid, 5).unwrap();
        assert_covers_once(&p, 103);
        let sizes: Vec<usize> = p.clients.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![11, 11, 11, 10, 10, 10, 10, 10, 10, 10]);
        assert_eq!(
            p,
            partition_labels(&labels, 10, PartitionScheme::Iid, 5).unwrap()
        );
        assert_ne!(
            p.clients,
            partition_labels(&labels, 10, PartitionScheme::Iid, 6)
                .unwrap()
                .clients
        );
    }

    #[test]
    fn dirichlet_covers_each_index_once_and_is_deterministic() {
        let labels = mnist_train_labels();
        for alpha in [0.05, 0.5, 100.0] {
            let scheme = PartitionScheme::Dirichlet { alpha };
            let p = partition_labels(&labels, 20, scheme, 3).unwrap();
            assert_covers_once(&p, labels.len());
            assert_eq!(p, partition_labels(&labels, 20, scheme, 3).unwrap());
            assert_ne!(
                p.clients,
                partition_labels(&labels, 20, scheme, 4).unwrap().clients
            );
        }
    }

    fn max_majority_share(p: &Partition, labels: &[u32]) -> f64 {
        p.label_counts(labels, 10)
            .iter()
            .map(|counts| {
                let total: usize = counts.iter().sum();
                *counts.iter().max().unwrap() as f64 / total as f64
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn small_alpha_is_skewed_and_large_alpha_is_not() {
        let labels = mnist_train_labels();
        let skewed =
            partition_labels(&labels, 10, PartitionScheme::Dirichlet { alpha: 0.1 }, 0).unwrap();
        let share = max_majority_share(&skewed, &labels);
        assert!(
            share > 0.8,
            "alpha 0.1: largest majority-class share {share}"
        );
        let even =
            partition_labels(&labels, 10, PartitionScheme::Dirichlet { alpha: 1000.0 }, 0).unwrap();
        let share = max_majority_share(&even, &labels);
        assert!(
            share < 0.3,
            "alpha 1000: largest majority-class share {share}"
        );
    }

    #[test]
    fn tiny_alpha_still_gives_every_client_an_image() {
        let labels = vec![0u32; 12];
        let p =
            partition_labels(&labels, 12, PartitionScheme::Dirichlet { alpha: 1e-4 }, 9).unwrap();
        assert_covers_once(&p, 12);
        assert!(p.clients.iter().all(|c| c.len() == 1));
    }

    #[test]
    fn too_many_or_zero_clients_is_invalid_setting() {
        let labels = vec![0u32, 1, 0];
        for k in [0, 4] {
            let err = partition_labels(&labels, k, PartitionScheme::Iid, 0).unwrap_err();
            match &err {
                Error::InvalidSetting { key, reason, .. } => {
                    assert_eq!(key, "clients");
                    assert!(reason.contains(&format!("3 training images among {k} clients")));
                }
                other => panic!("expected InvalidSetting, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_alpha_is_rejected() {
        let labels = vec![0u32, 1];
        for alpha in [0.0, -1.0, f64::NAN] {
            let err =
                partition_labels(&labels, 2, PartitionScheme::Dirichlet { alpha }, 0).unwrap_err();
            assert!(matches!(&err, Error::InvalidSetting { key, .. } if key == "alpha"));
        }
        assert!("dirichlet:0".parse::<PartitionScheme>().is_err());
        assert!("dirichlet".parse::<PartitionScheme>().is_err());
    }

    #[test]
    fn partition_round_trips_through_json() {
        let p = partition_labels(
            &[0, 1, 1, 0],
            2,
            PartitionScheme::Dirichlet { alpha: 0.5 },
            1,
        )
        .unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert!(
            json.contains(r#""scheme":{"kind":"dirichlet","alpha":0.5}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Partition>(&json).unwrap(), p);
    }
}
