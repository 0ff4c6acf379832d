//! `fleetctl`, the CLI: parses the command line, starts the async runtime and hands over to
//! `fleetctl::run`, which returns the exit code of the CLI contract.
#![forbid(unsafe_code)]

use clap::FromArgMatches;

fn main() -> std::process::ExitCode {
    let mut command = fleetctl::args::command();
    let matches = command.get_matches_mut();
    let cli = match fleetctl::args::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.format(&mut command).exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(fleetctl::client::EXIT_FAILED);
        }
    };
    let exit_code = runtime.block_on(fleetctl::run(cli));
    // Do not wait for a `events --follow` or progress stream still open in the background.
    runtime.shutdown_background();
    std::process::ExitCode::from(exit_code)
}
