#!/usr/bin/env bash
# Installs what execd's build, demo and tests need and is missing:
#   - the wasm32-wasip2 Rust target (plugins), with rustup
#   - php-cli (the example and test scripts), with apt-get when root
#   - a RabbitMQ broker answering on 127.0.0.1:5672 (AMQP tests), started
#     with `rabbitmq-server -detached`, installed with apt-get when missing
# Usage: scripts/setup.sh [--no-rabbitmq] [--bench]
set -euo pipefail

want_rabbit=1
want_bench=0
for a in "$@"; do
  case "$a" in
    --no-rabbitmq) want_rabbit=0 ;;
    --bench) want_bench=1 ;;
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
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  say "rustup target add wasm32-wasip2"
  rustup target add wasm32-wasip2 >&2
fi

command -v php >/dev/null || apt_install php-cli

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
