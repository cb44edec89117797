# syntax=docker/dockerfile:1
# sockmesh agent image: build stage with the eBPF toolchain, small runtime stage.
# Build: docker build -t sockmesh:0.1.0 .
#
# Build arguments:
#   RUST_IMAGE, BASE_IMAGE  the build and runtime base images; with no registry at hand, a
#                           local Debian base works (e.g. made with mmdebstrap and imported,
#                           as the container test does: tests/src/image.rs)
#   AGENT=prebuilt          take the agent binary `sockmesh` from the build context instead of
#                           compiling it (the container test passes the binary its suite built);
#                           the runtime stage, what ships, is the same either way
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
ARG AGENT=build

FROM ${RUST_IMAGE} AS build
# The kernel programs need a toolchain named `nightly` with rust-src and bpf-linker 0.10.0
# (the newest that links with rustc's own LLVM); see README "Development".
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && cargo install bpf-linker --version 0.10.0 --locked
WORKDIR /src
COPY . .
RUN cargo build --release -p sockmesh --locked \
 && install -D target/release/sockmesh /out/sockmesh

FROM scratch AS prebuilt
COPY sockmesh /out/sockmesh

# The stage named by AGENT; only that one is built.
FROM ${AGENT} AS agent

FROM ${BASE_IMAGE}
# ca-certificates: TLS to the API server (rustls reads the service account CA file itself,
# but a --kubeconfig may point at a server signed by a public CA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=agent /out/sockmesh /usr/local/bin/sockmesh
ENTRYPOINT ["/usr/local/bin/sockmesh"]
CMD ["run", "--kube"]
