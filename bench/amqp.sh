#!/usr/bin/env bash
# Messages/s for a trivial command (`cat`) consumed from RabbitMQ: execd's
# AMQP intake at concurrency 1 and 8, next to amqp-consume (Debian's
# amqp-tools; N consumer processes for concurrency N) on the same queue size.
#
#   bench/amqp.sh [EXECD_BINARY] [MESSAGES]     (defaults: the release build, 2000)
#
# Each run fills a fresh queue first (bench/amqp_client.py, no confirms, fast),
# then starts the consumer and times from the first message taken to the
# queue holding none ready. Needs a broker on 127.0.0.1:5672 (guest/guest),
# python3 and amqp-consume (scripts/setup.sh --bench installs what is missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
execd=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/execd/target}/release/execd}
messages=${2:-2000}
[ -x "$execd" ] || { echo "bench/amqp.sh: no execd at $execd (cargo build --release -p execd)" >&2; exit 1; }
command -v amqp-consume >/dev/null || { echo "bench/amqp.sh: amqp-consume missing (apt-get install amqp-tools)" >&2; exit 1; }

exec python3 - "$here" "$execd" "$messages" <<'PY'
import os, subprocess, sys, tempfile, time

here, execd, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, here)
import amqp_client  # noqa: E402

BODY = b'{"order":42,"items":["a","b","c"]}\n'
conn = amqp_client.Connection()
work = tempfile.mkdtemp(prefix="execd-bench-amqp-")


def drain(queue, procs, timeout=300.0):
    """msg/s from the first message taken until none is ready."""
    first = None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        depth, now = conn.depth(queue), time.monotonic()
        if first is None and depth < total:
            first = (now, depth)
        if first and depth == 0:
            return first[1] / max(now - first[0], 1e-9)
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a consumer exited early: {[p.returncode for p in procs]}")
        time.sleep(0.005)
    raise SystemExit(f"{queue} not drained in {timeout}s")


def run(peer, concurrency):
    queue = f"execd-bench-sh-{peer}-c{concurrency}-{os.getpid()}"
    conn.declare(queue)
    conn.publish_many(queue, BODY, total)
    procs = []
    try:
        if peer == "execd":
            cfg = os.path.join(work, f"{queue}.yaml")
            with open(cfg, "w") as f:
                f.write("listen: 127.0.0.1:0\nadmin: off\namqp:\n"
                        "  url: amqp://guest:guest@127.0.0.1:5672/%2f\n  consumers:\n"
                        f"    - queue: {queue}\n      concurrency: {concurrency}\n      cmd: cat\n")
            log = open(os.path.join(work, f"{queue}.log"), "w")
            procs = [subprocess.Popen([execd, "serve", "-c", cfg], stdout=subprocess.DEVNULL, stderr=log)]
        else:
            procs = [subprocess.Popen(["amqp-consume", "-s", "127.0.0.1", "-q", queue, "-p", "1", "cat"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for _ in range(concurrency)]
        return drain(queue, procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        conn.delete(queue)


print(f"{total} messages of {len(BODY)} bytes, command `cat`; execd: {execd}")
print(f"{'concurrency':>11}  {'execd msg/s':>12}  {'amqp-consume msg/s':>18}  ratio")
for c in (1, 8):
    e = run("execd", c)
    a = run("amqp-consume", c)
    print(f"{c:>11}  {e:>12.0f}  {a:>18.0f}  {e / a:5.2f}")
conn.close()
PY
