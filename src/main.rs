//! `session-server`: the supervisor, or (when it re-executes itself) a room
//! worker (see `src/lib.rs`).

fn main() -> std::process::ExitCode {
    session_server::main()
}
