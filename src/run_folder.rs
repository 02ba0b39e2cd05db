//! Run folders: owned by one process at a time, and never reused by accident.
//!
//! Every command that writes a run folder takes it with [`RunFolder::open`]: an advisory lock
//! (`flock`, through `std::fs::File::try_lock`) on `.convpress.lock` inside it, held until the
//! command ends, so a second process asking for the same folder gets a clear error instead of
//! interleaving its files with the first one's. A folder that already holds anything is only
//! continued with `--resume` (which the command checks against what is there) or emptied with
//! `--force`, and `--force` only empties folders that convpress made (the lock file says so).
//!
//! Locks are re-entrant within a process: a command that holds its folder may call the trainer,
//! which takes the folder it trains in again (flock would otherwise refuse the second open of
//! the same file, even in one process). A folder inside one that another process holds (a
//! running recipe's stage folder) is refused as well.
//!
//! Single output files follow the same rule through [`claim_output`]: never the command's
//! input, never an existing file without `--force`.

use anyhow::{Context as _, bail};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The lock file; its presence also marks a folder that convpress made.
pub const LOCK_FILE: &str = ".convpress.lock";

/// What a command may do with a folder that already holds files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// The folder must be new or empty.
    Fresh,
    /// The folder must exist; the command continues what it holds.
    Resume,
    /// Whatever convpress wrote there before is removed first (`--force`).
    Force,
}

impl Reuse {
    /// The policy for a command's `--resume` and `--force` flags.
    pub fn from_flags(resume: bool, force: bool) -> Reuse {
        match (resume, force) {
            (true, _) => Reuse::Resume,
            (false, true) => Reuse::Force,
            (false, false) => Reuse::Fresh,
        }
    }
}

/// A run folder held by this process; the lock is released when the last holder drops it.
#[derive(Debug)]
pub struct RunFolder {
    key: PathBuf,
}

struct Held {
    _file: File,
    holders: usize,
    /// This process made the folder: if it still holds nothing when released (the command
    /// failed before writing), it is removed again, so a refused command leaves nothing.
    created: bool,
}

static HELD: Mutex<BTreeMap<PathBuf, Held>> = Mutex::new(BTreeMap::new());

impl RunFolder {
    /// Takes `dir` for this process under `reuse`. `flag` is the option that named the folder
    /// (`--run-dir`); `can_resume` says whether the command has `--resume`; `inputs` are the
    /// files the command reads, which `--force` refuses to delete.
    pub fn open(
        dir: &Path,
        reuse: Reuse,
        flag: &str,
        can_resume: bool,
        inputs: &[&Path],
    ) -> anyhow::Result<RunFolder> {
        if reuse == Reuse::Resume && !dir.is_dir() {
            bail!("cannot resume: {} does not exist", dir.display());
        }
        if reuse == Reuse::Force
            && let Ok(root) = std::fs::canonicalize(dir)
        {
            for input in inputs {
                if std::fs::canonicalize(input).is_ok_and(|p| p.starts_with(&root)) {
                    bail!(
                        "--force would delete the input {}, which is inside {}: choose another {flag}",
                        input.display(),
                        dir.display()
                    );
                }
            }
        }
        let made_by_us = dir.join(LOCK_FILE).is_file();
        let folder = Self::lock(dir)?;
        let found = contents(dir)?;
        match reuse {
            Reuse::Fresh if !found.is_empty() => {
                let resume = if can_resume {
                    "pass --resume to continue it, --force to replace it, "
                } else {
                    "pass --force to replace it, "
                };
                bail!(
                    "{} already holds a run ({}): {resume}or choose another {flag}",
                    dir.display(),
                    listing(&found)
                );
            }
            Reuse::Force if !found.is_empty() => {
                if !made_by_us {
                    bail!(
                        "{} holds files that convpress did not write ({}): --force only replaces convpress run folders; move them away or choose another {flag}",
                        dir.display(),
                        listing(&found)
                    );
                }
                for name in &found {
                    let path = dir.join(name);
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed
                        .with_context(|| format!("--force: cannot remove {}", path.display()))?;
                }
            }
            _ => {}
        }
        Ok(folder)
    }

    /// Locks `dir` (created if missing) for this process without looking at what it holds;
    /// the trainer uses it for the folder it trains in, and checks its own files. A folder
    /// inside another process's run folder (a recipe's stage folder) is refused too.
    pub fn lock(dir: &Path) -> anyhow::Result<RunFolder> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let key = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(&key) {
            h.holders += 1;
            return Ok(RunFolder { key });
        }
        for outer in key.ancestors().skip(1) {
            if held.contains_key(outer) || !outer.join(LOCK_FILE).is_file() {
                continue;
            }
            // Taken and released at once: only to learn whether a process holds it.
            if let Err(busy) = take(outer) {
                bail!(
                    "{} is inside a run folder that is in use ({busy:#}): wait for it to finish",
                    dir.display()
                );
            }
        }
        let file = take(&key).map_err(|e| {
            anyhow::anyhow!("{e:#}: wait for it to finish, or choose another run folder")
        })?;
        held.insert(
            key.clone(),
            Held {
                _file: file,
                holders: 1,
                created,
            },
        );
        Ok(RunFolder { key })
    }

    /// The folder (absolute).
    pub fn path(&self) -> &Path {
        &self.key
    }
}

/// Opens and locks `dir`'s lock file, writing this process's pid into it. A lock file that
/// was unlinked while this process waited to open it (the previous holder removing a folder it
/// left empty) is opened again, so two processes never hold locks on different files.
fn take(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    for _ in 0..3 {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = owner.trim();
                let who = if owner.is_empty() {
                    "another convpress process".to_string()
                } else {
                    format!("another convpress process (pid {owner})")
                };
                bail!("{} is in use by {who}", dir.display());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        if !still_linked(&file, &path) {
            continue;
        }
        // The holder's pid, for the message another process gets.
        file.set_len(0)
            .and_then(|()| write!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(file);
    }
    bail!(
        "cannot lock {}: its lock file keeps being replaced",
        dir.display()
    )
}

/// Whether `file` is still the file at `path` (same inode), not one unlinked since it was opened.
fn still_linked(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(&self.key) {
            h.holders -= 1;
            if h.holders == 0 {
                // A folder this process made and left empty is removed while the lock is
                // still held, then the lock is released (by dropping the file).
                if h.created && contents(&self.key).is_ok_and(|c| c.is_empty()) {
                    let _ = std::fs::remove_file(self.key.join(LOCK_FILE));
                    let _ = std::fs::remove_dir(&self.key);
                }
                held.remove(&self.key);
            }
        }
    }
}

/// What `dir` holds besides the lock file and temporary files of interrupted writes, sorted.
pub fn contents(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LOCK_FILE || (name.starts_with('.') && name.contains(".tmp-")) {
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

fn listing(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
    if names.len() > shown.len() {
        format!(
            "{}, and {} more",
            shown.join(", "),
            names.len() - shown.len()
        )
    } else {
        shown.join(", ")
    }
}

/// Refuses to write `out` if it is one of `inputs` (the same file, by any path) or if it
/// exists and `force` is not set: no command overwrites its input, nor a file it did not
/// create, unless asked. `flag` names the option that chose `out`.
pub fn claim_output(out: &Path, inputs: &[&Path], force: bool, flag: &str) -> anyhow::Result<()> {
    for input in inputs {
        if same_file(out, input) {
            bail!(
                "{flag} {} is the input file: convpress never overwrites its input; choose another {flag}",
                out.display()
            );
        }
    }
    if out.exists() && !force {
        bail!(
            "{} exists already: choose another {flag}, or pass --force to replace it",
            out.display()
        );
    }
    if out.is_dir() {
        bail!("{flag} {} is a folder, not a file", out.display());
    }
    Ok(())
}

/// Whether two paths name one existing file: the same canonical path, or (on Unix) the same
/// device and inode, which also catches hard links.
fn same_file(a: &Path, b: &Path) -> bool {
    if let (Ok(x), Ok(y)) = (std::fs::canonicalize(a), std::fs::canonicalize(b))
        && x == y
    {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}
