//! Graph-preserving building blocks: every backward formula is itself differentiable, so second-order
//! gradients (gradient of a gradient-matching loss with respect to the input) are exact.
//!
//! candle's fused `softmax_last_dim` silently gives wrong second derivatives and `candle_nn::LayerNorm`'s
//! fast path cuts the graph; GELU-erf's built-in derivative rounds 1/sqrt(2 pi) to six digits. The
//! composites here avoid all three. Tests compare both orders of gradient with finite differences in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};

/// Layer normalisation over the last dimension, written as plain tensor operations.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f64, 3.]], &Device::Cpu).unwrap();
/// let w = Tensor::new(&[1f64, 1.], &Device::Cpu).unwrap();
/// let b = Tensor::new(&[0f64, 0.], &Device::Cpu).unwrap();
/// let y = fedleak::model::layer_norm(&x, &w, &b, 0.0).unwrap();
/// assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![-1.0, 1.0]]);
/// ```
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normalized = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    let features = normalized.dim(D::Minus1)?;
    let rows = normalized.elem_count() / features.max(1);
    let flat = normalized.reshape((rows, features))?;
    ((flat * repeat_rows(weight, rows)?)? + repeat_rows(bias, rows)?)?.reshape(normalized.shape())
}

/// `rows` copies of a tensor, flattened, as a (rows x n) matrix: the outer product of a column of ones
/// with it. Equivalent to a broadcast, but its backward sums over the copies with one matrix product,
/// where a broadcast's backward reduces over the leading dimensions element by element in candle
/// (measured: 18 % of a tiny-ViT training step at batch 8 went there).
pub(crate) fn repeat_rows(v: &Tensor, rows: usize) -> Result<Tensor> {
    Tensor::ones((rows, 1), v.dtype(), v.device())?.matmul(&v.reshape((1, v.elem_count()))?)
}

/// Softmax over the last dimension. The max is subtracted for stability and detached: the result does
/// not depend on it, so its gradient is exactly zero and the graph stays exact to every order.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0f64, 0.]], &Device::Cpu).unwrap();
/// let y = fedleak::model::softmax_last_dim(&x).unwrap();
/// assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![0.5, 0.5]]);
/// ```
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// The exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), composed from `erf` so that its
/// derivative (through erf's exact derivative) is exact to every order.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[0f64, 1.], &Device::Cpu).unwrap();
/// let y = fedleak::model::gelu(&x).unwrap().to_vec1::<f64>().unwrap();
/// assert_eq!(y[0], 0.0);
/// assert!((y[1] - 0.841344746068543).abs() < 1e-12);
/// ```
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let phi = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
    (x * phi)? * 0.5
}

/// `x W^T + b` for `x` of shape (..., in) and `weight` of shape (out, in).
///
/// A weight that takes no gradient (a plain tensor, as in an attack's input-gradient passes) goes
/// through [`FrozenWeightMatmul`] on the CPU, whose backward computes the input's gradient only.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let product = |x: &Tensor| -> Result<Tensor> {
        if !weight.track_op() && x.device().is_cpu() {
            x.apply_op1(FrozenWeightMatmul {
                weight: weight.clone(),
            })
        } else {
            x.matmul(&weight.t()?)
        }
    };
    let with_bias = |x: &Tensor| -> Result<Tensor> {
        let y = product(x)?;
        match bias {
            Some(b) => y.clone() + repeat_rows(b, y.dim(0)?)?,
            None => Ok(y),
        }
    };
    match x.dims() {
        [batch, tokens, inputs] => {
            with_bias(&x.reshape((batch * tokens, *inputs))?)?.reshape((*batch, *tokens, ()))
        }
        _ => with_bias(x),
    }
}

/// `x W^T` (x: M x K, W: N x K) for a weight that takes no gradient. candle's matmul backward also
/// computes the gradient of its right-hand side, and keeps it until the backward pass ends, even for
/// a constant: on ViT-B/16 that is 344 MB and one matrix product of three per linear layer, wasted in
/// every pass that only wants the input's gradient. This op's backward is `grad W`, built from
/// ordinary tensor operations (so differentiable again), and nothing for the weight.
struct FrozenWeightMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenWeightMatmul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, weight_k) = self.weight.dims2()?;
        if k != weight_k {
            candle_core::bail!(
                "frozen-weight matmul: input has {k} features, weight expects {weight_k}"
            );
        }
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("frozen-weight matmul: the weight is not on the CPU");
        };
        let product = x.matmul(
            weight,
            (1, m, n, k),
            x_layout,
            &weight_layout.transpose(0, 1)?,
        )?;
        Ok((product, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _product: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// Mean cross-entropy of logits (B x L) against target distributions (B x L): one-hot labels, or soft
/// labels as a label-optimising attack uses. Log-softmax with a detached max, exact to every order.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f64, 0.]], &Device::Cpu).unwrap();
/// let target = Tensor::new(&[[1f64, 0.]], &Device::Cpu).unwrap();
/// let loss = fedleak::model::cross_entropy(&logits, &target).unwrap().to_scalar::<f64>().unwrap();
/// assert!((loss - 2f64.ln()).abs() < 1e-15);
/// ```
pub fn cross_entropy(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_norm)?;
    let batch = logits.dim(0)? as f64;
    (log_probs * target)?.sum_all()? * (-1.0 / batch)
}
