//! How much memory an exact double-backward attack step takes, so that commands which need one can
//! refuse up front instead of being killed by the kernel half-way through.
//!
//! candle keeps the whole graph of the first backward pass for the second, and computes the
//! second-order gradient of every parameter as well as of the images; the step's peak resident memory
//! therefore grows with the parameter count and with the activations of every image. The estimate is
//! a fit of peak RSS measured with `/usr/bin/time -f %M fedleak bench --step attack-exact --model M
//! --batch B --iters 2 --warmup 0` (release build, f32, 2026-12-03):
//!
//! | model, batch | measured | estimate |
//! |---|---|---|
//! | vit-tiny-32, 1 / 2 / 4 / 8 | 0.80 / 1.18 / 1.94 / 3.37 GB | 0.87 / 1.25 / 2.01 / 3.52 GB |
//! | vit-tiny-32, 1, `--local-steps 2` | 1.79 GB | 1.68 GB |
//! | vit-micro-32, 1 / 8 | 79 / 165 MB | 97 / 175 MB |
//! | vit-b16-224, 1 | killed past 24.4 GB on a 23 GB machine | 39 GB |
//!
//! Set `FEDLEAK_SKIP_MEMORY_CHECK=1` to run such a step whatever the estimate says.

use super::config::{PositionEmbeddingKind, VitConfig};

/// Resident memory of the process before the step (binary, allocator, data), in bytes.
const BASELINE_BYTES: u64 = 64 << 20;

/// Bytes kept per parameter byte, whatever the batch (the second-order gradients of the parameters
/// and the parameter-sized terms of the graph).
const PER_PARAMETER_BYTE: f64 = 59.0;

/// Bytes kept per byte of one image's activations ([`activation_elements`]).
const PER_ACTIVATION_BYTE: f64 = 315.0;

/// Number of trainable values of the ViT (patch embedding, CLS token, learnable position table,
/// blocks, final norm, classifier).
///
/// ```
/// use fedleak::model::{parameter_count, ModelPreset, PositionEmbeddingKind};
/// let classes = vec!["a".to_string(), "b".to_string()];
/// let base = ModelPreset::VitB16_224.config(&classes, PositionEmbeddingKind::Learnable);
/// assert_eq!(parameter_count(&base), 85_800_194); // Hugging Face's ViT-B/16 with a 2-class head
/// ```
pub fn parameter_count(config: &VitConfig) -> u64 {
    let d = config.hidden_size as u64;
    let m = config.intermediate_size as u64;
    let tokens = config.num_patches() as u64 + 1;
    let qkv_bias = if config.qkv_bias { 3 * d } else { 0 };
    let block = 4 * d * d + qkv_bias + d + 2 * d * m + m + d + 4 * d;
    let positions = match config.position_embedding {
        PositionEmbeddingKind::Learnable => tokens * d,
        PositionEmbeddingKind::Sincos => 0,
    };
    let patch = d * config.patch_dim() as u64 + d;
    let classes = config.num_labels() as u64;
    patch + d + positions + config.num_hidden_layers as u64 * block + 2 * d + d * classes + classes
}

/// Values one image's forward pass produces per block, summed over blocks: the token activations
/// (width plus MLP width per token) and the attention maps (heads x tokens^2).
fn activation_elements(config: &VitConfig) -> u64 {
    let tokens = config.num_patches() as u64 + 1;
    let widths = (config.hidden_size + config.intermediate_size) as u64;
    let maps = config.num_attention_heads as u64 * tokens * tokens;
    config.num_hidden_layers as u64 * (tokens * widths + maps)
}

/// Estimated peak resident memory, in bytes, of one exact double-backward attack step on `images`
/// images, unrolling `local_steps` local SGD steps (1 for a gradient), with tensors of
/// `element_bytes` bytes (4 for f32, 8 for f64). See the module documentation for how well it fits.
///
/// ```
/// use fedleak::model::{exact_attack_step_bytes, ModelPreset, PositionEmbeddingKind};
/// let classes: Vec<String> = (0..10).map(|i| i.to_string()).collect();
/// let tiny = ModelPreset::VitTiny32.config(&classes, PositionEmbeddingKind::Learnable);
/// let base = ModelPreset::VitB16_224.config(&classes, PositionEmbeddingKind::Learnable);
/// let gb = |bytes: u64| bytes as f64 / 1e9;
/// assert!((0.7..1.0).contains(&gb(exact_attack_step_bytes(&tiny, 1, 1, 4))));
/// assert!(gb(exact_attack_step_bytes(&base, 1, 1, 4)) > 30.0);
/// ```
pub fn exact_attack_step_bytes(
    config: &VitConfig,
    images: usize,
    local_steps: usize,
    element_bytes: usize,
) -> u64 {
    let element_bytes = element_bytes as f64;
    let parameters = PER_PARAMETER_BYTE * parameter_count(config) as f64 * element_bytes;
    let activations =
        PER_ACTIVATION_BYTE * images as f64 * activation_elements(config) as f64 * element_bytes;
    BASELINE_BYTES + (local_steps.max(1) as f64 * (parameters + activations)) as u64
}

/// Memory the operating system can give this process without swapping (`MemAvailable` of
/// `/proc/meminfo`), in bytes; `None` where that is unknown (not Linux, or unreadable).
pub fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Environment variable that switches [`exact_step_memory_shortfall`] off.
pub const SKIP_MEMORY_CHECK: &str = "FEDLEAK_SKIP_MEMORY_CHECK";

/// `Some((needed, available))`, in bytes, when the exact double-backward step of
/// [`exact_attack_step_bytes`] would not fit in the memory available now; `None` when it fits, when
/// the available memory is unknown, or when [`SKIP_MEMORY_CHECK`] is set.
pub fn exact_step_memory_shortfall(
    config: &VitConfig,
    images: usize,
    local_steps: usize,
    element_bytes: usize,
) -> Option<(u64, u64)> {
    if std::env::var_os(SKIP_MEMORY_CHECK).is_some() {
        return None;
    }
    let needed = exact_attack_step_bytes(config, images, local_steps, element_bytes);
    let available = available_memory_bytes()?;
    (needed > available).then_some((needed, available))
}
