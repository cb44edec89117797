# syntax=docker/dockerfile:1
# sockmesh agent image: build stage with the eBPF toolchain, small runtime stage.
# Build: docker build -t sockmesh:0.1.0 .

FROM rust:1.95-bookworm AS build
# The kernel programs need a toolchain named `nightly` with rust-src and bpf-linker 0.10.0
# (the newest that links with rustc's own LLVM); see README "Development".
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && cargo install bpf-linker --version 0.10.0 --locked
WORKDIR /src
COPY . .
RUN cargo build --release -p sockmesh --locked \
 && install -D target/release/sockmesh /out/sockmesh

FROM debian:bookworm-slim
# ca-certificates: TLS to the API server (rustls reads the service account CA file itself,
# but a --kubeconfig may point at a server signed by a public CA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/sockmesh /usr/local/bin/sockmesh
ENTRYPOINT ["/usr/local/bin/sockmesh"]
CMD ["run", "--kube"]
