//! Gradient pruning (top-k sparsification), the defence of Zhu et al. 2019 ("Deep Leakage from
//! Gradients", Sec. 5), with optional uniform quantisation of the kept values.
//!
//! **Selection.** Per tensor, as in DLG's pruning defence: of a tensor with `n` entries the client keeps
//! the `k = ceil(keep_fraction * n)` entries of largest magnitude (at least one; a product
//! `keep_fraction * n` within 1e-9 relative of an integer counts as that integer, so 0.7 * 10 keeps 7),
//! ties broken towards the lower flat index, and sends zero for the rest. Every tensor thus keeps the
//! same fraction, so no layer is silenced entirely.
//!
//! **Quantisation** (`quantize_bits` 8 or 16, else f32): per tensor, the kept values are mapped to
//! `2^bits` evenly spaced levels from their minimum `lo` to their maximum with step
//! `step = (max - lo) / (2^bits - 1)` (stored as f32); a value decodes to `lo + code * step`, within
//! `step / 2` of the original.
//!
//! **Wire format, version 1** (the upload is exactly these bytes; all integers little-endian):
//!
//! ```text
//! header   4  magic "FLPR"
//!          1  version = 1
//!          1  value format: 0 = f32, 8 = 8-bit codes, 16 = 16-bit codes
//!          4  tensor count T (u32)
//! T times, in name order:
//!          2  name length L (u16), then L bytes of UTF-8 name
//!          1  rank R, then R dims (u32 each)
//!          4  kept count k (u32)
//!          1  index encoding: 0 = gaps, 1 = bitmap
//!          .  indices, strictly increasing flat (row-major) positions i_0 < i_1 < ... < i_(k-1):
//!             gaps:   k unsigned LEB128 varints g_0 = i_0, g_j = i_j - i_(j-1) - 1
//!             bitmap: ceil(n / 8) bytes, entry i is bit (i % 8) of byte i / 8; unused bits zero
//!          .  values in index order: f32: k x 4 bytes;
//!             quantised: lo (f32), step (f32), then k codes of bits / 8 bytes each
//! ```
//!
//! The client picks, per tensor, the smaller index encoding (gaps when strictly smaller), so a tensor
//! costs `2 + L + 1 + 4R + 4 + 1 + min(ceil(n/8), sum_j varint_len(g_j)) + V` bytes with
//! `V = 4k` (f32) or `8 + k bits/8` (quantised), and the upload `10 +` the sum over tensors.

use std::collections::BTreeSet;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

use super::{aggregate_readable, Aggregate, NamedTensors, Scheme, ThreatModel, Upload, View};
use crate::fl::Transmission;
use crate::{Error, Result};

/// First bytes of a pruned upload.
pub const MAGIC: &[u8; 4] = b"FLPR";
/// The wire format version this module writes and reads.
pub const VERSION: u8 = 1;
const INDEX_GAPS: u8 = 0;
const INDEX_BITMAP: u8 = 1;

/// Default fraction of entries each tensor keeps.
pub(crate) fn default_keep_fraction() -> f64 {
    0.1
}

/// Gradient pruning with an optional quantisation of the kept values (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct PruneScheme {
    keep_fraction: f64,
    quantize_bits: Option<u8>,
}

impl PruneScheme {
    /// A pruning scheme keeping `keep_fraction` (in (0, 1]) of every tensor, values as f32 or, with
    /// `quantize_bits` `Some(8)` / `Some(16)`, as codes of that many bits.
    pub fn new(keep_fraction: f64, quantize_bits: Option<u8>) -> Result<Self> {
        if !(keep_fraction > 0.0 && keep_fraction <= 1.0) {
            return Err(Error::InvalidSetting {
                key: "keep_fraction".into(),
                reason: format!("the kept fraction must lie in (0, 1], got {keep_fraction}"),
                hint: "e.g. 0.1 keeps the largest 10 % of every tensor; 1 keeps everything".into(),
            });
        }
        if !matches!(quantize_bits, None | Some(8) | Some(16)) {
            return Err(Error::InvalidSetting {
                key: "quantize_bits".into(),
                reason: format!(
                    "quantisation to {} bits is not supported",
                    quantize_bits.unwrap_or_default()
                ),
                hint: "use 8 or 16, or leave it out to send f32 values".into(),
            });
        }
        Ok(Self {
            keep_fraction,
            quantize_bits,
        })
    }

    /// The fraction of entries kept per tensor.
    pub fn keep_fraction(&self) -> f64 {
        self.keep_fraction
    }

    /// Bits per quantised value, `None` for f32.
    pub fn quantize_bits(&self) -> Option<u8> {
        self.quantize_bits
    }

    /// Prunes (and quantises) `update` and serialises it in the wire format.
    pub fn encode_update(&self, update: &NamedTensors) -> Result<Transmission> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.quantize_bits.unwrap_or(0));
        let count = u32::try_from(update.len())
            .map_err(|_| Error::Training("an update has more than 2^32 tensors".into()))?;
        out.extend_from_slice(&count.to_le_bytes());
        for (name, tensor) in update {
            self.encode_tensor(name, tensor, &mut out)?;
        }
        Ok(Transmission::from_bytes(out))
    }

    fn encode_tensor(&self, name: &str, tensor: &Tensor, out: &mut Vec<u8>) -> Result<()> {
        let too_big = |what: &str| Error::Training(format!("tensor `{name}`: {what}"));
        let name_len =
            u16::try_from(name.len()).map_err(|_| too_big("name longer than 65535 bytes"))?;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        let dims = tensor.dims();
        out.push(u8::try_from(dims.len()).map_err(|_| too_big("rank above 255"))?);
        for &d in dims {
            let d = u32::try_from(d).map_err(|_| too_big("dimension above 2^32"))?;
            out.extend_from_slice(&d.to_le_bytes());
        }
        let values = tensor
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::Training(format!(
                "tensor `{name}` of a client update has non-finite values; lower the learning rate"
            )));
        }
        let kept = top_k_indices(&values, kept_count(self.keep_fraction, values.len()));
        let k = u32::try_from(kept.len()).map_err(|_| too_big("more than 2^32 entries kept"))?;
        out.extend_from_slice(&k.to_le_bytes());

        let gaps = gap_varints(&kept);
        let bitmap_len = values.len().div_ceil(8);
        if gaps.len() < bitmap_len {
            out.push(INDEX_GAPS);
            out.extend_from_slice(&gaps);
        } else {
            out.push(INDEX_BITMAP);
            let mut bitmap = vec![0u8; bitmap_len];
            for &i in &kept {
                bitmap[i / 8] |= 1 << (i % 8);
            }
            out.extend_from_slice(&bitmap);
        }

        let kept_values: Vec<f32> = kept.iter().map(|&i| values[i]).collect();
        match self.quantize_bits {
            None => {
                for v in kept_values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Some(bits) => {
                let (lo, step, codes) = quantize(&kept_values, bits);
                out.extend_from_slice(&lo.to_le_bytes());
                out.extend_from_slice(&step.to_le_bytes());
                for code in codes {
                    if bits == 8 {
                        out.push(code as u8);
                    } else {
                        out.extend_from_slice(&(code as u16).to_le_bytes());
                    }
                }
            }
        }
        Ok(())
    }
}

/// The number of entries kept of `n`: `ceil(keep_fraction * n)` (a product within 1e-9 relative of an
/// integer counts as that integer), at least 1 and at most `n`; 0 for an empty tensor.
pub fn kept_count(keep_fraction: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let exact = keep_fraction * n as f64;
    let nearest = exact.round();
    let k = if (exact - nearest).abs() <= 1e-9 * exact.max(1.0) {
        nearest
    } else {
        exact.ceil()
    };
    (k as usize).clamp(1, n)
}

/// The flat positions of the `k` largest-magnitude values (ties to the lower index), ascending.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    if k < values.len() && k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b))
        });
    }
    order.truncate(k);
    order.sort_unstable();
    order
}

/// LEB128 varints of the index gaps (`i_0`, then `i_j - i_(j-1) - 1`).
fn gap_varints(indices: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut next = 0usize;
    for &i in indices {
        let mut g = (i - next) as u64;
        loop {
            let byte = (g & 0x7f) as u8;
            g >>= 7;
            if g == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        next = i + 1;
    }
    out
}

/// Uniform quantisation of `values` to `bits`: `(lo, step, codes)` with value ~ `lo + code * step`.
fn quantize(values: &[f32], bits: u8) -> (f32, f32, Vec<u32>) {
    let levels = (1u32 << bits) - 1;
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if values.is_empty() || hi <= lo {
        let lo = if values.is_empty() { 0.0 } else { lo };
        return (lo, 0.0, vec![0; values.len()]);
    }
    let step = ((f64::from(hi) - f64::from(lo)) / f64::from(levels)) as f32;
    let codes = values
        .iter()
        .map(|&v| {
            let code = ((f64::from(v) - f64::from(lo)) / f64::from(step)).round();
            code.clamp(0.0, f64::from(levels)) as u32
        })
        .collect();
    (lo, step, codes)
}

/// Decodes a pruned upload into dense f32 tensors (zeros where nothing was kept) on `template`'s
/// device. Every tensor must exist in `template` with the same shape; anything truncated, malformed,
/// duplicated or trailing is an [`Error::InvalidDataset`] naming `origin`.
pub fn decode_update(bytes: &[u8], template: &NamedTensors, origin: &str) -> Result<NamedTensors> {
    let device = template
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let mut r = Reader {
        bytes,
        pos: 0,
        origin,
    };
    if r.take(4, "the magic bytes")? != MAGIC {
        return Err(r.malformed("does not start with the magic bytes `FLPR`".into()));
    }
    let version = r.u8("the version")?;
    if version != VERSION {
        return Err(r.malformed(format!(
            "format version {version}, this build reads version {VERSION}"
        )));
    }
    let value_format = r.u8("the value format")?;
    if !matches!(value_format, 0 | 8 | 16) {
        return Err(r.malformed(format!("unknown value format {value_format}")));
    }
    let count = r.u32("the tensor count")?;
    let mut seen = BTreeSet::new();
    let mut out = NamedTensors::new();
    for _ in 0..count {
        let (name, tensor) = decode_tensor(&mut r, value_format, template, &device)?;
        if !seen.insert(name.clone()) {
            return Err(r.malformed(format!("tensor `{name}` appears twice")));
        }
        out.insert(name, tensor);
    }
    if r.pos != bytes.len() {
        return Err(r.malformed(format!(
            "{} unexpected bytes after the last tensor",
            bytes.len() - r.pos
        )));
    }
    Ok(out)
}

fn decode_tensor(
    r: &mut Reader<'_>,
    value_format: u8,
    template: &NamedTensors,
    device: &Device,
) -> Result<(String, Tensor)> {
    let name_len = usize::from(r.u16("a tensor name length")?);
    let name = std::str::from_utf8(r.take(name_len, "a tensor name")?)
        .map_err(|_| r.malformed("a tensor name is not UTF-8".into()))?
        .to_string();
    let rank = usize::from(r.u8("a tensor rank")?);
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        dims.push(r.u32("a tensor dimension")? as usize);
    }
    let expected = template
        .get(&name)
        .ok_or_else(|| r.malformed(format!("tensor `{name}` is not a model parameter")))?;
    if expected.dims() != dims.as_slice() {
        return Err(r.malformed(format!(
            "tensor `{name}` has shape {dims:?}, the model's is {:?}",
            expected.dims()
        )));
    }
    let n: usize = dims.iter().product();
    let k = r.u32("a kept count")? as usize;
    if k > n {
        return Err(r.malformed(format!("tensor `{name}` keeps {k} of {n} entries")));
    }
    let indices = match r.u8("an index encoding")? {
        INDEX_GAPS => {
            let mut indices = Vec::with_capacity(k.min(r.remaining()));
            let mut next = 0usize;
            for _ in 0..k {
                let gap = r.varint("an index gap")?;
                let i = usize::try_from(gap)
                    .ok()
                    .and_then(|g| next.checked_add(g))
                    .filter(|&i| i < n)
                    .ok_or_else(|| {
                        r.malformed(format!(
                            "tensor `{name}` has an index beyond its {n} entries"
                        ))
                    })?;
                indices.push(i);
                next = i + 1;
            }
            indices
        }
        INDEX_BITMAP => {
            let bitmap = r.take(n.div_ceil(8), "an index bitmap")?;
            let mut indices = Vec::with_capacity(k);
            for (byte_index, &byte) in bitmap.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        indices.push(byte_index * 8 + bit);
                    }
                }
            }
            if indices.len() != k || indices.last().is_some_and(|&i| i >= n) {
                return Err(r.malformed(format!(
                    "tensor `{name}`: the bitmap marks {} entries (or bits past the end), the \
                     count says {k}",
                    indices.len()
                )));
            }
            indices
        }
        other => {
            return Err(r.malformed(format!(
                "tensor `{name}` has unknown index encoding {other}"
            )))
        }
    };
    let mut dense = vec![0f32; n];
    if value_format == 0 {
        for &i in &indices {
            dense[i] = r.f32("a value")?;
        }
    } else {
        let lo = f64::from(r.f32("a quantisation minimum")?);
        let step = f64::from(r.f32("a quantisation step")?);
        for &i in &indices {
            let code = if value_format == 8 {
                f64::from(r.u8("a quantised value")?)
            } else {
                f64::from(r.u16("a quantised value")?)
            };
            dense[i] = (lo + code * step) as f32;
        }
    }
    Ok((name, Tensor::from_vec(dense, dims, device)?))
}

/// A cursor over upload bytes whose errors name the upload and what was being read.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    origin: &'a str,
}

impl<'a> Reader<'a> {
    fn malformed(&self, reason: String) -> Error {
        Error::InvalidDataset {
            source_name: self.origin.to_string(),
            reason: format!("not a valid pruned update (format v{VERSION}): {reason}"),
            hint:
                "the upload is truncated, corrupted, or from another scheme or model; re-capture it"
                    .to_string(),
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.malformed(format!(
                "truncated: {what} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn f32(&mut self, what: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(what)?))
    }

    fn varint(&mut self, what: &str) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8(what)?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed(format!("{what} is a varint longer than 64 bits")))
    }
}

impl Scheme for PruneScheme {
    fn id(&self) -> &str {
        "prune"
    }

    fn parameters(&self) -> String {
        let values = match self.quantize_bits {
            Some(bits) => format!("{bits}-bit"),
            None => "f32".to_string(),
        };
        format!(
            "keep={}% per tensor (largest magnitudes), values={values}",
            self.keep_fraction * 100.0
        )
    }

    fn encode(
        &mut self,
        _client: usize,
        update: &NamedTensors,
        _rng: &mut StdRng,
    ) -> Result<Upload> {
        let started = Instant::now();
        let transmission = self.encode_update(update)?;
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
        Ok(Some(decode_update(
            upload.as_bytes(),
            template,
            "a client upload",
        )?))
    }

    fn aggregate(
        &mut self,
        weighted: &[(usize, &Upload)],
        template: &NamedTensors,
    ) -> Result<Aggregate> {
        aggregate_readable(self, weighted, template)
    }

    fn threat_models(&self) -> Vec<ThreatModel> {
        vec![ThreatModel {
            id: "server".into(),
            description: "An honest-but-curious server reads every client's pruned (sparsified) \
                          update in the clear."
                .into(),
            view: View::ClientUpdates,
        }]
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    const SHAPES: &[(&str, &[usize])] = &[
        (
            "vit.encoder.layer.0.attention.attention.query.weight",
            &[64, 64],
        ),
        ("vit.encoder.layer.0.attention.attention.query.bias", &[64]),
        ("vit.embeddings.cls_token", &[1, 1, 64]),
        ("classifier.weight", &[10, 64]),
        ("classifier.bias", &[10]),
    ];

    fn random_update(seed: u64) -> NamedTensors {
        let mut rng = StdRng::seed_from_u64(seed);
        SHAPES
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                (
                    name.to_string(),
                    Tensor::from_vec(v, *shape, &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn varint_len(mut g: usize) -> usize {
        let mut len = 1;
        while g >= 128 {
            g >>= 7;
            len += 1;
        }
        len
    }

    /// The documented size formula, from the kept positions alone.
    fn formula_len(update: &NamedTensors, keep: f64, bits: Option<u8>) -> usize {
        let mut total = 10;
        for (name, t) in update {
            let n = t.elem_count();
            let k = kept_count(keep, n);
            let kept = top_k_indices(&values(t), k);
            let mut prev = 0;
            let mut gaps = 0;
            for &i in &kept {
                gaps += varint_len(i - prev);
                prev = i + 1;
            }
            let index_bytes = gaps.min(n.div_ceil(8));
            let value_bytes = match bits {
                None => 4 * k,
                Some(b) => 8 + k * usize::from(b) / 8,
            };
            total += 2 + name.len() + 1 + 4 * t.rank() + 4 + 1 + index_bytes + value_bytes;
        }
        total
    }

    #[test]
    fn kept_count_is_ceil_of_fraction() {
        assert_eq!(kept_count(0.7, 10), 7);
        assert_eq!(kept_count(0.1, 10), 1);
        assert_eq!(kept_count(0.15, 10), 2);
        assert_eq!(kept_count(0.01, 64), 1);
        assert_eq!(kept_count(1e-9, 64), 1);
        assert_eq!(kept_count(1.0, 64), 64);
        assert_eq!(kept_count(0.3, 4096), 1229);
        assert_eq!(kept_count(0.5, 0), 0);
    }

    #[test]
    fn keeps_exactly_k_largest_per_tensor_and_round_trips_f32() {
        let update = random_update(1);
        for keep in [0.01, 0.1, 0.3, 0.5, 1.0] {
            let scheme = PruneScheme::new(keep, None).unwrap();
            let wire = scheme.encode_update(&update).unwrap();
            let decoded = decode_update(wire.as_bytes(), &update, "test").unwrap();
            assert_eq!(decoded.len(), update.len());
            for (name, t) in &update {
                let orig = values(t);
                let got = values(&decoded[name]);
                assert_eq!(decoded[name].dims(), t.dims());
                let k = kept_count(keep, orig.len());
                let kept: Vec<usize> = (0..orig.len()).filter(|&i| got[i] != 0.0).collect();
                assert_eq!(kept.len(), k, "{name} keep={keep}");
                // Exact values where kept.
                for &i in &kept {
                    assert_eq!(got[i], orig[i]);
                }
                // Every kept magnitude >= every dropped magnitude.
                let min_kept = kept.iter().map(|&i| orig[i].abs()).fold(f32::MAX, f32::min);
                let max_dropped = (0..orig.len())
                    .filter(|i| got[*i] == 0.0)
                    .map(|i| orig[i].abs())
                    .fold(0.0, f32::max);
                assert!(
                    min_kept >= max_dropped,
                    "{name}: {min_kept} < {max_dropped}"
                );
            }
        }
    }

    #[test]
    fn quantised_round_trip_is_within_half_a_step() {
        let update = random_update(2);
        for bits in [8u8, 16] {
            let scheme = PruneScheme::new(0.25, Some(bits)).unwrap();
            let wire = scheme.encode_update(&update).unwrap();
            let decoded = decode_update(wire.as_bytes(), &update, "test").unwrap();
            for (name, t) in &update {
                let orig = values(t);
                let got = values(&decoded[name]);
                let kept = top_k_indices(&orig, kept_count(0.25, orig.len()));
                let lo = kept.iter().map(|&i| orig[i]).fold(f32::MAX, f32::min);
                let hi = kept.iter().map(|&i| orig[i]).fold(f32::MIN, f32::max);
                let step = (f64::from(hi) - f64::from(lo)) / f64::from((1u32 << bits) - 1);
                let tolerance = step / 2.0 * (1.0 + 1e-4) + 1e-7;
                for &i in &kept {
                    let err = (f64::from(got[i]) - f64::from(orig[i])).abs();
                    assert!(
                        err <= tolerance,
                        "{name}[{i}] {bits} bits: {err} > {tolerance}"
                    );
                }
                let dropped = (0..orig.len()).filter(|i| !kept.contains(i));
                assert!(dropped.into_iter().all(|i| got[i] == 0.0));
            }
        }
    }

    #[test]
    fn wire_size_matches_the_formula_and_beats_dense() {
        let update = random_update(3);
        let dense = Transmission::plain(&update, None).unwrap().len();
        for keep in [0.001, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0] {
            for bits in [None, Some(8), Some(16)] {
                let wire = PruneScheme::new(keep, bits)
                    .unwrap()
                    .encode_update(&update)
                    .unwrap();
                assert_eq!(
                    wire.len(),
                    formula_len(&update, keep, bits),
                    "keep={keep} bits={bits:?}"
                );
                if keep <= 0.5 {
                    assert!(wire.len() < dense, "keep={keep}: {} >= {dense}", wire.len());
                }
            }
        }
        // The index encoding is the smaller one: gaps when very sparse, a bitmap otherwise.
        let name = "w";
        let one: NamedTensors = [(name.to_string(), update[SHAPES[0].0].clone())].into();
        let encoding_byte = 10 + 2 + name.len() + 1 + 4 * 2 + 4;
        for (keep, encoding) in [
            (0.01, INDEX_GAPS),
            (0.1, INDEX_GAPS),
            (0.3, INDEX_BITMAP),
            (0.5, INDEX_BITMAP),
        ] {
            let wire = PruneScheme::new(keep, None)
                .unwrap()
                .encode_update(&one)
                .unwrap();
            assert_eq!(wire.as_bytes()[encoding_byte], encoding, "keep={keep}");
        }
    }

    #[test]
    fn truncated_or_malformed_bytes_are_errors() {
        let update = random_update(4);
        for bits in [None, Some(8)] {
            for keep in [0.01, 0.5] {
                let wire = PruneScheme::new(keep, bits)
                    .unwrap()
                    .encode_update(&update)
                    .unwrap();
                let bytes = wire.as_bytes();
                for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
                    match decode_update(&bytes[..cut], &update, "client 3 upload") {
                        Err(Error::InvalidDataset { source_name, .. }) => {
                            assert_eq!(source_name, "client 3 upload")
                        }
                        other => panic!("cut at {cut}: expected an error, got {:?}", other.is_ok()),
                    }
                }
                let mut trailing = bytes.to_vec();
                trailing.push(0);
                assert!(decode_update(&trailing, &update, "x").is_err());
            }
        }
        let good = PruneScheme::new(0.1, None)
            .unwrap()
            .encode_update(&update)
            .unwrap()
            .as_bytes()
            .to_vec();
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        let mut bad_format = good.clone();
        bad_format[5] = 3;
        for bad in [bad_magic, bad_version, bad_format] {
            assert!(matches!(
                decode_update(&bad, &update, "x"),
                Err(Error::InvalidDataset { .. })
            ));
        }
        // A tensor the model does not have, or with another shape.
        let mut other = update.clone();
        other.insert(
            "classifier.bias".into(),
            Tensor::zeros(11, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(decode_update(&good, &other, "x").is_err());
        let mut fewer = update.clone();
        fewer.remove("classifier.bias");
        assert!(decode_update(&good, &fewer, "x").is_err());
    }

    #[test]
    fn scheme_reads_and_aggregates() {
        let a = random_update(5);
        let b = random_update(6);
        let mut scheme = PruneScheme::new(0.2, None).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let ua = scheme.encode(0, &a, &mut rng).unwrap();
        let ub = scheme.encode(1, &b, &mut rng).unwrap();
        let ra = scheme.server_reads(&ua.transmission, &a).unwrap().unwrap();
        let rb = scheme.server_reads(&ub.transmission, &a).unwrap().unwrap();
        let agg = scheme.aggregate(&[(2, &ua), (2, &ub)], &a).unwrap();
        for name in a.keys() {
            let want: Vec<f32> = values(&ra[name])
                .iter()
                .zip(values(&rb[name]))
                .map(|(x, y)| 0.5 * x + 0.5 * y)
                .collect();
            for (w, g) in want.iter().zip(values(&agg.mean_update[name])) {
                assert!((w - g).abs() < 1e-7);
            }
        }
        assert_eq!(scheme.threat_models()[0].view, View::ClientUpdates);
        assert_eq!(
            scheme.parameters(),
            "keep=20% per tensor (largest magnitudes), values=f32"
        );
    }

    #[test]
    fn config_defaults_and_registry() {
        use crate::schemes::{build_scheme, SchemeConfig};
        let config: SchemeConfig = toml::from_str("id = \"prune\"").unwrap();
        assert_eq!(
            config,
            SchemeConfig::Prune {
                keep_fraction: 0.1,
                quantize_bits: None
            }
        );
        assert_eq!(config.id(), "prune");
        assert_eq!(build_scheme(&config, 0).unwrap().id(), "prune");
        let config: SchemeConfig =
            toml::from_str("id = \"prune\"\nkeep_fraction = 0.05\nquantize_bits = 8").unwrap();
        assert!(build_scheme(&config, 0)
            .unwrap()
            .parameters()
            .contains("8-bit"));
        let bad: SchemeConfig = toml::from_str("id = \"prune\"\nkeep_fraction = 0.0").unwrap();
        assert!(build_scheme(&bad, 0).is_err());
        assert!(toml::from_str::<SchemeConfig>("id = \"prune\"\nkeep = 0.1").is_err());
    }

    #[test]
    fn rejects_bad_settings() {
        for keep in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(matches!(
                PruneScheme::new(keep, None),
                Err(Error::InvalidSetting { .. })
            ));
        }
        for bits in [0u8, 4, 12, 32] {
            assert!(PruneScheme::new(0.1, Some(bits)).is_err());
        }
        assert!(PruneScheme::new(1.0, Some(16)).is_ok());
    }
}
