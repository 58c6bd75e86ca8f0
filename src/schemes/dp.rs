//! Differential privacy as a protection scheme, in two modes.
//!
//! - [`DpMode::ClientLevel`] (client-level local DP, the comparison of the Paillier-FL papers): every
//!   client clips its whole update (all tensors flattened together) to L2 norm `C` and adds
//!   N(0, (sigma C)^2) to every coordinate, drawn from its own random stream, before upload.
//! - [`DpMode::DpSgd`] (per-sample DP-SGD, Abadi et al. 2016): the federated loop clips every
//!   per-sample gradient to `C` and adds N(0, (sigma C)^2) to the batch sum
//!   ([`LocalTraining::PerSampleDp`]); the scheme then uploads the result as is.
//!
//! Either way the upload is plain f32 safetensors, the server reads every update in the clear and
//! aggregates the sample-weighted mean. [`DpScheme::privacy_spent`] states the resulting guarantee via
//! the RDP accountant ([`crate::accountant`]).

use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{
    aggregate_readable, read_plain, Aggregate, LocalTraining, NamedTensors, Scheme, ThreatModel,
    Upload, View,
};
use crate::accountant::epsilon_for;
use crate::fl::Transmission;
use crate::{Error, Result};

/// Where the noise goes (the `mode` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// Client-level local DP: clip the whole update to `C`, add N(0, (sigma C)^2) per coordinate.
    #[default]
    ClientLevel,
    /// Per-sample DP-SGD during local training; the update travels as computed.
    DpSgd,
}

impl DpMode {
    /// The config spelling (`client_level`, `dp_sgd`).
    pub fn as_str(self) -> &'static str {
        match self {
            DpMode::ClientLevel => "client_level",
            DpMode::DpSgd => "dp_sgd",
        }
    }
}

/// Default clipping norm C.
pub(crate) fn default_clip_norm() -> f64 {
    1.0
}

/// Default noise multiplier sigma.
pub(crate) fn default_noise_multiplier() -> f64 {
    1.0
}

/// Default delta of the reported (epsilon, delta) guarantee.
pub(crate) fn default_delta() -> f64 {
    1e-5
}

/// Differential privacy (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct DpScheme {
    mode: DpMode,
    clip_norm: f64,
    noise_multiplier: f64,
    delta: f64,
}

impl DpScheme {
    /// A DP scheme; `clip_norm` must be finite and > 0, `noise_multiplier` finite and >= 0 (0 clips
    /// without noise, an ablation with no finite epsilon), `delta` in (0, 1).
    pub fn new(mode: DpMode, clip_norm: f64, noise_multiplier: f64, delta: f64) -> Result<Self> {
        if !(clip_norm.is_finite() && clip_norm > 0.0) {
            return Err(invalid(
                "clip_norm",
                format!("the clipping norm must be a finite number > 0, got {clip_norm}"),
                "pick C near the median update (or per-sample gradient) norm, e.g. 1.0",
            ));
        }
        if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
            return Err(invalid(
                "noise_multiplier",
                format!(
                    "the noise multiplier must be a finite number >= 0, got {noise_multiplier}"
                ),
                "typical values are 0.5 to 5 (0 disables the noise and any finite epsilon)",
            ));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(invalid(
                "delta",
                format!("delta must lie in (0, 1), got {delta}"),
                "use a delta well below 1 / number of records (or clients), e.g. 1e-5",
            ));
        }
        Ok(Self {
            mode,
            clip_norm,
            noise_multiplier,
            delta,
        })
    }

    /// The mode.
    pub fn mode(&self) -> DpMode {
        self.mode
    }

    /// The clipping norm C.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The noise multiplier sigma (noise standard deviation over C).
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The delta the scheme reports epsilon at.
    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// The `(epsilon, optimal RDP order)` guarantee after `rounds` federated rounds, at `delta`;
    /// `None` without noise or for invalid inputs.
    ///
    /// - [`DpMode::ClientLevel`]: one Gaussian mechanism per round with L2 sensitivity C and sampling
    ///   rate 1 (every client takes part in every round), so `steps = rounds`; `sampling_rate` and
    ///   `steps_per_round` are ignored. The guarantee protects a client's whole local dataset under
    ///   the add-or-remove-one-client relation (its clipped update present or not); for replacing a
    ///   client's data the sensitivity is 2C, i.e. the guarantee of noise multiplier sigma / 2.
    /// - [`DpMode::DpSgd`]: record-level DP for each client's local data, with `sampling_rate` =
    ///   batch size / local dataset size and `steps = steps_per_round * rounds` local steps. The
    ///   analysis assumes Poisson sampling of the batches; fixed-size shuffled batches are the usual
    ///   approximation of it.
    pub fn privacy_spent(
        &self,
        rounds: u64,
        sampling_rate: f64,
        steps_per_round: u64,
        delta: f64,
    ) -> Option<(f64, f64)> {
        let (q, steps) = match self.mode {
            DpMode::ClientLevel => (1.0, rounds),
            DpMode::DpSgd => (sampling_rate, steps_per_round.checked_mul(rounds)?),
        };
        epsilon_for(self.noise_multiplier, q, steps, delta).ok()
    }

    fn noisy_clipped(&self, update: &NamedTensors, rng: &mut StdRng) -> Result<NamedTensors> {
        let mut flat = update
            .values()
            .map(|t| Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        clip_in_place(&mut flat, self.clip_norm)?;
        let std = self.noise_multiplier * self.clip_norm;
        if std > 0.0 {
            let normal = Normal::new(0.0, std).map_err(|e| {
                invalid(
                    "noise_multiplier",
                    format!("no Gaussian with standard deviation {std}: {e}"),
                    "use a finite noise multiplier and clipping norm",
                )
            })?;
            for values in &mut flat {
                for v in values.iter_mut() {
                    *v = (f64::from(*v) + normal.sample(rng)) as f32;
                }
            }
        }
        update
            .iter()
            .zip(flat)
            .map(|((name, t), values)| {
                Ok((
                    name.clone(),
                    Tensor::from_vec(values, t.shape(), t.device())?,
                ))
            })
            .collect()
    }
}

/// Scales all `values` (one vector per tensor) by one factor so that their joint L2 norm (computed
/// in f64 over the f32 values) is at most `clip_norm`, exactly after f32 rounding; returns the norm
/// before clipping. A non-finite update is a training failure.
fn clip_in_place(values: &mut [Vec<f32>], clip_norm: f64) -> Result<f64> {
    let original = l2_norm(values);
    if !original.is_finite() {
        return Err(Error::Training(
            "a client update has non-finite values; lower the learning rate".into(),
        ));
    }
    let mut norm = original;
    let mut factor = clip_norm / original;
    let mut rounds = 0;
    while norm > clip_norm {
        if rounds == 64 {
            // Only reachable for a C in the subnormal f32 range: send zeros (norm 0 <= C).
            values.iter_mut().flatten().for_each(|v| *v = 0.0);
            break;
        }
        for v in values.iter_mut().flatten() {
            *v = (f64::from(*v) * factor) as f32;
        }
        norm = l2_norm(values);
        // f32 rounding can leave the norm a hair above C; shrink by a few ulps and rescale.
        factor = (clip_norm / norm).min(1.0 - 1e-6);
        rounds += 1;
    }
    Ok(original)
}

fn l2_norm(values: &[Vec<f32>]) -> f64 {
    values
        .iter()
        .flatten()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

fn invalid(key: &str, reason: String, hint: &str) -> Error {
    Error::InvalidSetting {
        key: key.to_string(),
        reason,
        hint: hint.to_string(),
    }
}

impl Scheme for DpScheme {
    fn id(&self) -> &str {
        "dp"
    }

    fn parameters(&self) -> String {
        let base = format!(
            "mode={}, C={}, sigma={}, delta={:e}",
            self.mode.as_str(),
            self.clip_norm,
            self.noise_multiplier,
            self.delta
        );
        match (self.mode, self.privacy_spent(1, 1.0, 1, self.delta)) {
            (_, None) => format!("{base}, eps=inf (no noise)"),
            (DpMode::ClientLevel, Some((eps, order))) => {
                format!("{base}, eps={eps:.3} per round (q=1, RDP order {order})")
            }
            // Depends on the sampling rate and step count, which the audit knows.
            (DpMode::DpSgd, Some(_)) => base,
        }
    }

    fn local_training(&self) -> LocalTraining {
        match self.mode {
            DpMode::ClientLevel => LocalTraining::Standard,
            DpMode::DpSgd => LocalTraining::PerSampleDp {
                clip_norm: self.clip_norm,
                noise_multiplier: self.noise_multiplier,
            },
        }
    }

    fn encode(
        &mut self,
        _client: usize,
        update: &NamedTensors,
        rng: &mut StdRng,
    ) -> Result<Upload> {
        let started = Instant::now();
        let transmission = match self.mode {
            DpMode::ClientLevel => Transmission::plain(&self.noisy_clipped(update, rng)?, None)?,
            DpMode::DpSgd => Transmission::plain(update, None)?,
        };
        Ok(Upload {
            transmission,
            encode_seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn server_reads(
        &self,
        upload: &Transmission,
        template: &NamedTensors,
    ) -> Result<Option<NamedTensors>> {
        Ok(Some(read_plain(upload, template)?))
    }

    fn aggregate(
        &mut self,
        weighted: &[(usize, &Upload)],
        template: &NamedTensors,
    ) -> Result<Aggregate> {
        aggregate_readable(self, weighted, template)
    }

    fn threat_models(&self) -> Vec<ThreatModel> {
        let description = match self.mode {
            DpMode::ClientLevel => {
                "An honest-but-curious server reads every client's update in the clear, after the \
                 client clipped it to norm C and added Gaussian noise (client-level DP)."
            }
            DpMode::DpSgd => {
                "An honest-but-curious server reads every client's update in the clear, computed by \
                 DP-SGD (per-sample clipping to norm C and Gaussian noise)."
            }
        };
        vec![ThreatModel {
            id: "server".into(),
            description: description.into(),
            view: View::ClientUpdates,
        }]
    }

    fn dp_guarantee(
        &self,
        rounds: u64,
        sampling_rate: f64,
        steps_per_round: u64,
    ) -> Option<(f64, f64)> {
        self.privacy_spent(rounds, sampling_rate, steps_per_round, self.delta)
            .map(|(epsilon, _order)| (epsilon, self.delta))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random_update(seed: u64, shapes: &[(&str, &[usize])], scale: f32) -> NamedTensors {
        let mut rng = StdRng::seed_from_u64(seed);
        shapes
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| (rng.random::<f32>() - 0.5) * scale)
                    .collect();
                (
                    name.to_string(),
                    Tensor::from_vec(v, *shape, &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    fn flat(update: &NamedTensors) -> Vec<f32> {
        update
            .values()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt()
    }

    const SHAPES: &[(&str, &[usize])] = &[
        (
            "vit.embeddings.patch_embeddings.projection.weight",
            &[8, 3, 4, 4],
        ),
        ("vit.embeddings.patch_embeddings.projection.bias", &[8]),
        ("classifier.weight", &[10, 8]),
    ];

    fn decode(scheme: &DpScheme, upload: &Upload, template: &NamedTensors) -> NamedTensors {
        scheme
            .server_reads(&upload.transmission, template)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn clipping_bounds_the_norm_exactly() {
        for (seed, c) in [(1, 1.0), (2, 0.37), (3, 1e-3), (4, 7.5)] {
            let update = random_update(seed, SHAPES, 10.0);
            let mut scheme = DpScheme::new(DpMode::ClientLevel, c, 0.0, 1e-5).unwrap();
            let mut rng = StdRng::seed_from_u64(0);
            let upload = scheme.encode(0, &update, &mut rng).unwrap();
            let sent = flat(&decode(&scheme, &upload, &update));
            let n = norm(&sent);
            assert!(n <= c, "norm {n} > C {c}");
            assert!(n > c * (1.0 - 1e-5), "clipped too far: {n} vs {c}");
            // Clipping is one common factor: direction unchanged.
            let orig = flat(&update);
            let factor = c / norm(&orig);
            for (a, b) in orig.iter().zip(&sent) {
                assert!((f64::from(*a) * factor - f64::from(*b)).abs() < 1e-6 * c + 1e-9);
            }
        }
        // An update already inside the ball is untouched.
        let small = random_update(5, SHAPES, 1e-4);
        let mut scheme = DpScheme::new(DpMode::ClientLevel, 1.0, 0.0, 1e-5).unwrap();
        let upload = scheme
            .encode(0, &small, &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert_eq!(flat(&decode(&scheme, &upload, &small)), flat(&small));
    }

    #[test]
    fn noise_has_standard_deviation_sigma_times_c() {
        let (sigma, c) = (0.8, 2.5);
        let zeros: NamedTensors = [(
            "w".to_string(),
            Tensor::zeros((400, 500), DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        let mut scheme = DpScheme::new(DpMode::ClientLevel, c, sigma, 1e-5).unwrap();
        let upload = scheme
            .encode(0, &zeros, &mut StdRng::seed_from_u64(42))
            .unwrap();
        let noise = flat(&decode(&scheme, &upload, &zeros));
        let n = noise.len() as f64;
        let mean = noise.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = noise
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let want = sigma * c;
        assert!(
            ((var.sqrt() - want) / want).abs() < 0.03,
            "std {}",
            var.sqrt()
        );
        assert!(mean.abs() < 5.0 * want / n.sqrt(), "mean {mean}");
    }

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let update = random_update(9, SHAPES, 3.0);
        let mut scheme = DpScheme::new(DpMode::ClientLevel, 1.0, 1.1, 1e-5).unwrap();
        let mut run = |seed| {
            let upload = scheme
                .encode(0, &update, &mut StdRng::seed_from_u64(seed))
                .unwrap();
            upload.transmission.as_bytes().to_vec()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn dp_sgd_mode_delegates_to_the_loop_and_sends_plain() {
        let update = random_update(3, SHAPES, 3.0);
        let mut scheme = DpScheme::new(DpMode::DpSgd, 0.5, 1.2, 1e-5).unwrap();
        assert_eq!(
            scheme.local_training(),
            LocalTraining::PerSampleDp {
                clip_norm: 0.5,
                noise_multiplier: 1.2
            }
        );
        let upload = scheme
            .encode(0, &update, &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert_eq!(
            upload.transmission.as_bytes(),
            Transmission::plain(&update, None).unwrap().as_bytes()
        );
        assert_eq!(flat(&decode(&scheme, &upload, &update)), flat(&update));
        let client = DpScheme::new(DpMode::ClientLevel, 0.5, 1.2, 1e-5).unwrap();
        assert_eq!(client.local_training(), LocalTraining::Standard);
    }

    #[test]
    fn aggregate_is_the_weighted_mean() {
        let a = random_update(1, SHAPES, 1.0);
        let b = random_update(2, SHAPES, 1.0);
        let mut scheme = DpScheme::new(DpMode::DpSgd, 1.0, 1.0, 1e-5).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let ua = scheme.encode(0, &a, &mut rng).unwrap();
        let ub = scheme.encode(1, &b, &mut rng).unwrap();
        let agg = scheme.aggregate(&[(1, &ua), (3, &ub)], &a).unwrap();
        let got = flat(&agg.mean_update);
        for ((x, y), m) in flat(&a).iter().zip(flat(&b)).zip(got) {
            assert!((0.25 * x + 0.75 * y - m).abs() < 1e-6);
        }
        assert_eq!(
            agg.download_bytes_per_client,
            Transmission::plain(&a, None).unwrap().len()
        );
    }

    #[test]
    fn privacy_spent_uses_the_accountant() {
        let client = DpScheme::new(DpMode::ClientLevel, 1.0, 2.0, 1e-5).unwrap();
        let (eps, order) = client.privacy_spent(10, 0.3, 99, 1e-5).unwrap();
        assert_eq!((eps, order), epsilon_for(2.0, 1.0, 10, 1e-5).unwrap());
        let sgd = DpScheme::new(DpMode::DpSgd, 1.0, 1.1, 1e-5).unwrap();
        let (eps, _) = sgd.privacy_spent(10, 0.01, 100, 1e-5).unwrap();
        assert_eq!(eps, epsilon_for(1.1, 0.01, 1000, 1e-5).unwrap().0);
        let no_noise = DpScheme::new(DpMode::ClientLevel, 1.0, 0.0, 1e-5).unwrap();
        assert!(no_noise.privacy_spent(1, 1.0, 1, 1e-5).is_none());
        assert!(no_noise.parameters().contains("eps=inf"));
        assert!(client.parameters().contains("eps="));
        assert!(client
            .parameters()
            .starts_with("mode=client_level, C=1, sigma=2"));
    }

    #[test]
    fn config_defaults_and_registry() {
        use crate::schemes::{build_scheme, SchemeConfig};
        let config: SchemeConfig = toml::from_str("id = \"dp\"").unwrap();
        assert_eq!(
            config,
            SchemeConfig::Dp {
                mode: DpMode::ClientLevel,
                clip_norm: 1.0,
                noise_multiplier: 1.0,
                delta: 1e-5
            }
        );
        assert_eq!(config.id(), "dp");
        let scheme = build_scheme(&config, 0).unwrap();
        assert_eq!(scheme.id(), "dp");
        assert_eq!(scheme.local_training(), LocalTraining::Standard);
        let sgd: SchemeConfig =
            toml::from_str("id = \"dp\"\nmode = \"dp_sgd\"\nnoise_multiplier = 1.5").unwrap();
        assert_eq!(
            build_scheme(&sgd, 0).unwrap().local_training(),
            LocalTraining::PerSampleDp {
                clip_norm: 1.0,
                noise_multiplier: 1.5
            }
        );
        let bad: SchemeConfig = toml::from_str("id = \"dp\"\nclip_norm = -1.0").unwrap();
        assert!(build_scheme(&bad, 0).is_err());
        assert!(toml::from_str::<SchemeConfig>("id = \"dp\"\nmode = \"central\"").is_err());
    }

    #[test]
    fn rejects_bad_settings() {
        for (c, s, d, key) in [
            (0.0, 1.0, 1e-5, "clip_norm"),
            (f64::INFINITY, 1.0, 1e-5, "clip_norm"),
            (1.0, -0.1, 1e-5, "noise_multiplier"),
            (1.0, f64::NAN, 1e-5, "noise_multiplier"),
            (1.0, 1.0, 0.0, "delta"),
            (1.0, 1.0, 1.0, "delta"),
        ] {
            match DpScheme::new(DpMode::ClientLevel, c, s, d) {
                Err(Error::InvalidSetting { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected an invalid `{key}`, got {other:?}"),
            }
        }
    }

    #[test]
    fn non_finite_update_is_an_error() {
        let bad: NamedTensors = [(
            "w".to_string(),
            Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap(),
        )]
        .into();
        let mut scheme = DpScheme::new(DpMode::ClientLevel, 1.0, 1.0, 1e-5).unwrap();
        assert!(scheme
            .encode(0, &bad, &mut StdRng::seed_from_u64(0))
            .is_err());
    }
}
