# Layer gateway: `make run` starts the whole gateway locally, `make test` is the full check.
SHELL := /bin/bash
.DEFAULT_GOAL := help

WASM_TARGET := wasm32-wasip1
FILTER_WASM := target/$(WASM_TARGET)/release/hevlayer_filter.wasm
export HEVLAYER_FILTER_WASM ?= $(CURDIR)/$(FILTER_WASM)

# Tools installed by the Makefile itself (ignored by git): a Python venv with Envoy and the test
# clients, and the Turbopuffer emulator.
TOOLS := $(CURDIR)/.tools
VENV := $(TOOLS)/venv
PY := $(VENV)/bin/python
ENVOY := $(VENV)/bin/envoy
MINIFUGU := $(TOOLS)/bin/minifugu

.PHONY: help
help:
	@echo "make run    - start Envoy + filter + sidecar + local Turbopuffer emulator"
	@echo "make test   - fmt, clippy, native tests, wasm build, wasmtime-hosted and end-to-end tests"
	@echo "make bench  - benchmarks (filter, sidecar, gateway)"
	@echo "make wasm   - release build of the filter for $(WASM_TARGET)"
	@echo "make tools  - install Envoy, the emulator and the Python test tools into .tools/"

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

# Extra checks appended by the sections below (Envoy validation, end-to-end tests, ...).
TEST_EXTRA :=
BENCH_EXTRA :=

.PHONY: bench-filter
bench-filter: wasm
	cargo build --release --target $(WASM_TARGET) -p hevlayer-wasm-bench
	cargo run --release -p hevlayer-tests --bin filter-bench

.PHONY: bench-sidecar
bench-sidecar:
	cargo run --release -p hevlayer-sidecar --bin sidecar-bench -- --strict

.PHONY: FORCE
FORCE:

# ---- Envoy, tools, `make run`, end-to-end tests --------------------------------------------

# ---- Kubernetes manifests (envoy/kubernetes) and their offline validation -----------------

# ---- end of sections -------------------------------------------------------------------------

.PHONY: test
test: fmt-check clippy test-native test-wasm $(TEST_EXTRA)

.PHONY: bench
bench: bench-filter bench-sidecar $(BENCH_EXTRA)
