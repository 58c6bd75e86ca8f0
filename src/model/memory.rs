//! How much memory an attack step takes, so that commands which run one can refuse up front (or an
//! audit skip that attack) instead of being killed by the kernel part-way through.
//!
//! The step's peak resident memory grows with the parameter count (the model, the simulated update,
//! the finite-difference sweep's parameter copies) and with the activations of every image. The exact
//! double backward keeps far more: candle keeps the whole graph of the first backward pass for the
//! second and computes the second-order gradient of every parameter as well as of the images. Both
//! estimates are fits of peak RSS measured with `/usr/bin/time -f %M fedleak bench --step S --model M
//! --batch B [--local-steps K] [--concurrent C] --iters 1 --warmup 0` (release build, f32,
//! 2026-12-03):
//!
//! | step, model, batch | measured | estimate |
//! |---|---|---|
//! | exact, vit-tiny-32, 1 / 2 / 4 / 8 | 0.80 / 1.18 / 1.94 / 3.37 GB | 0.87 / 1.25 / 2.01 / 3.52 GB |
//! | exact, vit-tiny-32, 1, 2 local steps | 1.79 GB | 1.68 GB |
//! | exact, vit-micro-32, 1 / 8 | 79 / 165 MB | 97 / 175 MB |
//! | exact, vit-b16-224, 1 | killed past 24.4 GB on a 23 GB machine | 39 GB |
//! | finite difference, vit-tiny-32, 1 / 8 / 32 / 128 | 107 / 239 / 753 / 2830 MB | 110 / 262 / 781 / 2856 MB |
//! | finite difference, vit-tiny-32, 1 / 8, 4 local steps | 166 / 281 MB | 208 / 359 MB |
//! | finite difference, vit-b16-224, 1 / 2 / 4 | 2.12 / 2.86 / 4.68 GB | 2.15 / 3.21 / 5.32 GB |
//! | finite difference, vit-b16-224, 1, 2 local steps | 3.75 GB | 3.70 GB |
//! | finite difference, two at once, vit-b16-224 1 / vit-tiny-32 8 | 2.83 GB / 262 MB | 3.02 GB / 355 MB |
//!
//! The finite-difference rows were measured on 2026-12-03 after first-order passes moved to the
//! hand-written backward ([`super::loss_gradients`]), which keeps less than autograd did (ViT-B/16 at
//! batch 1: 2.54 GB before). Within -2 % / +35 % of every measurement (the exact rows: -6 % / +23 %).
//!
//! Set `FEDLEAK_SKIP_MEMORY_CHECK=1` to run a step whatever the estimate says.

use super::config::{PositionEmbeddingKind, VitConfig};

/// Resident memory of the process before the step (binary, allocator, data), in bytes.
const BASELINE_BYTES: u64 = 64 << 20;

/// How an attack step takes the input gradient of its matching objective, as far as memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttackStepKind {
    /// Exact double backward through candle's autograd (DLG, joint labels,
    /// `--input-gradient exact`).
    Exact,
    /// Hessian-vector products by finite differences of first-order passes (Inverting Gradients'
    /// default).
    FiniteDifference,
}

impl AttackStepKind {
    /// Bytes kept per parameter byte for the first (or only) local step, and for each further one.
    fn per_parameter_byte(self) -> (f64, f64) {
        match self {
            AttackStepKind::Exact => (59.0, 59.0),
            AttackStepKind::FiniteDifference => (3.0, 4.5),
        }
    }

    /// The share of one step's own memory (beyond the process and the model) that each further step
    /// running at once adds. Measured for the finite-difference step: 18 % (vit-tiny-32, batch 8)
    /// and 46 % (ViT-B/16, batch 1), taken as one half; not measured for the exact step, taken as
    /// all of it.
    fn concurrent_share(self) -> f64 {
        match self {
            AttackStepKind::Exact => 1.0,
            AttackStepKind::FiniteDifference => 0.5,
        }
    }

    /// Bytes kept per byte of one image's activations ([`activation_elements`]) and local step.
    fn per_activation_byte(self) -> f64 {
        match self {
            AttackStepKind::Exact => 315.0,
            AttackStepKind::FiniteDifference => 18.0,
        }
    }
}

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

/// An attack step about to run, as far as memory goes.
#[derive(Debug, Clone, Copy)]
pub struct AttackStepPlan<'a> {
    /// The attacked model.
    pub config: &'a VitConfig,
    /// How the step takes its input gradient.
    pub kind: AttackStepKind,
    /// Images behind the attacked update.
    pub images: usize,
    /// Local SGD steps the attack unrolls, over all the clients it simulates apart (1 for a
    /// gradient): the parameter-sized points it holds.
    pub local_steps: usize,
    /// Bytes per tensor element (4 for f32, 8 for f64).
    pub element_bytes: usize,
    /// Steps running at once (restarts on separate threads).
    pub concurrent: usize,
}

impl AttackStepPlan<'_> {
    /// Estimated peak resident memory, in bytes, of one such step (whatever `concurrent` says). See
    /// the module documentation for how well it fits.
    ///
    /// ```
    /// use fedleak::model::{AttackStepKind, AttackStepPlan, ModelPreset, PositionEmbeddingKind};
    /// let classes: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    /// let tiny = ModelPreset::VitTiny32.config(&classes, PositionEmbeddingKind::Learnable);
    /// let base = ModelPreset::VitB16_224.config(&classes, PositionEmbeddingKind::Learnable);
    /// let plan = |config, kind| AttackStepPlan {
    ///     config, kind, images: 1, local_steps: 1, element_bytes: 4, concurrent: 1,
    /// };
    /// let gb = |bytes: u64| bytes as f64 / 1e9;
    /// assert!((0.7..1.0).contains(&gb(plan(&tiny, AttackStepKind::Exact).step_bytes())));
    /// assert!(gb(plan(&base, AttackStepKind::Exact).step_bytes()) > 30.0);
    /// let first_order = gb(plan(&base, AttackStepKind::FiniteDifference).step_bytes());
    /// assert!((2.0..3.0).contains(&first_order));
    /// ```
    pub fn step_bytes(&self) -> u64 {
        let element_bytes = self.element_bytes as f64;
        let steps = self.local_steps.max(1) as f64;
        let parameter_bytes = parameter_count(self.config) as f64 * element_bytes;
        let activation_bytes = activation_elements(self.config) as f64 * element_bytes;
        let (first, further) = self.kind.per_parameter_byte();
        let images = self.kind.per_activation_byte() * self.images as f64 * activation_bytes;
        let kept = match self.kind {
            // The exact step keeps the graph of every unrolled step.
            AttackStepKind::Exact => steps * (first * parameter_bytes + images),
            AttackStepKind::FiniteDifference => {
                (first + further * (steps - 1.0)) * parameter_bytes + images
            }
        };
        BASELINE_BYTES + kept as u64
    }

    /// Estimated peak resident memory of `concurrent` such steps running at once: they share the
    /// process and the model; each further one adds a share of the rest.
    pub fn bytes(&self) -> u64 {
        let one = self.step_bytes();
        let shared = BASELINE_BYTES + parameter_count(self.config) * self.element_bytes as u64;
        let further = one.saturating_sub(shared) as f64 * self.kind.concurrent_share();
        one + (self.concurrent.saturating_sub(1) as f64 * further) as u64
    }

    /// `Some((needed, available))`, in bytes, when [`AttackStepPlan::bytes`] exceeds the memory
    /// available now; `None` when it fits, when the available memory is unknown, or when
    /// [`SKIP_MEMORY_CHECK`] is set.
    pub fn shortfall(&self) -> Option<(u64, u64)> {
        if std::env::var_os(SKIP_MEMORY_CHECK).is_some() {
            return None;
        }
        let needed = self.bytes();
        let available = available_memory_bytes()?;
        (needed > available).then_some((needed, available))
    }
}

/// Memory the operating system can give this process without swapping (`MemAvailable` of
/// `/proc/meminfo`), in bytes; `None` where that is unknown (not Linux, or unreadable).
fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Environment variable that switches [`AttackStepPlan::shortfall`] off.
pub const SKIP_MEMORY_CHECK: &str = "FEDLEAK_SKIP_MEMORY_CHECK";
