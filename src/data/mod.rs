//! Datasets: readers for IDX (MNIST) and CIFAR-10 binary folders, the preprocessing a model
//! was trained with, and seeded batching with optional augmentation.
//!
//! Images are held as `f32` in `[N, C, H, W]` order; preprocessing (padding, resizing,
//! normalisation) is applied once to a whole set, augmentation per batch.

pub mod batcher;
pub mod cifar;
pub mod fetch;
pub mod idx;
pub mod transform;

pub use batcher::{Augment, Batch, Batcher};
pub use transform::Preprocess;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why a dataset could not be read. Every variant names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{0}")]
    Missing(String),
}

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn corrupt(path: &Path, why: String) -> Self {
        DataError::Corrupt {
            path: path.to_path_buf(),
            why,
        }
    }
}

/// A labelled set of images, pixels in `[N, C, H, W]` order.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
    pub labels: Vec<u8>,
    pub classes: usize,
}

impl ImageSet {
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The first `n` images (or all of them if there are fewer).
    pub fn take(mut self, n: usize) -> Self {
        let n = n.min(self.n);
        self.pixels.truncate(n * self.image_len());
        self.labels.truncate(n);
        self.n = n;
        self
    }

    /// Shape of one image, `[C, H, W]`.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// The dataset formats convpress reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// IDX files named like MNIST's (train-images-idx3-ubyte, ...; raw or .gz).
    Mnist,
    /// CIFAR-10 binary batches (data_batch_1.bin ... data_batch_5.bin, test_batch.bin).
    Cifar10,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
        }
    }

    /// Folder used when neither `--data-dir` nor `CONVPRESS_DATA` is given.
    pub fn default_dir(self) -> PathBuf {
        let root = std::env::var_os("CONVPRESS_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data"));
        root.join(self.name())
    }
}

/// Train and test splits of one dataset.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: ImageSet,
    pub test: ImageSet,
}

/// Reads both splits of a dataset from `dir`.
pub fn load(kind: DatasetKind, dir: &Path) -> Result<Splits, DataError> {
    if dir.exists() && !dir.is_dir() {
        return Err(DataError::Missing(format!(
            "{} is a file, not a data folder: give --data-dir the folder that holds the dataset",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        let hint = match kind {
            DatasetKind::Mnist => format!(
                "run `convpress data fetch mnist --data-dir {}` to download it",
                dir.display()
            ),
            DatasetKind::Cifar10 => {
                "put the CIFAR-10 binary batches (data_batch_*.bin, test_batch.bin) there".into()
            }
        };
        return Err(DataError::Missing(format!(
            "data folder {} does not exist: {hint}",
            dir.display()
        )));
    }
    let splits = match kind {
        DatasetKind::Mnist => Splits {
            train: load_idx_pair(dir, "train")?,
            test: load_idx_pair(dir, "t10k")?,
        },
        DatasetKind::Cifar10 => {
            let dir = if dir.join("cifar-10-batches-bin").is_dir() {
                dir.join("cifar-10-batches-bin")
            } else {
                dir.to_path_buf()
            };
            let train: Vec<PathBuf> = (1..=5)
                .map(|i| dir.join(format!("data_batch_{i}.bin")))
                .collect();
            let test = vec![dir.join("test_batch.bin")];
            for p in train.iter().chain(&test) {
                if !p.is_file() {
                    return Err(DataError::Missing(format!(
                        "{} is missing (expected CIFAR-10 binary batches in {})",
                        p.display(),
                        dir.display()
                    )));
                }
            }
            Splits {
                train: cifar::read_cifar_files(&train)?,
                test: cifar::read_cifar_files(&test)?,
            }
        }
    };
    splits.check(dir)?;
    Ok(splits)
}

impl Splits {
    /// Refuses splits that nothing could be learned or measured on, before any work starts:
    /// an empty split, images without pixels, or train and test images of different sizes (a
    /// network takes one input size; Burn would panic on the first test batch).
    pub fn check(&self, dir: &Path) -> Result<(), DataError> {
        for (name, set) in [("training", &self.train), ("test", &self.test)] {
            if set.n == 0 {
                return Err(DataError::corrupt(
                    dir,
                    format!("the {name} split holds no images"),
                ));
            }
            if set.height == 0 || set.width == 0 {
                return Err(DataError::corrupt(
                    dir,
                    format!(
                        "the {name} images are {}x{}: they hold no pixels",
                        set.height, set.width
                    ),
                ));
            }
        }
        if self.train.image_shape() != self.test.image_shape() {
            let s = |v: [usize; 3]| format!("{}x{}x{}", v[0], v[1], v[2]);
            return Err(DataError::corrupt(
                dir,
                format!(
                    "training images are {} but test images are {}: both splits must have one size",
                    s(self.train.image_shape()),
                    s(self.test.image_shape())
                ),
            ));
        }
        Ok(())
    }
}

/// Finds `<prefix>-<kind>-ubyte` or its `.gz` form.
fn find_idx(dir: &Path, prefix: &str, kind: &str) -> Result<PathBuf, DataError> {
    let raw = dir.join(format!("{prefix}-{kind}-ubyte"));
    let gz = dir.join(format!("{prefix}-{kind}-ubyte.gz"));
    if raw.is_file() {
        Ok(raw)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        Err(DataError::Missing(format!(
            "{} is missing (nor its .gz): run `convpress data fetch mnist --data-dir {}`",
            raw.display(),
            dir.display()
        )))
    }
}

/// Reads `<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte` and checks they agree.
pub fn load_idx_pair(dir: &Path, prefix: &str) -> Result<ImageSet, DataError> {
    let img_path = find_idx(dir, prefix, "images-idx3")?;
    let lbl_path = find_idx(dir, prefix, "labels-idx1")?;
    let images = idx::read_idx(&img_path)?;
    let labels = idx::read_idx(&lbl_path)?;
    let (n, h, w) = match images.dims[..] {
        [n, h, w] => (n, h, w),
        _ => {
            return Err(DataError::corrupt(
                &img_path,
                format!("expected 3 dimensions (N, H, W), found {:?}", images.dims),
            ));
        }
    };
    if labels.dims.len() != 1 {
        return Err(DataError::corrupt(
            &lbl_path,
            format!("expected 1 dimension (N), found {:?}", labels.dims),
        ));
    }
    if labels.dims[0] != n {
        return Err(DataError::corrupt(
            &lbl_path,
            format!(
                "{} labels but {} has {n} images",
                labels.dims[0],
                img_path.display()
            ),
        ));
    }
    if let Some((i, &l)) = labels.data.iter().enumerate().find(|&(_, &l)| l >= 10) {
        return Err(DataError::corrupt(
            &lbl_path,
            format!("label {l} at index {i} is out of range 0..10"),
        ));
    }
    Ok(ImageSet {
        n,
        channels: 1,
        height: h,
        width: w,
        pixels: images.data.iter().map(|&b| b as f32 / 255.0).collect(),
        labels: labels.data,
        classes: 10,
    })
}
