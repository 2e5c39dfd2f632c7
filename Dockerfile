# syntax=docker/dockerfile:1
#
# The execd image: a static (musl) execd, the shipped plugins and an example
# config on Alpine. Its main use is as a source for app images:
#
#   COPY --from=registry.private.local/execd:<tag> /usr/local/bin/execd /usr/local/bin/execd
#
# so the Rust build never runs in a PHP app's pipeline (examples/php-app/).
# Build, push and deploy: docs/deploy.md. `make docker-lint` lints this file
# and scripts/check-delivery.py checks that what it copies is what the
# build produces.
#
#   chef ──> planner ──> host (dependencies layer, then execd) ──┐
#        └─> plugins (wasm32, components) ────────────────────────┴─> runtime

# ---- chef: the toolchain both build stages share ---------------------------
FROM rust:1.95-slim-trixie AS chef
# musl-tools gives musl-gcc: ring (lapin's TLS, via rustls) compiles C for the
# musl target.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl wasm32-wasip2 wasm32-unknown-unknown \
    && cargo install cargo-chef --version 0.1.77 --locked
WORKDIR /src
# The same flags as `make static`, so the binary here is the one the Makefile
# builds and measures: symbols stripped at link time.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TARGET_DIR=/src/target

# ---- planner: reduce the workspace to its manifests ------------------------
# recipe.json changes only when a Cargo.toml or Cargo.lock does, so the cook
# layer below stays cached across source changes.
FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
# Every workspace member, or cargo cannot load the workspace.
COPY host/ host/
COPY bench/spawner/ bench/spawner/
RUN cargo chef prepare --recipe-path recipe.json

# ---- host: dependencies (cached layer), then execd itself ------------------
FROM chef AS host
COPY --from=planner /src/recipe.json recipe.json
# -p execd, as in the build below: dependency features are unified over the
# packages built, so cooking the whole workspace could leave the build below
# with different features, and recompiling dependencies after all.
RUN cargo chef cook --release --target x86_64-unknown-linux-musl -p execd --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY host/ host/
COPY bench/spawner/ bench/spawner/
# host/src compiles these in: the WIT contract (wasmtime's bindgen!) and the
# plugin template (`execd plugin new`).
COPY wit/ wit/
COPY plugins/template/ plugins/template/
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p execd --bin execd

# ---- plugins: the WebAssembly components -----------------------------------
# Independent of the host stage: a change in host/src does not rebuild them,
# and a plugin change does not rebuild execd. The SDK's build.rs reads
# ../../wit/execd-plugin.wit, hence wit/.
FROM chef AS plugins
COPY wit/ wit/
COPY plugins/ plugins/
# hostile.wasm misbehaves on purpose for the sandbox tests; it never ships.
RUN PLUGINS_TARGET_DIR=/src/plugins-target plugins/build.sh \
    && rm plugins/dist/hostile.wasm

# ---- runtime ----------------------------------------------------------------
# Alpine rather than scratch: busybox wget for HEALTHCHECK and a /bin/sh for
# routes that ask for `shell: true`, for about 8 MB.
FROM alpine:3.22 AS runtime
RUN addgroup -S -g 10001 execd \
    && adduser -S -D -H -u 10001 -G execd -h /nonexistent -s /sbin/nologin execd
COPY --from=host /src/target/x86_64-unknown-linux-musl/release/execd /usr/local/bin/execd
COPY --from=plugins /src/plugins/dist/ /usr/local/lib/execd/plugins/
COPY config/image.yaml /etc/execd/execd.yaml
ENV EXECD_CONFIG=/etc/execd/execd.yaml \
    EXECD_LOG_FORMAT=json \
    EXECD_PLUGINS=/usr/local/lib/execd/plugins
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 8080: the routes (config/image.yaml). 9090: the admin listener (/healthz,
# /readyz, /metrics), which listens on 127.0.0.1 unless the config says
# otherwise; HEALTHCHECK runs inside the container, so it reaches it anyway.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/execd"]
CMD ["serve"]
