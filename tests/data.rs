//! Dataset readers on files the tests write, good and corrupt; transforms; batching.

mod common;

use convpress::data::idx::{encode_idx, parse_idx};
use convpress::data::transform::{self, ResizeMode};
use convpress::data::{self, Augment, Batcher, DataError, DatasetKind, ImageSet};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn idx_round_trip_raw_and_gzip() {
    let dir = tmp();
    common::write_synthetic_mnist(dir.path(), 50, 20, 28);
    let splits = data::load(DatasetKind::Mnist, dir.path()).unwrap();
    assert_eq!(splits.train.n, 50);
    assert_eq!(splits.test.n, 20);
    assert_eq!(splits.train.image_shape(), [1, 28, 28]);
    assert!(
        splits
            .train
            .pixels
            .iter()
            .all(|&p| (0.0..=1.0).contains(&p))
    );

    // Same content, gzip-compressed, under the .gz names.
    let gz = tmp();
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        let raw = std::fs::read(dir.path().join(name)).unwrap();
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&raw).unwrap();
        std::fs::write(gz.path().join(format!("{name}.gz")), enc.finish().unwrap()).unwrap();
    }
    let gz_splits = data::load(DatasetKind::Mnist, gz.path()).unwrap();
    assert_eq!(gz_splits.train.pixels, splits.train.pixels);
    assert_eq!(gz_splits.test.labels, splits.test.labels);
}

fn err_text(e: DataError) -> String {
    e.to_string()
}

#[test]
fn idx_corrupt_files_are_named_and_explained() {
    // Bad magic.
    let e = parse_idx(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap_err();
    assert!(e.contains("bad magic"), "{e}");
    // Truncated data.
    let mut bytes = encode_idx(&[3, 2, 2], &[0; 12]);
    bytes.truncate(bytes.len() - 5);
    let e = parse_idx(&bytes).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    // Truncated header.
    let e = parse_idx(&[0, 0, 8, 3, 0, 0]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    // Wrong element type.
    let e = parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0]).unwrap_err();
    assert!(e.contains("not supported"), "{e}");

    // Image/label count mismatch, through the folder reader: the error names the file.
    let dir = tmp();
    common::write_synthetic_mnist(dir.path(), 10, 10, 28);
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte"),
        encode_idx(&[9], &[0; 9]),
    )
    .unwrap();
    let e = err_text(data::load(DatasetKind::Mnist, dir.path()).unwrap_err());
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("9 labels"),
        "{e}"
    );

    // Label out of range.
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte"),
        encode_idx(&[10], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 12]),
    )
    .unwrap();
    let e = err_text(data::load(DatasetKind::Mnist, dir.path()).unwrap_err());
    assert!(e.contains("label 12") && e.contains("out of range"), "{e}");

    // Damaged gzip.
    std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte.gz"),
        [0x1f, 0x8b, 8, 0, 1, 2, 3],
    )
    .unwrap();
    let e = err_text(data::load(DatasetKind::Mnist, dir.path()).unwrap_err());
    assert!(
        e.contains("train-labels-idx1-ubyte.gz") && e.contains("gzip"),
        "{e}"
    );
}

#[test]
fn missing_folder_says_how_to_fetch() {
    let e = err_text(
        data::load(
            DatasetKind::Mnist,
            std::path::Path::new("/nonexistent/mnist"),
        )
        .unwrap_err(),
    );
    assert!(e.contains("convpress data fetch mnist"), "{e}");
    let dir = tmp();
    let e = err_text(data::load(DatasetKind::Mnist, dir.path()).unwrap_err());
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("is missing"),
        "{e}"
    );
}

fn cifar_record(label: u8, value: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend(std::iter::repeat_n(value, 3072));
    r
}

#[test]
fn cifar_reader_good_and_corrupt() {
    let dir = tmp();
    for i in 1..=5 {
        let mut bytes = Vec::new();
        for k in 0..4u8 {
            bytes.extend(cifar_record((k + i) % 10, k * 60));
        }
        std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), bytes).unwrap();
    }
    std::fs::write(dir.path().join("test_batch.bin"), cifar_record(3, 255)).unwrap();
    let splits = data::load(DatasetKind::Cifar10, dir.path()).unwrap();
    assert_eq!(splits.train.n, 20);
    assert_eq!(splits.test.n, 1);
    assert_eq!(splits.train.image_shape(), [3, 32, 32]);
    assert_eq!(splits.test.labels, vec![3]);
    assert_eq!(splits.test.pixels[0], 1.0);
    assert_eq!(splits.train.labels[..4], [1, 2, 3, 4]);

    // Truncated record.
    let mut t = cifar_record(1, 1);
    t.pop();
    std::fs::write(dir.path().join("test_batch.bin"), t).unwrap();
    let e = err_text(data::load(DatasetKind::Cifar10, dir.path()).unwrap_err());
    assert!(
        e.contains("test_batch.bin") && e.contains("truncated"),
        "{e}"
    );
    // Label out of range.
    std::fs::write(dir.path().join("test_batch.bin"), cifar_record(11, 0)).unwrap();
    let e = err_text(data::load(DatasetKind::Cifar10, dir.path()).unwrap_err());
    assert!(e.contains("label 11"), "{e}");
    // Missing batch.
    std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
    let e = err_text(data::load(DatasetKind::Cifar10, dir.path()).unwrap_err());
    assert!(e.contains("data_batch_3.bin"), "{e}");
}

fn set_of(pixels: Vec<f32>, h: usize, w: usize) -> ImageSet {
    ImageSet {
        n: pixels.len() / (h * w),
        channels: 1,
        height: h,
        width: w,
        labels: vec![0; pixels.len() / (h * w)],
        pixels,
        classes: 10,
    }
}

#[test]
fn pad_resize_normalise() {
    let set = set_of((0..16).map(|v| v as f32).collect(), 4, 4);
    let padded = transform::pad(&set, 2);
    assert_eq!((padded.height, padded.width), (8, 8));
    assert_eq!(padded.pixels[2 * 8 + 2], 0.0);
    assert_eq!(padded.pixels[5 * 8 + 5], 15.0);
    assert_eq!(padded.pixels[0], 0.0);

    // Area resize by 1/2 averages 2x2 blocks exactly.
    let half = transform::resize(&set, 2, 2, ResizeMode::Area);
    assert_eq!(half.pixels, vec![2.5, 4.5, 10.5, 12.5]);
    // A constant image stays constant under both modes, any ratio.
    let flat = set_of(vec![0.7; 28 * 28], 28, 28);
    for mode in [ResizeMode::Area, ResizeMode::Bilinear] {
        for (h, w) in [(14, 14), (10, 13), (40, 40)] {
            let r = transform::resize(&flat, h, w, mode);
            assert!(
                r.pixels.iter().all(|&v| (v - 0.7).abs() < 1e-5),
                "{mode:?} {h}x{w}"
            );
        }
    }

    // Fitted normalisation gives zero mean and unit variance on the training set, padding
    // included.
    let mut rng = 12345u32;
    let pixels: Vec<f32> = (0..5 * 28 * 28)
        .map(|_| {
            rng = rng.wrapping_mul(1664525).wrapping_add(1013904223);
            (rng >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect();
    let set = set_of(pixels, 28, 28);
    let p = data::Preprocess::fit(&set, 2, None);
    let out = p.apply(&set);
    assert_eq!(out.image_shape(), [1, 32, 32]);
    let (mean, std) = transform::channel_stats(&out);
    assert!(mean[0].abs() < 1e-3, "{mean:?}");
    assert!((std[0] - 1.0).abs() < 1e-3, "{std:?}");
}

#[test]
fn batching_is_seeded_and_covers_the_set() {
    let dir = tmp();
    common::write_synthetic_mnist(dir.path(), 100, 10, 28);
    let splits = data::load(DatasetKind::Mnist, dir.path()).unwrap();
    let device = burn::tensor::Device::flex();
    let aug = Augment {
        crop_pad: 2,
        hflip: false,
    };
    let b = Batcher::new(&splits.train, 32, aug, vec![0.0]);
    assert_eq!(b.num_batches(), 4);
    let mut order = b.order(7, 0);
    assert_eq!(order, b.order(7, 0));
    assert_ne!(order, b.order(7, 1));
    assert_ne!(order, b.order(8, 0));
    order.sort();
    assert_eq!(order, (0..100).collect::<Vec<_>>());

    let first: Vec<Vec<f32>> = b
        .epoch(7, 3, &device)
        .map(|x| x.images.into_data().try_to_vec::<f32>().unwrap())
        .collect();
    let again: Vec<Vec<f32>> = b
        .epoch(7, 3, &device)
        .map(|x| x.images.into_data().try_to_vec::<f32>().unwrap())
        .collect();
    assert_eq!(
        first, again,
        "the same seed and epoch give the same batches"
    );
    let sizes: Vec<usize> = b.epoch(7, 0, &device).map(|x| x.len).collect();
    assert_eq!(sizes, vec![32, 32, 32, 4]);
}
