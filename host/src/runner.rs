//! Spawning commands: argv without a shell, a clean environment, a process
//! group of its own, capped output, a timeout that stops the whole group,
//! and no process left behind.
//!
//! The runner knows nothing of HTTP or AMQP: it takes a [`RunSpec`] and gives
//! back a [`RunResult`].

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where the command's standard input comes from.
pub enum Stdin {
    /// `/dev/null`.
    Null,
    /// These bytes, then end of file.
    Bytes(Bytes),
    /// Chunks as they arrive (a streamed request body); the sender dropping
    /// is end of file.
    Stream(mpsc::Receiver<Bytes>),
}

/// Everything needed to run one command.
pub struct RunSpec {
    pub program: PathBuf,
    /// argv, including argv[0].
    pub argv: Vec<OsString>,
    pub wd: PathBuf,
    /// The complete environment: nothing is inherited.
    pub env: Vec<(OsString, OsString)>,
    pub stdin: Stdin,
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub max_output: u64,
    /// Route or consumer name, for log lines.
    pub route: Arc<str>,
    pub request_id: Arc<str>,
    /// Cancelled when the daemon's drain deadline passes: stop the command.
    pub abort: CancellationToken,
    /// User, group and resource limits; `None` keeps the fast spawn path.
    pub lockdown: Option<crate::config::Lockdown>,
}

/// How a command ended.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Exit code when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Stopped by execd at its timeout.
    pub timed_out: bool,
    /// Stopped by execd because the daemon is shutting down.
    pub aborted: bool,
    /// Stopped by execd because stdout grew past `max_output`.
    pub output_overflow: bool,
    pub stdout: Bytes,
    /// The last bytes of stderr (at most [`STDERR_TAIL`]).
    pub stderr_tail: Vec<u8>,
    pub duration: Duration,
}

impl RunResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.aborted && !self.output_overflow
    }
}

/// How much of stderr is kept for errors and post plugins.
pub const STDERR_TAIL: usize = 4096;

/// A command could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {program}: {source}")]
pub struct SpawnError {
    pub program: String,
    #[source]
    pub source: std::io::Error,
}

/// Pids of the commands the runner is waiting on itself. The orphan reaper
/// leaves these alone; tokio reaps them.
static TRACKED: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();

fn tracked() -> &'static Mutex<HashSet<i32>> {
    TRACKED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Spawns hold this shared from `spawn` until their pid is tracked; the
/// reaper holds it exclusively while it reaps orphans, so it never takes a
/// command that is started but not yet tracked for one. Shared, so spawns run in
/// parallel: each one blocks its thread until the child has exec'd
/// (vfork), and one lock for all of them capped execd at one spawn at a
/// time (about 1,200 a second on 2 cores, with a core a quarter idle).
static SPAWNING: RwLock<()> = RwLock::new(());

/// Makes execd the reaper of orphans from its commands' process groups, so
/// a grandchild that outlives its command can never become a zombie that no
/// one collects (execd is often PID 1 in a container). Idempotent.
///
/// The reaper is a plain thread rather than a task: it must outlive any one
/// tokio runtime (the CLI and tests start several), and it polls because a
/// second SIGCHLD handler would race tokio's own.
pub fn start_orphan_reaper() {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.set(()).is_err() {
        return;
    }
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument and
    // touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let spawned = std::thread::Builder::new()
        .name("execd-reaper".into())
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                reap_orphans();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the orphan reaper; orphaned grandchildren may stay zombies");
    }
}

/// Collects exited children that are not commands the runner waits on and
/// that belong to a command's process group (not to execd's own group, whose
/// children someone else in this process may be waiting for).
fn reap_orphans() {
    let own_group = unsafe { libc::getpgrp() };
    // SAFETY (both closures): plain syscalls on a pid; no memory is shared.
    let in_command_group = |pid: i32| {
        let pgid = unsafe { libc::getpgid(pid) };
        pgid >= 0 && pgid != own_group
    };
    let untracked = |pid: &i32| {
        !tracked()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(pid)
    };
    // Looking costs spawns nothing; only when something may be an orphan
    // does the reaper stop spawns, so that a command started but not yet
    // tracked cannot pass for one, and look again.
    let candidates: Vec<i32> = children()
        .into_iter()
        .filter(|&pid| untracked(&pid) && in_command_group(pid))
        .collect();
    if candidates.is_empty() {
        return;
    }
    let _no_spawns = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
    for pid in candidates.into_iter().filter(untracked) {
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    }
}

/// Direct children of this process, from /proc.
fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Sends `sig` to every process of a group; `false` when none is left.
pub fn signal_group(pgid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) with a negative pid addresses a process group.
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// Runs one command to completion.
pub async fn run(spec: RunSpec) -> Result<RunResult, SpawnError> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&spec.program);
    if let Some((arg0, rest)) = spec.argv.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.current_dir(&spec.wd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(match spec.stdin {
            Stdin::Null => Stdio::null(),
            _ => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    if let Some(l) = &spec.lockdown {
        apply_lockdown(&mut cmd, l);
    }

    let mut child = {
        let _spawning = SPAWNING.read().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn().map_err(|source| SpawnError {
            program: spec.program.display().to_string(),
            source,
        })?;
        if let Some(pid) = child.id() {
            tracked()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pid as i32);
        }
        child
    };
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    // Whatever happens below, the group is killed and the pid untracked.
    let mut cleanup = GroupGuard { pgid: pid };

    let stdin_task = match (spec.stdin, child.stdin.take()) {
        (Stdin::Bytes(b), Some(mut w)) => Some(tokio::spawn(async move {
            // A command that does not read its input closes the pipe early;
            // that is its business, not an error.
            let _ = w.write_all(&b).await;
            let _ = w.shutdown().await;
        })),
        (Stdin::Stream(mut rx), Some(mut w)) => Some(tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        })),
        _ => None,
    };
    let stderr = child.stderr.take().expect("stderr is piped");
    let stop_stderr = CancellationToken::new();
    let mut stderr_task = tokio::spawn(log_stderr(
        stderr,
        spec.route.clone(),
        spec.request_id.clone(),
        stop_stderr.clone(),
    ));
    let mut stdout = child.stdout.take().expect("stdout is piped");

    let mut buf = BytesMut::with_capacity(8192);
    let mut stdout_open = true;
    let mut status = None;
    let mut timed_out = false;
    let mut aborted = false;
    let mut output_overflow = false;
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut kill_at: Option<tokio::time::Instant> = None;
    // Set when the command has ended: how long its output is still read.
    let mut drain_until: Option<tokio::time::Instant> = None;
    let limit = spec.max_output;

    while stdout_open || status.is_none() {
        tokio::select! {
            r = read_some(&mut stdout, &mut buf), if stdout_open => {
                match r {
                    Ok(0) | Err(_) => stdout_open = false,
                    Ok(_) if buf.len() as u64 > limit => {
                        output_overflow = true;
                        stdout_open = false;
                        signal_group(pid, libc::SIGKILL);
                    }
                    Ok(_) => {}
                }
            }
            s = child.wait(), if status.is_none() => {
                status = Some(s);
                // The command is gone; anything it left running in its group
                // goes too, which also closes pipes those processes held.
                signal_group(pid, libc::SIGKILL);
                drain_until = Some(tokio::time::Instant::now() + AFTER_EXIT);
            }
            _ = tokio::time::sleep_until(deadline), if !timed_out && !aborted => {
                timed_out = true;
                stop_group(pid, spec.kill_grace, &mut kill_at);
            }
            _ = spec.abort.cancelled(), if !timed_out && !aborted => {
                aborted = true;
                stop_group(pid, spec.kill_grace, &mut kill_at);
            }
            _ = sleep_until_opt(kill_at) => {
                kill_at = None;
                signal_group(pid, libc::SIGKILL);
            }
            _ = sleep_until_opt(drain_until), if stdout_open => {
                stdout_open = false;
                escaped_output(&spec.route, &spec.request_id, "stdout");
            }
        }
    }
    let status = status.expect("loop ends with a status");
    // Reaped and its group killed above: a later kill could only hit a
    // stranger that reused the pid.
    cleanup.pgid = 0;
    untrack(pid);
    if let Some(t) = stdin_task {
        t.abort();
    }
    let stderr_tail = match drain_until {
        Some(at) => match tokio::time::timeout_at(at, &mut stderr_task).await {
            Ok(tail) => tail.unwrap_or_default(),
            Err(_) => {
                escaped_output(&spec.route, &spec.request_id, "stderr");
                stop_stderr.cancel();
                stderr_task.await.unwrap_or_default()
            }
        },
        None => stderr_task.await.unwrap_or_default(),
    };
    let (exit_code, signal) = match &status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal())
        }
        Err(_) => (None, None),
    };
    if output_overflow {
        buf.truncate(limit as usize);
    }
    Ok(RunResult {
        exit_code,
        signal,
        timed_out,
        aborted,
        output_overflow,
        stdout: buf.freeze(),
        stderr_tail,
        duration: started.elapsed(),
    })
}

/// The type `setrlimit` takes its resource as: glibc has an enum of its own,
/// musl a plain int.
#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;

/// Sets user, group and rlimits for the child. Limits go in through
/// `pre_exec` (between fork and exec); uid and gid through the standard
/// library, which also drops supplementary groups when execd is root.
fn apply_lockdown(cmd: &mut tokio::process::Command, l: &crate::config::Lockdown) {
    if let Some(gid) = l.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = l.uid {
        cmd.uid(uid);
    }
    let limits: Vec<(RlimitResource, u64)> = [
        (libc::RLIMIT_CPU, l.cpu_seconds),
        (libc::RLIMIT_AS, l.address_space),
        (libc::RLIMIT_NOFILE, l.open_files),
        (libc::RLIMIT_NPROC, l.processes),
    ]
    .into_iter()
    .filter_map(|(r, v)| v.map(|v| (r, v)))
    .collect();
    if limits.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit, which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (resource, value) in &limits {
                let lim = libc::rlimit {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                if libc::setrlimit(*resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// How long a command's stdout, stderr and reply socket are still read
/// after it ended. Its process group is gone by then, so their writers are
/// closed and what is left is already buffered; this only bounds a process
/// that left the group (`setsid`) holding a copy of one.
pub(crate) const AFTER_EXIT: Duration = Duration::from_secs(2);

fn escaped_output(route: &str, request_id: &str, stream: &str) {
    tracing::warn!(
        route,
        request_id,
        "the command ended but a process outside its group still holds its {stream}; stopped reading it {}s after the end",
        AFTER_EXIT.as_secs()
    );
}

/// SIGTERM now, SIGKILL after the grace period.
fn stop_group(pgid: i32, grace: Duration, kill_at: &mut Option<tokio::time::Instant>) {
    if grace.is_zero() {
        signal_group(pgid, libc::SIGKILL);
    } else {
        signal_group(pgid, libc::SIGTERM);
        *kill_at = Some(tokio::time::Instant::now() + grace);
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(buf.len().max(8192));
    }
    r.read_buf(buf).await
}

fn untrack(pid: i32) {
    tracked()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid);
}

/// Kills what is left of a command's group when a run ends early (its
/// future dropped by a client that went away, say).
struct GroupGuard {
    pgid: i32,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.pgid > 0 {
            signal_group(self.pgid, libc::SIGKILL);
            // The run future was dropped before the command was reaped;
            // tokio's orphan queue reaps it, so the pid is no longer ours.
            untrack(self.pgid);
        }
    }
}

/// Logs stderr line by line (tagged with route and request id) and keeps
/// its tail.
async fn log_stderr<R: AsyncRead + Unpin>(
    mut r: R,
    route: Arc<str>,
    request_id: Arc<str>,
    stop: CancellationToken,
) -> Vec<u8> {
    let mut tail: Vec<u8> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 8192];
    let mut logged_bytes = 0usize;
    // A script that floods stderr must not flood the log.
    const LOG_BUDGET: usize = 64 * 1024;
    loop {
        let n = tokio::select! {
            r = r.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = stop.cancelled() => break,
        };
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > STDERR_TAIL * 2 {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        pending.extend_from_slice(&chunk[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if logged_bytes < LOG_BUDGET {
                logged_bytes += line.len();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                tracing::warn!(route = %route, request_id = %request_id, "stderr: {}", text.trim_end_matches('\r'));
            }
        }
        if pending.len() > 8192 {
            pending.clear();
        }
    }
    if !pending.is_empty() && logged_bytes < LOG_BUDGET {
        tracing::warn!(route = %route, request_id = %request_id, "stderr: {}", String::from_utf8_lossy(&pending));
    }
    if tail.len() > STDERR_TAIL {
        tail.drain(..tail.len() - STDERR_TAIL);
    }
    tail
}
