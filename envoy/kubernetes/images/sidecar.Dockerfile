# The hevlayer sidecar. Build from the repository root (sidecar.Dockerfile.dockerignore keeps
# target/ and .tools/ out of the context):
#   docker build -f envoy/kubernetes/images/sidecar.Dockerfile -t REGISTRY/hevlayer/sidecar:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
# The image's toolchain, not a fresh "stable" download for rust-toolchain.toml.
ENV RUSTUP_TOOLCHAIN=1.95.0
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p hevlayer-sidecar

FROM debian:bookworm-slim
COPY --from=build /src/target/release/hevlayer-sidecar /usr/local/bin/hevlayer-sidecar
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/hevlayer-sidecar"]
