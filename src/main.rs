use clap::Parser;

fn main() {
    stop_quietly_on_closed_pipes();
    convpress::kernels::memory::keep_freed_buffers();
    let cli = convpress::cli::Cli::parse();
    if let Err(e) = convpress::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `convpress bench ops | head -3` should end quietly when `head` closes the pipe, as other
/// Unix tools do. Rust ignores SIGPIPE, so the next `println!` would panic on the write error
/// instead; restoring the default action lets the signal end the process.
fn stop_quietly_on_closed_pipes() {
    #[cfg(unix)]
    // SAFETY: sets a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
