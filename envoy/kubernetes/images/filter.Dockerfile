# The hevlayer filter as an image: /plugin.wasm, alone in the last layer. The plain deployment's
# copy-filter init container runs `cp` from it (hence busybox, not scratch); Istio's wasm image
# fetcher accepts the same image (it reads plugin.wasm from the last layer). Build from the
# repository root:
#   docker build -f envoy/kubernetes/images/filter.Dockerfile -t REGISTRY/hevlayer/filter:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
ENV RUSTUP_TOOLCHAIN=1.95.0
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target wasm32-wasip1 -p hevlayer-filter

FROM busybox:1.37
COPY --from=build /src/target/wasm32-wasip1/release/hevlayer_filter.wasm /plugin.wasm
USER 65532:65532
