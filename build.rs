//! With the `agones` feature: generates the server side of the Agones SDK's gRPC
//! protocol for the tests' fake SDK server (see `tests/agones/README.md`). Without
//! it, nothing: `cargo build` needs no `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "agones")]
    {
        println!("cargo:rerun-if-changed=tests/agones/proto");
        let root = "tests/agones/proto";
        tonic_build::configure()
            .build_client(false)
            .build_server(true)
            .compile_protos(
                &[
                    format!("{root}/sdk/sdk.proto"),
                    format!("{root}/sdk/beta/beta.proto"),
                ],
                &[
                    format!("{root}/googleapis"),
                    format!("{root}/grpc-gateway"),
                    format!("{root}/sdk"),
                    format!("{root}/sdk/beta"),
                ],
            )
            .expect("generate the Agones SDK server from tests/agones/proto (needs protoc)");
    }
}
