//! Real labelled images and their split among federated clients.
//!
//! This is the first step of the flow: a [`DataSpec`] (what `--data` takes) names a source, [`load_data`]
//! reads it into train and test [`Dataset`]s of one [`ImageShape`] (f32 in [0, 1], N x C x H x W planar),
//! and [`partition_labels`] splits the training images among K clients (IID or Dirichlet non-IID).
//!
//! One file per source kind: [`spec`] parses source names, [`fixture`] serves the datasets embedded in
//! the binary, [`image_folder`] reads `DIR/[split/]label/*.png`, [`npz`] reads MedMNIST `.npz` archives (`npy` parses their arrays),
//! [`image_file`] decodes and converts single images (shared by all), and [`partition`] splits among
//! clients. This module knows nothing of models, training, schemes or attacks.

pub mod fixture;
pub mod image_file;
pub mod image_folder;
mod npy;
pub mod npz;
pub mod partition;
pub mod spec;

pub use fixture::{load_fixture, load_target, target_names};
pub use image_file::{load_image_file, read_image_shape};
pub use image_folder::load_image_folder;
pub use npz::load_medmnist_npz;
pub use partition::{partition_labels, Partition, PartitionScheme};
pub use spec::{DataSpec, FixtureName};

use crate::{Error, Result};

/// Channels, height and width of an image tensor (C x H x W).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageShape {
    /// Number of colour channels (1 or 3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

impl ImageShape {
    /// The shape `channels` x `height` x `width`.
    ///
    /// ```
    /// use fedleak::data::ImageShape;
    /// let shape = ImageShape::new(3, 32, 32);
    /// assert_eq!(shape.len(), 3072);
    /// assert_eq!(shape.to_string(), "3x32x32");
    /// ```
    pub const fn new(channels: usize, height: usize, width: usize) -> Self {
        ImageShape {
            channels,
            height,
            width,
        }
    }

    /// Number of values in one image (C * H * W).
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// True when a dimension is zero (an image of this shape holds no values).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that this shape can be a load target: 1 or 3 channels, non-zero height and width.
    ///
    /// ```
    /// use fedleak::data::ImageShape;
    /// assert!(ImageShape::new(3, 32, 32).check_target().is_ok());
    /// assert!(ImageShape::new(4, 32, 32).check_target().is_err());
    /// ```
    pub fn check_target(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::InvalidSetting {
                key: "channels".into(),
                reason: format!(
                    "images can be loaded with 1 or 3 channels, got {}",
                    self.channels
                ),
                hint: "use 1 (grayscale) or 3 (RGB)".into(),
            });
        }
        if self.height == 0 || self.width == 0 || self.height > 65_535 || self.width > 65_535 {
            return Err(Error::InvalidSetting {
                key: "image-size".into(),
                reason: format!(
                    "image height and width must be between 1 and 65535, got {}x{}",
                    self.height, self.width
                ),
                hint: "use the model's input size, e.g. 32".into(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// A set of labelled images, all of one [`ImageShape`], values f32 in [0, 1], layout N x C x H x W.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where the images came from (fixture name, directory or `.npz` path, and the split).
    pub name: String,
    /// Shape of every image.
    pub shape: ImageShape,
    /// Class names; label `i` names `class_names[i]`.
    pub class_names: Vec<String>,
    /// Pixel values, image after image (N * C * H * W values).
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Provenance of each image (file path or `npz` key and index), same order as `labels`.
    pub sources: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixel values of image `index` (C * H * W values).
    pub fn image(&self, index: usize) -> &[f32] {
        let n = self.shape.len();
        &self.images[index * n..(index + 1) * n]
    }

    /// Number of images of each class (`class_names.len()` entries).
    ///
    /// ```
    /// use fedleak::data::{load_data, DataSpec, ImageShape};
    /// let spec: DataSpec = "fixture:ihc-tiles-32".parse()?;
    /// let splits = load_data(&spec, ImageShape::new(3, 32, 32), 0)?;
    /// assert_eq!(splits.train.class_counts(), vec![193, 251]);
    /// # Ok::<(), fedleak::Error>(())
    /// ```
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(label as usize) {
                *count += 1;
            }
        }
        counts
    }

    /// A new dataset holding the images at `indices`, in that order (e.g. one client's share).
    ///
    /// Panics if an index is out of range (a programmer error: indices come from a [`Partition`] of
    /// this dataset).
    ///
    /// ```
    /// use fedleak::data::{load_data, DataSpec, ImageShape};
    /// let spec: DataSpec = "fixture:digits-8x8".parse()?;
    /// let splits = load_data(&spec, ImageShape::new(1, 8, 8), 0)?;
    /// let part = splits.train.select(&[2, 0]);
    /// assert_eq!(part.len(), 2);
    /// assert_eq!(part.image(1), splits.train.image(0));
    /// assert_eq!(part.labels, vec![splits.train.labels[2], splits.train.labels[0]]);
    /// # Ok::<(), fedleak::Error>(())
    /// ```
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.shape.len());
        let mut labels = Vec::with_capacity(indices.len());
        let mut sources = Vec::with_capacity(indices.len());
        for &i in indices {
            assert!(
                i < self.len(),
                "index {i} out of range for dataset `{}` of {} images",
                self.name,
                self.len()
            );
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
            sources.push(self.sources[i].clone());
        }
        Dataset {
            name: self.name.clone(),
            shape: self.shape,
            class_names: self.class_names.clone(),
            images,
            labels,
            sources,
        }
    }
}

/// The train and test parts of a data source.
#[derive(Debug, Clone)]
pub struct DataSplits {
    /// Images the clients train on (split among them).
    pub train: Dataset,
    /// Held-out images the server scores global accuracy on.
    pub test: Dataset,
}

/// Loads the source `spec` as train and test sets, every image converted to `target`.
///
/// Conversion: resized to `target` height x width with a bilinear (triangle) filter unless already that
/// size; grayscale replicated to RGB, RGB reduced to grayscale by ITU-R 601 luma; alpha dropped; values
/// f32 in [0, 1]. `seed` decides the 80 % / 20 % split of image folders without `train`/`test` folders
/// (and nothing else).
///
/// ```
/// use fedleak::data::{load_data, DataSpec, ImageShape};
/// let spec: DataSpec = "fixture:ihc-tiles-32".parse()?;
/// let splits = load_data(&spec, ImageShape::new(3, 32, 32), 0)?;
/// assert_eq!((splits.train.len(), splits.test.len()), (444, 182));
/// assert_eq!(splits.train.class_names, vec!["dab_negative", "dab_positive"]);
/// assert_eq!(splits.train.images.len(), 444 * 3 * 32 * 32);
/// # Ok::<(), fedleak::Error>(())
/// ```
pub fn load_data(spec: &DataSpec, target: ImageShape, seed: u64) -> Result<DataSplits> {
    match spec {
        DataSpec::Fixture(name) => load_fixture(*name, target, seed),
        DataSpec::MedMnist(path) => load_medmnist_npz(path, target),
        DataSpec::Folder(dir) => load_image_folder(dir, target, seed),
    }
}
