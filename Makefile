# Layer gateway: `make run` starts the whole gateway locally, `make test` is the full check.
SHELL := /bin/bash
.DEFAULT_GOAL := help

WASM_TARGET := wasm32-wasip1
FILTER_WASM := target/$(WASM_TARGET)/release/hevlayer_filter.wasm
export HEVLAYER_FILTER_WASM ?= $(CURDIR)/$(FILTER_WASM)

.PHONY: help
help:
	@echo "make run    - start Envoy + filter + sidecar + local Turbopuffer emulator"
	@echo "make test   - fmt, clippy, native tests, wasm build, wasmtime-hosted tests"
	@echo "make bench  - benchmarks"
	@echo "make wasm   - release build of the filter for $(WASM_TARGET)"

.PHONY: wasm
wasm: $(FILTER_WASM)

$(FILTER_WASM): FORCE
	cargo build --release --target $(WASM_TARGET) -p hevlayer-filter

.PHONY: fmt-check
fmt-check:
	cargo fmt --all --check

.PHONY: clippy
clippy:
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target $(WASM_TARGET) -p hevlayer-filter --release -- -D warnings

.PHONY: test-native
test-native:
	cargo test --workspace --exclude hevlayer-tests

.PHONY: test-wasm
test-wasm: wasm
	cargo test -p hevlayer-tests

.PHONY: test
test: fmt-check clippy test-native test-wasm

.PHONY: bench
bench: wasm
	cargo run --release -p hevlayer-tests --bin filter-bench

.PHONY: FORCE
FORCE:
