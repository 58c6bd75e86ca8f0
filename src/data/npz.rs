//! MedMNIST `.npz` archives: a zip of `.npy` arrays `train_images`, `train_labels`, `test_images`,
//! `test_labels` (and optional `val_*`, not read).
//!
//! Images are uint8 `(N, H, W)` or `(N, H, W, C)` with C of 1 or 3; labels `(N,)` or `(N, 1)` of any
//! integer type. Class names are the label values as strings (`"0"`, `"1"`, ..., up to the largest label
//! found), so label `i` names class `i`. Multi-label arrays `(N, L > 1)` (ChestMNIST) are not supported.
//! Each array is parsed by the sibling `npy` module (NumPy format 1.0, 2.0 and 3.0).
//!
//! This module knows nothing of image folders or clients.

use std::io::{Cursor, Read, Seek};
use std::path::Path;

use super::image_file::append_converted_u8;
use super::npy::{parse_npy, DType, NpyArray};
use super::{DataSplits, Dataset, ImageShape};
use crate::{Error, Result};

/// Labels at or above this are rejected (class names are `0..=max label`).
const MAX_CLASSES: usize = 65_536;

/// Loads the MedMNIST-layout archive at `path`, every image converted to `target`.
///
/// ```
/// use fedleak::data::{load_medmnist_npz, ImageShape};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tiny.npz");
/// // One 1x1 grayscale image per split, as `numpy.savez` would write it.
/// let npy = |descr: &str, shape: &str, data: &[u8]| {
///     let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
///     while (10 + header.len() + 1) % 64 != 0 { header.push(' '); }
///     header.push('\n');
///     let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
///     bytes.extend((header.len() as u16).to_le_bytes());
///     bytes.extend(header.as_bytes());
///     bytes.extend(data);
///     bytes
/// };
/// let mut zip = zip::ZipWriter::new(std::fs::File::create(&path)?);
/// for (key, descr, shape, data) in [
///     ("train_images", "|u1", "(1, 1, 1)", &[255u8][..]),
///     ("train_labels", "|u1", "(1, 1)", &[3]),
///     ("test_images", "|u1", "(1, 1, 1)", &[0]),
///     ("test_labels", "|u1", "(1, 1)", &[1]),
/// ] {
///     zip.start_file(format!("{key}.npy"), zip::write::SimpleFileOptions::default())?;
///     std::io::Write::write_all(&mut zip, &npy(descr, shape, data))?;
/// }
/// zip.finish()?;
/// let splits = load_medmnist_npz(&path, ImageShape::new(3, 1, 1))?;
/// assert_eq!(splits.train.images, vec![1.0, 1.0, 1.0]);
/// assert_eq!(splits.train.labels, vec![3]);
/// assert_eq!(splits.test.class_names, vec!["0", "1", "2", "3"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_medmnist_npz(path: &Path, target: ImageShape) -> Result<DataSplits> {
    target.check_target()?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    load_npz(
        std::io::BufReader::new(file),
        &path.display().to_string(),
        target,
    )
}

/// Loads a MedMNIST-layout archive held in memory (an embedded fixture); `name` names it in errors.
pub(crate) fn load_npz_bytes(bytes: &[u8], name: &str, target: ImageShape) -> Result<DataSplits> {
    target.check_target()?;
    load_npz(Cursor::new(bytes), name, target)
}

fn load_npz<R: Read + Seek>(reader: R, name: &str, target: ImageShape) -> Result<DataSplits> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| Error::InvalidDataset {
        source_name: name.into(),
        reason: format!("not a readable `.npz` (zip) archive: {e}"),
        hint: "MedMNIST data is an `.npz` file as written by `numpy.savez`; check the download"
            .into(),
    })?;
    let train = read_split(&mut archive, name, "train")?;
    let test = read_split(&mut archive, name, "test")?;
    let num_classes = train
        .labels
        .iter()
        .chain(&test.labels)
        .max()
        .map_or(0, |&m| m as usize + 1);
    if num_classes > MAX_CLASSES {
        return Err(Error::InvalidDataset {
            source_name: name.into(),
            reason: format!(
                "the largest label is {}, but labels must be class indices below {MAX_CLASSES}",
                num_classes - 1
            ),
            hint: "renumber the classes 0, 1, 2, ...".into(),
        });
    }
    let class_names: Vec<String> = (0..num_classes).map(|c| c.to_string()).collect();
    Ok(DataSplits {
        train: train.into_dataset(name, &class_names, target),
        test: test.into_dataset(name, &class_names, target),
    })
}

/// The raw images and labels of one split.
struct RawSplit {
    split: &'static str,
    count: usize,
    height: usize,
    width: usize,
    channels: usize,
    pixels: Vec<u8>,
    labels: Vec<u32>,
}

impl RawSplit {
    fn into_dataset(self, name: &str, class_names: &[String], target: ImageShape) -> Dataset {
        let per_image = self.height * self.width * self.channels;
        let mut images = Vec::with_capacity(self.count * target.len());
        for image in self.pixels.chunks_exact(per_image) {
            append_converted_u8(
                image,
                self.height,
                self.width,
                self.channels,
                target,
                &mut images,
            );
        }
        let sources = (0..self.count)
            .map(|i| format!("{name}:{}_images[{i}]", self.split))
            .collect();
        Dataset {
            name: format!("{name} [{}]", self.split),
            shape: target,
            class_names: class_names.to_vec(),
            images,
            labels: self.labels,
            sources,
        }
    }
}

fn read_split<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    name: &str,
    split: &'static str,
) -> Result<RawSplit> {
    let images_key = format!("{split}_images");
    let labels_key = format!("{split}_labels");
    let images = read_array(archive, name, &images_key)?;
    let labels = read_array(archive, name, &labels_key)?;
    let invalid = |reason: String, hint: &str| Error::InvalidDataset {
        source_name: name.into(),
        reason,
        hint: hint.into(),
    };

    if images.dtype != (DType { kind: 'u', size: 1 }) {
        return Err(invalid(
            format!(
                "`{images_key}` has dtype `{}`, expected uint8 (`|u1`)",
                images.descr
            ),
            "MedMNIST images are uint8; convert with `images.astype(numpy.uint8)`",
        ));
    }
    let (count, height, width, channels) = match images.shape[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] => (n, h, w, c),
        _ => {
            return Err(invalid(
                format!(
                    "`{images_key}` has shape {:?}, expected (N, H, W) or (N, H, W, C)",
                    images.shape
                ),
                "store 2D images; 3D volumes (e.g. OrganMNIST3D) are not supported",
            ))
        }
    };
    if channels != 1 && channels != 3 {
        return Err(invalid(
            format!(
                "`{images_key}` has {channels} channels (shape {:?}), expected 1 or 3",
                images.shape
            ),
            "use grayscale or RGB images; 3D volumes (e.g. OrganMNIST3D) are not supported",
        ));
    }
    if count == 0 || height == 0 || width == 0 {
        return Err(invalid(
            format!("`{images_key}` holds no images (shape {:?})", images.shape),
            "every split needs at least one image",
        ));
    }
    if height > 65_535 || width > 65_535 {
        return Err(invalid(
            format!("`{images_key}` images are {height}x{width}, larger than 65535"),
            "resize the images before packing them",
        ));
    }

    let label_count = match labels.shape[..] {
        [n] | [n, 1] => n,
        [n, l] => {
            return Err(invalid(
                format!(
                    "`{labels_key}` has shape ({n}, {l}): multi-label data ({l} labels per image) is not supported"
                ),
                "use a single-label dataset (e.g. PathMNIST, DermaMNIST, BloodMNIST); ChestMNIST is multi-label",
            ))
        }
        _ => {
            return Err(invalid(
                format!("`{labels_key}` has shape {:?}, expected (N,) or (N, 1)", labels.shape),
                "store one integer label per image",
            ))
        }
    };
    if label_count != count {
        return Err(invalid(
            format!(
                "`{images_key}` holds {count} images but `{labels_key}` holds {label_count} labels"
            ),
            "store exactly one label per image",
        ));
    }
    let labels = labels.integers(name, &labels_key)?;
    Ok(RawSplit {
        split,
        count,
        height,
        width,
        channels,
        pixels: images.data,
        labels,
    })
}

fn read_array<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    name: &str,
    key: &str,
) -> Result<NpyArray> {
    let entry_name = format!("{key}.npy");
    if archive.index_for_name(&entry_name).is_none() {
        let mut found: Vec<&str> = archive
            .file_names()
            .map(|f| f.strip_suffix(".npy").unwrap_or(f))
            .collect();
        found.sort_unstable();
        let found: Vec<String> = found.iter().map(|k| format!("`{k}`")).collect();
        return Err(Error::InvalidDataset {
            source_name: name.into(),
            reason: format!(
                "key `{key}` is missing; the archive holds {}",
                if found.is_empty() {
                    "nothing".to_string()
                } else {
                    found.join(", ")
                }
            ),
            hint: "a MedMNIST archive holds `train_images`, `train_labels`, `test_images` and \
                       `test_labels` (and optionally `val_*`)"
                .into(),
        });
    }
    let mut entry = archive
        .by_name(&entry_name)
        .map_err(|e| corrupt_entry(name, key, &e.to_string()))?;
    let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0).min(1 << 30));
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| corrupt_entry(name, key, &e.to_string()))?;
    parse_npy(&bytes).map_err(|reason| Error::InvalidDataset {
        source_name: name.into(),
        reason: format!("`{key}` is not a readable `.npy` array: {reason}"),
        hint: "write arrays with `numpy.savez` (C order, plain numeric dtype)".into(),
    })
}

fn corrupt_entry(name: &str, key: &str, reason: &str) -> Error {
    Error::InvalidDataset {
        source_name: name.into(),
        reason: format!("cannot read `{key}` from the archive: {reason}"),
        hint: "the file may be truncated; download it again".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::npy::tests::npy;
    use super::*;
    use std::io::Write;

    fn npz(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (key, bytes) in entries {
            zip.start_file(
                format!("{key}.npy"),
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn tiny_entries() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (
                "train_images",
                npy("|u1", "(2, 2, 2)", &[0, 255, 0, 255, 1, 2, 3, 4]),
            ),
            (
                "train_labels",
                npy(
                    "<i8",
                    "(2,)",
                    &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ),
            ),
            ("test_images", npy("|u1", "(1, 2, 2)", &[9, 9, 9, 9])),
            ("test_labels", npy("|u1", "(1, 1)", &[4])),
        ]
    }

    const SHAPE: ImageShape = ImageShape::new(1, 2, 2);

    #[test]
    fn reads_tiny_archive() {
        let bytes = npz(&tiny_entries());
        let splits = load_npz_bytes(&bytes, "tiny.npz", SHAPE).unwrap();
        assert_eq!(splits.train.labels, vec![1, 0]);
        assert_eq!(splits.test.labels, vec![4]);
        assert_eq!(splits.train.class_names, vec!["0", "1", "2", "3", "4"]);
        assert_eq!(splits.train.image(0), &[0.0, 1.0, 0.0, 1.0]);
        assert_eq!(splits.train.sources[1], "tiny.npz:train_images[1]");
    }

    #[test]
    fn missing_test_labels_names_the_key_and_found_keys() {
        let mut entries = tiny_entries();
        entries.retain(|(k, _)| *k != "test_labels");
        let bytes = npz(&entries);
        let err = load_npz_bytes(&bytes, "tiny.npz", SHAPE).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidDataset { .. }), "{err:?}");
        assert!(msg.contains("tiny.npz"), "{msg}");
        assert!(msg.contains("key `test_labels` is missing"), "{msg}");
        assert!(
            msg.contains("`test_images`, `train_images`, `train_labels`"),
            "{msg}"
        );
    }

    #[test]
    fn multi_label_is_unsupported() {
        let mut entries = tiny_entries();
        entries[1] = ("train_labels", npy("|u1", "(2, 3)", &[0, 1, 0, 1, 0, 1]));
        let err = load_npz_bytes(&npz(&entries), "chest.npz", SHAPE).unwrap_err();
        assert!(err.to_string().contains("multi-label"), "{err}");
    }

    #[test]
    fn count_mismatch_names_both_counts() {
        let mut entries = tiny_entries();
        entries[1] = ("train_labels", npy("|u1", "(3, 1)", &[0, 1, 0]));
        let err = load_npz_bytes(&npz(&entries), "x.npz", SHAPE).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`train_images` holds 2 images but `train_labels` holds 3 labels"),
            "{msg}"
        );
    }

    #[test]
    fn negative_label_is_rejected() {
        let mut entries = tiny_entries();
        entries[3] = ("test_labels", npy("|i1", "(1,)", &[0xff]));
        let err = load_npz_bytes(&npz(&entries), "x.npz", SHAPE).unwrap_err();
        assert!(
            err.to_string().contains("is -1, not a class index"),
            "{err}"
        );
    }

    #[test]
    fn huge_label_is_rejected() {
        let mut entries = tiny_entries();
        entries[3] = ("test_labels", npy("<u4", "(1,)", &[0, 0, 1, 0]));
        let err = load_npz_bytes(&npz(&entries), "x.npz", SHAPE).unwrap_err();
        assert!(
            err.to_string().contains("the largest label is 65536"),
            "{err}"
        );
    }

    #[test]
    fn float_images_are_rejected() {
        let mut entries = tiny_entries();
        entries[2] = ("test_images", npy("<f4", "(1, 1, 1)", &[0, 0, 0, 0]));
        let err = load_npz_bytes(&npz(&entries), "x.npz", SHAPE).unwrap_err();
        assert!(err.to_string().contains("expected uint8"), "{err}");
    }

    #[test]
    fn not_a_zip_is_invalid() {
        let err = load_npz_bytes(b"garbage", "x.npz", SHAPE).unwrap_err();
        assert!(err.to_string().contains("not a readable `.npz`"), "{err}");
    }
}
