# execd — two commands on a fresh machine:
#   make demo   install what is missing, build, serve config/execd.yaml on 127.0.0.1:8080
#   make test   install what is missing, build, run every test
# The build cache lives outside the checkout so fresh clones reuse it.

CARGO_TARGET_DIR ?= $(HOME)/.cache/execd/target
PLUGINS_TARGET_DIR ?= $(HOME)/.cache/execd/plugins-target
export CARGO_TARGET_DIR PLUGINS_TARGET_DIR

EXECD := $(CARGO_TARGET_DIR)/release/execd

.PHONY: all setup build plugins demo test lint fmt check bench bench-smoke clean

all: build

setup:
	@scripts/setup.sh

setup-nobroker:
	@scripts/setup.sh --no-rabbitmq

build: setup-nobroker plugins
	cargo build --release -p execd

plugins: setup-nobroker
	plugins/build.sh

demo: build
	$(EXECD) check -c config/execd.yaml
	$(EXECD) serve -c config/execd.yaml

test: setup plugins
	cargo test --workspace --all-targets -- --test-threads=4
	cargo test --manifest-path plugins/Cargo.toml --target-dir $(HOME)/.cache/execd/plugins-native

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

check: lint test

clean:
	cargo clean
