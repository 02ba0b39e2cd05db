//! Files that are either wholly written or not there: write a temporary sibling, then rename.
//! Used for datasets, checkpoints, run logs and compressed models, so a crash or SIGKILL never
//! leaves half a file.

use std::path::{Path, PathBuf};

/// Writes a file through a temporary sibling and a rename, so a reader never sees half of it.
/// Its error names `path` (the OS error alone names nothing).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
        })
}

/// `dir/.name.tmp-<pid>-<n>`: a temporary path on the same file system as `path`, unique
/// within this process too (threads may write the same file at once).
pub fn tmp_sibling(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}
