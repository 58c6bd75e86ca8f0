//! The real datasets and target images embedded in the binary at compile time from `fixtures/`.
//!
//! Embedding (with `include_dir`) makes `fixture:NAME` work from an installed binary whatever the
//! working directory. Provenance and licences are in `fixtures/README.md`. The embedded bytes go
//! through the same loaders as user data: [`FixtureName::IhcTiles32`], [`FixtureName::Digits8x8`] and
//! [`FixtureName::LfwSubset25x25`] are ImageFolder trees, [`FixtureName::Mnist5k`] a MedMNIST `.npz`.
//!
//! This module only knows where the fixtures are; the loading rules live with each source kind.

use std::path::Path;

use include_dir::{include_dir, Dir};

use super::image_file::{append_converted, decode_image};
use super::image_folder::{load_listing, Contents, ListedFile, Listing};
use super::npz::load_npz_bytes;
use super::spec::{nearest, FixtureName};
use super::{DataSplits, ImageShape};
use crate::{Error, Result};

static IHC_TILES_32: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/fixtures/ihc-tiles-32");
static DIGITS_8X8: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/fixtures/digits-8x8");
static LFW_SUBSET_25X25: Dir<'static> =
    include_dir!("$CARGO_MANIFEST_DIR/fixtures/lfw-subset-25x25");
static TARGETS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/fixtures/targets");
static MNIST5K_NPZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/mnist5k-medmnist-layout.npz"
));

/// Sizes (height = width) at which every target image is stored, smallest first.
const TARGET_SIZES: [usize; 2] = [32, 64];

/// Loads the embedded fixture `name`, every image converted to `target`; `seed` decides the 80/20
/// split of the fixtures without split folders (`digits-8x8`, `lfw-subset-25x25`).
///
/// ```
/// use fedleak::data::{load_fixture, FixtureName, ImageShape};
/// let splits = load_fixture(FixtureName::LfwSubset25x25, ImageShape::new(1, 25, 25), 0)?;
/// assert_eq!((splits.train.len(), splits.test.len()), (160, 40));
/// assert_eq!(splits.train.class_names, vec!["face", "nonface"]);
/// # Ok::<(), fedleak::Error>(())
/// ```
pub fn load_fixture(name: FixtureName, target: ImageShape, seed: u64) -> Result<DataSplits> {
    target.check_target()?;
    let display = format!("fixture:{name}");
    match name {
        FixtureName::Mnist5k => load_npz_bytes(MNIST5K_NPZ, &display, target),
        FixtureName::IhcTiles32 => {
            load_listing(&embedded_listing(&IHC_TILES_32, &display), target, seed)
        }
        FixtureName::Digits8x8 => {
            load_listing(&embedded_listing(&DIGITS_8X8, &display), target, seed)
        }
        FixtureName::LfwSubset25x25 => {
            load_listing(&embedded_listing(&LFW_SUBSET_25X25, &display), target, seed)
        }
    }
}

/// Names of the embedded target images (single images for attack demos), sorted: `astronaut`,
/// `camera`, `cell`, `chelsea`, `coffee`, `coins`, `ihc`, `microaneurysms`, `moon`, `retina`, `rocket`,
/// `sk_china`, `sk_flower`.
///
/// ```
/// let names = fedleak::data::target_names();
/// assert_eq!(names.len(), 13);
/// assert_eq!(names[0], "astronaut");
/// ```
pub fn target_names() -> Vec<String> {
    let mut names: Vec<String> = TARGETS
        .files()
        .filter_map(|f| f.path().file_stem()?.to_str())
        .filter_map(|stem| stem.rsplit_once('_').map(|(name, _)| name.to_string()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Loads the embedded target image `name` (see [`target_names`]) converted to `shape`: the smallest
/// stored size (32x32 or 64x64) at least as large as `shape`, else the largest, resized if needed.
///
/// ```
/// use fedleak::data::{load_target, ImageShape};
/// let pixels = load_target("camera", ImageShape::new(1, 32, 32))?;
/// assert_eq!(pixels.len(), 32 * 32);
/// assert!(load_target("kamera", ImageShape::new(1, 32, 32)).is_err());
/// # Ok::<(), fedleak::Error>(())
/// ```
pub fn load_target(name: &str, shape: ImageShape) -> Result<Vec<f32>> {
    shape.check_target()?;
    let names = target_names();
    if !names.iter().any(|n| n == name) {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let listed: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
        return Err(Error::UnknownData {
            spec: name.into(),
            reason: format!("no target image is named `{name}`"),
            hint: format!(
                "target images are {}; the nearest is `{}`",
                listed.join(", "),
                nearest(name, &refs).unwrap_or("astronaut")
            ),
        });
    }
    let needed = shape.height.max(shape.width);
    let size = TARGET_SIZES
        .into_iter()
        .find(|&s| s >= needed)
        .unwrap_or(TARGET_SIZES[TARGET_SIZES.len() - 1]);
    let file_name = format!("{name}_{size}x{size}.png");
    let file = TARGETS
        .get_file(&file_name)
        .unwrap_or_else(|| panic!("embedded target `{file_name}` is missing"));
    let image = decode_image(
        file.contents(),
        Path::new(&format!("fixture:targets/{file_name}")),
    )?;
    let mut out = Vec::with_capacity(shape.len());
    append_converted(&image, shape, &mut out);
    Ok(out)
}

/// Lists an embedded directory as an ImageFolder [`Listing`] shown as `display/...`.
fn embedded_listing(dir: &'static Dir<'static>, display: &str) -> Listing {
    let dirs = dir
        .dirs()
        .map(|sub| {
            let name = entry_name(sub.path());
            (
                name.clone(),
                embedded_listing(sub, &format!("{display}/{name}")),
            )
        })
        .collect();
    let files = dir
        .files()
        .map(|file| {
            let name = entry_name(file.path());
            ListedFile {
                display: format!("{display}/{name}"),
                name,
                contents: Contents::Embedded(file.contents()),
            }
        })
        .collect();
    Listing::sorted(display.to_string(), dirs, files)
}

fn entry_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RGB32: ImageShape = ImageShape::new(3, 32, 32);

    #[test]
    fn ihc_tiles_32_loads_444_train_182_test() {
        let splits = load_fixture(FixtureName::IhcTiles32, RGB32, 0).unwrap();
        assert_eq!(splits.train.len(), 444);
        assert_eq!(splits.test.len(), 182);
        assert_eq!(
            splits.train.class_names,
            vec!["dab_negative", "dab_positive"]
        );
        assert_eq!(splits.test.class_names, splits.train.class_names);
        assert_eq!(splits.train.shape, RGB32);
        assert_eq!(splits.train.images.len(), 444 * 3 * 32 * 32);
        assert_eq!(splits.train.class_counts(), vec![193, 251]);
        assert_eq!(splits.test.class_counts(), vec![121, 61]);
        assert!(splits.train.images.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(
            splits.train.sources[0],
            "fixture:ihc-tiles-32/train/dab_negative/ihc_y000_x432.png"
        );
        // Real stained tissue: the channels differ.
        let image = splits.train.image(0);
        assert_ne!(image[..1024], image[1024..2048]);
    }

    #[test]
    fn ihc_tiles_match_the_png_bytes() {
        let splits = load_fixture(FixtureName::IhcTiles32, RGB32, 0).unwrap();
        let file = IHC_TILES_32
            .get_file("train/dab_negative/ihc_y000_x432.png")
            .unwrap();
        let png = image::load_from_memory(file.contents()).unwrap().to_rgb8();
        let pixel = png.get_pixel(5, 3);
        let image = splits.train.image(0);
        for c in 0..3 {
            assert_eq!(image[c * 1024 + 3 * 32 + 5], f32::from(pixel.0[c]) / 255.0);
        }
    }

    #[test]
    fn mnist5k_loads_and_resizes_to_rgb32() {
        let splits = load_fixture(FixtureName::Mnist5k, RGB32, 0).unwrap();
        assert_eq!(splits.train.len(), 4000);
        assert_eq!(splits.test.len(), 500);
        assert_eq!(splits.train.class_names.len(), 10);
        assert_eq!(splits.train.shape, RGB32);
        assert_eq!(splits.train.images.len(), 4000 * 3 * 32 * 32);
        let image = splits.train.image(0);
        // Grayscale replicated to three identical planes, with ink and background.
        assert_eq!(image[..1024], image[1024..2048]);
        assert_eq!(image[..1024], image[2048..]);
        assert!(image.iter().any(|&v| v > 0.9) && image.contains(&0.0));
        assert!(splits.train.class_counts().iter().all(|&c| c > 300));
    }

    #[test]
    fn mnist5k_native_size_is_exact() {
        let splits = load_fixture(FixtureName::Mnist5k, ImageShape::new(1, 28, 28), 0).unwrap();
        let image = splits.test.image(0);
        for v in image {
            let byte = (v * 255.0).round();
            assert_eq!(byte / 255.0, *v);
        }
    }

    #[test]
    fn digits_split_80_20_per_class_deterministically() {
        let shape = ImageShape::new(1, 8, 8);
        let a = load_fixture(FixtureName::Digits8x8, shape, 1).unwrap();
        let b = load_fixture(FixtureName::Digits8x8, shape, 1).unwrap();
        let c = load_fixture(FixtureName::Digits8x8, shape, 2).unwrap();
        assert_eq!(a.train.len() + a.test.len(), 1797);
        assert_eq!(a.train.class_names.len(), 10);
        for (class, (train, test)) in a
            .train
            .class_counts()
            .into_iter()
            .zip(a.test.class_counts())
            .enumerate()
        {
            let total = train + test;
            let expected = (total as f64 * 0.2).round() as usize;
            assert_eq!(test, expected, "class {class}: {train} train, {test} test");
        }
        assert_eq!(a.test.sources, b.test.sources);
        assert_eq!(a.train.images, b.train.images);
        assert_ne!(a.test.sources, c.test.sources);
        assert_eq!(a.test.len(), c.test.len());
        let train: std::collections::HashSet<_> = a.train.sources.iter().collect();
        assert!(a.test.sources.iter().all(|s| !train.contains(s)));
    }

    #[test]
    fn every_target_loads_at_both_sizes() {
        for name in target_names() {
            for shape in [ImageShape::new(3, 32, 32), ImageShape::new(1, 64, 64)] {
                let pixels = load_target(&name, shape).unwrap();
                assert_eq!(pixels.len(), shape.len(), "{name}");
            }
        }
        let err = load_target("astronot", RGB32).unwrap_err();
        assert!(
            err.to_string().contains("the nearest is `astronaut`"),
            "{err}"
        );
    }
}
