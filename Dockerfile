# session-server: build in the official Rust image, run in a slim Debian image as
# a non-root user. The image runs anywhere a container runs; with the `agones`
# feature built in, it also speaks the Agones SDK when Agones starts it (the pod
# has AGONES_SDK_GRPC_PORT set). See deploy/ and the README's "Production".

FROM rust:1.95-slim-bookworm AS build
# protoc: the Agones SDK's gRPC code is generated at build time (libprotobuf-dev
# holds the well-known .proto files it imports: empty, wrappers, field_mask).
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when a manifest, the
# lock file or the build script change, not on every source change. Every
# workspace member's manifest and an empty root stand in for the sources.
COPY Cargo.toml Cargo.lock build.rs ./
COPY contract/Cargo.toml contract/
COPY transport/Cargo.toml transport/
COPY supervisor/Cargo.toml supervisor/
COPY worker/Cargo.toml worker/
COPY loadgen/Cargo.toml loadgen/
COPY tests/agones/proto tests/agones/proto
RUN mkdir -p src benches loadgen/src \
 && for f in contract/lib.rs transport/lib.rs supervisor/lib.rs worker/lib.rs; do touch $f; done \
 && for f in src/main.rs loadgen/src/main.rs benches/recovery.rs benches/encode.rs; do echo 'fn main() {}' > $f; done \
 && cargo build --release --locked --features agones --bin session-server \
 && rm -rf src benches loadgen/src contract/lib.rs transport/lib.rs supervisor/lib.rs worker/lib.rs
# Then the sources (the load generator's only as far as the workspace needs).
COPY src src
COPY contract contract
COPY transport transport
COPY supervisor supervisor
COPY worker worker
COPY loadgen/src loadgen/src
COPY benches benches
# The dev board's TypeScript client (compiled, committed).
COPY clients/typescript/dist clients/typescript/dist
RUN touch src/main.rs contract/lib.rs transport/lib.rs supervisor/lib.rs worker/lib.rs \
 && cargo build --release --locked --features agones --bin session-server \
 && strip target/release/session-server

FROM debian:bookworm-slim
# CA certificates for an https BACKEND_URL; a user and a data folder for the
# embedded store.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /app/data \
 && chown app:app /app/data
COPY --from=build /src/target/release/session-server /usr/local/bin/session-server
# The same program under the name the design gives it: `supervisor --workers 4`.
RUN ln -s session-server /usr/local/bin/supervisor
WORKDIR /app
USER 10001
ENV PORT=8000 \
    DATA_DIR=/app/data
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/session-server"]
