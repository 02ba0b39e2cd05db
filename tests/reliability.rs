//! Bad input through the real binary, as an adversarial user would give it: damaged data,
//! checkpoints and compressed files, impossible flags, reused and shared run folders.
//!
//! Every case runs `convpress` in a fresh copy of one fixture folder (a small dataset, a
//! trained LeNet-5, its compressed file and its run folder) and asserts
//! - the exit code (1 for a refused command, 2 for a flag clap refuses, 0 for the controls):
//!   never a panic (101), an abort (134) or a hang (the harness kills a case after 120 s);
//! - that the error names the file or flag at fault (each case lists what it must say);
//! - that no file which was there before changed or vanished (SHA-256 before and after),
//!   except under the paths a control case is meant to extend.
//!
//! The two concurrency cases start two real processes on one run folder.
//!
//! `CONVPRESS_SHOW_ERRORS=1 cargo test --release --test reliability -- --nocapture` prints
//! every case's last line of stderr.

mod common;

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The binary under test: this build's, or `CONVPRESS_BIN` (to run the table against
/// another build, such as the one before a fix).
fn bin() -> String {
    std::env::var("CONVPRESS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_convpress").into())
}

/// The fixture every case starts from, built once per test run:
/// `data/` (64 training and 32 test images, 28x28), `runs/l5/` (a finished LeNet-5 run),
/// `l5.safetensors` (its model), `l5.cpz` (that model compressed), `l5.q8.cpz` (it quantized),
/// `recipe.toml` (one eval
/// stage) and `runs/c/` (that recipe run from `l5.safetensors`).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::write_synthetic_mnist(&dir.join("data"), 64, 32, 28);
        let run = |args: &str| {
            let out = convpress_in(&dir, args);
            assert!(out.status.success(), "fixture `{args}`: {}", stderr(&out));
        };
        run("train --model lenet5 --epochs 1 --batch-size 16 --data-dir data --run-dir runs/l5 --no-progress");
        std::fs::copy(dir.join("runs/l5/model.safetensors"), dir.join("l5.safetensors")).unwrap();
        run("encode --checkpoint l5.safetensors --out l5.cpz --conv-bits 2 --fc-bits 2");
        run("quantize --checkpoint l5.safetensors --out l5.q8.cpz --calibrate 16 --data-dir data");
        std::fs::write(
            dir.join("recipe.toml"),
            "[[stage]]\nkind = \"eval\"\n",
        )
        .unwrap();
        run("compress --recipe recipe.toml --from l5.safetensors --run-dir runs/c --data-dir data --no-progress");
        dir
    })
}

fn convpress_in(dir: &Path, args: &str) -> Output {
    let (out, hung) = run_case(dir, args);
    assert!(!hung, "`convpress {args}` hung for {} s", HANG.as_secs());
    out
}

/// How long a case may run before it counts as a hang.
const HANG: Duration = Duration::from_secs(120);

/// Runs `convpress args` in `dir`; the output, and whether it had to be killed as a hang.
fn run_case(dir: &Path, args: &str) -> (Output, bool) {
    let mut child = Command::new(bin())
        .args(args.split_whitespace())
        .current_dir(dir)
        .env("CONVPRESS_DATA", dir.join("no-default-data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), false);
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            return (child.wait_with_output().unwrap(), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// SHA-256 of every file under `dir`, by relative path.
fn hashes(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, out);
            } else if meta.is_file() && entry.file_name() != ".convpress.lock" {
                // (The lock file is convpress's own: it holds the pid of the last holder.)
                let bytes = std::fs::read(&path).unwrap_or_default();
                let hex: String = Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), hex);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Rewrites the safetensors checkpoint at `path` through `edit` (metadata and tensors), with
/// its checksum made right again: damage that only the later checks can catch.
fn reseal(
    path: &Path,
    edit: impl FnOnce(&mut HashMap<String, String>, &mut Vec<(String, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = header.metadata().clone().unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut md, &mut tensors);
    let parts: Vec<(&str, &[usize], &[u8])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    md.insert(
        "convpress.checksum".into(),
        convpress::checkpoint::checksum(&md, &parts),
    );
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(md)).unwrap()).unwrap();
}

fn flip_byte(path: &Path, from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - from_end;
    bytes[i] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// `values` pseudo-random f32s (seeded) as a file: bytes that are no format at all.
fn random_file(path: &Path, values: usize, seed: u64) {
    let bytes: Vec<u8> = common::values(values, seed)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path, keep: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..keep.min(bytes.len())]).unwrap();
}

fn idx(dir: &Path, name: &str, dims: &[usize], fill: u8) {
    let n: usize = dims.iter().product();
    std::fs::write(
        dir.join(name),
        convpress::data::idx::encode_idx(dims, &vec![fill; n]),
    )
    .unwrap();
}

/// `bad/`: a copy of the good dataset, to be damaged by a case.
fn bad_data(d: &Path) -> PathBuf {
    let bad = d.join("bad");
    copy_tree(&d.join("data"), &bad);
    bad
}

struct Case {
    name: &'static str,
    /// Arguments, split on whitespace, run in the case's folder.
    args: &'static str,
    setup: fn(&Path),
    code: i32,
    /// What stderr must contain (each): the file or flag at fault, and the reason.
    says: &'static [&'static str],
    /// Paths (prefixes) that a control case may change.
    changes: &'static [&'static str],
}

fn none(_: &Path) {}

const fn case(
    name: &'static str,
    args: &'static str,
    setup: fn(&Path),
    code: i32,
    says: &'static [&'static str],
) -> Case {
    Case {
        name,
        args,
        setup,
        code,
        says,
        changes: &[],
    }
}

const TRAIN: &str = "train --model lenet5 --no-progress";

fn cases() -> Vec<Case> {
    let mut v = vec![
        // --- data ---
        case(
            "missing data folder",
            "train --data-dir nowhere --run-dir r",
            none,
            1,
            &["nowhere", "data fetch mnist"],
        ),
        case(
            "data folder is a file",
            "train --data-dir l5.cpz --run-dir r",
            none,
            1,
            &["l5.cpz", "is a file"],
        ),
        case(
            "truncated training images",
            "train --data-dir bad --run-dir r",
            |d| truncate(&bad_data(d).join("train-images-idx3-ubyte"), 1000),
            1,
            &["train-images-idx3-ubyte"],
        ),
        case(
            "IDX with a wrong magic",
            "train --data-dir bad --run-dir r",
            |d| {
                std::fs::write(
                    bad_data(d).join("t10k-labels-idx1-ubyte"),
                    b"\x01\x02\x03\x04garbage",
                )
                .unwrap()
            },
            1,
            &["t10k-labels-idx1-ubyte"],
        ),
        case(
            "fewer labels than images",
            "train --data-dir bad --run-dir r",
            |d| idx(&bad_data(d), "train-labels-idx1-ubyte", &[63], 1),
            1,
            &["train-labels-idx1-ubyte", "63 labels"],
        ),
        case(
            "label out of range",
            "train --data-dir bad --run-dir r",
            |d| idx(&bad_data(d), "train-labels-idx1-ubyte", &[64], 12),
            1,
            &["train-labels-idx1-ubyte", "out of range"],
        ),
        case(
            "damaged gzip",
            "train --data-dir bad --run-dir r",
            |d| {
                let b = bad_data(d);
                std::fs::remove_file(b.join("train-images-idx3-ubyte")).unwrap();
                std::fs::write(
                    b.join("train-images-idx3-ubyte.gz"),
                    b"\x1f\x8b\x08\x00not really gzip",
                )
                .unwrap()
            },
            1,
            &["train-images-idx3-ubyte.gz"],
        ),
        case(
            "images of 1 dimension",
            "train --data-dir bad --run-dir r",
            |d| idx(&bad_data(d), "train-images-idx3-ubyte", &[64 * 784], 0),
            1,
            &["train-images-idx3-ubyte", "3 dimensions"],
        ),
        case(
            "no training images",
            "train --data-dir bad --run-dir r",
            |d| {
                let b = bad_data(d);
                idx(&b, "train-images-idx3-ubyte", &[0, 28, 28], 0);
                idx(&b, "train-labels-idx1-ubyte", &[0], 0);
            },
            1,
            &["bad", "training split holds no images"],
        ),
        case(
            "no test images",
            "train --data-dir bad --run-dir r",
            |d| {
                let b = bad_data(d);
                idx(&b, "t10k-images-idx3-ubyte", &[0, 28, 28], 0);
                idx(&b, "t10k-labels-idx1-ubyte", &[0], 0);
            },
            1,
            &["bad", "test split holds no images"],
        ),
        case(
            "no test images for eval",
            "eval --checkpoint l5.safetensors --data-dir bad",
            |d| {
                let b = bad_data(d);
                idx(&b, "t10k-images-idx3-ubyte", &[0, 28, 28], 0);
                idx(&b, "t10k-labels-idx1-ubyte", &[0], 0);
            },
            1,
            &["bad", "test split holds no images"],
        ),
        case(
            "splits of different sizes",
            "train --data-dir bad --run-dir r",
            |d| {
                let b = bad_data(d);
                idx(&b, "t10k-images-idx3-ubyte", &[32, 32, 32], 0);
            },
            1,
            &["bad", "1x28x28", "1x32x32"],
        ),
        case(
            "splits of different sizes (prune)",
            "prune --checkpoint l5.safetensors --sparsity 0.5 --epochs 1 --data-dir bad --run-dir r",
            |d| {
                let b = bad_data(d);
                idx(&b, "train-images-idx3-ubyte", &[64, 20, 20], 0);
            },
            1,
            &["bad", "1x20x20"],
        ),
        case(
            "images of zero height",
            "train --data-dir bad --run-dir r",
            |d| {
                let b = bad_data(d);
                idx(&b, "train-images-idx3-ubyte", &[64, 0, 28], 0);
                idx(&b, "t10k-images-idx3-ubyte", &[32, 0, 28], 0);
            },
            1,
            &["bad", "0x28"],
        ),
        case(
            "data of another size for eval",
            "eval --checkpoint l5.safetensors --data-dir bad",
            |d| {
                let b = bad_data(d);
                idx(&b, "train-images-idx3-ubyte", &[64, 20, 20], 0);
                idx(&b, "t10k-images-idx3-ubyte", &[32, 20, 20], 0);
            },
            1,
            &["l5.safetensors", "bad"],
        ),
        case(
            "CIFAR folder without its batches",
            "train --dataset cifar10 --model resnet20 --data-dir data --run-dir r",
            none,
            1,
            &["data_batch_1.bin"],
        ),
        case(
            "truncated CIFAR batch",
            "train --dataset cifar10 --model resnet20 --data-dir cifar --run-dir r",
            |d| {
                let c = d.join("cifar");
                std::fs::create_dir_all(&c).unwrap();
                for name in [
                    "data_batch_1.bin",
                    "data_batch_2.bin",
                    "data_batch_3.bin",
                    "data_batch_4.bin",
                    "data_batch_5.bin",
                    "test_batch.bin",
                ] {
                    std::fs::write(c.join(name), vec![1u8; 3073 + 100]).unwrap();
                }
            },
            1,
            &["data_batch_1.bin"],
        ),
        case(
            "resize beyond memory",
            "train --data-dir data --run-dir r --resize 100000x100000",
            none,
            1,
            &["--resize", "memory"],
        ),
        case(
            "padding beyond memory",
            "train --data-dir data --run-dir r --pad 100000",
            none,
            1,
            &["--pad", "memory"],
        ),
        case(
            "padding that overflows",
            "train --data-dir data --run-dir r --pad 4611686018427387904",
            none,
            1,
            &["--pad"],
        ),
        case(
            "train limit 0",
            "train --data-dir data --run-dir r --train-limit 0",
            none,
            1,
            &["--train-limit"],
        ),
        // --- checkpoints ---
        case(
            "missing checkpoint",
            "eval --checkpoint nothere.safetensors --data-dir data",
            none,
            1,
            &["nothere.safetensors", "No such file"],
        ),
        case(
            "checkpoint is a folder",
            "info --checkpoint runs",
            none,
            1,
            &["runs"],
        ),
        case(
            "empty checkpoint",
            "info --checkpoint empty.safetensors",
            |d| std::fs::write(d.join("empty.safetensors"), b"").unwrap(),
            1,
            &["empty.safetensors", "not a convpress model file"],
        ),
        case(
            "random bytes",
            "eval --checkpoint random.safetensors --data-dir data",
            |d| random_file(&d.join("random.safetensors"), 500, 3),
            1,
            &["random.safetensors", "not a convpress model file"],
        ),
        case(
            "flipped bit in the weights",
            "eval --checkpoint l5.safetensors --data-dir data",
            |d| flip_byte(&d.join("l5.safetensors"), 1000),
            1,
            &["l5.safetensors", "checksum mismatch"],
        ),
        case(
            "flipped bit, info",
            "info --checkpoint l5.safetensors",
            |d| flip_byte(&d.join("l5.safetensors"), 5),
            1,
            &["l5.safetensors", "checksum mismatch"],
        ),
        case(
            "flipped bit, training from it",
            "prune --checkpoint l5.safetensors --sparsity 0.5 --epochs 1 --data-dir data --run-dir r",
            |d| flip_byte(&d.join("l5.safetensors"), 70_000),
            1,
            &["l5.safetensors", "checksum mismatch"],
        ),
        case(
            "truncated checkpoint",
            "eval --checkpoint l5.safetensors --data-dir data",
            |d| truncate(&d.join("l5.safetensors"), 4000),
            1,
            &["l5.safetensors"],
        ),
        case(
            "safetensors without convpress metadata",
            "info --checkpoint plain.safetensors",
            |d| {
                let data = vec![0u8; 16];
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data)
                        .unwrap();
                std::fs::write(
                    d.join("plain.safetensors"),
                    safetensors::serialize(vec![("w", view)], None).unwrap(),
                )
                .unwrap()
            },
            1,
            &["plain.safetensors", "not a convpress checkpoint"],
        ),
        case(
            "tensor shape against the architecture (info)",
            "info --checkpoint l5.safetensors",
            |d| {
                reseal(&d.join("l5.safetensors"), |_, t| {
                    let w = t.iter_mut().find(|x| x.0 == "layers.0.weight").unwrap();
                    w.1 = vec![w.1.iter().product()];
                })
            },
            1,
            &[
                "l5.safetensors",
                "layers.0.weight",
                "the architecture needs",
            ],
        ),
        case(
            "missing tensor (encode)",
            "encode --checkpoint l5.safetensors --out x.cpz",
            |d| {
                reseal(&d.join("l5.safetensors"), |_, t| {
                    t.retain(|x| x.0 != "layers.0.bias")
                })
            },
            1,
            &["l5.safetensors", "layers.0.bias is missing"],
        ),
        case(
            "extra tensor",
            "eval --checkpoint l5.safetensors --data-dir data",
            |d| {
                reseal(&d.join("l5.safetensors"), |_, t| {
                    t.push(("layers.99.weight".into(), vec![2], vec![0; 8]))
                })
            },
            1,
            &["l5.safetensors", "layers.99.weight"],
        ),
        case(
            "another model's architecture",
            "info --checkpoint l5.safetensors",
            |d| {
                reseal(&d.join("l5.safetensors"), |md, _| {
                    let arch = convpress::models::ModelKind::Lenet300
                        .arch([1, 28, 28], 10)
                        .unwrap();
                    md.insert(
                        "convpress.arch".into(),
                        serde_json::to_string(&arch).unwrap(),
                    );
                })
            },
            1,
            &["l5.safetensors", "do not match the stored architecture"],
        ),
        case(
            "NaN weight",
            "prune --checkpoint l5.safetensors --sparsity 0.5 --epochs 1 --data-dir data --run-dir r",
            |d| {
                reseal(&d.join("l5.safetensors"), |_, t| {
                    let w = t.iter_mut().find(|x| x.0 == "layers.0.weight").unwrap();
                    w.2[..4].copy_from_slice(&f32::NAN.to_le_bytes());
                })
            },
            1,
            &["l5.safetensors", "damaged", "NaN"],
        ),
        case(
            "damaged architecture metadata",
            "info --checkpoint l5.safetensors",
            |d| {
                reseal(&d.join("l5.safetensors"), |md, _| {
                    md.insert("convpress.arch".into(), "{\"name\": 3".into());
                })
            },
            1,
            &["l5.safetensors", "architecture metadata is damaged"],
        ),
        case(
            "unknown checkpoint format",
            "info --checkpoint l5.safetensors",
            |d| {
                reseal(&d.join("l5.safetensors"), |md, _| {
                    md.insert("convpress.format".into(), "9".into());
                })
            },
            1,
            &["l5.safetensors", "checkpoint format 9"],
        ),
        case(
            "inconsistent architecture",
            "info --checkpoint l5.safetensors",
            |d| {
                reseal(&d.join("l5.safetensors"), |md, _| {
                    let mut arch: serde_json::Value =
                        serde_json::from_str(&md["convpress.arch"]).unwrap();
                    arch["classes"] = 7.into();
                    md.insert("convpress.arch".into(), arch.to_string());
                })
            },
            1,
            &["l5.safetensors", "architecture is inconsistent"],
        ),
        // --- compressed files ---
        case(
            "truncated .cpz",
            "eval --checkpoint l5.cpz --data-dir data",
            |d| truncate(&d.join("l5.cpz"), 300),
            1,
            &["l5.cpz", "truncated"],
        ),
        case(
            "flipped bit in a .cpz",
            "info --checkpoint l5.cpz",
            |d| flip_byte(&d.join("l5.cpz"), 40),
            1,
            &["l5.cpz", "checksum mismatch"],
        ),
        case(
            "empty .cpz",
            "eval --checkpoint e.cpz --data-dir data",
            |d| std::fs::write(d.join("e.cpz"), b"").unwrap(),
            1,
            &["e.cpz", "not a convpress model file"],
        ),
        case(
            "random .cpz",
            "info --checkpoint r.cpz",
            |d| random_file(&d.join("r.cpz"), 300, 5),
            1,
            &["r.cpz", "not a convpress model file"],
        ),
        case(
            ".cpz of another version",
            "info --checkpoint l5.cpz",
            |d| {
                let p = d.join("l5.cpz");
                let mut b = std::fs::read(&p).unwrap();
                b[4] = 77;
                std::fs::write(p, b).unwrap()
            },
            1,
            &["l5.cpz", "format version 77"],
        ),
        case(
            "damaged .cpz to the sparse bench",
            "bench sparse --checkpoint l5.cpz --seconds 0.1",
            |d| truncate(&d.join("l5.cpz"), 1000),
            1,
            &["l5.cpz"],
        ),
        case(
            "encode a .cpz onto itself",
            "encode --checkpoint l5.cpz",
            none,
            1,
            &["l5.cpz", "is the input file"],
        ),
        case(
            "encode onto its input",
            "encode --checkpoint l5.safetensors --out l5.safetensors",
            none,
            1,
            &["--out", "l5.safetensors", "is the input file"],
        ),
        case(
            "encode onto its input by another path",
            "encode --checkpoint l5.safetensors --out ./runs/../l5.safetensors",
            none,
            1,
            &["is the input file"],
        ),
        case(
            "encode onto its input through a link",
            "encode --checkpoint l5.safetensors --out link.cpz",
            |d| std::os::unix::fs::symlink(d.join("l5.safetensors"), d.join("link.cpz")).unwrap(),
            1,
            &["link.cpz", "is the input file"],
        ),
        case(
            "encode onto another file",
            "encode --checkpoint l5.safetensors --out other.cpz",
            |d| std::fs::write(d.join("other.cpz"), b"precious").unwrap(),
            1,
            &["other.cpz", "exists already", "--force"],
        ),
        case(
            "encode, report in the way",
            "encode --checkpoint l5.safetensors --out new.cpz",
            |d| std::fs::write(d.join("new.report.json"), b"precious").unwrap(),
            1,
            &["new.report.json", "exists already"],
        ),
        // --- quantization ---
        case(
            "quantize at 0 bits",
            "quantize --checkpoint l5.safetensors --out x.cpz --bits 0 --data-dir data",
            none,
            1,
            &["bits", "between 2 and 8"],
        ),
        case(
            "quantize at 1 bit",
            "quantize --checkpoint l5.safetensors --out x.cpz --bits 1 --data-dir data",
            none,
            1,
            &["bits", "binarization"],
        ),
        case(
            "quantize at 9 bits",
            "quantize --checkpoint l5.safetensors --out x.cpz --bits 9 --data-dir data",
            none,
            1,
            &["bits", "between 2 and 8"],
        ),
        case(
            "quantize calibrating on no image",
            "quantize --checkpoint l5.safetensors --out x.cpz --calibrate 0 --data-dir data",
            none,
            1,
            &["calibrate", "empty set"],
        ),
        case(
            "quantize a quantized model",
            "quantize --checkpoint l5.q8.cpz --out x.cpz --data-dir data",
            none,
            1,
            &["l5.q8.cpz", "already quantized"],
        ),
        case(
            "quantize onto its input",
            "quantize --checkpoint l5.safetensors --out l5.safetensors --data-dir data",
            none,
            1,
            &["--out", "is the input file"],
        ),
        case(
            "quantize a layer that is not there",
            "quantize --checkpoint l5.safetensors --out x.cpz --float-layers layers.99 --data-dir data",
            none,
            1,
            &["float-layers", "layers.99"],
        ),
        case(
            "quantize with a percentile out of range",
            "quantize --checkpoint l5.safetensors --out x.cpz --calibration percentile --percentile 30 --data-dir data",
            none,
            1,
            &["percentile", "30"],
        ),
        case(
            "quantize without the data",
            "quantize --checkpoint l5.safetensors --out x.cpz --data-dir nowhere",
            none,
            1,
            &["nowhere"],
        ),
        case(
            "quantize with every layer kept in float",
            "quantize --checkpoint l5.safetensors --out x.cpz --float-layers layers.* --data-dir data",
            none,
            1,
            &["kept in float", "nothing to quantize"],
        ),
        case(
            "qat at 9 bits",
            "qat --checkpoint l5.safetensors --out x.cpz --bits 9 --data-dir data",
            none,
            1,
            &["bits", "between 2 and 8"],
        ),
        case(
            "qat for no epoch",
            "qat --checkpoint l5.safetensors --out x.cpz --epochs 0 --data-dir data",
            none,
            1,
            &["epochs", "at least 1"],
        ),
        case(
            "qat of a quantized model",
            "qat --checkpoint l5.q8.cpz --out x.cpz --data-dir data",
            none,
            1,
            &["l5.q8.cpz", "already quantized"],
        ),
        case(
            "damaged quantized file",
            "eval --checkpoint l5.q8.cpz --data-dir data",
            |d| flip_byte(&d.join("l5.q8.cpz"), 100),
            1,
            &["l5.q8.cpz", "checksum mismatch"],
        ),
        case(
            "truncated quantized file",
            "info --checkpoint l5.q8.cpz",
            |d| truncate(&d.join("l5.q8.cpz"), 5000),
            1,
            &["l5.q8.cpz", "truncated"],
        ),
        case(
            "whole-model int8 bench on a float model",
            "bench quant --checkpoint l5.safetensors --seconds 0.1",
            none,
            1,
            &["l5.safetensors", "not a quantized model"],
        ),
        // --- flags ---
        case(
            "threads 100000",
            "--threads 100000 info --checkpoint l5.safetensors",
            none,
            1,
            &["--threads 100000", "at most"],
        ),
        case(
            "threads 0",
            "--threads 0 info --checkpoint l5.safetensors",
            none,
            1,
            &["--threads"],
        ),
        case(
            "lr NaN",
            "train --data-dir data --run-dir r --lr NaN",
            none,
            1,
            &["--lr"],
        ),
        case(
            "lr negative",
            "train --data-dir data --run-dir r --lr -1",
            none,
            1,
            &["--lr"],
        ),
        case(
            "momentum 1",
            "train --data-dir data --run-dir r --momentum 1",
            none,
            1,
            &["--momentum"],
        ),
        case(
            "epochs 0",
            "train --data-dir data --run-dir r --epochs 0",
            none,
            1,
            &["--epochs"],
        ),
        case(
            "batch size 0",
            "train --data-dir data --run-dir r --batch-size 0",
            none,
            1,
            &["--batch-size"],
        ),
        case(
            "resize 0x0",
            "train --data-dir data --run-dir r --resize 0x0",
            none,
            1,
            &["--resize"],
        ),
        case(
            "resize nonsense",
            "train --data-dir data --run-dir r --resize 14y",
            none,
            2,
            &["--resize"],
        ),
        case(
            "epochs not a number",
            "train --epochs many",
            none,
            2,
            &["--epochs", "many"],
        ),
        case(
            "unknown model",
            "train --model alexnet",
            none,
            2,
            &["--model", "alexnet"],
        ),
        case(
            "latency batch beyond memory",
            "bench latency --checkpoint l5.safetensors --batch 100000000 --seconds 0.1",
            none,
            1,
            &["--batch", "memory"],
        ),
        case(
            "bench train batch beyond memory",
            "bench train --batch 1000000000 --seconds 0.1",
            none,
            1,
            &["--batch", "memory"],
        ),
        case(
            "bench sparse batch beyond memory",
            "bench sparse --batch 100000000000 --seconds 0.1",
            none,
            1,
            &["--batch", "memory"],
        ),
        case(
            "finetune lr negative",
            "encode --checkpoint l5.safetensors --out x.cpz --finetune-epochs 1 --finetune-lr -1",
            none,
            1,
            &["--finetune-lr"],
        ),
        case(
            "conv bits 0",
            "encode --checkpoint l5.safetensors --out x.cpz --conv-bits 0",
            none,
            1,
            &["--conv-bits"],
        ),
        case(
            "fc bits 17",
            "encode --checkpoint l5.safetensors --out x.cpz --fc-bits 17",
            none,
            1,
            &["--fc-bits"],
        ),
        case(
            "sparsity above 1",
            "prune --checkpoint l5.safetensors --sparsity 1.5 --data-dir data --run-dir r",
            none,
            1,
            &["--sparsity"],
        ),
        case(
            "sparsity NaN",
            "prune --checkpoint l5.safetensors --sparsity NaN --data-dir data --run-dir r",
            none,
            1,
            &["--sparsity"],
        ),
        case(
            "unknown layer",
            "prune --checkpoint l5.safetensors --layer-sparsity nosuch=0.5 --data-dir data --run-dir r",
            none,
            1,
            &["nosuch"],
        ),
        case(
            "sensitivity sparsity 2",
            "sensitivity --checkpoint l5.safetensors --sparsities 2 --out s --data-dir data",
            none,
            1,
            &["--sparsities"],
        ),
        case(
            "recipe missing",
            "compress --recipe none.toml --run-dir c",
            none,
            1,
            &["none.toml"],
        ),
        case(
            "recipe with an unknown key",
            "compress --recipe bad.toml --run-dir c",
            |d| {
                std::fs::write(
                    d.join("bad.toml"),
                    "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\nsparsty = 0.9\n",
                )
                .unwrap()
            },
            1,
            &["bad.toml:4", "sparsty"],
        ),
        case(
            "recipe with an unknown stage",
            "compress --recipe bad.toml --run-dir c --from l5.safetensors",
            |d| std::fs::write(d.join("bad.toml"), "[[stage]]\nkind = \"quantise\"\n").unwrap(),
            1,
            &["bad.toml:2", "quantise"],
        ),
        case(
            "recipe from a damaged model",
            "compress --recipe recipe.toml --run-dir c --from l5.safetensors",
            |d| flip_byte(&d.join("l5.safetensors"), 100),
            1,
            &["l5.safetensors", "checksum mismatch"],
        ),
        // --- run folders ---
        case(
            "train into a finished run",
            "train --model lenet5 --epochs 1 --data-dir data --run-dir runs/l5 --no-progress",
            none,
            1,
            &["runs/l5", "already holds a run", "--resume"],
        ),
        case(
            "train into a run without checkpoints",
            "train --model lenet5 --epochs 1 --data-dir data --run-dir runs/l5 --no-progress",
            |d| std::fs::remove_dir_all(d.join("runs/l5/checkpoints")).unwrap(),
            1,
            &["runs/l5", "already holds a run", "model.safetensors"],
        ),
        case(
            "resume with another model",
            "train --run-dir runs/l5 --resume --model lenet300",
            none,
            1,
            &["--model", "--resume"],
        ),
        case(
            "resume with another lr",
            "train --run-dir runs/l5 --resume --lr 0.5 --epochs 2",
            none,
            1,
            &["--lr"],
        ),
        case(
            "resume a folder that does not exist",
            "train --run-dir nothing --resume",
            none,
            1,
            &["nothing", "does not exist"],
        ),
        case(
            "resume with a damaged config",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| std::fs::write(d.join("runs/l5/config.json"), "{ not json").unwrap(),
            1,
            &["runs/l5/config.json", "damaged"],
        ),
        case(
            "force on a folder convpress did not make",
            "train --model lenet5 --epochs 1 --data-dir data --run-dir mine --force",
            |d| {
                std::fs::create_dir_all(d.join("mine")).unwrap();
                std::fs::write(d.join("mine/thesis.tex"), "years of work").unwrap();
            },
            1,
            &["mine", "did not write", "thesis.tex"],
        ),
        case(
            "compress into a non-empty folder",
            "compress --recipe recipe.toml --from l5.safetensors --run-dir runs/l5",
            none,
            1,
            &["runs/l5", "already holds a run"],
        ),
        case(
            "compress resume of nothing",
            "compress --recipe recipe.toml --from l5.safetensors --run-dir empty --resume",
            |d| std::fs::create_dir_all(d.join("empty")).unwrap(),
            1,
            &["empty", "holds no recipe run"],
        ),
        case(
            "prune into a used folder",
            "prune --checkpoint l5.safetensors --sparsity 0.5 --epochs 1 --data-dir data --run-dir runs/l5",
            none,
            1,
            &["runs/l5", "already holds a run"],
        ),
        case(
            "prune-filters into a used folder",
            "prune-filters --checkpoint l5.safetensors --ratio 0.5 --epochs 1 --data-dir data --run-dir runs/l5",
            none,
            1,
            &["runs/l5", "already holds a run"],
        ),
        case(
            "sensitivity into a used folder",
            "sensitivity --checkpoint l5.safetensors --sparsities 0.5 --out runs/l5 --data-dir data",
            none,
            1,
            &["runs/l5", "already holds a run"],
        ),
        case(
            "run folder under a file",
            "train --model lenet5 --epochs 1 --data-dir data --run-dir l5.cpz/run",
            none,
            1,
            &["l5.cpz/run"],
        ),
        case(
            "resume with a damaged state.json",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| std::fs::write(d.join("runs/l5/checkpoints/epoch-0001/state.json"), "{").unwrap(),
            1,
            &["runs/l5/checkpoints/epoch-0001/state.json", "damaged"],
        ),
        case(
            "resume with a damaged optimizer state",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| truncate(&d.join("runs/l5/checkpoints/epoch-0001/optimizer.bpk"), 20),
            1,
            &["runs/l5/checkpoints/epoch-0001/optimizer.bpk"],
        ),
        case(
            "resume with a damaged checkpoint",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| {
                flip_byte(
                    &d.join("runs/l5/checkpoints/epoch-0001/model.safetensors"),
                    3000,
                )
            },
            1,
            &[
                "runs/l5/checkpoints/epoch-0001/model.safetensors",
                "checksum mismatch",
            ],
        ),
        case(
            "resume with a damaged metrics log",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| std::fs::write(d.join("runs/l5/metrics.jsonl"), "{\"epoch\": oops}\n").unwrap(),
            1,
            &["runs/l5/metrics.jsonl", "damaged"],
        ),
        case(
            "resume when latest names no checkpoint",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| std::fs::write(d.join("runs/l5/checkpoints/latest"), "epoch-0042").unwrap(),
            1,
            &["runs/l5", "no complete checkpoint"],
        ),
        case(
            "compress resume with a damaged stage record",
            "compress --recipe recipe.toml --from ../../reliability-fixture/l5.safetensors --run-dir runs/c --resume",
            |d| std::fs::write(d.join("runs/c/stages/01-eval/stage.json"), "[").unwrap(),
            1,
            &["runs/c/stages/01-eval/stage.json", "damaged"],
        ),
        case(
            "compress resume with damaged settings",
            "compress --recipe recipe.toml --from ../../reliability-fixture/l5.safetensors --run-dir runs/c --resume",
            |d| std::fs::write(d.join("runs/c/resolved.json"), "nope").unwrap(),
            1,
            &["runs/c/resolved.json", "damaged"],
        ),
        case(
            "compress resume from another model",
            "compress --recipe recipe.toml --from l5.cpz --run-dir runs/c --resume",
            none,
            1,
            &["cannot resume", "l5.cpz"],
        ),
        case(
            "report of a folder without a report",
            "report runs/l5",
            none,
            1,
            &["runs/l5", "no report"],
        ),
        case(
            "report with a damaged report.json",
            "report runs/c",
            |d| std::fs::write(d.join("runs/c/report.json"), "{\"stages\": 5}").unwrap(),
            1,
            &["runs/c/report.json"],
        ),
        case(
            "comparison over an earlier one",
            "report runs/c runs/c --out cmp",
            |d| {
                std::fs::create_dir_all(d.join("cmp")).unwrap();
                std::fs::write(d.join("cmp/compare.md"), "mine").unwrap();
            },
            1,
            &["cmp/compare.md", "exists already", "--force"],
        ),
        case(
            "prune targets file damaged",
            "prune --checkpoint l5.safetensors --targets t.json --epochs 1 --data-dir data --run-dir r",
            |d| std::fs::write(d.join("t.json"), "{\"layer_sparsity\": 3}").unwrap(),
            1,
            &["t.json"],
        ),
        case(
            "constraints beside a model damaged",
            "eval --checkpoint x.safetensors --data-dir data",
            |d| {
                std::fs::copy(d.join("l5.safetensors"), d.join("x.safetensors")).unwrap();
                std::fs::write(d.join("x.constraints.safetensors"), "garbage").unwrap();
            },
            1,
            &["x.constraints.safetensors"],
        ),
        case(
            "sensitivity --out is a file",
            "sensitivity --checkpoint l5.safetensors --sparsities 0.5 --out l5.cpz --data-dir data",
            none,
            1,
            &["--out", "l5.cpz"],
        ),
        case(
            "bench quant batch 0",
            "bench quant --batch 0 --seconds 0.1",
            none,
            1,
            &["--batch"],
        ),
        case(
            "prune with nothing to prune",
            "prune --checkpoint l5.safetensors --sparsity 0 --epochs 1 --data-dir data --run-dir r",
            none,
            1,
            &["sparsity is 0", "nothing to prune"],
        ),
        // --- found in review of the first version of these rules ---
        case(
            "fetch over other files of MNIST's names",
            "data fetch mnist --data-dir data",
            none,
            1,
            &[
                "data",
                "train-images-idx3-ubyte",
                "other contents",
                "--force",
            ],
        ),
        case(
            "force with missing data keeps the old run",
            "train --model lenet5 --epochs 1 --data-dir nowhere --run-dir runs/l5 --force",
            none,
            1,
            &["nowhere"],
        ),
        case(
            "force with a bad lr keeps the old run",
            "prune --checkpoint l5.safetensors --sparsity 0.5 --epochs 1 --lr -1 --data-dir data --run-dir runs/l5 --force",
            none,
            1,
            &["lr"],
        ),
        case(
            "latest names a folder outside the run",
            "train --run-dir runs/l5 --resume --epochs 2",
            |d| std::fs::write(d.join("runs/l5/checkpoints/latest"), "../../runs/c").unwrap(),
            1,
            &["runs/l5", "no complete checkpoint"],
        ),
        case(
            "crop-pad beyond the image",
            "train --data-dir data --run-dir r --crop-pad 40",
            none,
            1,
            &["--crop-pad 40", "at most"],
        ),
        case(
            "crop-pad that would wrap",
            "train --data-dir data --run-dir r --crop-pad 18446744073709551615",
            none,
            1,
            &["--crop-pad"],
        ),
        case(
            "seconds beyond a week",
            "bench latency --checkpoint l5.safetensors --seconds 1e20",
            none,
            1,
            &["--seconds"],
        ),
        case(
            "latency seconds beyond a week",
            "prune-filters --checkpoint l5.safetensors --ratio 0.5 --epochs 1 --latency-seconds 1e20 --data-dir data --run-dir p",
            none,
            1,
            &["--latency-seconds"],
        ),
        case(
            "a rewrite of a layer that cannot take the form",
            "rewrite --to fire --layers layers.2 --checkpoint l5.safetensors --data-dir data --run-dir p",
            none,
            1,
            &["l5.safetensors", "layers.2", "\"same\" convolution"],
        ),
        case(
            "transformed filters that do not divide the filter count",
            "rewrite --to dihedral --layers layers.2 --checkpoint l5.safetensors --data-dir data --run-dir p",
            none,
            1,
            &["layers.2", "50 filters"],
        ),
        case(
            "distillation at temperature 0",
            "distill --teacher l5.safetensors --student lenet300 --temperature 0 --data-dir data --run-dir p",
            none,
            1,
            &["temperature must be a positive number"],
        ),
        case(
            "distillation with alpha outside [0, 1]",
            "distill --teacher l5.safetensors --student lenet300 --alpha 1.5 --data-dir data --run-dir p",
            none,
            1,
            &["alpha must be in [0, 1]"],
        ),
        case(
            "a student that is neither a model nor a file",
            "distill --teacher l5.safetensors --student lenet7 --data-dir data --run-dir p",
            none,
            1,
            &["--student", "neither a model"],
        ),
        case(
            "a missing teacher",
            "distill --teacher nowhere.safetensors --student lenet300 --data-dir data --run-dir p",
            none,
            1,
            &["teacher", "nowhere.safetensors"],
        ),
        case(
            "preprocessing of the wrong length",
            "eval --checkpoint l5.safetensors --data-dir data",
            |d| {
                reseal(&d.join("l5.safetensors"), |md, _| {
                    let mut meta: serde_json::Value =
                        serde_json::from_str(&md["convpress.meta"]).unwrap();
                    meta["preprocess"]["mean"] = serde_json::json!([]);
                    md.insert("convpress.meta".into(), meta.to_string());
                })
            },
            1,
            &["l5.safetensors", "preprocessing"],
        ),
        case(
            "input too large",
            "info --checkpoint l5.safetensors",
            |d| {
                reseal(&d.join("l5.safetensors"), |md, _| {
                    let mut arch: serde_json::Value =
                        serde_json::from_str(&md["convpress.arch"]).unwrap();
                    arch["input"] = serde_json::json!([1, 65536, 65536]);
                    md.insert("convpress.arch".into(), arch.to_string());
                })
            },
            1,
            &["l5.safetensors", "input 1x65536x65536"],
        ),
        case(
            "gamma without the step schedule",
            "train --data-dir data --run-dir r --gamma 0.5",
            none,
            1,
            &["gamma needs schedule"],
        ),
        case(
            "rescale setting without rescale-from",
            "train --data-dir data --run-dir r --rescale-interp bilinear",
            none,
            1,
            &["rescale-interp needs rescale-from"],
        ),
        case(
            "resume with a rescale setting",
            "train --run-dir runs/l5 --resume --rescale-min-gain 2",
            none,
            1,
            &["--rescale-min-gain"],
        ),
        case(
            "the same seed twice",
            "rescale-compare --model lenet5 --seeds 1,1 --rescale-at 1 --epochs 2 --data-dir data --out rc",
            none,
            1,
            &["--seeds"],
        ),
        case(
            "encode --run-dir without fine-tuning",
            "encode --checkpoint l5.safetensors --out x.cpz --run-dir w",
            none,
            1,
            &["--run-dir", "--finetune-epochs"],
        ),
        case(
            "encode fine-tuning without data",
            "encode --checkpoint l5.safetensors --out x.cpz --finetune-epochs 1 --data-dir nowhere",
            none,
            1,
            &["nowhere"],
        ),
        case(
            "report of one run with --out",
            "report runs/c --out elsewhere",
            none,
            1,
            &["--out"],
        ),
        case(
            "compress from a model without its data",
            "compress --recipe recipe.toml --from l5.safetensors --run-dir c --data-dir nowhere",
            none,
            1,
            &["nowhere"],
        ),
        case(
            "compress with a report batch beyond memory",
            "compress --recipe big.toml --from l5.safetensors --run-dir c",
            |d| {
                std::fs::write(
                    d.join("big.toml"),
                    "[report]\nbatches = [100000000000]\n\n[[stage]]\nkind = \"eval\"\n",
                )
                .unwrap()
            },
            1,
            &["[report] batches", "memory"],
        ),
        case(
            "force would delete the input",
            "prune --checkpoint runs/l5/model.safetensors --sparsity 0.5 --epochs 1 --data-dir data --run-dir runs/l5 --force",
            none,
            1,
            &["would delete the input", "runs/l5/model.safetensors"],
        ),
    ];
    // Controls: what works must still work, and change only what it should.
    v.extend([
        case("control: info", "info --checkpoint l5.safetensors", none, 0, &[]),
        case("control: info on the .cpz", "info --checkpoint l5.cpz", none, 0, &[]),
        case("control: info on the quantized file", "info --checkpoint l5.q8.cpz", none, 0, &[]),
        case("control: eval on the int8 kernels", "eval --checkpoint l5.q8.cpz --data-dir data", none, 0, &[]),
        Case {
            changes: &["q4.cpz"],
            ..case("control: quantize at 4 bits", "quantize --checkpoint l5.safetensors --out q4.cpz --bits 4 --calibrate 8 --data-dir data", none, 0, &[])
        },
        case("control: eval", "eval --checkpoint l5.cpz --data-dir data", none, 0, &[]),
        Case {
            changes: &["runs/c"],
            ..case("control: resume of a finished recipe run, copied elsewhere", "compress --recipe recipe.toml --from ../../reliability-fixture/l5.safetensors --run-dir runs/c --resume --data-dir data", none, 0, &[])
        },
        Case {
            changes: &["runs/c/report.md", "runs/c/plots"],
            ..case("control: report redraws a run", "report runs/c", none, 0, &[])
        },
        Case {
            changes: &["runs/l5"],
            ..case("control: resume repeating the run's own flags", "train --run-dir runs/l5 --resume --model lenet5 --batch-size 16 --epochs 2 --data-dir data --no-progress", none, 0, &[])
        },
        Case {
            changes: &["runs/l5"],
            ..case("control: resume for another epoch", "train --run-dir runs/l5 --resume --epochs 2 --no-progress", none, 0, &[])
        },
        Case {
            changes: &["runs/l5", "moved", "data"],
            ..case("control: resume on moved data", "train --run-dir runs/l5 --resume --epochs 2 --data-dir moved --no-progress", |d| {
                std::fs::rename(d.join("data"), d.join("moved")).unwrap()
            }, 0, &[])
        },
        Case {
            changes: &["other.cpz"],
            ..case("control: encode --force replaces its output", "encode --checkpoint l5.safetensors --out other.cpz --force", |d| {
                std::fs::write(d.join("other.cpz"), b"old").unwrap()
            }, 0, &[])
        },
        Case {
            changes: &["runs/l5"],
            ..case("control: train --force replaces a run", "train --model lenet5 --epochs 1 --data-dir data --run-dir runs/l5 --force --no-progress", none, 0, &[])
        },
    ]);
    v
}

#[test]
fn bad_input_is_refused_without_panics_or_lost_files() {
    let base = fixture();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability-cases");
    let _ = std::fs::remove_dir_all(&root);
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    let (mut refused, mut controls) = (0, 0);
    for (i, c) in cases.iter().enumerate() {
        let dir = root.join(format!("{i:02}"));
        copy_tree(base, &dir);
        (c.setup)(&dir);
        let before = hashes(&dir);
        let (out, hung) = run_case(&dir, c.args);
        let err = stderr(&out);
        let code = out.status.code().unwrap_or(-1);
        let mut why = Vec::new();
        if hung {
            why.push(format!("hung for {} s", HANG.as_secs()));
        }
        if code != c.code {
            why.push(format!("exit {code}, expected {}", c.code));
        }
        if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
            why.push("panicked".into());
        }
        for s in c.says {
            if !err.contains(s) {
                why.push(format!("stderr lacks {s:?}"));
            }
        }
        if std::env::var_os("CONVPRESS_SHOW_ERRORS").is_some() {
            eprintln!("[{code}] {}: {}", c.name, err.lines().last().unwrap_or(""));
        }
        let after = hashes(&dir);
        if c.code != 0 {
            // A refused command writes nothing.
            for path in after.keys().filter(|p| !before.contains_key(*p)) {
                why.push(format!("wrote {}", path.display()));
            }
        }
        for (path, hash) in &before {
            if c.changes.iter().any(|p| path.starts_with(p)) {
                continue;
            }
            match after.get(path) {
                None => why.push(format!("{} was removed", path.display())),
                Some(h) if h != hash => why.push(format!("{} changed", path.display())),
                _ => {}
            }
        }
        if c.code == 0 {
            controls += 1;
        } else {
            refused += 1;
        }
        if !why.is_empty() {
            failures.push(format!(
                "{} (`convpress {}`): {}\n    stderr: {}",
                c.name,
                c.args,
                why.join("; "),
                err.trim()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{refused} bad inputs refused, {controls} controls passed");
}

/// Waits until `dir` is locked by a running process (its lock file names a pid).
fn wait_for_lock(dir: &Path, child: &mut std::process::Child) {
    let started = Instant::now();
    loop {
        if std::fs::read_to_string(dir.join(".convpress.lock")).is_ok_and(|s| !s.trim().is_empty())
        {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the first process ended before locking"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no lock after 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn(dir: &Path, args: &str) -> std::process::Child {
    Command::new(bin())
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_trainings_in_one_run_folder_do_not_mix() {
    let base = fixture();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability-concurrent-train");
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&base.join("data"), &dir.join("data"));
    let mut first = spawn(
        &dir,
        &format!("{TRAIN} --epochs 20 --data-dir data --run-dir R"),
    );
    wait_for_lock(&dir.join("R"), &mut first);
    let second = convpress_in(
        &dir,
        "train --model lenet300 --epochs 1 --no-progress --data-dir data --run-dir R",
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(err.contains("in use by another convpress process"), "{err}");
    assert!(err.contains('R'), "{err}");
    // The folder holds the first run only, whole: it resumes.
    let config = std::fs::read_to_string(dir.join("R/config.json")).unwrap();
    assert!(config.contains("\"lenet5\""), "{config}");
    let metrics = std::fs::read_to_string(dir.join("R/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 20);
    let resumed = convpress_in(&dir, "train --run-dir R --resume --epochs 21 --no-progress");
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_recipe_runs_in_one_folder_do_not_mix() {
    let base = fixture();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability-concurrent-compress");
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(base, &dir);
    std::fs::write(
        dir.join("long.toml"),
        "[[stage]]\nkind = \"finetune\"\nepochs = 20\n",
    )
    .unwrap();
    let mut first = spawn(
        &dir,
        "compress --recipe long.toml --from l5.safetensors --run-dir C --no-progress --data-dir data",
    );
    wait_for_lock(&dir.join("C"), &mut first);
    let before = hashes(&dir.join("C"));
    // A stage folder inside the running recipe's folder is refused too.
    let nested = convpress_in(
        &dir,
        "train --model lenet5 --epochs 1 --no-progress --data-dir data --run-dir C/stages/99-extra",
    );
    assert_eq!(nested.status.code(), Some(1), "{}", stderr(&nested));
    assert!(
        stderr(&nested).contains("inside a run folder that is in use"),
        "{}",
        stderr(&nested)
    );
    let second = convpress_in(
        &dir,
        "compress --recipe recipe.toml --from l5.safetensors --run-dir C --resume --data-dir data",
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("in use by another convpress process"),
        "{}",
        stderr(&second)
    );
    // The second process wrote nothing into the folder while the first one ran.
    let recipe = std::fs::read_to_string(dir.join("C/recipe.toml")).unwrap();
    assert!(recipe.contains("finetune"), "{recipe}");
    assert!(before.keys().all(|p| dir.join("C").join(p).exists()));
    let report = std::fs::read_to_string(dir.join("C/report.json")).unwrap();
    assert!(report.contains("finetune"));
    let _ = std::fs::remove_dir_all(&dir);
}
