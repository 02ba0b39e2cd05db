//! What the machine can give a command: memory for the large buffers it is about to allocate,
//! and worker threads. Sizes that cannot succeed are refused up front with the figure and the
//! limit, instead of the process aborting in the allocator (or starting threads for minutes).

use anyhow::bail;

/// Worker threads allowed per core: more than this only adds switching, and a mistyped
/// `--threads 100000` would spend minutes starting threads.
pub const THREADS_PER_CORE: usize = 4;

/// Refuses a thread count of 0 or above [`THREADS_PER_CORE`] times the cores.
pub fn check_threads(n: usize) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = THREADS_PER_CORE * cores;
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    if n > cap {
        bail!(
            "--threads {n} is more than {THREADS_PER_CORE} per core ({cap} on this machine's {cores} cores): use at most {cap}"
        );
    }
    Ok(())
}

/// The longest a single measurement may be asked to run: a week.
pub const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// Refuses a duration that is not a positive number of seconds up to [`MAX_SECONDS`] (beyond
/// it `Duration::from_secs_f64` would panic on overflow long before anyone waits that long).
pub fn check_seconds(flag: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 && v <= MAX_SECONDS {
        Ok(())
    } else {
        Err(format!(
            "{flag} must be a positive number of seconds, at most {MAX_SECONDS} (a week), got {v}"
        ))
    }
}

/// Bytes of memory this process may plan to use: the kernel's estimate of what is available
/// (`MemAvailable` in `/proc/meminfo`), or 16 GiB where that cannot be read.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(16 << 30, |kb| kb.saturating_mul(1024))
}

/// `count` values of `bytes_each` bytes, or `None` if the product overflows.
pub fn bytes_of(count: &[usize], bytes_each: usize) -> Option<u64> {
    count
        .iter()
        .try_fold(bytes_each as u64, |a, &d| a.checked_mul(d as u64))
}

/// Refuses `what` if it needs more than the available memory. `bytes` is `None` when the size
/// overflowed 64 bits; `fix` says which setting to change.
pub fn check_memory(what: &str, bytes: Option<u64>, fix: &str) -> anyhow::Result<()> {
    let limit = available_memory();
    match bytes {
        Some(b) if b <= limit => Ok(()),
        Some(b) => bail!(
            "{what} needs {}, more than the {} of memory available: {fix}",
            human(b),
            human(limit)
        ),
        None => bail!("{what} needs more than 2^64 bytes: {fix}"),
    }
}

/// `1.5 GiB`, `340.0 MiB`.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// Refuses a batch of `batch` images through `arch` that could not fit in memory: the input
/// and the two largest activations for inference, the input and every activation three times
/// (value, gradient, a temporary) for training. A lower bound of what the engine allocates,
/// so whatever it refuses would certainly have failed.
pub fn check_batch(
    arch: &crate::models::Arch,
    batch: usize,
    training: bool,
    flag: &str,
) -> anyhow::Result<()> {
    let input: usize = arch.input.iter().product();
    let outputs: Vec<usize> = arch
        .layer_stats()
        .iter()
        .map(|s| s.output.numel())
        .collect();
    let per_image = if training {
        outputs.iter().try_fold(input as u64, |a, &n| {
            a.checked_add((n as u64).checked_mul(3)?)
        })
    } else {
        let mut sorted = outputs;
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sorted
            .iter()
            .take(2)
            .try_fold(input as u64, |a, &n| a.checked_add(n as u64))
    };
    let bytes = per_image
        .and_then(|v| v.checked_mul(batch as u64))
        .and_then(|v| v.checked_mul(4));
    let what = format!(
        "a batch of {batch} images through {} ({})",
        arch.name,
        if training { "training" } else { "inference" }
    );
    check_memory(&what, bytes, &format!("use a smaller {flag}"))
}
