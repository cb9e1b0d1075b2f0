//! The same program under the name the design gives it (`supervisor --workers
//! 4`): `cargo run --release --bin supervisor -- --workers 4`; the container
//! image has both names.

fn main() -> std::process::ExitCode {
    session_server::main()
}
