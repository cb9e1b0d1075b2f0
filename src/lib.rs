//! The one program, under two names (`session-server`, and `supervisor` as the
//! design names it: `src/main.rs`, `src/bin/supervisor.rs`): runs the
//! supervisor, or (when the supervisor re-executes it) a room worker.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use contract::config::{Cli, ConfigError, Mode};
use tracing_subscriber::EnvFilter;

mod init;

/// The program's `main`, whatever its name.
pub fn main() -> ExitCode {
    contract::alloc::configure();
    let cli = Cli::parse();
    if cli.mode.is_none() && init::needed() {
        return init::run();
    }
    // A salvage process's stdout is the supervisor's pipe, which may close
    // before it is done: its logs go to stderr.
    init_logs(matches!(cli.mode, Some(Mode::Salvage(_))));

    let result = match cli.mode {
        Some(Mode::Worker(args)) => worker::main(args).map(|()| ExitCode::SUCCESS),
        Some(Mode::Salvage(args)) => {
            worker::salvage::main(args.attempt).map(|()| ExitCode::SUCCESS)
        }
        None => match cli.serve.validate(&supervisor::detect_host()) {
            Ok(config) if config.agones.is_some() && !supervisor::AGONES_BUILT => {
                eprintln!(
                    "session-server: configuration error: {}",
                    ConfigError::AgonesNotBuilt
                );
                return ExitCode::from(2);
            }
            Ok(config) => {
                // Unusable TLS files are a configuration error like any other.
                if let Some(Err(e)) = config.tls.as_ref().map(supervisor::load_tls) {
                    eprintln!("session-server: configuration error: {e}");
                    return ExitCode::from(2);
                }
                supervisor::main(config).map(|outcome| match outcome {
                    supervisor::StopOutcome::EverythingSaved => ExitCode::SUCCESS,
                    supervisor::StopOutcome::NotAllSaved => {
                        ExitCode::from(supervisor::StopOutcome::NOT_ALL_SAVED_EXIT_CODE)
                    }
                })
            }
            Err(e) => {
                eprintln!("session-server: configuration error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs through `tracing`: level from `RUST_LOG` (default `info`), human-readable,
/// or one JSON object per line with `LOG_FORMAT=json`.
fn init_logs(to_stderr: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let json = std::env::var("LOG_FORMAT").as_deref() == Ok("json");
    match (json, to_stderr) {
        (true, false) => builder.json().with_current_span(true).init(),
        (true, true) => builder
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .init(),
        (false, false) => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        (false, true) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
}
