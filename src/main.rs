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

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (mimalloc.h, v2 and v3 alike); the Rust
/// bindings name the options around it (14, 16) but not this one.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory for reuse instead of purging it 10 ms later: a ViT-B/16 attack step frees and
    // reallocates hundreds of MB per pass, and purged pages come back through page faults that zero
    // them (one kernel thread: 3.5 -> 2.8 s per step; peak RSS +27 MB). A short-lived command loses
    // nothing by keeping its high-water mark.
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table; it runs first thing
    // in `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args = cli::Args::parse();
    // candle reads this once per thread, before the first backward pass: without it second-order
    // gradients are silently wrong (the attacks refuse to take one then). Set before any thread
    // starts, and only when needed: it makes every backward pass keep its graph.
    if args.needs_second_order_gradients() {
        fedleak_attacks::enable_second_order_gradients();
    }
    // Always pinned, also when candle's default (the physical cores) stands: candle asks for its thread
    // count on every matrix product, and without this variable it counts the physical cores by reading
    // /proc/cpuinfo each time. Tiny ViT on 2 cores, `fedleak bench` without `--threads`, old and new
    // alternated: attack step at batch 1 37-38 -> 24-26 ms, batch 8 195-205 -> 176-198 ms; training
    // step at batch 16 140-174 -> 129-136 ms.
    let threads = args
        .kernel_threads()
        .unwrap_or_else(candle_core::utils::get_num_threads);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    cli::init_logging(args.global.quiet);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cli::render_error(&error));
            ExitCode::from(cli::exit_code(&error))
        }
    }
}
