//! Configuration: command-line flags with environment fallbacks, turned once into
//! a validated [`Config`] (bad configuration stops start-up with one clear line).

use std::net::IpAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::ipc::WorkerId;

#[derive(Debug, Parser)]
#[command(name = "session-server", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Internal: run as a room worker for the supervisor that spawned this process.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Flags of the server (the supervisor; workers get theirs from it).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Port to listen on (0 picks a free port; the log says which).
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Number of worker processes [default: number of CPUs].
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,
    /// Most rooms one worker holds; when every worker is full, new rooms get HTTP 503.
    #[arg(long, env = "ROOMS_PER_WORKER", default_value_t = 100)]
    pub rooms_per_worker: usize,
    /// Secret that verifies client tokens (HS256). Prefer the environment variable.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Require the token's `host` claim (and check it against the Host header).
    /// Set to false for backends that do not set the claim; a present claim is
    /// still checked.
    #[arg(long, env = "REQUIRE_HOST_CLAIM", default_value_t = true, action = ArgAction::Set)]
    pub require_host_claim: bool,
    /// Interval between pings to an idle client; a client silent for two
    /// intervals is dropped.
    #[arg(long, env = "PING_INTERVAL_MS", default_value_t = 30_000)]
    pub ping_interval_ms: u64,
    /// Board persistence service. Not implemented in this build: shapes are kept
    /// in memory while a room is open.
    #[arg(long, env = "BACKEND_URL")]
    pub backend_url: Option<String>,
}

/// Flags of a worker process, set by the supervisor that spawns it.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Name of the supervisor's local socket to connect to.
    #[arg(long)]
    pub ipc: String,
    #[arg(long)]
    pub worker_id: u32,
}

/// Environment variable carrying the handshake nonce from supervisor to worker
/// (the environment of a process is readable only by its owner, unlike argv).
pub const WORKER_NONCE_ENV: &str = "SESSION_SERVER_WORKER_NONCE";

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub bind: IpAddr,
    pub workers: usize,
    pub rooms_per_worker: usize,
    pub jwt_secret: String,
    pub require_host_claim: bool,
    pub ping_interval: Duration,
    /// Accepted for compatibility; persistence is not implemented yet.
    pub backend_url: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("JWT_SECRET is required: set it to the secret the backend signs client tokens with")]
    MissingJwtSecret,
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("--rooms-per-worker must be at least 1")]
    NoRooms,
    #[error("--ping-interval-ms must be at least 10")]
    PingTooShort,
}

impl ServeArgs {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let jwt_secret = self
            .jwt_secret
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::MissingJwtSecret)?;
        let workers = self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if workers == 0 {
            return Err(ConfigError::NoWorkers);
        }
        if self.rooms_per_worker == 0 {
            return Err(ConfigError::NoRooms);
        }
        if self.ping_interval_ms < 10 {
            return Err(ConfigError::PingTooShort);
        }
        Ok(Config {
            port: self.port,
            bind: self.bind,
            workers,
            rooms_per_worker: self.rooms_per_worker,
            jwt_secret,
            require_host_claim: self.require_host_claim,
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            backend_url: self.backend_url,
        })
    }
}

impl WorkerArgs {
    pub fn worker_id(&self) -> WorkerId {
        WorkerId(self.worker_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn missing_secret_is_a_configuration_error() {
        let cli = parse(&["--workers", "2"]);
        // The environment may define JWT_SECRET; the check is on the value.
        let mut serve = cli.serve;
        serve.jwt_secret = None;
        assert_eq!(serve.validate().unwrap_err(), ConfigError::MissingJwtSecret);
    }

    #[test]
    fn flags_become_a_config() {
        let cli = parse(&[
            "--port",
            "0",
            "--workers",
            "3",
            "--rooms-per-worker",
            "7",
            "--jwt-secret",
            "s",
            "--require-host-claim",
            "false",
        ]);
        let config = cli.serve.validate().unwrap();
        assert_eq!(config.port, 0);
        assert_eq!(config.workers, 3);
        assert_eq!(config.rooms_per_worker, 7);
        assert_eq!(config.jwt_secret, "s");
        assert!(!config.require_host_claim);
    }

    #[test]
    fn zero_workers_is_refused() {
        let cli = parse(&["--workers", "0", "--jwt-secret", "s"]);
        assert_eq!(cli.serve.validate().unwrap_err(), ConfigError::NoWorkers);
    }
}
