use clap::Parser;

fn main() {
    convpress::kernels::memory::keep_freed_buffers();
    let cli = convpress::cli::Cli::parse();
    if let Err(e) = convpress::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
