#!/usr/bin/env python3
"""execd's benchmarks: execd side by side with its peers, ratios first.

    make bench          # full run: writes docs/benchmarks.md and docs/benchmarks.png
    make bench-smoke    # one short iteration of every scenario; writes nothing

The scenarios: (1) a trivial command over HTTP, (2) a PHP
route, (3) a large request body, (4) plugins, (5) AMQP, (6) memory and
start-up. Each runs execd and its peers in the same process of this script,
on 127.0.0.1 only, alternating the peers round by round (the order rotates,
so none always goes first or always runs on a warmer machine) and reports
medians. The peers are Debian's `webhook` (adnanh/webhook, told to wait for
the command), `amqp-consume` (amqp-tools), and the spawner in
bench/spawner: the same command at the same parallelism with no HTTP or
queue at all, the most a runner could get from this machine.

Every loop here is bounded in count and in time; every child is stopped by
its pid.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ is a folder of scripts, not a package: import its sibling directly,
# and leave no __pycache__ behind in the checkout.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import amqp_client  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WRK_LUA = HERE / "wrk-report.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000  # throughput is reported in decimal MB/s
MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how often each scenario runs."""

    smoke: bool
    seconds: int            # one wrk or spawner run
    rounds: int             # alternations of the peers per scenario
    conns: tuple[int, ...]  # wrk connections = spawner workers
    body_mib: tuple[int, ...]
    body_runs: int
    amqp: tuple[tuple[int, int], ...]  # (concurrency, messages)
    startup_runs: int
    run_timeout: int        # upper bound for any single measured run


FULL = Plan(smoke=False, seconds=5, rounds=3, conns=(1, 16), body_mib=(10, 100),
            body_runs=3, amqp=((1, 800), (8, 3000)), startup_runs=5, run_timeout=180)
SMOKE = Plan(smoke=True, seconds=1, rounds=1, conns=(16,), body_mib=(10,),
             body_runs=1, amqp=((8, 100),), startup_runs=1, run_timeout=60)


def say(plan: Plan, msg: str) -> None:
    print(f"bench{' smoke' if plan.smoke else ''}: {msg}", flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rotate(items, n):
    n %= len(items)
    return list(items[n:]) + list(items[:n])


# --------------------------------------------------------------------------
# Processes under test


class Daemon:
    """A server under test: started, polled until it answers HTTP, measured
    through /proc, stopped by its pid."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None,
                 cwd: Path = HERE, log: Path | None = None, ready_path: str = "/"):
        self.name, self.argv, self.port = name, argv, port
        self.env = {**os.environ, **(env or {})}
        self.cwd, self.ready_path = cwd, ready_path
        self.log_path = log or Path(tempfile.gettempdir()) / f"execd-bench-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, timeout: float = 60.0) -> "Daemon":
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        # Ready means "answers an HTTP request" (any status): the moment a
        # client could be served, which is what start-up time is about.
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", self.ready_path)
                c.getresponse().read()
                c.close()
                self.ready_s = time.monotonic() - t0
                return self
            except OSError:
                time.sleep(0.002)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on port {self.port} within {timeout}s:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        out = (r.status, r.read())
        c.close()
        return out

    def _status(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0])
        return out

    def rss_kb(self) -> int:
        return self._status()["VmRSS"]

    def hwm_kb(self) -> int:
        return self._status()["VmHWM"]

    def reset_hwm(self) -> bool:
        # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0),
        # so a peak can be taken per run instead of since start.
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def cpu(self) -> tuple[float, float]:
        """(own CPU seconds, CPU seconds of reaped children)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        f = stat[stat.rindex(")") + 2:].split()
        utime, stime, cutime, cstime = (int(x) for x in f[11:15])
        return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclasses.dataclass
class Sample:
    """One measured run of one peer."""

    rate: float                   # requests (runs, messages) per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    rss_peak_kb: int | None = None
    cpu_us: float | None = None        # the server's own CPU per request
    child_cpu_us: float | None = None  # its commands' CPU per request
    load_cpu_us: float | None = None   # the load generator's CPU per request
    count: int = 0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(url: str, conns: int, seconds: int, headers=(), timeout: int = 180) -> Sample:
    # One wrk thread: it keeps every connection busy at these rates and
    # leaves the second core to the server and its commands.
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(WRK_LUA)]
    for h in headers:
        argv += ["-H", h]
    cpu0 = children_cpu()
    p = subprocess.run(argv + [url], capture_output=True, text=True, timeout=timeout)
    cpu = children_cpu() - cpu0
    m = re.search(r"^BENCH_JSON (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stdout}\n{p.stderr}")
    j = json.loads(m.group(1))
    secs = j["duration_us"] / 1e6
    e = j["errors"]
    n = max(j["requests"], 1)
    return Sample(rate=j["requests"] / secs, p50_ms=j["p50_us"] / 1000, p99_ms=j["p99_us"] / 1000,
                  errors=e["connect"] + e["read"] + e["write"] + e["timeout"] + e["status"],
                  load_cpu_us=cpu / n * 1e6, count=j["requests"])


def run_spawner(spawner: Path, argv: list[str], workers: int, seconds: float,
                runs: int | None = None, stdin_file: Path | None = None,
                timeout: int = 180) -> Sample:
    cmd = [str(spawner), "-c", str(workers), "-d", str(seconds), "--json"]
    if runs:
        cmd += ["-n", str(runs)]
    if stdin_file:
        cmd += ["--stdin-file", str(stdin_file)]
    p = subprocess.run(cmd + ["--"] + argv, capture_output=True, text=True, cwd=HERE, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"spawner failed ({p.returncode}): {p.stdout}\n{p.stderr}")
    j = json.loads(p.stdout.strip().splitlines()[-1])
    return Sample(rate=j["runs_per_s"], p50_ms=j["p50_us"] / 1000, p99_ms=j["p99_us"] / 1000,
                  errors=j["failures"], count=j["runs"])


def measure_http(d: Daemon, path: str, conns: int, seconds: int, headers=(),
                 timeout: int = 180) -> Sample:
    """wrk against a daemon, with the daemon's CPU and peak RSS over the run."""
    d.reset_hwm()
    own0, kids0 = d.cpu()
    s = run_wrk(d.url(path), conns, seconds, headers, timeout)
    own1, kids1 = d.cpu()
    n = max(s.count, 1)
    s.rss_peak_kb = d.hwm_kb()
    s.cpu_us = (own1 - own0) / n * 1e6
    s.child_cpu_us = (kids1 - kids0) / n * 1e6
    return s


# --------------------------------------------------------------------------
# Results


class Results:
    """Every sample, keyed by (scenario, variant, peer); plus single facts."""

    def __init__(self):
        self.samples: dict[tuple[str, str, str], list[Sample]] = {}
        self.facts: dict[str, object] = {}
        self.notes: dict[str, str] = {}   # scenario -> why it was not measured

    def add(self, scenario: str, variant: str, peer: str, s: Sample) -> None:
        self.samples.setdefault((scenario, variant, peer), []).append(s)

    def get(self, scenario: str, variant: str, peer: str) -> list[Sample]:
        return self.samples.get((scenario, variant, peer), [])

    def med(self, scenario: str, variant: str, peer: str, field: str = "rate"):
        return median([getattr(s, field) for s in self.get(scenario, variant, peer)])

    def per_round(self, scenario: str, variant: str, a: str, b: str, field: str = "rate") -> list[float]:
        """a ÷ b round by round. Each round runs the peers back to back, so
        these ratios show what drift between rounds does to the medians."""
        xs = [getattr(s, field) for s in self.get(scenario, variant, a)]
        ys = [getattr(s, field) for s in self.get(scenario, variant, b)]
        return [x / y for x, y in zip(xs, ys) if x is not None and y]

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        res = cls()
        for entry in data["samples"]:
            for run in entry["runs"]:
                res.add(entry["scenario"], entry["variant"], entry["peer"], Sample(**run))
        res.facts, res.notes = data.get("facts", {}), data.get("notes", {})
        return res

    def to_json(self) -> dict:
        return {
            "samples": [{"scenario": k[0], "variant": k[1], "peer": k[2],
                         "runs": [dataclasses.asdict(s) for s in v]}
                        for k, v in self.samples.items()],
            "facts": self.facts, "notes": self.notes,
        }


# --------------------------------------------------------------------------
# Scenarios 1 and 2: commands over HTTP


@dataclasses.dataclass(frozen=True)
class HttpCase:
    scenario: str   # "trivial" or "php"
    variant: str
    title: str
    execd_path: str
    hook: str       # webhook's hook id
    argv: tuple[str, ...]  # what the spawner runs (cwd bench/, like the route's wd)
    expect: bytes   # what the response body starts with, for both servers


HTTP_CASES = (
    HttpCase("trivial", "echo", "`/bin/echo ok`", "/echo", "echo", ("/bin/echo", "ok"), b"ok\n"),
    HttpCase("php", "php -r", "`php -r 'echo 1;'`", "/php-r", "php-r", ("php", "-r", "echo 1;"), b"1"),
    HttpCase("php", "script", "`php php/small.php`", "/php-script", "php-script",
             ("php", "php/small.php"), b'{"method":'),
)
HTTP_PEERS = ("execd", "webhook", "spawner")


def start_servers(args) -> tuple[Daemon, Daemon]:
    port = free_port()
    execd = Daemon("execd", [str(args.execd), "serve", "-c", str(HERE / "execd.yaml")], port,
                   env={"EXECD_BENCH_PORT": str(port)}, ready_path="/__ready")
    port = free_port()
    webhook = Daemon("webhook", ["webhook", "-hooks", str(HERE / "webhook-hooks.json"), "-template",
                                 "-ip", "127.0.0.1", "-port", str(port)], port,
                     env={"EXECD_BENCH_DIR": str(HERE)}, ready_path="/__ready")
    return execd.start(), webhook.start()


def check_same_answers(execd: Daemon, webhook: Daemon) -> None:
    """Both servers must answer each case with the command's output, or the
    comparison would be of different work."""
    for case in HTTP_CASES:
        for d, path in ((execd, case.execd_path), (webhook, f"/hooks/{case.hook}")):
            status, body = d.get(path)
            if status != 200 or not body.startswith(case.expect):
                raise RuntimeError(f"{d.name} {path}: {status} {body[:200]!r}, expected 200 {case.expect!r}...")


def scenario_http(plan: Plan, args, res: Results, execd: Daemon, webhook: Daemon) -> None:
    # Idle RSS first, before any request has grown a pool or an arena.
    time.sleep(1.0)
    res.facts["idle_rss_kb"] = {"execd": execd.rss_kb(), "webhook": webhook.rss_kb()}
    check_same_answers(execd, webhook)
    for d, path in ((execd, "/echo"), (webhook, "/hooks/echo")):
        run_wrk(d.url(path), 4, 1)  # warm-up: page cache, lazy pools, the first spawns
    for case in HTTP_CASES:
        for conns in plan.conns:
            variant = f"{case.variant} c{conns}"
            for rnd in range(plan.rounds):
                for peer in rotate(HTTP_PEERS, rnd):
                    if peer == "execd":
                        s = measure_http(execd, case.execd_path, conns, plan.seconds, timeout=plan.run_timeout)
                    elif peer == "webhook":
                        s = measure_http(webhook, f"/hooks/{case.hook}", conns, plan.seconds,
                                         timeout=plan.run_timeout)
                    else:
                        s = run_spawner(args.spawner, list(case.argv), conns, plan.seconds,
                                        timeout=plan.run_timeout)
                    res.add(case.scenario, variant, peer, s)
                    say(plan, f"{case.scenario} {variant} round {rnd + 1} {peer:8} "
                              f"{s.rate:9.1f}/s p50 {s.p50_ms:7.2f} ms p99 {s.p99_ms:7.2f} ms"
                              + (f" errors {s.errors}" if s.errors else ""))
    res.facts["rss_after_load_kb"] = {"execd": execd.rss_kb(), "webhook": webhook.rss_kb()}


# --------------------------------------------------------------------------
# Scenario 3: large bodies to stdin


def post_body(port: int, data: bytes, timeout: int) -> tuple[float, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    c.request("POST", "/body", body=data, headers={"Content-Type": "application/octet-stream"})
    r = c.getresponse()
    body = r.read()
    dt = time.monotonic() - t0
    c.close()
    if r.status != 200:
        raise RuntimeError(f"POST /body: {r.status} {body[:300]!r}")
    return dt, body


def scenario_body(plan: Plan, args, res: Results) -> None:
    # A fresh daemon, so the growth measured is this scenario's alone.
    port = free_port()
    execd = Daemon("execd-body", [str(args.execd), "serve", "-c", str(HERE / "execd.yaml")], port,
                   env={"EXECD_BENCH_PORT": str(port)}, ready_path="/__ready").start()
    try:
        post_body(port, b"warm-up", 30)
        time.sleep(0.5)
        for mib in plan.body_mib:
            size = mib * MiB
            data = (b"0123456789abcdef" * (size // 16 + 1))[:size]
            variant = f"{mib} MiB"
            with tempfile.NamedTemporaryFile(prefix="execd-bench-body-") as f:
                f.write(data)
                f.flush()
                for rnd in range(plan.rounds):
                    for peer in rotate(("execd", "spawner"), rnd):
                        if peer == "execd":
                            base = execd.rss_kb()
                            execd.reset_hwm()
                            times = []
                            for _ in range(plan.body_runs):
                                dt, out = post_body(port, data, plan.run_timeout)
                                if out.strip() != str(size).encode():
                                    raise RuntimeError(f"/body answered {out[:100]!r}, expected {size}")
                                times.append(dt)
                            peak = execd.hwm_kb()
                            s = Sample(rate=size / MB / median(times), p50_ms=median(times) * 1000,
                                       rss_peak_kb=peak, count=len(times))
                            res.facts.setdefault("body_rss", {}).setdefault(variant, []).append(
                                {"base_kb": base, "peak_kb": peak})
                        else:
                            sp = run_spawner(args.spawner, ["wc", "-c"], 1, plan.run_timeout,
                                             runs=plan.body_runs, stdin_file=Path(f.name),
                                             timeout=plan.run_timeout + 30)
                            s = Sample(rate=size / MB / (sp.p50_ms / 1000), p50_ms=sp.p50_ms,
                                       errors=sp.errors, count=sp.count)
                        res.add("body", variant, peer, s)
                        say(plan, f"body {variant} round {rnd + 1} {peer:8} {s.rate:8.1f} MB/s"
                                  + (f" peak RSS {s.rss_peak_kb / 1024:.1f} MiB" if s.rss_peak_kb else ""))
        res.facts["body_idle_rss_kb"] = execd.rss_kb()
    finally:
        execd.stop()


# --------------------------------------------------------------------------
# Scenario 4: plugins


PLUGIN_VARIANTS = (
    # variant, path, headers, plugins run
    ("baseline", "/no-such-route", (), 0),
    ("1 plugin", "/plugin-1", (), 1),
    ("3 plugins", "/plugin-3", ("X-Pass: k-bench",), 3),
)


def scenario_plugins(plan: Plan, args, res: Results, execd: Daemon) -> None:
    # End to end over HTTP: each plugin route ends in a refusal (401) so no
    # command runs; against a 404 that touches no plugin, the difference in
    # time per request is what the plugins cost, hop to their thread included.
    for _, path, headers, n in PLUGIN_VARIANTS[1:]:
        status, body = execd.get(path, dict(h.split(": ", 1) for h in headers))
        if status != 401:
            raise RuntimeError(f"execd {path}: {status} {body[:200]!r}; expected the plugin's 401")
    for rnd in range(plan.rounds):
        for variant, path, headers, n in rotate(PLUGIN_VARIANTS, rnd):
            s = measure_http(execd, path, 1, plan.seconds, headers, timeout=plan.run_timeout)
            # 4xx is the expected answer here; only transport errors count.
            s.errors = 0
            res.add("plugins", variant, "execd", s)
            say(plan, f"plugins {variant:9} round {rnd + 1} {s.rate:9.1f} req/s ({1e6 / s.rate:.1f} µs/request)")
    if plan.smoke or args.skip_cargo_bench:
        res.facts["plugins_cargo_bench"] = None
        return
    if not (REPO / "host/benches/plugins.rs").is_file():
        res.facts["plugins_cargo_bench"] = {"missing": True}
        return
    say(plan, "plugins: cargo bench -p execd --bench plugins")
    p = subprocess.run(["cargo", "bench", "-p", "execd", "--bench", "plugins"], cwd=REPO,
                       capture_output=True, text=True, timeout=3600)
    out = p.stdout.strip()
    res.facts["plugins_cargo_bench"] = {"ok": p.returncode == 0, "output": out,
                                        "stderr_tail": p.stderr.strip().splitlines()[-15:]}
    print(out, flush=True)


def parse_plugin_bench(out: str) -> dict[str, float]:
    """Pulls `<name> <x> µs/call` and `<x> µs/chain` figures out of the
    plugin bench's report; unknown lines are kept verbatim in the docs."""
    found = {}
    for line in out.splitlines():
        m = re.search(r"([\d.]+)\s*µs/chain", line)
        if m:
            found["chain"] = float(m.group(1))
            continue
        m = re.search(r"^\s*(\S.*?)\s+([\d.]+)\s*µs/call", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


# --------------------------------------------------------------------------
# Scenario 5: AMQP


AMQP_PEERS = ("execd", "amqp-consume", "spawner")
AMQP_BODY = b'{"order":42,"items":["a","b","c"]}\n'


def broker_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


def drain_rate(conn: amqp_client.Connection, queue: str, total: int, timeout: float,
               procs: list[subprocess.Popen]) -> tuple[float, bool]:
    """Messages/s while consumers empty `queue`, timed from the first
    message taken to the queue holding none ready. Start-up and connecting
    are outside the window; at both ends at most `prefetch` messages are in
    flight, which cancels out over thousands."""
    deadline = time.monotonic() + timeout
    first_t = first_depth = None
    while time.monotonic() < deadline:
        depth = conn.depth(queue)
        now = time.monotonic()
        if first_t is None and depth < total:
            first_t, first_depth = now, depth
        if first_t is not None and depth == 0:
            return (first_depth / (now - first_t) if now > first_t else 0.0), True
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a consumer exited early ({[p.returncode for p in procs]})")
        time.sleep(0.005)
    if first_t is None:
        return 0.0, False
    done = first_depth - conn.depth(queue)
    return done / (time.monotonic() - first_t), False


def execd_amqp_config(dirpath: Path, queue: str, concurrency: int, port: int) -> Path:
    path = dirpath / f"amqp-{queue}.yaml"
    path.write_text(
        "# Generated by bench/bench.py for one AMQP run.\n"
        f"listen: 127.0.0.1:{port}\n"
        "amqp:\n"
        "  url: amqp://guest:guest@127.0.0.1:5672/%2f\n"
        "  consumers:\n"
        f"    - queue: {queue}\n"
        f"      concurrency: {concurrency}\n"
        "      cmd: cat\n"
        "routes: []\n")
    return path


def scenario_amqp(plan: Plan, args, res: Results) -> None:
    if not broker_up():
        res.notes["amqp"] = "no RabbitMQ broker answers on 127.0.0.1:5672"
        return
    work = Path(tempfile.mkdtemp(prefix="execd-bench-amqp-"))
    # Does this execd have a working AMQP intake? `check` validates the section.
    probe = execd_amqp_config(work, "execd-bench-probe", 1, free_port())
    p = subprocess.run([str(args.execd), "check", "-c", str(probe)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        res.notes["amqp"] = f"this execd does not load an `amqp:` section: {(p.stdout + p.stderr).strip()[:300]}"
        return
    msg_file = work / "message"
    msg_file.write_bytes(AMQP_BODY)
    conn = amqp_client.Connection()
    try:
        for concurrency, total in plan.amqp:
            variant = f"cat c{concurrency}"
            for rnd in range(plan.rounds):
                for peer in rotate(AMQP_PEERS, rnd):
                    if peer == "spawner":
                        s = run_spawner(args.spawner, ["cat"], concurrency, plan.run_timeout, runs=total,
                                        stdin_file=msg_file, timeout=plan.run_timeout + 30)
                        s.p50_ms = s.p99_ms = None  # per-run latency is not comparable to a queue's
                    else:
                        s = amqp_run(plan, args, work, conn, peer, concurrency, total, rnd)
                    res.add("amqp", variant, peer, s)
                    say(plan, f"amqp {variant} round {rnd + 1} {peer:12} {s.rate:8.1f} msg/s"
                              + (" (did not finish in time)" if s.errors else ""))
    finally:
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


def amqp_run(plan: Plan, args, work: Path, conn: amqp_client.Connection, peer: str,
             concurrency: int, total: int, rnd: int) -> Sample:
    queue = f"execd-bench-{peer}-c{concurrency}-{rnd}-{os.getpid()}"
    conn.declare(queue)
    procs: list[subprocess.Popen] = []
    daemon = None
    try:
        conn.publish_many(queue, AMQP_BODY, total)
        if peer == "execd":
            port = free_port()
            cfg = execd_amqp_config(work, queue, concurrency, port)
            daemon = Daemon("execd-amqp", [str(args.execd), "serve", "-c", str(cfg)], port,
                            ready_path="/__ready").start()
            procs = [daemon.proc]
        else:
            # amqp-consume runs one command at a time; concurrency N is N
            # consumers on the queue, each taking one message at a time.
            procs = [subprocess.Popen(["amqp-consume", "-s", "127.0.0.1", "-q", queue, "-p", "1", "cat"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL)
                     for _ in range(concurrency)]
        rate, finished = drain_rate(conn, queue, total, plan.run_timeout, procs)
        return Sample(rate=rate, errors=0 if finished else 1, count=total)
    finally:
        if daemon:
            daemon.stop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        conn.delete(queue)


# --------------------------------------------------------------------------
# Scenario 6: memory and start-up


FIVE_PLUGINS = {
    "api-key": "{ keys: [k-bench] }",
    "hmac-signature": '{ secret: "bench-secret-0123456789abcdef" }',
    "jwt": '{ secret: "bench-secret-0123456789abcdef0123456789" }',
    "json-map": "{ fields: { user: { pointer: /user } } }",
    "response-shape": "{ mode: envelope }",
}


def startup_config(work: Path) -> Path:
    """config/execd.yaml as shipped, plus the five shipped plugins. It is
    written beside a link to examples/ so the config's relative paths
    (../examples/php/...) resolve as they do from config/."""
    (work / "config").mkdir(parents=True, exist_ok=True)
    link = work / "examples"
    if not link.exists():
        link.symlink_to(REPO / "examples")
    text = (REPO / "config/execd.yaml").read_text()
    text += "\n# Added by bench/bench.py: the five shipped plugins.\nplugins:\n"
    for name, config in FIVE_PLUGINS.items():
        wasm = REPO / "plugins/dist" / f"{name}.wasm"
        if not wasm.is_file():
            raise RuntimeError(f"{wasm} is missing: run `make plugins`")
        text += f"  {name}:\n    path: {wasm}\n    config: {config}\n"
    path = work / "config" / "execd.yaml"
    path.write_text(text)
    return path


def scenario_startup(plan: Plan, args, res: Results) -> None:
    work = Path(tempfile.mkdtemp(prefix="execd-bench-startup-"))
    try:
        cfg = startup_config(work)
        cache = work / "plugin-cache"
        variants = {
            "execd, config/execd.yaml + 5 plugins": lambda port: Daemon(
                "execd-startup", [str(args.execd), "serve", "-c", str(cfg)], port,
                env={"EXECD_LISTEN": f"127.0.0.1:{port}"}, ready_path="/__ready"),
            # The same, with --plugin-cache filled by an earlier start: the
            # plugins are loaded compiled instead of compiled at start-up.
            "execd, config/execd.yaml + 5 plugins, plugin cache warm": lambda port: Daemon(
                "execd-startup-cached", [str(args.execd), "serve", "--plugin-cache", str(cache), "-c", str(cfg)],
                port, env={"EXECD_LISTEN": f"127.0.0.1:{port}"}, ready_path="/__ready"),
            "execd, config/execd.yaml": lambda port: Daemon(
                "execd-startup-plain", [str(args.execd), "serve", "-c", str(REPO / "config/execd.yaml")], port,
                env={"EXECD_LISTEN": f"127.0.0.1:{port}"}, ready_path="/__ready"),
            "webhook, bench hooks": lambda port: Daemon(
                "webhook-startup", ["webhook", "-hooks", str(HERE / "webhook-hooks.json"), "-template",
                                    "-ip", "127.0.0.1", "-port", str(port)], port,
                env={"EXECD_BENCH_DIR": str(HERE)}, ready_path="/__ready"),
        }
        # Fill the cache once, untimed.
        variants["execd, config/execd.yaml + 5 plugins, plugin cache warm"](free_port()).start(
            timeout=plan.run_timeout).stop()
        for rnd in range(plan.startup_runs):
            for name, make in rotate(list(variants.items()), rnd):
                d = make(free_port()).start(timeout=plan.run_timeout)
                try:
                    time.sleep(1.0)  # let start-up transients settle: idle, not starting
                    s = Sample(rate=0.0, p50_ms=d.ready_s * 1000, rss_peak_kb=d.rss_kb(), count=1)
                finally:
                    d.stop()
                res.add("startup", name, name.split(",")[0], s)
                say(plan, f"start-up {name}: ready in {s.p50_ms:.1f} ms, idle RSS {s.rss_peak_kb / 1024:.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# The report


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, spec=".1f", none="—"):
    return none if x is None else format(x, spec)


def fx(x):
    return fmt(x, ".2f") + "x" if x is not None else "—"


@dataclasses.dataclass
class Target:
    what: str
    required: str
    measured: float | None
    ok: bool | None
    margin: str
    unit: str = "x"
    rounds: tuple = ()  # the ratio in each round, when it is a ratio of peers


def at_least(what, measured, need, unit="x", rounds=()):
    if measured is None:
        return Target(what, f"≥ {need:g}{unit}", None, None, "not measured", unit)
    ok = measured >= need
    pct = (measured / need - 1) * 100
    return Target(what, f"≥ {need:g}{unit}", measured, ok,
                  f"{'+' if pct >= 0 else ''}{pct:.0f}% {'above' if ok else 'short of'} the target", unit,
                  tuple(rounds))


def at_most(what, measured, limit, unit="x", rounds=()):
    if measured is None:
        return Target(what, f"≤ {limit:g}{unit}", None, None, "not measured", unit)
    ok = measured <= limit
    pct = (measured / limit - 1) * 100
    return Target(what, f"≤ {limit:g}{unit}", measured, ok,
                  f"{abs(pct):.0f}% {'under' if ok else 'over'} the limit", unit, tuple(rounds))


def plugin_per_call(res: Results) -> dict[str, float | None]:
    base = res.med("plugins", "baseline", "execd")
    out = {}
    for variant, _, _, n in PLUGIN_VARIANTS[1:]:
        r = res.med("plugins", variant, "execd")
        out[variant] = (1e6 / r - 1e6 / base) / n if r and base else None
    return out


def targets(plan: Plan, res: Results) -> list[Target]:
    c = max(plan.conns)
    v = f"echo c{c}"
    t = [
        at_least(f"trivial, {c} conns: req/s vs webhook", ratio(res.med("trivial", v, "execd"),
                                                               res.med("trivial", v, "webhook")), 1.15,
                 rounds=res.per_round("trivial", v, "execd", "webhook")),
        at_most(f"trivial, {c} conns: p99 vs webhook", ratio(res.med("trivial", v, "execd", "p99_ms"),
                                                            res.med("trivial", v, "webhook", "p99_ms")), 0.7,
                rounds=res.per_round("trivial", v, "execd", "webhook", "p99_ms")),
        at_least(f"trivial, {c} conns: req/s vs spawner", ratio(res.med("trivial", v, "execd"),
                                                               res.med("trivial", v, "spawner")), 0.95,
                 rounds=res.per_round("trivial", v, "execd", "spawner")),
    ]
    for case in HTTP_CASES[1:]:
        for conns in plan.conns:
            v = f"{case.variant} c{conns}"
            t.append(at_least(f"PHP {case.variant}, {conns} conns: req/s vs webhook",
                              ratio(res.med("php", v, "execd"), res.med("php", v, "webhook")), 1.0,
                              rounds=res.per_round("php", v, "execd", "webhook")))
    big = f"{max(plan.body_mib)} MiB"
    growth = None
    if res.facts.get("body_rss", {}).get(big):
        growth = median([(r["peak_kb"] - r["base_kb"]) / 1024 for r in res.facts["body_rss"][big]])
    t.append(at_most(f"{big} body: execd RSS growth", growth, 10, " MiB"))
    per_call = plugin_bench_one(res)
    label = "plugins: µs per call (cargo bench, api-key)"
    if per_call is None:
        per_call = plugin_per_call(res).get("1 plugin")
        label = "plugins: µs per call (over HTTP, 1 plugin)"
    t.append(at_most(label, per_call, 10, " µs"))
    conc = max(c for c, _ in plan.amqp)
    v = f"cat c{conc}"
    t.append(at_least(f"AMQP c{conc}: msg/s vs amqp-consume", ratio(res.med("amqp", v, "execd"),
                                                                     res.med("amqp", v, "amqp-consume")), 1.5,
                      rounds=res.per_round("amqp", v, "execd", "amqp-consume")))
    t.append(at_least(f"AMQP c{conc}: msg/s vs spawner", ratio(res.med("amqp", v, "execd"),
                                                                res.med("amqp", v, "spawner")), 0.9,
                      rounds=res.per_round("amqp", v, "execd", "spawner")))
    for variant, label in (("", "compiled at start"), (", plugin cache warm", "plugin cache warm")):
        idle = res.med("startup", f"execd, config/execd.yaml + 5 plugins{variant}", "execd", "rss_peak_kb")
        t.append(at_most(f"idle RSS, 5 plugins loaded ({label})", idle / 1024 if idle else None, 20, " MiB"))
    return t


def plugin_bench_one(res: Results) -> float | None:
    cb = res.facts.get("plugins_cargo_bench") or {}
    if not cb.get("ok"):
        return None
    found = parse_plugin_bench(cb["output"])
    for k, val in found.items():
        if "api-key" in k and "->" not in k:
            return val
    return None


def versions(args) -> dict[str, str]:
    def first(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    rev = first(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "execd": f"{first([str(args.execd), '--version'])} (git {rev}{', with uncommitted changes' if dirty else ''})",
        "webhook": first(["webhook", "-version"]),
        "wrk": first(["wrk", "-v"]).split(" Copyright")[0],
        "php": first(["php", "-v"]),
        "amqp-tools": "amqp-consume " + first(["dpkg-query", "-W", "-f", "${Version}", "amqp-tools"]),
    }


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {"cores": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "memory": f"{int(mem) / 1024 / 1024:.0f} GiB"}


def render(plan: Plan, args, res: Results, chart: str | None) -> str:
    m, ver = machine(), res.facts.get("versions") or versions(args)
    now = res.facts.get("measured_at") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = []
    w = L.append
    w("# Benchmarks\n")
    w("<!-- Written by bench/bench.py (`make bench`); edit the harness, not this file. -->\n")
    w(f"execd side by side with the daemons it replaces, on the same machine in the same run, "
      f"peers alternated round by round; every figure is the median of {plan.rounds} rounds "
      f"of {plan.seconds} s (wrk: 1 thread; everything on 127.0.0.1).\n")
    w(f"- **Date:** {now}")
    w(f"- **Machine:** {m['cores']} cores ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}")
    w(f"- **Command:** `{args.command}`")
    w(f"- **Versions:** " + "; ".join(f"{k} {v}" if not v.startswith(k) else v for k, v in ver.items()))
    w("- **Peers:** `webhook` = Debian's adnanh/webhook with `include-command-output-in-response: true` "
      "(it waits for the command, as execd does); `spawner` = bench/spawner, the same command at the "
      "same parallelism with no HTTP at all: the physical limit; `amqp-consume` = amqp-tools, one "
      "process per unit of concurrency.\n")
    if chart:
        w(f"![Throughput, latency, AMQP and memory per scenario]({chart})\n")

    # -- ratios first --
    w("## Ratios\n")
    w("execd ÷ peer, per scenario (higher is better for req/s, lower for latency).\n")
    w("| scenario | conns | req/s vs webhook | p99 vs webhook | req/s vs spawner (limit) |")
    w("|---|---:|---:|---:|---:|")
    for case in HTTP_CASES:
        for conns in plan.conns:
            v = f"{case.variant} c{conns}"
            e, wh, sp = (res.med(case.scenario, v, p) for p in HTTP_PEERS)
            ep, whp = (res.med(case.scenario, v, p, "p99_ms") for p in ("execd", "webhook"))
            w(f"| {case.title} | {conns} | {fx(ratio(e, wh))} | {fx(ratio(ep, whp))} | {fx(ratio(e, sp))} |")
    for conc, _ in plan.amqp:
        v = f"cat c{conc}"
        e, ac, sp = (res.med("amqp", v, p) for p in AMQP_PEERS)
        if e is not None:
            w(f"| AMQP `cat` (msg/s vs amqp-consume; vs spawner) | {conc} | {fx(ratio(e, ac))} | — | {fx(ratio(e, sp))} |")
    w("")

    w("## Targets\n")
    w("Measured = the ratio of the peers' medians. Each round runs the peers back to back, so the ratio "
      "within each round (last column) shows how much drift between rounds moves the verdict.\n")
    w("| target | required | measured | result | each round |")
    w("|---|---:|---:|---|---|")
    for t in targets(plan, res):
        measured = "—" if t.measured is None else (f"{t.measured:.2f}{t.unit}")
        result = "not measured" if t.ok is None else (f"**pass** ({t.margin})" if t.ok else f"**miss** ({t.margin})")
        rounds = ", ".join(f"{r:.2f}" for r in t.rounds) or "—"
        w(f"| {t.what} | {t.required} | {measured} | {result} | {rounds} |")
    w("")

    # -- scenarios --
    w("## 1–2. Commands over HTTP\n")
    w(f"wrk for {plan.seconds} s per run (`-t1 -cN`), the spawner with N workers for as long. CPU "
      "columns: the server's own CPU time per request and its commands' (from /proc), and wrk's; peak "
      "RSS is the server process's during the run.\n")
    w("| command | conns | peer | req/s | p50 ms | p99 ms | server CPU µs/req | commands CPU µs/req | wrk CPU µs/req | peak RSS MiB | errors |")
    w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in HTTP_CASES:
        for conns in plan.conns:
            v = f"{case.variant} c{conns}"
            for peer in HTTP_PEERS:
                ss = res.get(case.scenario, v, peer)
                if not ss:
                    continue
                med = lambda f: median([getattr(s, f) for s in ss])  # noqa: E731
                rss = med("rss_peak_kb")
                w(f"| {case.title} | {conns} | {peer} | {fmt(med('rate'))} | {fmt(med('p50_ms'), '.2f')} | "
                  f"{fmt(med('p99_ms'), '.2f')} | {fmt(med('cpu_us'), '.0f')} | {fmt(med('child_cpu_us'), '.0f')} | "
                  f"{fmt(med('load_cpu_us'), '.0f')} | {fmt(rss / 1024 if rss else None)} | {sum(s.errors for s in ss)} |")
    w("")

    w("## 3. Large body to stdin\n")
    w("`POST /body` (`wc -c`, `payload-to: stdin`), one request at a time; MB/s = body size ÷ time "
      "from the first byte sent to the answer read. RSS growth = execd's peak RSS during the requests "
      "minus its RSS just before. The spawner pipes the same bytes from memory into `wc -c`.\n")
    w("| body | execd MB/s | spawner MB/s | execd ÷ spawner | execd RSS before MiB | peak MiB | growth MiB |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for mib in plan.body_mib:
        v = f"{mib} MiB"
        e, sp = res.med("body", v, "execd"), res.med("body", v, "spawner")
        rows = res.facts.get("body_rss", {}).get(v, [])
        base = median([r["base_kb"] / 1024 for r in rows])
        peak = median([r["peak_kb"] / 1024 for r in rows])
        growth = median([(r["peak_kb"] - r["base_kb"]) / 1024 for r in rows])
        w(f"| {mib} MiB | {fmt(e)} | {fmt(sp)} | {fx(ratio(e, sp))} | {fmt(base)} | {fmt(peak)} | {fmt(growth)} |")
    w("")

    w("## 4. Plugins\n")
    cb = res.facts.get("plugins_cargo_bench")
    if cb and cb.get("ok"):
        w("`cargo bench -p execd --bench plugins` (host/benches/plugins.rs: the real host, a fresh "
          "instance per call, no HTTP):\n")
        w("```text\n" + cb["output"] + "\n```\n")
    elif cb and cb.get("missing"):
        w("`cargo bench -p execd --bench plugins`: **not measured yet** (host/benches/plugins.rs does not exist).\n")
    elif cb:
        w("`cargo bench -p execd --bench plugins` **failed**:\n\n```text\n" + "\n".join(cb.get("stderr_tail", []))
          + "\n```\n")
    else:
        w("`cargo bench -p execd --bench plugins`: **not measured** in this run.\n")
    w("Over HTTP, wrk with 1 connection: each plugin route ends in the last plugin's 401, so no "
      "command runs; the baseline is a 404 that touches no plugin. µs per plugin = (time per "
      "request − baseline's) ÷ plugins run; it includes building the plugin's view of the request and the route's own work beyond a 404.\n")
    w("| route | plugins | req/s | µs/request | µs per plugin |")
    w("|---|---:|---:|---:|---:|")
    per = plugin_per_call(res)
    for variant, path, _, n in PLUGIN_VARIANTS:
        r = res.med("plugins", variant, "execd")
        w(f"| `{path}` | {n} | {fmt(r)} | {fmt(1e6 / r if r else None)} | {fmt(per.get(variant)) if n else '—'} |")
    w("")

    w("## 5. AMQP\n")
    if "amqp" in res.notes:
        w(f"**Not measured:** {res.notes['amqp']}.\n")
    else:
        total = ", ".join(f"{n} messages at concurrency {c}" for c, n in plan.amqp)
        w(f"A queue pre-filled with {total} (a {len(AMQP_BODY)}-byte JSON body each), drained by `cat` "
          "per message. msg/s is timed from the first message taken to the queue empty (the broker's "
          "depth, polled every 5 ms), so start-up and connecting are outside it. amqp-consume at "
          "concurrency N is N processes with prefetch 1; the spawner pipes the body into `cat` with "
          "N workers.\n")
        w("| concurrency | execd msg/s | amqp-consume msg/s | spawner runs/s | execd ÷ amqp-consume | execd ÷ spawner |")
        w("|---:|---:|---:|---:|---:|---:|")
        for conc, _ in plan.amqp:
            v = f"cat c{conc}"
            e, ac, sp = (res.med("amqp", v, p) for p in AMQP_PEERS)
            w(f"| {conc} | {fmt(e)} | {fmt(ac)} | {fmt(sp)} | {fx(ratio(e, ac))} | {fx(ratio(e, sp))} |")
        w("")

    w("## 6. Memory and start-up\n")
    idle = res.facts.get("idle_rss_kb", {})
    after = res.facts.get("rss_after_load_kb", {})
    c = max(plan.conns)
    load = {p: res.med("trivial", f"echo c{c}", p, "rss_peak_kb") for p in ("execd", "webhook")}
    w("| | execd | webhook | execd ÷ webhook |")
    w("|---|---:|---:|---:|")
    for label, d in (("idle RSS MiB (bench config: 6 routes, 3 plugin instances)", idle),
                     (f"peak RSS MiB under load (`/bin/echo ok`, {c} conns)", load),
                     ("RSS MiB after all HTTP runs", after)):
        e, wh = d.get("execd"), d.get("webhook")
        w(f"| {label} | {fmt(e / 1024 if e else None)} | {fmt(wh / 1024 if wh else None)} | {fx(ratio(e, wh))} |")
    w("")
    w("Start-up: process start to the first HTTP answer, then idle RSS one second later.\n")
    w("| server and config | ready ms | idle RSS MiB |")
    w("|---|---:|---:|")
    for (scen, variant, peer), ss in res.samples.items():
        if scen == "startup":
            rss = median([s.rss_peak_kb for s in ss])
            w(f"| {variant} | {fmt(median([s.p50_ms for s in ss]))} | {fmt(rss / 1024 if rss else None)} |")
    w("")

    notes = HERE / "analysis.md"
    if notes.is_file():
        w(notes.read_text().strip() + "\n")
    return "\n".join(L)


def make_chart(plan: Plan, res: Results, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is missing; no chart (bench/run.sh installs it into a venv)", file=sys.stderr)
        return False
    colors = {"execd": "#2b6cb0", "webhook": "#dd6b20", "spawner": "#718096", "amqp-consume": "#38a169"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))

    def bars(ax, groups, peers, value, title, ylabel, log=True):
        width = 0.8 / len(peers)
        for i, peer in enumerate(peers):
            xs = [g + (i - (len(peers) - 1) / 2) * width for g in range(len(groups))]
            ys = [value(g, peer) or 0 for g in groups]
            ax.bar(xs, ys, width, label=peer, color=colors.get(peer))
            for x, y in zip(xs, ys):
                if y:
                    ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (x, y), ha="center", va="bottom",
                                fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups] if isinstance(groups[0], tuple) else groups, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.legend(fontsize=8)

    groups = [(f"{case.variant}\n{conns} conn{'s' if conns > 1 else ''}", case, conns)
              for case in HTTP_CASES for conns in plan.conns]
    bars(axes[0][0], groups, HTTP_PEERS, lambda g, p: res.med(g[1].scenario, f"{g[1].variant} c{g[2]}", p),
         "HTTP: requests/s (higher is better)", "req/s (log)")
    bars(axes[0][1], groups, HTTP_PEERS,
         lambda g, p: res.med(g[1].scenario, f"{g[1].variant} c{g[2]}", p, "p99_ms"),
         "HTTP: p99 latency (lower is better)", "ms (log)")
    if "amqp" in res.notes:
        axes[1][0].text(0.5, 0.5, "AMQP: not measured\n" + res.notes["amqp"][:80], ha="center", va="center",
                        wrap=True)
        axes[1][0].set_axis_off()
    else:
        bars(axes[1][0], [f"cat, concurrency {c}" for c, _ in plan.amqp], AMQP_PEERS,
             lambda g, p: res.med("amqp", f"cat c{g.split()[-1]}", p),
             "AMQP: messages/s (higher is better)", "msg/s", log=False)
    idle = res.facts.get("idle_rss_kb", {})
    c = max(plan.conns)
    plug = res.med("startup", "execd, config/execd.yaml + 5 plugins", "execd", "rss_peak_kb")
    mem = {
        "idle": lambda p: idle.get(p),
        f"under load\n(echo, {c} conns)": lambda p: res.med("trivial", f"echo c{c}", p, "rss_peak_kb"),
        "idle, example\nconfig + 5 plugins": lambda p: plug if p == "execd" else None,
    }
    bars(axes[1][1], list(mem), ("execd", "webhook"),
         lambda g, p: (mem[g](p) or 0) / 1024, "Memory: RSS of the server process (lower is better)", "MiB",
         log=False)
    fig.suptitle(f"execd vs peers — {os.cpu_count()} cores, median of {plan.rounds} rounds", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------


def smoke_check(res: Results) -> list[str]:
    """The smoke run's only assertion: every peer of every scenario ran and
    produced numbers (or the scenario says why it could not run)."""
    problems = []

    def need(scenario, variant, peer, fields=("rate",)):
        ss = res.get(scenario, variant, peer)
        if not ss:
            problems.append(f"{scenario} {variant} {peer}: did not run")
            return
        for s in ss:
            for f in fields:
                v = getattr(s, f)
                if v is None or v <= 0:
                    problems.append(f"{scenario} {variant} {peer}: no {f} ({v})")
            if s.errors:
                problems.append(f"{scenario} {variant} {peer}: {s.errors} errors")

    for case in HTTP_CASES:
        for conns in SMOKE.conns:
            for peer in HTTP_PEERS:
                need(case.scenario, f"{case.variant} c{conns}", peer, ("rate", "p50_ms", "p99_ms"))
    for mib in SMOKE.body_mib:
        for peer in ("execd", "spawner"):
            need("body", f"{mib} MiB", peer)
    for variant, *_ in PLUGIN_VARIANTS:
        need("plugins", variant, "execd")
    if "amqp" not in res.notes:
        for conc, _ in SMOKE.amqp:
            for peer in AMQP_PEERS:
                need("amqp", f"cat c{conc}", peer)
    for (scen, variant, peer), ss in res.samples.items():
        if scen == "startup" and not all(s.p50_ms and s.rss_peak_kb for s in ss):
            problems.append(f"startup {variant}: no numbers")
    if not any(k[0] == "startup" for k in res.samples):
        problems.append("startup: did not run")
    return problems


SCENARIOS = ("http", "body", "plugins", "amqp", "startup")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--execd", type=Path, required=True, help="the execd binary to measure")
    ap.add_argument("--spawner", type=Path, required=True, help="bench/spawner's binary")
    ap.add_argument("--smoke", action="store_true", help="one short iteration of each scenario; writes nothing")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--out", type=Path, default=REPO / "docs/benchmarks.md")
    ap.add_argument("--skip-cargo-bench", action="store_true", help="do not run cargo bench for the plugins")
    ap.add_argument("--command", default="make bench", help="the command line recorded in the report")
    ap.add_argument("--from-json", type=Path, help="write the report from a saved run (~/.cache/execd/bench/"
                    "last.json) instead of measuring")
    args = ap.parse_args()
    plan = SMOKE if args.smoke else FULL
    only = set(args.only.split(","))
    for tool in ("wrk", "webhook", "amqp-consume", "php", "wc", "cat"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing; run scripts/setup.sh --bench", file=sys.stderr)
            return 1
    for b in (args.execd, args.spawner):
        if not b.is_file():
            print(f"bench: {b} does not exist; build it first (make bench / make bench-smoke do)", file=sys.stderr)
            return 1
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        return report(plan, args, Results.from_json(data))
    say(plan, f"execd {args.execd}, spawner {args.spawner}, {os.cpu_count()} cores")
    res = Results()
    res.facts["measured_at"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res.facts["versions"] = versions(args)
    started = time.monotonic()
    if only & {"http", "plugins"}:
        execd, webhook = start_servers(args)
        try:
            if "http" in only:
                scenario_http(plan, args, res, execd, webhook)
            if "plugins" in only:
                scenario_plugins(plan, args, res, execd)
        finally:
            execd.stop()
            webhook.stop()
    if "body" in only:
        scenario_body(plan, args, res)
    if "amqp" in only:
        scenario_amqp(plan, args, res)
        if "amqp" in res.notes:
            say(plan, f"amqp: not measured: {res.notes['amqp']}")
    if "startup" in only:
        scenario_startup(plan, args, res)
    say(plan, f"done in {time.monotonic() - started:.0f} s")

    raw = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "execd/bench"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / ("smoke.json" if plan.smoke else "last.json")).write_text(json.dumps(res.to_json(), indent=1))

    if plan.smoke:
        problems = smoke_check(res) if only == set(SCENARIOS) else []
        for t in targets(plan, res):
            say(plan, f"target {t.what}: {'—' if t.measured is None else f'{t.measured:.2f}{t.unit}'} "
                      f"(smoke numbers; not a verdict)")
        if problems:
            for p in problems:
                say(plan, f"FAILED: {p}")
            return 1
        say(plan, "ok: every scenario ran and produced numbers (nothing written to docs/)")
        return 0
    return report(plan, args, res)


def report(plan: Plan, args, res: Results) -> int:
    """Writes docs/benchmarks.md and its chart, and prints the verdicts."""
    png = args.out.with_suffix(".png")
    chart = png.name if make_chart(plan, res, png) else None
    args.out.write_text(render(plan, args, res, chart))
    say(plan, f"wrote {args.out}" + (f" and {png}" if chart else ""))
    for t in targets(plan, res):
        state = "not measured" if t.ok is None else ("pass" if t.ok else "MISS")
        say(plan, f"{state:12} {t.what}: {t.required}, measured "
                  f"{'—' if t.measured is None else f'{t.measured:.2f}{t.unit}'} ({t.margin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
