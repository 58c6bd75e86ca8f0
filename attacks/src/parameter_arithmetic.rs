//! One-pass arithmetic over parameter-sized tensors: the squared norms and dot products of the
//! matching objective, and the linear combinations that form its direction and the
//! finite-difference step's shifted parameters.
//!
//! candle evaluates `a x + b y` as three element-wise kernels with an output buffer each, and a
//! squared norm as a squared copy and a sum. The finite-difference attack step does that several
//! times a step over every parameter (1.8 M values on the tiny ViT, 86 M on ViT-B/16) between its
//! passes, where nothing else runs. These functions read each operand once and write at most one
//! buffer, in fixed chunks (across rayon's threads for a large tensor when there are several), each
//! sum taken in f64 over vectorised lanes and the chunks' sums added in order: a result does not
//! depend on the thread count. Off the CPU, or for a dtype other than f32 and f64 or a tensor that
//! is not contiguous, they fall back to candle's ops.
//!
//! Measured 2026-12-06 with timers around those lines (`fedleak bench --step attack --model
//! vit-tiny-32 --batch 8 --threads 2`, single runs): the direction's arithmetic took 2.2 ms and the
//! shift 1.0 ms of a 68 ms step through candle's ops, 1.4-1.9 and 0.6 ms with these functions; on
//! ViT-B/16 (`--model vit-b16-224 --batch 1`) 83-107 ms and 40 ms of a 1290 ms step through
//! candle's, 61-63 and 32 ms with these on one thread. The whole step, with this and candle's
//! element-wise pool left out (see `fedleak`'s `main`), is timed against PyTorch in
//! `tests/bench/README.md`.

use std::mem::MaybeUninit;

use candle_core::{DType, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::Result;

/// Elements per chunk of work (a chunk's sum is one f64 partial; the partials are added in order).
const CHUNK: usize = 1 << 15;

/// The fewest elements worth splitting across threads (four chunks).
const MIN_PARALLEL: usize = 4 * CHUNK;

/// Runs `f` on the contiguous elements of the CPU tensors `tensors` (all of dtype `T`, each a
/// different tensor: a read lock is held on each), or returns `None` when one of them is not such
/// a tensor.
fn with_slices<T: WithDType, R>(tensors: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Option<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(tensors.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        let (start, end) = layout.contiguous_offsets()?;
        slices.push(&cpu.as_slice::<T>().ok()?[start..end]);
    }
    Some(f(&slices))
}

/// `(sum_i g_i^2, sum_i g_i t_i)` over aligned chunks of `g` and `t` (equal lengths), the chunks'
/// sums added in order.
fn chunked_sums<T: WithDType>(g: &[T], t: &[T]) -> (f64, f64) {
    let add = |a: (f64, f64), b: (f64, f64)| (a.0 + b.0, a.1 + b.1);
    if !parallel(g.len()) {
        return g
            .chunks(CHUNK)
            .zip(t.chunks(CHUNK))
            .map(|(g, t)| norm_and_dot_of_chunk(g, t))
            .fold((0.0, 0.0), add);
    }
    g.par_chunks(CHUNK)
        .zip(t.par_chunks(CHUNK))
        .map(|(g, t)| norm_and_dot_of_chunk(g, t))
        .collect::<Vec<_>>()
        .into_iter()
        .fold((0.0, 0.0), add)
}

/// Whether to split `len` elements' work across rayon's threads: only when there are several
/// threads and at least [`MIN_PARALLEL`] elements. With one thread (`fedleak attack` running
/// restarts at once, one kernel thread each), work handed to the pool from a restart's own thread
/// would queue behind the pool's single worker instead of running on its caller; below the minimum,
/// waking the pool costs more than it saves.
fn parallel(len: usize) -> bool {
    len >= MIN_PARALLEL && rayon::current_num_threads() > 1
}

/// Lanes of the running sums: independent accumulators the compiler keeps in vector registers (one
/// running sum would be a chain of dependent additions, one element per adder latency).
const LANES: usize = 8;

/// `(sum_i g_i^2, sum_i g_i t_i)` in f64, in one pass.
fn norm_and_dot_of_chunk<T: WithDType>(g: &[T], t: &[T]) -> (f64, f64) {
    let (mut norm, mut dot) = ([0f64; LANES], [0f64; LANES]);
    let (g_lanes, t_lanes) = (g.chunks_exact(LANES), t.chunks_exact(LANES));
    let (g_rest, t_rest) = (g_lanes.remainder(), t_lanes.remainder());
    for (g, t) in g_lanes.zip(t_lanes) {
        for lane in 0..LANES {
            let g = g[lane].to_f64();
            norm[lane] += g * g;
            dot[lane] += g * t[lane].to_f64();
        }
    }
    for (lane, (g, t)) in g_rest.iter().zip(t_rest).enumerate() {
        let g = g.to_f64();
        norm[lane] += g * g;
        dot[lane] += g * t.to_f64();
    }
    (norm.iter().sum(), dot.iter().sum())
}

/// `(|g|^2, <g, t>)` in f64, in one pass over both (`t` in `g`'s dtype and shape).
pub(crate) fn squared_norm_and_dot(g: &Tensor, t: &Tensor) -> Result<(f64, f64)> {
    fn fused<T: WithDType>(g: &Tensor, t: &Tensor) -> Option<(f64, f64)> {
        with_slices::<T, _>(&[g, t], |s| chunked_sums(s[0], s[1]))
    }
    let fast = match g.dtype() {
        _ if g.shape() != t.shape() || g.dtype() != t.dtype() => None,
        DType::F32 => fused::<f32>(g, t),
        DType::F64 => fused::<f64>(g, t),
        _ => None,
    };
    if let Some(found) = fast {
        return Ok(found);
    }
    Ok((candle_sum(&g.sqr()?)?, candle_sum(&(g * t)?)?))
}

/// The sum of a tensor's elements by candle's ops, in f64 (the fallback of the fused sums).
fn candle_sum(x: &Tensor) -> Result<f64> {
    Ok(x.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `|x|^2` summed over a list of tensors, in f64, reading each once.
pub(crate) fn squared_norm(tensors: &[Tensor]) -> Result<f64> {
    fn fused<T: WithDType>(x: &Tensor) -> Option<f64> {
        with_slices::<T, _>(&[x], |s| chunked_sums(s[0], s[0]).0)
    }
    let mut total = 0f64;
    for x in tensors {
        let fast = match x.dtype() {
            DType::F32 => fused::<f32>(x),
            DType::F64 => fused::<f64>(x),
            _ => None,
        };
        total += match fast {
            Some(found) => found,
            None => candle_sum(&x.sqr()?)?,
        };
    }
    Ok(total)
}

/// Writes `a x + b y` into `out` (all three of one length).
fn combine_chunk<T: WithDType>(out: &mut [MaybeUninit<T>], a: T, x: &[T], b: T, y: &[T]) {
    for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
        o.write(x * a + y * b);
    }
}

/// `a x + b y` in `x`'s dtype (`y` of the same dtype and shape), one pass and one output buffer;
/// each element rounds as candle's `(x * a + y * b)` does.
pub(crate) fn linear_combination(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    fn fused<T: WithDType>(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Option<Tensor> {
        let (a, b) = (T::from_f64(a), T::from_f64(b));
        let values = with_slices::<T, _>(&[x, y], |s| {
            let mut out = Vec::with_capacity(s[0].len());
            let spare = out.spare_capacity_mut();
            if parallel(s[0].len()) {
                spare
                    .par_chunks_mut(CHUNK)
                    .zip(s[0].par_chunks(CHUNK).zip(s[1].par_chunks(CHUNK)))
                    .for_each(|(out, (x, y))| combine_chunk(out, a, x, b, y));
            } else {
                spare
                    .chunks_mut(CHUNK)
                    .zip(s[0].chunks(CHUNK).zip(s[1].chunks(CHUNK)))
                    .for_each(|(out, (x, y))| combine_chunk(out, a, x, b, y));
            }
            // SAFETY: the chunks above cover the first `len` elements and wrote every one of them.
            unsafe { out.set_len(s[0].len()) };
            out
        })?;
        Tensor::from_vec(values, x.shape(), x.device()).ok()
    }
    let fast = match x.dtype() {
        _ if x.shape() != y.shape() || x.dtype() != y.dtype() => None,
        DType::F32 => fused::<f32>(a, x, b, y),
        DType::F64 => fused::<f64>(a, x, b, y),
        _ => None,
    };
    match fast {
        Some(combined) => Ok(combined),
        None => Ok(((x * a)? + (y * b)?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(n: usize, scale: f64, dtype: DType) -> Tensor {
        let values: Vec<f64> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f64 * scale - 3.0)
            .collect();
        Tensor::from_vec(values, n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The sum of a tensor's elements as candle computes it, in f64.
    fn total(x: Tensor) -> f64 {
        x.sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn norms_and_dots_match_candle_over_several_chunks() {
        // Three and a bit chunks, in both dtypes; f64 sums of f32 values are exact to ~1e-12 here.
        for dtype in [DType::F32, DType::F64] {
            let (g, t) = (
                ramp(3 * CHUNK + 17, 0.01, dtype),
                ramp(3 * CHUNK + 17, -0.003, dtype),
            );
            let (norm, dot) = squared_norm_and_dot(&g, &t).unwrap();
            let (g64, t64) = (
                g.to_dtype(DType::F64).unwrap(),
                t.to_dtype(DType::F64).unwrap(),
            );
            let want_norm = total(g64.sqr().unwrap());
            let want_dot = total((&g64 * &t64).unwrap());
            assert!(
                (norm - want_norm).abs() <= 1e-12 * want_norm,
                "{dtype:?} {norm} {want_norm}"
            );
            assert!(
                (dot - want_dot).abs() <= 1e-12 * want_dot.abs(),
                "{dtype:?} {dot} {want_dot}"
            );
        }
    }

    #[test]
    fn a_linear_combination_rounds_as_candle_does() {
        for dtype in [DType::F32, DType::F64] {
            let (x, y) = (
                ramp(2 * CHUNK + 5, 0.01, dtype),
                ramp(2 * CHUNK + 5, 0.02, dtype),
            );
            let fused = linear_combination(-0.37, &x, 1.9, &y).unwrap();
            let candle = ((&x * -0.37).unwrap() + (&y * 1.9).unwrap()).unwrap();
            assert_eq!(total((fused - candle).unwrap().abs().unwrap()), 0.0);
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // Large enough to be split across threads when there are several.
        let (g, t) = (
            ramp(MIN_PARALLEL * 2 + 3, 0.013, DType::F32),
            ramp(MIN_PARALLEL * 2 + 3, -0.007, DType::F32),
        );
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let sums = squared_norm_and_dot(&g, &t).unwrap();
                let combined = linear_combination(0.3, &g, -1.7, &t).unwrap();
                (sums, combined.to_vec1::<f32>().unwrap())
            })
        };
        assert_eq!(on(1), on(2));
    }

    #[test]
    fn strided_and_mismatched_tensors_take_candles_ops() {
        // A transposed view is not contiguous: the fallback must give the same values.
        let x = ramp(6, 1.0, DType::F32)
            .reshape((2, 3))
            .unwrap()
            .t()
            .unwrap();
        let y = ramp(6, 0.5, DType::F32).reshape((3, 2)).unwrap();
        let combined = linear_combination(2.0, &x, 1.0, &y).unwrap();
        let want = ((&x * 2.0).unwrap() + &y).unwrap();
        assert_eq!(
            combined.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        let norm = squared_norm(std::slice::from_ref(&x)).unwrap();
        let want_norm = total(x.sqr().unwrap());
        assert!(
            (norm - want_norm).abs() <= 1e-6 * norm,
            "{norm} {want_norm}"
        );
        let (_, dot) = squared_norm_and_dot(&x, &y).unwrap();
        let want_dot = total((&x * &y).unwrap());
        assert!(
            (dot - want_dot).abs() <= 1e-6 * dot.abs(),
            "{dot} {want_dot}"
        );
        assert!(linear_combination(1.0, &x, 1.0, &ramp(5, 1.0, DType::F32)).is_err());
    }
}
