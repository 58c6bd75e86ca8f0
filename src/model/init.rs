//! Seeded parameter initialisation and the parameter inventory (names and shapes) of a configuration.
//!
//! `Device::set_seed` fails on CPU, so fedleak draws every initial value from its own seeded RNG on the
//! host and uploads it. The scheme is Hugging Face's `ViTPreTrainedModel._init_weights`: weights and the
//! CLS / position embeddings from a normal(0, 0.02) truncated at two standard deviations, biases zero,
//! layer norms one and zero.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::config::{PositionEmbeddingKind, VitConfig};

/// Standard deviation of Hugging Face's `initializer_range`.
const INIT_STD: f64 = 0.02;

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InitKind {
    TruncatedNormal,
    Zeros,
    Ones,
}

/// Every parameter of a configuration: Hugging Face name, shape, and initial distribution, sorted by name.
/// A fixed sin-cos position table is not a parameter and is not listed.
pub(crate) fn parameter_inventory(cfg: &VitConfig) -> Vec<(String, Vec<usize>, InitKind)> {
    use InitKind::*;
    let (d, m, c, p) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_channels,
        cfg.patch_size,
    );
    let mut params = vec![
        (
            "vit.embeddings.cls_token".to_string(),
            vec![1, 1, d],
            TruncatedNormal,
        ),
        (
            "vit.embeddings.patch_embeddings.projection.weight".to_string(),
            vec![d, c, p, p],
            TruncatedNormal,
        ),
        (
            "vit.embeddings.patch_embeddings.projection.bias".to_string(),
            vec![d],
            Zeros,
        ),
        ("vit.layernorm.weight".to_string(), vec![d], Ones),
        ("vit.layernorm.bias".to_string(), vec![d], Zeros),
        (
            "classifier.weight".to_string(),
            vec![cfg.num_labels(), d],
            TruncatedNormal,
        ),
        ("classifier.bias".to_string(), vec![cfg.num_labels()], Zeros),
    ];
    if cfg.position_embedding == PositionEmbeddingKind::Learnable {
        params.push((
            "vit.embeddings.position_embeddings".to_string(),
            vec![1, cfg.num_patches() + 1, d],
            TruncatedNormal,
        ));
    }
    for i in 0..cfg.num_hidden_layers {
        let pre = format!("vit.encoder.layer.{i}");
        for norm in ["layernorm_before", "layernorm_after"] {
            params.push((format!("{pre}.{norm}.weight"), vec![d], Ones));
            params.push((format!("{pre}.{norm}.bias"), vec![d], Zeros));
        }
        for proj in ["query", "key", "value"] {
            params.push((
                format!("{pre}.attention.attention.{proj}.weight"),
                vec![d, d],
                TruncatedNormal,
            ));
            if cfg.qkv_bias {
                params.push((
                    format!("{pre}.attention.attention.{proj}.bias"),
                    vec![d],
                    Zeros,
                ));
            }
        }
        let dense = [
            ("attention.output.dense", d, d),
            ("intermediate.dense", m, d),
            ("output.dense", d, m),
        ];
        for (name, outputs, inputs) in dense {
            params.push((
                format!("{pre}.{name}.weight"),
                vec![outputs, inputs],
                TruncatedNormal,
            ));
            params.push((format!("{pre}.{name}.bias"), vec![outputs], Zeros));
        }
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// Draws the initial parameters of `cfg` from a generator seeded with `seed`, by Hugging Face name.
///
/// The same seed gives bit-identical parameters on every run and machine.
///
/// ```
/// use candle_core::{DType, Device};
/// use fedleak::model::{init_parameters, ModelPreset, PositionEmbeddingKind};
/// let cfg = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], PositionEmbeddingKind::Learnable);
/// let a = init_parameters(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
/// let b = init_parameters(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
/// let key = "vit.embeddings.cls_token";
/// assert_eq!(a[key].to_vec3::<f32>().unwrap(), b[key].to_vec3::<f32>().unwrap());
/// ```
pub fn init_parameters(
    cfg: &VitConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    parameter_inventory(cfg)
        .into_iter()
        .map(|(name, shape, kind)| {
            let count: usize = shape.iter().product();
            let values: Vec<f64> = match kind {
                InitKind::Zeros => vec![0.0; count],
                InitKind::Ones => vec![1.0; count],
                InitKind::TruncatedNormal => (0..count)
                    .map(|_| loop {
                        let z: f64 = rng.sample(StandardNormal);
                        if z.abs() <= 2.0 {
                            break z * INIT_STD;
                        }
                    })
                    .collect(),
            };
            let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            Ok((name, tensor))
        })
        .collect()
}
