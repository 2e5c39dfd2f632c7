#!/usr/bin/env bash
# Runs bench/bench.py (arguments passed through) with matplotlib available
# for the chart: a venv under ~/.cache/execd/bench-venv, made on first use
# so the system Python stays untouched and fresh clones reuse it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${EXECD_BENCH_VENV:-$HOME/.cache/execd/bench-venv}

if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "bench: creating $venv with matplotlib" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q matplotlib >&2
fi
exec "$venv/bin/python" "$here/bench.py" "$@"
