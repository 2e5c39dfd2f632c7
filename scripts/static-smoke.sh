#!/usr/bin/env bash
# The static execd starts and serves: checks that the musl binary has no
# program interpreter and no shared-library dependency (so it runs in
# Alpine and Debian images alike), then serves a tiny config on a free
# 127.0.0.1 port with a clean environment, answers a plain route and a route
# through a WebAssembly plugin (Cranelift compiling in the static binary),
# and exits 0 on SIGTERM.
#
# Usage: scripts/static-smoke.sh [BINARY]
#   BINARY defaults to $CARGO_TARGET_DIR/x86_64-unknown-linux-musl/release/execd
#   (`make static` builds it; `make docker-check` runs this after it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$HOME/.cache/execd/target}
bin=${1:-$target_dir/x86_64-unknown-linux-musl/release/execd}
plugin=$repo/plugins/dist/response-shape.wasm

die() { printf 'static-smoke: FAIL %s\n' "$*" >&2; exit 1; }
say() { printf 'static-smoke: %s\n' "$*"; }

[[ -x $bin ]] || die "$bin does not exist: run \`make static\`"
[[ -f $plugin ]] || die "$plugin does not exist: run \`make plugins\`"

# `file` says "static-pie linked" or "statically linked" depending on PIE;
# readelf is the ground truth: no INTERP header, no NEEDED entry.
say "$(file -b "$bin")"
if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
    die "$bin asks for a program interpreter (dynamically linked)"
fi
if readelf -dW "$bin" | grep -q '(NEEDED)'; then
    die "$bin needs shared libraries: $(readelf -dW "$bin" | grep '(NEEDED)' | tr -s ' ')"
fi
# glibc's ldd has no verdict of its own on a static binary; it only must not
# list a library.
ldd_out=$(ldd "$bin" 2>&1 || true)
say "ldd: $ldd_out"
grep -q '=>' <<<"$ldd_out" && die "ldd lists shared libraries"

tmp=$(mktemp -d)
pid=
cleanup() {
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$tmp/execd.yaml" <<EOF
listen: 127.0.0.1:$port
plugins:
  envelope:
    path: $plugin
    config: { mode: envelope }
routes:
  - url: /ping
    cmd: /bin/echo pong
  - url: /shaped
    post: [envelope]
    cmd: /bin/echo [1,2]
EOF

# A clean environment: nothing from this machine's build may be needed.
env -i PATH=/usr/bin:/bin "$bin" serve -c "$tmp/execd.yaml" >"$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || die "execd exited at start-up: $(cat "$tmp/log")"
    sleep 0.1
done

body=$(curl -fsS --max-time 10 "http://127.0.0.1:$port/ping") || die "GET /ping failed: $(cat "$tmp/log")"
[[ $body == pong ]] || die "GET /ping answered ${body@Q}, expected 'pong'"
say "GET /ping -> $body"

body=$(curl -fsS --max-time 10 "http://127.0.0.1:$port/shaped") || die "GET /shaped failed: $(cat "$tmp/log")"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["data"] == [1, 2] and r["status"] == 200, r' "$body" \
    || die "GET /shaped answered ${body@Q}, expected the response-shape envelope"
say "GET /shaped -> $body"

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=
[[ $status == 0 ]] || die "execd exited $status on SIGTERM: $(cat "$tmp/log")"
say "ok: $bin is static, serves, and stops cleanly on SIGTERM"
