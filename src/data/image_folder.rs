//! ImageFolder trees: `DIR/[split/]label/*.png|jpg|jpeg`, on disk or embedded in the binary.
//!
//! With `train/` and `test/` folders (and an optional `val/`, not read) those are the splits; without
//! them every class folder is split with the seed, 80 % train / 20 % test (at least one test image per
//! class of two or more). Class names are the sorted union of the class folders of both splits, labels
//! their index; files are read in sorted order. Files without an image extension (e.g. `manifest.csv`)
//! are skipped; a file with one that does not decode is an error naming it, never skipped.
//!
//! The tree is first listed into a `Listing` so the same rules serve a directory on disk and a
//! fixture embedded at compile time. This module knows nothing of `.npz` files or of clients.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::image_file::{append_converted, decode_image, has_image_extension};
use super::{DataSplits, Dataset, ImageShape};
use crate::{Error, Result};

/// Share of each class held out for testing when a folder has no split folders.
const TEST_FRACTION: f64 = 0.2;

/// Loads the ImageFolder tree at `dir` (see the module doc), every image converted to `target`.
///
/// ```
/// use fedleak::data::{load_image_folder, ImageShape};
/// let dir = tempfile::tempdir()?;
/// for (class, count) in [("cat", 5), ("dog", 2)] {
///     std::fs::create_dir(dir.path().join(class))?;
///     for i in 0..count {
///         let path = dir.path().join(class).join(format!("{i}.png"));
///         image::GrayImage::new(4, 4).save(path).unwrap();
///     }
/// }
/// let splits = load_image_folder(dir.path(), ImageShape::new(1, 4, 4), 7)?;
/// assert_eq!((splits.train.len(), splits.test.len()), (5, 2));
/// assert_eq!(splits.test.labels, vec![0, 1]);
/// assert_eq!(splits.train.class_names, vec!["cat", "dog"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_image_folder(dir: &Path, target: ImageShape, seed: u64) -> Result<DataSplits> {
    target.check_target()?;
    let listing = Listing::read_dir(dir, dir.display().to_string(), 0)?;
    load_listing(&listing, target, seed)
}

/// The bytes of one listed file: borrowed from the binary or read from disk on demand.
#[derive(Debug, Clone)]
pub(crate) enum Contents {
    /// Embedded at compile time.
    Embedded(&'static [u8]),
    /// A file on disk.
    Disk(PathBuf),
}

/// One file of a [`Listing`].
#[derive(Debug, Clone)]
pub(crate) struct ListedFile {
    /// File name.
    pub(crate) name: String,
    /// Full name shown to users and recorded as the image's source.
    pub(crate) display: String,
    /// Where the bytes are.
    pub(crate) contents: Contents,
}

/// A directory of an ImageFolder tree: sub-directories and files, each sorted by name.
#[derive(Debug, Clone)]
pub(crate) struct Listing {
    /// Full name shown to users (a path, or `fixture:NAME/...`).
    pub(crate) display: String,
    /// Sub-directories (name, listing), sorted by name.
    pub(crate) dirs: Vec<(String, Listing)>,
    /// Files, sorted by name.
    pub(crate) files: Vec<ListedFile>,
}

/// How deep a listing on disk goes: root (0) / split (1) / class (2); deeper folders are not read.
const MAX_DEPTH: usize = 2;

impl Listing {
    /// Lists `dir` on disk down to [`MAX_DEPTH`] levels.
    fn read_dir(dir: &Path, display: String, depth: usize) -> Result<Listing> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let metadata = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            let shown = path.display().to_string();
            if metadata.is_dir() {
                let sub = if depth < MAX_DEPTH {
                    Listing::read_dir(&path, shown, depth + 1)?
                } else {
                    Listing {
                        display: shown,
                        dirs: Vec::new(),
                        files: Vec::new(),
                    }
                };
                dirs.push((name, sub));
            } else {
                files.push(ListedFile {
                    name,
                    display: shown,
                    contents: Contents::Disk(path),
                });
            }
        }
        Ok(Listing::sorted(display, dirs, files))
    }

    /// A listing with its entries sorted by name.
    pub(crate) fn sorted(
        display: String,
        mut dirs: Vec<(String, Listing)>,
        mut files: Vec<ListedFile>,
    ) -> Listing {
        dirs.sort_by(|a, b| a.0.cmp(&b.0));
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Listing {
            display,
            dirs,
            files,
        }
    }

    fn dir(&self, name: &str) -> Option<&Listing> {
        self.dirs.iter().find(|(n, _)| n == name).map(|(_, d)| d)
    }

    /// The files with an image extension.
    fn images(&self) -> impl Iterator<Item = &ListedFile> {
        self.files.iter().filter(|f| has_image_extension(&f.name))
    }

    /// Warns about sub-folders of a class folder, which are not read.
    fn warn_nested(&self) {
        for (_, sub) in &self.dirs {
            tracing::warn!(folder = %sub.display, "ignoring a folder inside a class folder");
        }
    }
}

/// One image to load: its label and file.
struct Item<'a> {
    label: u32,
    file: &'a ListedFile,
}

/// Applies the ImageFolder rules to `root` and decodes the images.
pub(crate) fn load_listing(root: &Listing, target: ImageShape, seed: u64) -> Result<DataSplits> {
    match (root.dir("train"), root.dir("test")) {
        (Some(train), Some(test)) => load_split_layout(root, train, test, target),
        (Some(_), None) | (None, Some(_)) => {
            let (has, lacks) = if root.dir("train").is_some() {
                ("train", "test")
            } else {
                ("test", "train")
            };
            Err(Error::InvalidDataset {
                source_name: root.display.clone(),
                reason: format!("it has a `{has}/` folder but no `{lacks}/` folder"),
                hint: format!(
                    "add `{lacks}/LABEL/*.png`, or use no split folders (`LABEL/*.png`) and \
                     fedleak holds out 20 % of each class"
                ),
            })
        }
        (None, None) => load_class_layout(root, target, seed),
    }
}

fn load_split_layout(
    root: &Listing,
    train: &Listing,
    test: &Listing,
    target: ImageShape,
) -> Result<DataSplits> {
    check_no_loose_images(train)?;
    check_no_loose_images(test)?;
    for (name, dir) in &root.dirs {
        if !matches!(name.as_str(), "train" | "test" | "val") {
            tracing::warn!(folder = %dir.display, "ignoring a folder beside the `train/` and `test/` splits");
        }
    }
    let classes: BTreeSet<&str> = train
        .dirs
        .iter()
        .chain(&test.dirs)
        .map(|(name, _)| name.as_str())
        .collect();
    let class_names: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    let mut splits = Vec::with_capacity(2);
    for (split_name, split) in [("train", train), ("test", test)] {
        let mut items = Vec::new();
        for (class, listing) in &split.dirs {
            let label = class_names
                .iter()
                .position(|c| c == class)
                .expect("class set is the union of class folders") as u32;
            listing.warn_nested();
            let before = items.len();
            items.extend(listing.images().map(|file| Item { label, file }));
            if items.len() == before {
                return Err(empty_class(listing));
            }
        }
        if items.is_empty() {
            return Err(Error::InvalidDataset {
                source_name: split.display.clone(),
                reason: "the split folder has no class folders with images".into(),
                hint: format!("put images in `{split_name}/LABEL/*.png` (one folder per class)"),
            });
        }
        let name = format!("{} [{split_name}]", root.display);
        splits.push(decode_items(name, &class_names, &items, target)?);
    }
    let test = splits.pop().expect("two splits");
    let train = splits.pop().expect("two splits");
    Ok(DataSplits { train, test })
}

fn load_class_layout(root: &Listing, target: ImageShape, seed: u64) -> Result<DataSplits> {
    check_no_loose_images(root)?;
    if root.dirs.is_empty() {
        return Err(Error::InvalidDataset {
            source_name: root.display.clone(),
            reason: "the directory holds no class folders with images".into(),
            hint: "lay images out as `DIR/LABEL/*.png` or `DIR/train/LABEL/*.png` + \
                   `DIR/test/LABEL/*.png` (PNG or JPEG)"
                .into(),
        });
    }
    let class_names: Vec<String> = root.dirs.iter().map(|(name, _)| name.clone()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut train_items = Vec::new();
    let mut test_items = Vec::new();
    for (label, (_, listing)) in root.dirs.iter().enumerate() {
        listing.warn_nested();
        let files: Vec<&ListedFile> = listing.images().collect();
        if files.is_empty() {
            return Err(empty_class(listing));
        }
        let n = files.len();
        let n_test = if n >= 2 {
            ((n as f64 * TEST_FRACTION).round() as usize).clamp(1, n - 1)
        } else {
            0
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut is_test = vec![false; n];
        for &i in &order[..n_test] {
            is_test[i] = true;
        }
        for (file, test) in files.into_iter().zip(is_test) {
            let item = Item {
                label: label as u32,
                file,
            };
            if test {
                test_items.push(item);
            } else {
                train_items.push(item);
            }
        }
    }
    if test_items.is_empty() {
        return Err(Error::InvalidDataset {
            source_name: root.display.clone(),
            reason: "every class folder holds a single image, so no test image can be held out"
                .into(),
            hint: "add images, or provide `train/` and `test/` split folders".into(),
        });
    }
    let train = decode_items(
        format!("{} [train]", root.display),
        &class_names,
        &train_items,
        target,
    )?;
    let test = decode_items(
        format!("{} [test]", root.display),
        &class_names,
        &test_items,
        target,
    )?;
    Ok(DataSplits { train, test })
}

fn check_no_loose_images(dir: &Listing) -> Result<()> {
    match dir.images().next() {
        Some(file) => Err(Error::InvalidDataset {
            source_name: dir.display.clone(),
            reason: format!(
                "image `{}` lies directly in the folder, outside any class folder, so it has no label",
                file.name
            ),
            hint: "move each image into a folder named after its class (`LABEL/*.png`)".into(),
        }),
        None => Ok(()),
    }
}

fn empty_class(listing: &Listing) -> Error {
    Error::InvalidDataset {
        source_name: listing.display.clone(),
        reason: "the class folder holds no images (.png, .jpg, .jpeg)".into(),
        hint: "add images to the folder or remove it".into(),
    }
}

fn decode_items(
    name: String,
    class_names: &[String],
    items: &[Item<'_>],
    target: ImageShape,
) -> Result<Dataset> {
    let mut images = Vec::with_capacity(items.len() * target.len());
    let mut labels = Vec::with_capacity(items.len());
    let mut sources = Vec::with_capacity(items.len());
    for item in items {
        let shown = Path::new(&item.file.display);
        let image = match &item.file.contents {
            Contents::Embedded(bytes) => decode_image(bytes, shown)?,
            Contents::Disk(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                decode_image(&bytes, path)?
            }
        };
        append_converted(&image, target, &mut images);
        labels.push(item.label);
        sources.push(item.file.display.clone());
    }
    Ok(Dataset {
        name,
        shape: target,
        class_names: class_names.to_vec(),
        images,
        labels,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ImageShape = ImageShape::new(3, 8, 8);

    fn write_png(path: &Path, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(8, 8, image::Luma([value]))
            .save(path)
            .unwrap();
    }

    fn invalid_dataset_source(err: &Error) -> &str {
        match err {
            Error::InvalidDataset { source_name, .. } => source_name,
            other => panic!("expected InvalidDataset, got {other:?}"),
        }
    }

    #[test]
    fn split_layout_uses_union_of_classes() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/b/1.png"), 10);
        write_png(&dir.path().join("train/a/1.png"), 20);
        write_png(&dir.path().join("test/c/1.jpg"), 30);
        std::fs::write(dir.path().join("manifest.csv"), "path\n").unwrap();
        std::fs::write(dir.path().join("train/a/notes.txt"), "x").unwrap();
        let splits = load_image_folder(dir.path(), SHAPE, 0).unwrap();
        assert_eq!(splits.train.class_names, vec!["a", "b", "c"]);
        assert_eq!(splits.test.class_names, splits.train.class_names);
        assert_eq!(splits.train.labels, vec![0, 1]);
        assert_eq!(splits.test.labels, vec![2]);
        assert!(splits.train.sources[0].ends_with("1.png"));
        assert_eq!(splits.train.image(0)[0], 20.0 / 255.0);
    }

    #[test]
    fn corrupt_png_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            write_png(&dir.path().join(format!("cls/{i}.png")), 100);
        }
        let bad = dir.path().join("cls/x.png");
        std::fs::write(&bad, b"\x89PNG garbage bytes, not an image").unwrap();
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        match &err {
            Error::CorruptImage { path, .. } => assert_eq!(path, &bad),
            other => panic!("expected CorruptImage, got {other:?}"),
        }
        assert!(err.to_string().contains("x.png"), "{err}");
    }

    #[test]
    fn unreadable_image_among_good_ones_in_split_layout_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/a/0.png"), 1);
        write_png(&dir.path().join("train/a/2.png"), 1);
        write_png(&dir.path().join("test/a/0.png"), 1);
        let bad = dir.path().join("test/a/1.jpeg");
        std::fs::write(&bad, [0u8; 64]).unwrap();
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert!(
            matches!(&err, Error::CorruptImage { path, .. } if path == &bad),
            "{err:?}"
        );
    }

    #[test]
    fn empty_directory_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert_eq!(
            invalid_dataset_source(&err),
            dir.path().display().to_string()
        );
        assert!(err.to_string().contains("hint: lay images out as"), "{err}");
    }

    #[test]
    fn directory_with_only_non_images_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cls")).unwrap();
        std::fs::write(dir.path().join("cls/readme.txt"), "x").unwrap();
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert!(invalid_dataset_source(&err).ends_with("cls"), "{err}");
        assert!(err.to_string().contains("holds no images"), "{err}");
    }

    #[test]
    fn empty_class_in_a_split_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/a/0.png"), 1);
        std::fs::create_dir_all(dir.path().join("train/b")).unwrap();
        write_png(&dir.path().join("test/a/0.png"), 1);
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert!(invalid_dataset_source(&err).ends_with("b"), "{err}");
    }

    #[test]
    fn train_without_test_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/a/0.png"), 1);
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert!(err.to_string().contains("no `test/` folder"), "{err}");
    }

    #[test]
    fn loose_images_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a/0.png"), 1);
        write_png(&dir.path().join("loose.png"), 1);
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert!(err.to_string().contains("`loose.png`"), "{err}");
    }

    #[test]
    fn missing_directory_is_io_error() {
        let err = load_image_folder(Path::new("/nonexistent/fedleak"), SHAPE, 0).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn single_image_classes_cannot_be_split() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a/0.png"), 1);
        write_png(&dir.path().join("b/0.png"), 1);
        let err = load_image_folder(dir.path(), SHAPE, 0).unwrap_err();
        assert!(err.to_string().contains("single image"), "{err}");
    }

    #[test]
    fn bad_target_shape_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_image_folder(dir.path(), ImageShape::new(2, 8, 8), 0).unwrap_err();
        assert!(matches!(&err, Error::InvalidSetting { key, .. } if key == "channels"));
    }
}
