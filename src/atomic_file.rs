//! Files that are either wholly written or not there: write a temporary sibling, then rename.
//! Used for datasets, checkpoints, run logs and compressed models, so a crash or SIGKILL never
//! leaves half a file.

use std::path::{Path, PathBuf};

/// Writes a file through a temporary sibling and a rename, so a reader never sees half of it.
/// Its error names `path` (the OS error alone names nothing).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_new(path, bytes, true)
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

/// Publishes the finished file `staged` as `path`. With `replace`, a rename (any file at `path`
/// is replaced). Without it, a hard link, which fails if `path` exists, so a file that
/// appeared there since the command checked (another process's output) is never replaced;
/// then `staged` is removed. Both files must be on one file system (a sibling, see
/// [`tmp_sibling`]).
pub fn publish(staged: &Path, path: &Path, replace: bool) -> std::io::Result<()> {
    let named = |e: std::io::Error| {
        let _ = std::fs::remove_file(staged);
        std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
    };
    if replace {
        return std::fs::rename(staged, path).map_err(named);
    }
    match std::fs::hard_link(staged, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(staged);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(named(std::io::Error::new(
            e.kind(),
            "it appeared while this command ran (another process?); nothing was replaced",
        ))),
        // A file system without hard links: the check before the work is all there is.
        Err(_) if !path.exists() => std::fs::rename(staged, path).map_err(named),
        Err(e) => Err(named(e)),
    }
}

/// [`write_atomic`], but without `replace` an existing file at `path` is never replaced (see
/// [`publish`]).
pub fn write_new(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
    })?;
    publish(&tmp, path, replace)
}
