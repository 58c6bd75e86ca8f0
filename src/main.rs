//! The `fedleak` command line: parse, call the library, print once, map errors to exit codes.
//!
//! Exit codes: 0 success; 2 bad usage, configuration or input (the message names the file or option
//! and how to fix it); 1 runtime failure. Results go to files and, for scripts, a JSON line on stdout;
//! messages go to stderr.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// candle allocates every op's output afresh; mimalloc keeps freed pages for reuse instead of handing
/// large buffers back to the OS and faulting them in again (`fedleak bench` measures the difference).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    // candle reads this once per thread, before the first backward pass: without it second-order
    // gradients are silently wrong (the attacks refuse to take one then). Set before any thread
    // starts, and only when needed: it makes every backward pass keep its graph.
    if args.needs_second_order_gradients() {
        fedleak_attacks::enable_second_order_gradients();
    }
    if let Some(threads) = args.kernel_threads() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    cli::init_logging(args.global.quiet);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cli::render_error(&error));
            ExitCode::from(cli::exit_code(&error))
        }
    }
}
