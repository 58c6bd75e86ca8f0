//! The gradients of the ViT's training loss by a hand-written backward pass, first order only.
//!
//! candle's autograd accumulates every node's gradient into a freshly zeroed tensor (`zeros_like`, then
//! `add`) and runs layer norm, softmax and GELU as chains of element-wise ops, each with its own
//! output buffer and its own backward node. In the finite-difference attack step, which is nothing but
//! first-order passes, that overhead is most of the time: in a profile of the tiny ViT's attack step at
//! batch 8 (`perf record`, 2026-12-03), `Tensor::add`, mostly that accumulation, took 31 % of the main
//! thread's samples and GELU's `erf` chain most of the rest. This module computes the same
//! gradients with the matrix products on candle's GEMM and every element-wise stage fused into one loop
//! per row (layer norm, softmax, GELU, cross-entropy; rows split across rayon's threads), forward and
//! backward, and no gradient bookkeeping. It also skips what cannot reach the loss: the last block
//! computes queries, attention output and MLP for the CLS token only. The layers are the ones of
//! [`super::Vit`] (same parameter names, same formulas), and the tests check both against candle's
//! autograd in f64.
//!
//! A batch of two or more images runs as two passes over its halves, at once on two cores
//! (`Pass::run_in_halves`): on this project's 2-core machine candle's kernels split across both cores
//! pay a hand-off per kernel, which at tiny-ViT sizes costs what the second core brings. Measured
//! 2026-12-05 (`fedleak bench --step attack --model vit-tiny-32 --batch 8 --iters 10 --threads 2`,
//! before and after alternated twice): 139 / 145 -> 93 / 88 ms; two restarts at once on one kernel
//! thread each, where the halves run in turn, 77-79 -> 80-81 ms.
//!
//! GELU's `erf` in f32 is [`super::fast_math::erf`], a rational function that vectorises, in place of
//! `libm::erff` (2026-12-05, `fedleak bench --step attack --model vit-tiny-32 --batch 8 --iters 10`,
//! four alternated rounds: one kernel thread 119.9 -> 115.4 ms, two restarts at once 61.6 -> 59.8 ms
//! per step, two threads 71.6 -> 67.0 ms).
//!
//! It gives no second-order gradients: the exact double backward (DLG, `--input-gradient exact`)
//! still runs through the autograd composites of [`super::layers`].

use candle_core::{DType, Tensor, WithDType, D};
use fedleak_attacks::{GradientRequest, LossGradients, ParamMap};
use rayon::prelude::*;

use super::config::{PositionEmbeddingKind, VitConfig};
use super::fast_math;
use super::vit::sincos_position_embedding;

/// The gradients of the mean cross-entropy of `images` (B x C x H x W) against `targets` (B x classes,
/// one-hot or soft) under `params`, by a hand-written backward pass (see the module doc). `Ok(None)`
/// off the CPU or for a dtype other than f32 and f64: the caller then uses candle's autograd.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use fedleak::model::{init_parameters, loss_gradients, ModelPreset, PositionEmbeddingKind};
/// use fedleak_attacks::GradientRequest;
/// let cfg = ModelPreset::VitMicro32.config(&["a".into(), "b".into()], PositionEmbeddingKind::Sincos);
/// let params = init_parameters(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
/// let images = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
/// let targets = Tensor::new(&[[1f32, 0.]], &Device::Cpu).unwrap();
/// let want = GradientRequest { input: true, parameters: false };
/// let grads = loss_gradients(&cfg, &params, &images, &targets, want).unwrap().unwrap();
/// assert_eq!(grads.input.unwrap().dims(), &[1, 3, 32, 32]);
/// assert!(grads.parameters.is_none());
/// ```
pub fn loss_gradients(
    config: &VitConfig,
    params: &ParamMap,
    images: &Tensor,
    targets: &Tensor,
    request: GradientRequest,
) -> candle_core::Result<Option<LossGradients>> {
    if !images.device().is_cpu() {
        return Ok(None);
    }
    let pass = Pass {
        config,
        params,
        request,
    };
    match images.dtype() {
        DType::F32 => pass.run_in_halves::<f32>(images, targets).map(Some),
        DType::F64 => pass.run_in_halves::<f64>(images, targets).map(Some),
        _ => Ok(None),
    }
}

/// The element types the fused kernels run in.
trait Float: WithDType + num_traits::Float {
    /// The error function.
    fn erf(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn erf(self) -> Self {
        fast_math::erf(self)
    }
}

impl Float for f64 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// One forward and backward pass over fixed parameters.
struct Pass<'a> {
    config: &'a VitConfig,
    params: &'a ParamMap,
    request: GradientRequest,
}

/// A layer norm's saved forward state: the normalised rows and each row's 1 / std.
struct NormCache<T> {
    normalized: Vec<T>,
    inverse_std: Vec<T>,
}

/// What one block's backward needs from its forward.
struct BlockCache<T> {
    /// Query tokens per image: all of them, or 1 (the CLS token) in the last block.
    query_tokens: usize,
    norm_before: NormCache<T>,
    attention_input: Tensor,
    query_input: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention: Vec<T>,
    merged: Tensor,
    /// The projections the forward used (the key/value weights concatenated once per pass).
    projections: Projections,
    mlp: MlpCache<T>,
}

/// A block's attention projections, each a (weight, optional bias).
struct Projections {
    query: (Tensor, Option<Tensor>),
    key_value: (Tensor, Option<Tensor>),
}

/// What the MLP half of a block (layer norm, fc1, GELU, fc2) needs for its backward.
struct MlpCache<T> {
    norm: NormCache<T>,
    input: Tensor,
    pre_activation: Vec<T>,
    cdf: Vec<T>,
    activation: Tensor,
}

impl Pass<'_> {
    fn param(&self, name: &str) -> candle_core::Result<Tensor> {
        self.params
            .get(name)
            .map(Tensor::detach)
            .ok_or_else(|| candle_core::Error::Msg(format!("parameter {name} is missing")))
    }

    fn optional_param(&self, name: &str, present: bool) -> candle_core::Result<Option<Tensor>> {
        present.then(|| self.param(name)).transpose()
    }

    /// The pass over a batch of two or more images as two passes over its halves (the first
    /// `ceil(B / 2)` images and the rest), at once on rayon's threads when there are several, else
    /// one after the other. Each half divides its loss by the whole batch's size, so the batch's
    /// gradients are the halves' sums (parameters) and concatenation (images). The images of a
    /// batch do not interact in a ViT, so this is the batch's pass up to rounding. Each half runs
    /// on one core with its kernels' parallel loops mostly inline, where one pass over the whole
    /// batch splits every small kernel across the cores and pays a hand-off for each. The split
    /// does not depend on the thread count, so neither do the results.
    fn run_in_halves<T: Float>(
        &self,
        images: &Tensor,
        targets: &Tensor,
    ) -> candle_core::Result<LossGradients> {
        let batch = images.dim(0)?;
        if batch < 2 {
            return self.run::<T>(images, targets, batch);
        }
        let first = batch.div_ceil(2);
        let half = |start: usize, len: usize| {
            let (images, targets) = (
                images.narrow(0, start, len)?,
                targets.narrow(0, start, len)?,
            );
            self.run::<T>(&images, &targets, batch)
        };
        let (head, tail) = if rayon::current_num_threads() > 1 {
            rayon::join(|| half(0, first), || half(first, batch - first))
        } else {
            (half(0, first), half(first, batch - first))
        };
        let (head, tail) = (head?, tail?);
        let input = match (head.input, tail.input) {
            (Some(head), Some(tail)) => Some(Tensor::cat(&[head, tail], 0)?),
            _ => None,
        };
        let parameters = match (head.parameters, tail.parameters) {
            (Some(head), Some(mut tail)) => Some(
                head.into_iter()
                    .map(|(name, head)| {
                        let tail = tail.remove(&name).ok_or_else(|| {
                            candle_core::Error::Msg(format!(
                                "half-batch gradient {name} is missing"
                            ))
                        })?;
                        Ok((name, (head + tail)?))
                    })
                    .collect::<candle_core::Result<ParamMap>>()?,
            ),
            _ => None,
        };
        Ok(LossGradients {
            loss: head.loss + tail.loss,
            input,
            parameters,
        })
    }

    /// One pass over `images`, the loss summed over them and divided by `loss_divisor` (their
    /// number for their mean; the whole batch's for a part of it).
    fn run<T: Float>(
        &self,
        images: &Tensor,
        targets: &Tensor,
        loss_divisor: usize,
    ) -> candle_core::Result<LossGradients> {
        let cfg = self.config;
        let (batch, channels, height, width) = images.dims4()?;
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let (grid_h, grid_w) = (height / p, width / p);
        let patches_per_image = grid_h * grid_w;
        let tokens = patches_per_image + 1;
        let rows = batch * tokens;
        let eps = T::from_f64(cfg.layer_norm_eps);
        let mut grads = ParamMap::new();
        let want_params = self.request.parameters;

        // Embeddings.
        let patch_weight = self
            .param("vit.embeddings.patch_embeddings.projection.weight")?
            .reshape((d, channels * p * p))?;
        let patch_bias = self.param("vit.embeddings.patch_embeddings.projection.bias")?;
        let patches = images
            .detach()
            .reshape((batch, channels, grid_h, p, grid_w, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch * patches_per_image, channels * p * p))?;
        let embedded = affine::<T>(&patches, &patch_weight, Some(&patch_bias))?;
        let cls = self
            .param("vit.embeddings.cls_token")?
            .broadcast_as((batch, 1, d))?;
        let positions = match cfg.position_embedding {
            PositionEmbeddingKind::Learnable => self.param("vit.embeddings.position_embeddings")?,
            PositionEmbeddingKind::Sincos => {
                sincos_position_embedding(cfg, images.dtype(), images.device())?
            }
        };
        let mut x = Tensor::cat(
            &[&cls, &embedded.reshape((batch, patches_per_image, d))?],
            1,
        )?
        .broadcast_add(&positions)?
        .reshape((rows, d))?;

        // Encoder blocks. Only the CLS token of the last block's output reaches the loss, so that
        // block computes its queries, attention output and MLP for the CLS token alone (exact: the
        // other rows would get zero gradient).
        let mut caches = Vec::with_capacity(cfg.num_hidden_layers);
        for layer in 0..cfg.num_hidden_layers {
            let query_tokens = if layer + 1 == cfg.num_hidden_layers {
                1
            } else {
                tokens
            };
            let (next, cache) =
                self.block_forward::<T>(layer, &x, batch, tokens, query_tokens, eps)?;
            caches.push(cache);
            x = next;
        }

        // Head: final layer norm of the CLS token, classifier, mean cross-entropy.
        let cls_out = if cfg.num_hidden_layers == 0 {
            leading_rows(&x, batch, tokens, 1)?
        } else {
            x.clone()
        };
        let (features, final_norm) = layer_norm_forward::<T>(
            &cls_out,
            &self.param("vit.layernorm.weight")?,
            &self.param("vit.layernorm.bias")?,
            eps,
        )?;
        let classifier_weight = self.param("classifier.weight")?;
        let logits = affine::<T>(
            &features,
            &classifier_weight,
            Some(&self.param("classifier.bias")?),
        )?;
        let (loss, logits_grad) = cross_entropy_backward::<T>(&logits, targets, loss_divisor)?;
        if want_params {
            grads.insert(
                "classifier.weight".into(),
                logits_grad.t()?.matmul(&features)?,
            );
            grads.insert("classifier.bias".into(), sum_rows(&logits_grad)?);
        }
        let features_grad = logits_grad.matmul(&classifier_weight)?;
        let cls_grad = self.layer_norm_backward::<T>(
            "vit.layernorm",
            &features_grad,
            &final_norm,
            &mut grads,
        )?;
        let mut x_grad = if cfg.num_hidden_layers == 0 {
            add_to_leading_rows::<T>(&x.zeros_like()?, &cls_grad, tokens)?
        } else {
            cls_grad
        };
        for (layer, cache) in caches.iter().enumerate().rev() {
            x_grad = self.block_backward::<T>(layer, &x_grad, cache, batch, tokens, &mut grads)?;
        }

        // Embeddings, backward.
        let tokens_grad = x_grad.reshape((batch, tokens, d))?;
        if want_params {
            if cfg.position_embedding == PositionEmbeddingKind::Learnable {
                grads.insert(
                    "vit.embeddings.position_embeddings".into(),
                    tokens_grad.sum_keepdim(0)?,
                );
            }
            grads.insert(
                "vit.embeddings.cls_token".into(),
                tokens_grad.narrow(1, 0, 1)?.sum_keepdim(0)?,
            );
        }
        let embedded_grad = tokens_grad
            .narrow(1, 1, patches_per_image)?
            .reshape((batch * patches_per_image, d))?;
        if want_params {
            grads.insert(
                "vit.embeddings.patch_embeddings.projection.weight".into(),
                embedded_grad
                    .t()?
                    .matmul(&patches)?
                    .reshape((d, channels, p, p))?,
            );
            grads.insert(
                "vit.embeddings.patch_embeddings.projection.bias".into(),
                sum_rows(&embedded_grad)?,
            );
        }
        let input = if self.request.input {
            Some(
                embedded_grad
                    .matmul(&patch_weight)?
                    .reshape((batch, grid_h, grid_w, channels, p, p))?
                    .permute((0, 3, 1, 4, 2, 5))?
                    .reshape((batch, channels, height, width))?,
            )
        } else {
            None
        };
        Ok(LossGradients {
            loss,
            input,
            parameters: want_params.then_some(grads),
        })
    }

    fn block_prefix(layer: usize) -> String {
        format!("vit.encoder.layer.{layer}")
    }

    /// One pre-norm block forward on the token rows (B*T x D). Every token attends to all; only
    /// the first `query_tokens` of each image are queries and come out (all of them, or the CLS
    /// token in the last block): the output is (B*query_tokens x D).
    fn block_forward<T: Float>(
        &self,
        layer: usize,
        x: &Tensor,
        batch: usize,
        tokens: usize,
        query_tokens: usize,
        eps: T,
    ) -> candle_core::Result<(Tensor, BlockCache<T>)> {
        let cfg = self.config;
        let prefix = Self::block_prefix(layer);
        let (d, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let head_dim = d / heads;

        let (attention_input, norm_before) = layer_norm_forward::<T>(
            x,
            &self.param(&format!("{prefix}.layernorm_before.weight"))?,
            &self.param(&format!("{prefix}.layernorm_before.bias"))?,
            eps,
        )?;
        let projections = self.attention_projections(&prefix)?;
        let query_input = leading_rows(&attention_input, batch, tokens, query_tokens)?;
        let split = |rows: Tensor, count: usize| -> candle_core::Result<Tensor> {
            rows.reshape((batch, count, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let query = split(
            affine::<T>(
                &query_input,
                &projections.query.0,
                projections.query.1.as_ref(),
            )?,
            query_tokens,
        )?;
        let key_value = affine::<T>(
            &attention_input,
            &projections.key_value.0,
            projections.key_value.1.as_ref(),
        )?;
        let key = split(key_value.narrow(1, 0, d)?, tokens)?;
        let value = split(key_value.narrow(1, d, d)?, tokens)?;
        let scores = query.matmul(&key.t()?)?;
        let scale = T::from_f64(1.0 / (head_dim as f64).sqrt());
        let attention = softmax_rows::<T>(&values::<T>(&scores)?, tokens, scale);
        let attention_tensor = Tensor::from_slice(&attention, scores.shape(), x.device())?;
        let merged = attention_tensor
            .matmul(&value)?
            .transpose(1, 2)?
            .reshape((batch * query_tokens, d))?;
        let attended = affine::<T>(
            &merged,
            &self.param(&format!("{prefix}.attention.output.dense.weight"))?,
            Some(&self.param(&format!("{prefix}.attention.output.dense.bias"))?),
        )?;
        let x = (leading_rows(x, batch, tokens, query_tokens)? + attended)?;
        let (x, mlp) = self.mlp_forward::<T>(&prefix, &x, eps)?;
        Ok((
            x,
            BlockCache {
                query_tokens,
                norm_before,
                attention_input,
                query_input,
                query,
                key,
                value,
                attention,
                merged,
                projections,
                mlp,
            },
        ))
    }

    /// The MLP half of a block on rows: `x + fc2(GELU(fc1(LN(x))))`.
    fn mlp_forward<T: Float>(
        &self,
        prefix: &str,
        x: &Tensor,
        eps: T,
    ) -> candle_core::Result<(Tensor, MlpCache<T>)> {
        let (input, norm) = layer_norm_forward::<T>(
            x,
            &self.param(&format!("{prefix}.layernorm_after.weight"))?,
            &self.param(&format!("{prefix}.layernorm_after.bias"))?,
            eps,
        )?;
        let pre = affine::<T>(
            &input,
            &self.param(&format!("{prefix}.intermediate.dense.weight"))?,
            Some(&self.param(&format!("{prefix}.intermediate.dense.bias"))?),
        )?;
        let pre_activation = values::<T>(&pre)?;
        let (activation, cdf) = gelu_forward(&pre_activation);
        let activation = Tensor::from_vec(activation, pre.shape(), x.device())?;
        let out = affine::<T>(
            &activation,
            &self.param(&format!("{prefix}.output.dense.weight"))?,
            Some(&self.param(&format!("{prefix}.output.dense.bias"))?),
        )?;
        Ok((
            (x + out)?,
            MlpCache {
                norm,
                input,
                pre_activation,
                cdf,
                activation,
            },
        ))
    }

    /// Backward of [`Pass::mlp_forward`]: the gradient of its input rows, residual included.
    fn mlp_backward<T: Float>(
        &self,
        prefix: &str,
        out_grad: &Tensor,
        cache: &MlpCache<T>,
        grads: &mut ParamMap,
    ) -> candle_core::Result<Tensor> {
        let activation_grad = self.linear_backward(
            &format!("{prefix}.output.dense"),
            out_grad,
            &cache.activation,
            grads,
        )?;
        let pre_grad = gelu_backward(
            &values::<T>(&activation_grad)?,
            &cache.pre_activation,
            &cache.cdf,
        );
        let pre_grad = Tensor::from_vec(pre_grad, activation_grad.shape(), out_grad.device())?;
        let input_grad = self.linear_backward(
            &format!("{prefix}.intermediate.dense"),
            &pre_grad,
            &cache.input,
            grads,
        )?;
        out_grad
            + self.layer_norm_backward::<T>(
                &format!("{prefix}.layernorm_after"),
                &input_grad,
                &cache.norm,
                grads,
            )?
    }

    /// The query projection (weight, bias) and the key and value projections stacked into one
    /// (2D x D) weight and (2D) bias.
    fn attention_projections(&self, prefix: &str) -> candle_core::Result<Projections> {
        let name = |part: &str, what: &str| format!("{prefix}.attention.attention.{part}.{what}");
        let bias = |part: &str| self.optional_param(&name(part, "bias"), self.config.qkv_bias);
        let key_value_bias = match (bias("key")?, bias("value")?) {
            (Some(k), Some(v)) => Some(Tensor::cat(&[k, v], 0)?),
            _ => None,
        };
        Ok(Projections {
            query: (self.param(&name("query", "weight"))?, bias("query")?),
            key_value: (
                Tensor::cat(
                    &[
                        self.param(&name("key", "weight"))?,
                        self.param(&name("value", "weight"))?,
                    ],
                    0,
                )?,
                key_value_bias,
            ),
        })
    }

    /// One block backward: the gradient of its input rows (B*T x D) from that of its output rows
    /// (B*query_tokens x D).
    fn block_backward<T: Float>(
        &self,
        layer: usize,
        out_grad: &Tensor,
        cache: &BlockCache<T>,
        batch: usize,
        tokens: usize,
        grads: &mut ParamMap,
    ) -> candle_core::Result<Tensor> {
        let cfg = self.config;
        let prefix = Self::block_prefix(layer);
        let (d, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let head_dim = d / heads;
        let query_tokens = cache.query_tokens;
        let device = out_grad.device();

        let x_grad = self.mlp_backward::<T>(&prefix, out_grad, &cache.mlp, grads)?;

        // Attention branch.
        let merged_grad = self.linear_backward(
            &format!("{prefix}.attention.output.dense"),
            &x_grad,
            &cache.merged,
            grads,
        )?;
        let context_grad = merged_grad
            .reshape((batch, query_tokens, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let attention_shape = (batch, heads, query_tokens, tokens);
        let attention = Tensor::from_slice(&cache.attention, attention_shape, device)?;
        let value_grad = attention.t()?.matmul(&context_grad)?;
        let attention_grad = context_grad.matmul(&cache.value.t()?)?;
        let scale = T::from_f64(1.0 / (head_dim as f64).sqrt());
        let scores_grad = softmax_rows_backward::<T>(
            &values::<T>(&attention_grad)?,
            &cache.attention,
            tokens,
            scale,
        );
        let scores_grad = Tensor::from_vec(scores_grad, attention_shape, device)?;
        let query_grad = scores_grad.matmul(&cache.key)?;
        let key_grad = scores_grad.t()?.matmul(&cache.query)?;
        let merge = |t: Tensor, count: usize| -> candle_core::Result<Tensor> {
            t.transpose(1, 2)?.reshape((batch * count, d))
        };
        let query_grad = merge(query_grad, query_tokens)?;
        let key_value_grad =
            Tensor::cat(&[merge(key_grad, tokens)?, merge(value_grad, tokens)?], 1)?;
        let projections = &cache.projections;
        if self.request.parameters {
            let attention_prefix = format!("{prefix}.attention.attention");
            let key_value_weight = key_value_grad.t()?.matmul(&cache.attention_input)?;
            let key_value_bias = sum_rows(&key_value_grad)?;
            let parts = [
                (
                    "query",
                    query_grad.t()?.matmul(&cache.query_input)?,
                    sum_rows(&query_grad)?,
                ),
                (
                    "key",
                    key_value_weight.narrow(0, 0, d)?,
                    key_value_bias.narrow(0, 0, d)?,
                ),
                (
                    "value",
                    key_value_weight.narrow(0, d, d)?,
                    key_value_bias.narrow(0, d, d)?,
                ),
            ];
            for (part, weight, bias) in parts {
                grads.insert(format!("{attention_prefix}.{part}.weight"), weight);
                if cfg.qkv_bias {
                    grads.insert(format!("{attention_prefix}.{part}.bias"), bias);
                }
            }
        }
        let attention_input_grad = add_to_leading_rows::<T>(
            &key_value_grad.matmul(&projections.key_value.0)?,
            &query_grad.matmul(&projections.query.0)?,
            tokens,
        )?;
        let norm_grad = self.layer_norm_backward::<T>(
            &format!("{prefix}.layernorm_before"),
            &attention_input_grad,
            &cache.norm_before,
            grads,
        )?;
        add_to_leading_rows::<T>(&norm_grad, &x_grad, tokens)
    }

    /// Backward of `y = x W^T + b` (module `name`): records the weight and bias gradients when
    /// parameters are requested, returns the input's.
    fn linear_backward(
        &self,
        name: &str,
        out_grad: &Tensor,
        input: &Tensor,
        grads: &mut ParamMap,
    ) -> candle_core::Result<Tensor> {
        if self.request.parameters {
            grads.insert(format!("{name}.weight"), out_grad.t()?.matmul(input)?);
            grads.insert(format!("{name}.bias"), sum_rows(out_grad)?);
        }
        out_grad.matmul(&self.param(&format!("{name}.weight"))?)
    }

    /// Backward of a layer norm (module `name`) over rows: records the scale and shift gradients when
    /// parameters are requested, returns the input's.
    fn layer_norm_backward<T: Float>(
        &self,
        name: &str,
        out_grad: &Tensor,
        cache: &NormCache<T>,
        grads: &mut ParamMap,
    ) -> candle_core::Result<Tensor> {
        let shape = out_grad.shape().clone();
        let width = out_grad.dim(D::Minus1)?;
        let weight = values::<T>(&self.param(&format!("{name}.weight"))?)?;
        let dy = values::<T>(out_grad)?;
        let n = T::from_f64(width as f64);
        let mut dx = vec![T::zero(); dy.len()];
        let rows_per_task = (CHUNK / width.max(1)).max(1);
        // Per task: its rows' input gradients, and partial scale and shift gradients, summed below
        // in task order (so the result does not depend on scheduling).
        let blocks: Vec<_> = dy
            .chunks(rows_per_task * width)
            .zip(cache.normalized.chunks(rows_per_task * width))
            .zip(dx.chunks_mut(rows_per_task * width))
            .zip(cache.inverse_std.chunks(rows_per_task))
            .collect();
        let partials = map_blocks(blocks, |(((dy, xhat), dx), inverse_std)| {
            let mut weight_grad = vec![T::zero(); width];
            let mut bias_grad = vec![T::zero(); width];
            for (((dy, xhat), dx), &inverse_std) in dy
                .chunks_exact(width)
                .zip(xhat.chunks_exact(width))
                .zip(dx.chunks_exact_mut(width))
                .zip(inverse_std)
            {
                let (mut mean_g, mut mean_gx) = (T::zero(), T::zero());
                for j in 0..width {
                    let g = dy[j] * weight[j];
                    mean_g += g;
                    mean_gx += g * xhat[j];
                    weight_grad[j] += dy[j] * xhat[j];
                    bias_grad[j] += dy[j];
                }
                mean_g /= n;
                mean_gx /= n;
                for j in 0..width {
                    dx[j] = inverse_std * (dy[j] * weight[j] - mean_g - xhat[j] * mean_gx);
                }
            }
            (weight_grad, bias_grad)
        });
        let mut weight_grad = vec![T::zero(); width];
        let mut bias_grad = vec![T::zero(); width];
        for (w, b) in &partials {
            for j in 0..width {
                weight_grad[j] += w[j];
                bias_grad[j] += b[j];
            }
        }
        if self.request.parameters {
            let device = out_grad.device();
            grads.insert(
                format!("{name}.weight"),
                Tensor::from_vec(weight_grad, width, device)?,
            );
            grads.insert(
                format!("{name}.bias"),
                Tensor::from_vec(bias_grad, width, device)?,
            );
        }
        Tensor::from_vec(dx, shape, out_grad.device())
    }
}

/// The sum of a matrix's rows (a bias gradient), as one matrix product: candle's `sum(0)` walks the
/// column-strided layout element by element.
fn sum_rows(grad: &Tensor) -> candle_core::Result<Tensor> {
    let rows = grad.dim(0)?;
    Tensor::ones((1, rows), grad.dtype(), grad.device())?
        .matmul(grad)?
        .squeeze(0)
}

/// The first `count` token rows of every image of token rows (B*tokens x D), as (B*count x D).
fn leading_rows(
    x: &Tensor,
    batch: usize,
    tokens: usize,
    count: usize,
) -> candle_core::Result<Tensor> {
    if count == tokens {
        return Ok(x.clone());
    }
    let d = x.dim(1)?;
    x.reshape((batch, tokens, d))?
        .narrow(1, 0, count)?
        .reshape((batch * count, d))
}

/// Token rows (B*tokens x D) with `addition` (B*count x D) added to the first `count` rows of
/// every image: the backward of [`leading_rows`], accumulated.
fn add_to_leading_rows<T: Float>(
    x: &Tensor,
    addition: &Tensor,
    tokens: usize,
) -> candle_core::Result<Tensor> {
    let (rows, d) = x.dims2()?;
    if addition.dims() == x.dims() {
        return x + addition;
    }
    let count = addition.dim(0)? / (rows / tokens).max(1);
    let mut sum = values::<T>(x)?;
    let addition = values::<T>(addition)?;
    for (image_rows, added) in sum
        .chunks_exact_mut(tokens * d)
        .zip(addition.chunks_exact(count * d))
    {
        for (target, &value) in image_rows[..count * d].iter_mut().zip(added) {
            *target += value;
        }
    }
    Tensor::from_vec(sum, (rows, d), x.device())
}

/// `x W^T + b` on rows. The bias is added by a loop of this module's, not by candle's
/// `broadcast_add`: when candle's element-wise pool has workers (`CANDLE_NUM_THREADS` above 1; fedleak
/// runs without them by default), candle runs ops of 64 Ki elements and more (the MLP's and the
/// key/value projection's outputs at half a tiny-ViT batch of 8) on it, one caller at a time, and
/// the two halves of [`Pass::run_in_halves`] would wait for each other there.
fn affine<T: WithDType>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let y = x.matmul(&weight.t()?)?;
    let Some(bias) = bias else {
        return Ok(y);
    };
    let bias = values::<T>(bias)?;
    let mut sums = values::<T>(&y)?;
    for row in sums.chunks_exact_mut(bias.len()) {
        for (value, &shift) in row.iter_mut().zip(&bias) {
            *value += shift;
        }
    }
    Tensor::from_vec(sums, y.shape(), y.device())
}

/// A tensor's elements in row-major order.
fn values<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Layer norm over the last dimension of rows, as [`super::layer_norm`] computes it; returns the output
/// and what the backward needs.
fn layer_norm_forward<T: Float>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: T,
) -> candle_core::Result<(Tensor, NormCache<T>)> {
    let width = x.dim(D::Minus1)?;
    let xs = values::<T>(x)?;
    let (weight, bias) = (values::<T>(weight)?, values::<T>(bias)?);
    let n = T::from_f64(width as f64);
    let mut normalized = vec![T::zero(); xs.len()];
    let mut out = vec![T::zero(); xs.len()];
    let mut inverse_std = vec![T::zero(); xs.len() / width.max(1)];
    let rows_per_task = (CHUNK / width.max(1)).max(1);
    let blocks: Vec<_> = xs
        .chunks(rows_per_task * width)
        .zip(normalized.chunks_mut(rows_per_task * width))
        .zip(out.chunks_mut(rows_per_task * width))
        .zip(inverse_std.chunks_mut(rows_per_task))
        .collect();
    map_blocks(blocks, |(((xs, normalized), out), inverse_std)| {
        for (((row, xhat), y), r) in xs
            .chunks_exact(width)
            .zip(normalized.chunks_exact_mut(width))
            .zip(out.chunks_exact_mut(width))
            .zip(inverse_std)
        {
            let mean = row.iter().fold(T::zero(), |s, &v| s + v) / n;
            let variance = row
                .iter()
                .fold(T::zero(), |s, &v| s + (v - mean) * (v - mean))
                / n;
            *r = T::one() / (variance + eps).sqrt();
            for j in 0..width {
                xhat[j] = (row[j] - mean) * *r;
                y[j] = xhat[j] * weight[j] + bias[j];
            }
        }
    });
    Ok((
        Tensor::from_vec(out, x.shape(), x.device())?,
        NormCache {
            normalized,
            inverse_std,
        },
    ))
}

/// Softmax of `scale * scores` over rows of length `width`.
fn softmax_rows<T: Float>(scores: &[T], width: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::zero(); scores.len()];
    let task = (CHUNK / width.max(1)).max(1) * width;
    let blocks: Vec<_> = scores.chunks(task).zip(out.chunks_mut(task)).collect();
    map_blocks(blocks, |(scores, out)| {
        for (row, y) in scores.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let max = row
                .iter()
                .fold(T::neg_infinity(), |m, &v| num_traits::Float::max(m, v));
            let mut sum = T::zero();
            for (y, &s) in y.iter_mut().zip(row) {
                *y = ((s - max) * scale).exp();
                sum += *y;
            }
            for y in y.iter_mut() {
                *y /= sum;
            }
        }
    });
    out
}

/// Backward of [`softmax_rows`]: the gradient of the scores from that of the probabilities.
fn softmax_rows_backward<T: Float>(
    probabilities_grad: &[T],
    probabilities: &[T],
    width: usize,
    scale: T,
) -> Vec<T> {
    let mut out = vec![T::zero(); probabilities.len()];
    let task = (CHUNK / width.max(1)).max(1) * width;
    let blocks: Vec<_> = probabilities_grad
        .chunks(task)
        .zip(probabilities.chunks(task))
        .zip(out.chunks_mut(task))
        .collect();
    map_blocks(blocks, |((probabilities_grad, probabilities), out)| {
        for ((dy, y), dx) in probabilities_grad
            .chunks_exact(width)
            .zip(probabilities.chunks_exact(width))
            .zip(out.chunks_exact_mut(width))
        {
            let dot = dy.iter().zip(y).fold(T::zero(), |s, (&g, &p)| s + g * p);
            for j in 0..width {
                dx[j] = scale * y[j] * (dy[j] - dot);
            }
        }
    });
    out
}

/// Elements per parallel task of the element-wise kernels: large enough to amortise the hand-off.
const CHUNK: usize = 8192;

/// `task` applied to each block (slices of a kernel's inputs and outputs), results in block order:
/// across rayon's threads when there are several threads and several blocks, else in order on this
/// thread. Rayon hands a call from outside its pool to a pool thread and waits, even for one block
/// or a one-thread pool: in `fedleak attack`'s concurrent restarts (their own threads, one kernel
/// thread each) that queued both restarts' kernels on the same pool thread. The blocks are the same
/// either way, so sums over them are too.
fn map_blocks<B: Send, R: Send>(blocks: Vec<B>, task: impl Fn(B) -> R + Sync + Send) -> Vec<R> {
    if blocks.len() > 1 && rayon::current_num_threads() > 1 {
        blocks.into_par_iter().map(task).collect()
    } else {
        blocks.into_iter().map(task).collect()
    }
}

/// The exact GELU, u Phi(u), of every element, and Phi(u) for the backward.
fn gelu_forward<T: Float>(pre: &[T]) -> (Vec<T>, Vec<T>) {
    let half = T::from_f64(0.5);
    let inverse_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let mut activation = vec![T::zero(); pre.len()];
    let mut cdf = vec![T::zero(); pre.len()];
    let blocks: Vec<_> = pre
        .chunks(CHUNK)
        .zip(activation.chunks_mut(CHUNK))
        .zip(cdf.chunks_mut(CHUNK))
        .collect();
    map_blocks(blocks, |((u, a), c)| {
        for ((&u, a), c) in u.iter().zip(a.iter_mut()).zip(c.iter_mut()) {
            *c = half * (T::one() + (u * inverse_sqrt2).erf());
            *a = u * *c;
        }
    });
    (activation, cdf)
}

/// Backward of [`gelu_forward`]: the output gradient times Phi(u) + u phi(u).
fn gelu_backward<T: Float>(out_grad: &[T], pre: &[T], cdf: &[T]) -> Vec<T> {
    let half = T::from_f64(0.5);
    let density_scale =
        T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    let mut grad = vec![T::zero(); pre.len()];
    let blocks: Vec<_> = grad
        .chunks_mut(CHUNK)
        .zip(out_grad.chunks(CHUNK))
        .zip(pre.chunks(CHUNK).zip(cdf.chunks(CHUNK)))
        .collect();
    map_blocks(blocks, |((g, dy), (u, c))| {
        for j in 0..g.len() {
            let density = density_scale * (-(u[j] * u[j]) * half).exp();
            g[j] = dy[j] * (c[j] + u[j] * density);
        }
    });
    grad
}

/// The cross-entropy of logits (B x L) against targets summed over the rows and divided by
/// `divisor`, `-(1/divisor) sum t log softmax(z)` (the mean for `divisor` = B), and its gradient with
/// respect to the logits, `(softmax(z) * sum(t) - t) / divisor` per row.
fn cross_entropy_backward<T: Float>(
    logits: &Tensor,
    targets: &Tensor,
    divisor: usize,
) -> candle_core::Result<(f64, Tensor)> {
    let (batch, classes) = logits.dims2()?;
    if targets.dims() != [batch, classes] {
        candle_core::bail!(
            "targets have shape {:?}, the logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    let logits_values = values::<T>(logits)?;
    let probabilities = softmax_rows(&logits_values, classes, T::one());
    let targets = values::<T>(&targets.to_dtype(logits.dtype())?)?;
    let inverse_divisor = T::one() / T::from_f64(divisor as f64);
    let mut grad = vec![T::zero(); probabilities.len()];
    let mut loss = 0f64;
    for (((z, p), t), g) in logits_values
        .chunks_exact(classes)
        .zip(probabilities.chunks_exact(classes))
        .zip(targets.chunks_exact(classes))
        .zip(grad.chunks_exact_mut(classes))
    {
        let z: Vec<f64> = z.iter().map(|&v| WithDType::to_f64(v)).collect();
        let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let log_norm = z.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        let mass = t.iter().fold(T::zero(), |s, &v| s + v);
        for j in 0..classes {
            g[j] = (p[j] * mass - t[j]) * inverse_divisor;
            loss -= WithDType::to_f64(t[j]) * (z[j] - log_norm);
        }
    }
    Ok((
        loss / divisor as f64,
        Tensor::from_vec(grad, (batch, classes), logits.device())?,
    ))
}
