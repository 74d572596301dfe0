# syntax=docker/dockerfile:1
#
# Freshet's container image: the `freshet` CLI and the `freshet-coordinator` and
# `freshet-worker` binaries on a distroless base, as the non-root user 10001.
#
#   docker build -t freshet:dev .
#   docker run --rm freshet:dev --help
#
# The build needs no system protoc: .cargo/config.toml points PROTOC at tools/protoc,
# which runs the protoc that the protoc-bin-vendored crate ships (x86_64). Other build
# architectures use Debian's protoc instead (see below).

ARG RUST_VERSION=1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
# cmake and clang: fallbacks some -sys crates (aws-lc-sys, zstd-sys) use to build C code.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang \
 && if [ "${TARGETARCH:-amd64}" != "amd64" ]; then apt-get install -y --no-install-recommends protobuf-compiler; fi \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace (less .dockerignore): every member crate, Cargo.lock, .cargo/ and
# tools/, so a new crate in the workspace needs no change here.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    if [ "${TARGETARCH:-amd64}" != "amd64" ]; then export PROTOC=/usr/bin/protoc; fi \
 && cargo build --release --locked -p freshet-cli --bins \
 && mkdir -p /out \
 && install -m 0755 target/release/freshet target/release/freshet-coordinator \
      target/release/freshet-worker /out/

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="freshet" \
      org.opencontainers.image.description="Keeps Delta Lake tables fresh: a coordinator plans merge cycles, stateless workers rewrite Parquet files" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
# Numeric, so Kubernetes can check runAsNonRoot; the Helm chart runs as the same uid.
USER 10001:10001
WORKDIR /tmp
# Coordinator gRPC and HTTP (metrics, probes); worker gRPC and HTTP.
EXPOSE 50051 9090 50061 9091
ENTRYPOINT ["/usr/local/bin/freshet"]
CMD ["--help"]
