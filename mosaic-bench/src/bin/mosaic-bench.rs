//! The Mosaic load tool: see `mosaic-bench --help`.

fn main() -> std::process::ExitCode {
    let load_process =
        std::env::args().nth(1).as_deref() == Some(mosaic_bench::load::LOAD_PROCESS_ARG);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = if load_process {
        rt.block_on(mosaic_bench::load::worker::run())
    } else {
        let args = <mosaic_bench::cli::Args as clap::Parser>::parse();
        rt.block_on(mosaic_bench::cli::run(args))
    };
    // Load processes and services end with their pipes; do not wait for stray tasks.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
