//! `spawner` — the "physical limit" the benchmarks compare execd with.
//!
//! It runs one command over and over at a fixed parallelism and does only
//! what any runner must do per run — spawn with a clean environment in its
//! own process group, feed stdin, collect stdout and stderr, wait — with no
//! HTTP, no queue and no async runtime. What execd reaches relative to this
//! is the share of the machine that its own machinery leaves to the command.
//!
//! ```text
//! spawner [-c WORKERS] [-n RUNS] [-d SECONDS] [--stdin-file F] [--json] -- PROGRAM [ARG]...
//! ```
//!
//! It stops at `-n` runs or after `-d` seconds, whichever comes first (the
//! duration always applies, so a run is bounded in time), and prints runs/s
//! and the p50/p99 latency of one run. Only std: `Command::spawn` uses
//! posix_spawn (vfork semantics) on Linux for exactly these settings, which
//! is the cheapest way to start a process from Rust.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Payloads up to this size fit in a pipe's buffer, so writing them before
/// reading the output cannot deadlock and needs no second thread.
const PIPE_BUFFER: usize = 64 * 1024;

const USAGE: &str = "usage: spawner [-c WORKERS] [-n RUNS] [-d SECONDS] [--stdin-file FILE] [--json] -- PROGRAM [ARG]...";

/// What to run and for how long, from the command line.
struct Options {
    /// Runs in flight at once, one thread each.
    workers: usize,
    /// Stop after this many runs in total; `None`: only the duration bounds.
    runs: Option<u64>,
    /// Stop starting runs after this long.
    duration: Duration,
    /// Written to each run's stdin; `None`: stdin is /dev/null.
    payload: Option<Vec<u8>>,
    /// One JSON object on stdout instead of a human line.
    json: bool,
    /// The program, resolved against PATH once, as execd does at load.
    program: PathBuf,
    args: Vec<String>,
}

/// What the workers measured.
#[derive(Default)]
struct Tally {
    /// Microseconds per run, spawn to reaped.
    latencies_us: Vec<u64>,
    /// Runs that could not spawn or exited non-zero.
    failures: u64,
    /// The first failure, so a broken command is not a silent zero.
    first_error: Option<String>,
}

fn main() -> ExitCode {
    let opts = match parse(std::env::args().skip(1).collect()) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("spawner: {msg}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let started = Instant::now();
    let tally = run_all(&opts);
    let elapsed = started.elapsed().as_secs_f64();
    report(&opts, &tally, elapsed);
    if let Some(e) = &tally.first_error {
        eprintln!("spawner: {} failed runs; first: {e}", tally.failures);
    }
    if tally.latencies_us.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse(args: Vec<String>) -> Result<Options, String> {
    let mut workers = 1;
    let mut runs = None;
    let mut duration = Duration::from_secs(5);
    let mut payload = None;
    let mut json = false;
    let mut it = args.into_iter();
    let mut command = Vec::new();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "-c" => {
                workers = value("-c")?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or("-c: expected 1..1024 workers")?
            }
            "-n" => {
                runs = Some(
                    value("-n")?
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or("-n: expected a positive run count")?,
                )
            }
            "-d" => {
                let secs: f64 = value("-d")?
                    .parse()
                    .ok()
                    .filter(|s| (0.01..=3600.0).contains(s))
                    .ok_or("-d: expected 0.01..3600 seconds")?;
                duration = Duration::from_secs_f64(secs);
            }
            "--stdin-file" => {
                let f = value("--stdin-file")?;
                payload = Some(std::fs::read(&f).map_err(|e| format!("{f}: {e}"))?);
            }
            "--json" => json = true,
            "-h" | "--help" => return Err("help".into()),
            "--" => {
                command.extend(it.by_ref());
                break;
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    let Some((program, args)) = command.split_first() else {
        return Err("no command after --".into());
    };
    Ok(Options {
        workers,
        runs,
        duration,
        payload,
        json,
        program: resolve(program)?,
        args: args.to_vec(),
    })
}

/// Finds `name` on PATH (a name with a slash is taken as a path).
fn resolve(name: &str) -> Result<PathBuf, String> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name}: not found on PATH"))
}

fn run_all(opts: &Options) -> Tally {
    let deadline = Instant::now() + opts.duration;
    // Runs not yet claimed; a worker claims one before each spawn.
    let remaining = AtomicU64::new(opts.runs.unwrap_or(u64::MAX));
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.workers)
            .map(|_| s.spawn(|| worker(opts, deadline, &remaining)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker panicked"))
            .collect()
    });
    let mut all = Tally::default();
    for t in tallies {
        all.latencies_us.extend(t.latencies_us);
        all.failures += t.failures;
        all.first_error = all.first_error.or(t.first_error);
    }
    all.latencies_us.sort_unstable();
    all
}

fn worker(opts: &Options, deadline: Instant, remaining: &AtomicU64) -> Tally {
    // The same settings execd's runner uses: clean environment but PATH,
    // own process group, all three streams handled. Built once per worker;
    // each spawn makes fresh pipes.
    let mut cmd = Command::new(&opts.program);
    cmd.args(&opts.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .process_group(0)
        .stdin(if opts.payload.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut tally = Tally::default();
    while Instant::now() < deadline
        && remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    {
        let start = Instant::now();
        match run_once(&mut cmd, opts.payload.as_deref()) {
            Ok(()) => tally.latencies_us.push(start.elapsed().as_micros() as u64),
            Err(e) => {
                tally.failures += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    tally
}

/// One run: spawn, feed stdin, read stdout and stderr to the end, reap.
fn run_once(cmd: &mut Command, payload: Option<&[u8]>) -> Result<(), String> {
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let stdin = child.stdin.take();
    let output = match (payload, stdin) {
        (Some(p), Some(mut w)) if p.len() <= PIPE_BUFFER => {
            // A command that does not read its input may close the pipe
            // early (EPIPE); like execd, that is its business.
            let _ = w.write_all(p);
            drop(w);
            child.wait_with_output()
        }
        (Some(p), Some(mut w)) => std::thread::scope(|s| {
            s.spawn(move || {
                let _ = w.write_all(p);
            });
            child.wait_with_output()
        }),
        _ => child.wait_with_output(),
    }
    .map_err(|e| format!("wait: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The value below which `q` of the sorted samples lie (nearest rank).
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(opts: &Options, t: &Tally, elapsed: f64) {
    let runs = t.latencies_us.len();
    let rate = runs as f64 / elapsed;
    let (p50, p99) = (
        percentile(&t.latencies_us, 0.50),
        percentile(&t.latencies_us, 0.99),
    );
    let mean = if runs == 0 {
        0.0
    } else {
        t.latencies_us.iter().sum::<u64>() as f64 / runs as f64
    };
    let program = opts.program.display().to_string();
    if opts.json {
        println!(
            "{{\"program\":{program:?},\"workers\":{},\"runs\":{runs},\"failures\":{},\"seconds\":{elapsed:.3},\"runs_per_s\":{rate:.1},\"p50_us\":{p50},\"p99_us\":{p99},\"mean_us\":{mean:.1}}}",
            opts.workers, t.failures
        );
    } else {
        println!(
            "{program}: {runs} runs in {elapsed:.2}s with {} workers: {rate:.1} runs/s, p50 {p50} µs, p99 {p99} µs ({} failed)",
            opts.workers, t.failures
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn runs_stop_at_the_count_and_failures_are_counted() {
        let opts = |program: &str| Options {
            workers: 2,
            runs: Some(5),
            duration: Duration::from_secs(10),
            payload: Some(b"hello".to_vec()),
            json: true,
            program: resolve(program).unwrap(),
            args: vec![],
        };
        let t = run_all(&opts("cat"));
        assert_eq!((t.latencies_us.len(), t.failures), (5, 0));
        let t = run_all(&opts("false"));
        assert_eq!((t.latencies_us.len(), t.failures), (0, 5));
        assert!(t.first_error.unwrap().contains("exit status: 1"));
    }
}
