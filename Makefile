# execd — two commands on a fresh machine:
#   make demo   install what is missing, build, serve config/execd.yaml on 127.0.0.1:8080
#   make test   install what is missing, build, run every test
# The build cache lives outside the checkout so fresh clones reuse it.

CARGO_TARGET_DIR ?= $(HOME)/.cache/execd/target
PLUGINS_TARGET_DIR ?= $(HOME)/.cache/execd/plugins-target
export CARGO_TARGET_DIR PLUGINS_TARGET_DIR

EXECD := $(CARGO_TARGET_DIR)/release/execd
# The static (musl) execd that the image ships and app images copy.
MUSL_TARGET := x86_64-unknown-linux-musl
EXECD_STATIC := $(CARGO_TARGET_DIR)/$(MUSL_TARGET)/release/execd
# hadolint and PyYAML, in a venv of their own (scripts/setup.sh --docker).
EXECD_TOOLS ?= $(HOME)/.cache/execd/tools
export EXECD_TOOLS

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
	$(MAKE) --no-print-directory bench-smoke
	$(MAKE) --no-print-directory docker-lint docker-check

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --manifest-path plugins/Cargo.toml --all -- --check
	cargo clippy --manifest-path plugins/Cargo.toml --workspace --all-targets \
		--target-dir $(HOME)/.cache/execd/plugins-native -- -D warnings

check: lint test

# Benchmarks (bench/): execd vs webhook, amqp-consume and the spawner limit,
# all on 127.0.0.1; writes docs/benchmarks.md and docs/benchmarks.png.
bench: plugins
	scripts/setup.sh --bench
	cargo build --release -p execd -p execd-bench-spawner
	if [ -f host/benches/plugins.rs ]; then cargo bench -p execd --bench plugins --no-run; fi
	bench/run.sh --execd $(EXECD) --spawner $(CARGO_TARGET_DIR)/release/spawner

# One short iteration of every scenario on the debug build (make test runs
# it so the harness cannot rot); asserts only that each peer produced numbers.
bench-smoke:
	scripts/setup.sh --bench
	cargo build -p execd -p execd-bench-spawner
	python3 bench/bench.py --smoke --execd $(CARGO_TARGET_DIR)/debug/execd --spawner $(CARGO_TARGET_DIR)/debug/spawner

# Shipping (docs/deploy.md). No Docker engine runs here, so the Dockerfiles
# are linted, and checked against what the build produces, without one.
.PHONY: setup-static static docker-lint docker-check

setup-static:
	@scripts/setup.sh --no-rabbitmq --static

# The binary the Dockerfile builds, with the same flags (symbols stripped at
# link); `build` stays the glibc one for local use.
static: setup-static
	CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release -p execd --bin execd --target $(MUSL_TARGET)
	@echo "static: $(EXECD_STATIC): $$(stat -c %s $(EXECD_STATIC)) bytes"

DOCKERFILES := Dockerfile $(wildcard examples/*/Dockerfile*)

docker-lint:
	@scripts/setup.sh --no-rabbitmq --docker
	$(EXECD_TOOLS)/bin/hadolint --config .hadolint.yaml $(DOCKERFILES)

# The static binary starts and serves; every COPY of every Dockerfile finds
# what the build made; the configs the images, compose and k8s use load.
docker-check: static plugins
	@scripts/setup.sh --no-rabbitmq --docker
	scripts/static-smoke.sh $(EXECD_STATIC)
	$(EXECD_TOOLS)/bin/python3 scripts/check-delivery.py

clean:
	cargo clean
