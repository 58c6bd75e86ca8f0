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

/// How many times candle's barrier-pool workers spin for the next element-wise kernel before they
/// park (candle's default: 25 000). While a matrix product runs on rayon's threads the pool's worker
/// keeps spinning and takes a core from it; on 2 cores a shorter spin is faster wherever matrix
/// products dominate. Measured on this project's 2-core machine, `fedleak bench` alternated against the
/// default, medians: tiny-ViT attack step at batch 8 188-214 -> 156-173 ms, ViT-B/16 attack step at
/// batch 1 1776-1808 -> 1549-1630 ms, tiny-ViT training step at batch 16 138-144 -> 123-135 ms; the
/// tiny-ViT attack step at batch 1 on two threads loses a little (24-32 -> 24-36 ms; `fedleak attack`
/// runs restarts on one thread each, where no worker spins). Against PyTorch (`tests/bench/compare_torch.sh`, 3 rounds each, ratios fedleak/torch) 25 000 /
/// 10 000 / 4000 gave: attack step tiny b=1 0.90 / 1.01 / 1.11, tiny b=8 1.77 / 1.72 / 1.71, ViT-B/16
/// b=1 0.95 / 0.83 / 0.75; training step tiny b=8 2.01 / 1.80 / 1.62.
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` in the environment overrides it. It matters only when the pool has
/// workers: fedleak runs element-wise ops without them (see [`ELEMENTWISE_POOL_THREADS`]) unless
/// `CANDLE_NUM_THREADS` asks for more.
const BARRIER_POOL_SPIN_LIMIT: u32 = 4000;

/// Threads of candle's pool for element-wise ops (1: each op runs on its caller's thread; candle's
/// default is the kernel thread count). The passes that dominate fedleak's time run their own fused
/// loops and matrix products on rayon's threads (`--threads`), the two halves of a batch at once;
/// candle's pool takes one caller at a time and its worker spins for the next op, so it only competes
/// with them. Measured on this project's 2-core machine (2026-12-06, `fedleak bench --threads 2`,
/// the same binary with `CANDLE_NUM_THREADS=2` and without, medians of four alternated rounds), pool
/// of 2 threads -> 1: tiny-ViT attack step at batch 8 66.7 -> 63.7 ms, training step at batch 16
/// 80.5 -> 67.0 ms, ViT-B/16 attack step 1189 -> 1173 ms, tiny batch-1 attack and training steps
/// 20.3 -> 19.8 and 9.4 -> 8.7 ms. `CANDLE_NUM_THREADS` in the environment overrides it.
const ELEMENTWISE_POOL_THREADS: usize = 1;

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
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", ELEMENTWISE_POOL_THREADS.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var(
            "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            BARRIER_POOL_SPIN_LIMIT.to_string(),
        );
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
