//! # hostile — a plugin that misbehaves on purpose (TEST ONLY)
//!
//! Host tests load it to prove that the sandbox holds: a runaway plugin is
//! stopped by the deadline or the memory cap, a trap or an error fails the
//! call closed, and the plugin can reach no file, environment variable or
//! network. It must never be shipped in an image.
//!
//! ```yaml
//! plugins:
//!   - name: hostile
//!     config: { mode: loop }
//! ```
//!
//! | mode     | behaviour |
//! |----------|-----------|
//! | `loop`   | spins forever (the host's deadline must stop it) |
//! | `sleep`  | sleeps for an hour in one host call, where no guest code runs for the epoch to stop (the host's deadline must stop it anyway) |
//! | `alloc`  | allocates and touches 1 MiB blocks forever (the memory cap must stop it) |
//! | `trap`   | panics, which aborts: a wasm trap |
//! | `error`  | returns `Err("hostile error")` |
//! | `file`   | tries to read `/etc/passwd`, write `/tmp/execd-hostile-canary`, list `/` and `.` |
//! | `env`    | tries `HOME`, counts environment variables and arguments |
//! | `socket` | tries TCP to `127.0.0.1:22`, a DNS lookup, a UDP bind and a TCP listen |
//! | `clock`  | answers with the wall and monotonic clocks it sees |
//! | `log`    | logs a 3000-character line and 10 000 short ones, then continues (the host's line length and per-call limits must hold) |
//! | `ok`     | continues unchanged |
//!
//! `file`, `env` and `socket` never trap: they answer `200` with
//! `{"mode": "file", "results": [{"op": "read /etc/passwd", "ok": false,
//! "detail": "<error text>"}, ...]}`, where `ok: true` means the attempt got
//! through (and `detail` then shows what leaked), so a host test asserts
//! every `ok` is false.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use execd_plugin_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Which misbehaviour.
    mode: Mode,
}

/// The misbehaviours (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Loop,
    Sleep,
    Alloc,
    Trap,
    Error,
    File,
    Env,
    Socket,
    Clock,
    Log,
    Ok,
}

/// One attempt to reach outside the sandbox.
#[derive(Debug, Serialize)]
struct Probe {
    /// What was tried, e.g. `read /etc/passwd`.
    op: String,
    /// Whether it got through.
    ok: bool,
    /// The error, or what was obtained.
    detail: String,
}

impl Probe {
    fn new<T, E: std::fmt::Display>(
        op: &str,
        result: Result<T, E>,
        show: impl FnOnce(T) -> String,
    ) -> Probe {
        match result {
            Ok(value) => Probe {
                op: op.to_owned(),
                ok: true,
                detail: show(value),
            },
            Err(err) => Probe {
                op: op.to_owned(),
                ok: false,
                detail: err.to_string(),
            },
        }
    }

    /// A count that should be zero in the sandbox: `ok` when it is not.
    fn count(op: &str, count: usize, what: &str) -> Probe {
        Probe {
            op: op.to_owned(),
            ok: count > 0,
            detail: format!("{count} {what}"),
        }
    }
}

/// The plugin.
struct Hostile;

impl Plugin for Hostile {
    type Config = Settings;
}

impl Pre for Hostile {
    fn pre(settings: &Settings, _ctx: &Context, inv: Invocation) -> Result<Decision, String> {
        let mode = settings.mode;
        let probes = match mode {
            Mode::Loop => spin(),
            Mode::Sleep => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                return Ok(Decision::Continue(inv));
            }
            Mode::Alloc => hoard(),
            Mode::Trap => panic!("hostile trap"),
            Mode::Error => return Err("hostile error".to_owned()),
            Mode::Ok => return Ok(Decision::Continue(inv)),
            Mode::Log => {
                // One line far over the host's 2048 characters, then a flood.
                info!("{}", "é".repeat(3000));
                for i in 0..10_000 {
                    info!("hostile log line {i}");
                }
                return Ok(Decision::Continue(inv));
            }
            Mode::Clock => return Ok(Decision::Reply(Reply::json(200, &clock()))),
            Mode::File => file_probes(CANARY),
            Mode::Env => env_probes(),
            Mode::Socket => socket_probes(),
        };
        Ok(Decision::Reply(Reply::json(200, &report(mode, &probes))))
    }
}

export_plugin!(Hostile, pre);

/// The reply body for the probing modes.
fn report(mode: Mode, probes: &[Probe]) -> serde_json::Value {
    json!({ "mode": mode, "results": probes })
}

/// Never returns, and never yields: only the host's deadline ends it.
fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

/// Never returns: grows until the host's memory cap traps it. Each block is
/// filled with non-zero bytes so the pages are really committed.
fn hoard() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(vec![0xA5; 1 << 20]);
        std::hint::black_box(&mut blocks);
    }
}

/// The file `file` mode tries to create; a host test checks it never appears.
const CANARY: &str = "/tmp/execd-hostile-canary";

fn file_probes(canary: &str) -> Vec<Probe> {
    vec![
        Probe::new(
            "read /etc/passwd",
            std::fs::read_to_string("/etc/passwd"),
            |text| {
                format!(
                    "read {} bytes: {}",
                    text.len(),
                    text.lines().next().unwrap_or_default()
                )
            },
        ),
        Probe::new(
            &format!("write {canary}"),
            std::fs::File::create(canary)
                .and_then(|mut file| file.write_all(b"the sandbox leaked\n")),
            |()| "wrote the canary".to_owned(),
        ),
        Probe::new("list /", std::fs::read_dir("/"), |entries| {
            format!("{} entries", entries.count())
        }),
        Probe::new("list .", std::fs::read_dir("."), |entries| {
            format!("{} entries", entries.count())
        }),
    ]
}

fn env_probes() -> Vec<Probe> {
    let vars: Vec<String> = std::env::vars().map(|(name, _)| name).collect();
    let mut count = Probe::count("env::vars().count()", vars.len(), "variables");
    if count.ok {
        count.detail.push_str(&format!(": {}", vars.join(", ")));
    }
    vec![
        Probe::new("env::var(HOME)", std::env::var("HOME"), |home| {
            format!("HOME={home}")
        }),
        count,
        Probe::count("env::args().count()", std::env::args().count(), "arguments"),
    ]
}

fn socket_probes() -> Vec<Probe> {
    vec![
        Probe::new(
            "tcp connect 127.0.0.1:22",
            TcpStream::connect("127.0.0.1:22"),
            |stream| format!("connected to {:?}", stream.peer_addr()),
        ),
        Probe::new(
            "dns resolve localhost:80",
            "localhost:80".to_socket_addrs(),
            |addrs| format!("resolved {:?}", addrs.collect::<Vec<_>>()),
        ),
        Probe::new(
            "udp bind 0.0.0.0:0",
            UdpSocket::bind("0.0.0.0:0"),
            |socket| format!("bound {:?}", socket.local_addr()),
        ),
        Probe::new(
            "tcp listen 127.0.0.1:0",
            TcpListener::bind("127.0.0.1:0"),
            |listener| format!("listening on {:?}", listener.local_addr()),
        ),
    ]
}

/// What the clocks read: the wall clock in ms since the epoch, and two
/// monotonic readings (their difference shows the clock's resolution).
fn clock() -> serde_json::Value {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH);
    let start = Instant::now();
    let elapsed_ns = start.elapsed().as_nanos();
    json!({
        "mode": Mode::Clock,
        "unix_ms": wall.as_ref().map(|d| d.as_millis() as u64).ok(),
        "wall_error": wall.err().map(|err| err.to_string()),
        "monotonic_elapsed_ns": elapsed_ns as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(json: &str) -> Result<(), String> {
        validate_config::<Hostile>(json)
    }

    #[test]
    fn validate_accepts_the_modes_and_rejects_others() {
        for mode in [
            "loop", "sleep", "alloc", "trap", "error", "file", "env", "socket", "clock", "log",
            "ok",
        ] {
            assert_eq!(
                validate(&format!(r#"{{"mode": "{mode}"}}"#)),
                Ok(()),
                "{mode}"
            );
        }
        let err = validate(r#"{"mode": "fork"}"#).unwrap_err();
        assert!(err.starts_with("mode: unknown variant `fork`"), "{err}");
        assert!(
            validate("null")
                .unwrap_err()
                .starts_with("configuration is missing")
        );
        assert!(validate(r#"{"mode": "ok", "extra": 1}"#).is_err());
    }

    /// The shape a host test parses: mode, then op/ok/detail per attempt.
    #[test]
    fn report_shape() {
        let probes = [
            Probe::new("read x", Err::<(), _>("denied"), |()| String::new()),
            Probe::new("read y", Ok::<_, String>(3), |n| format!("{n} bytes")),
            Probe::count("count", 0, "variables"),
        ];
        assert_eq!(
            report(Mode::File, &probes),
            json!({"mode": "file", "results": [
                {"op": "read x", "ok": false, "detail": "denied"},
                {"op": "read y", "ok": true, "detail": "3 bytes"},
                {"op": "count", "ok": false, "detail": "0 variables"},
            ]})
        );
    }

    /// On the native host nothing is sandboxed, so the probes must see
    /// through: this proves a probe reports `ok: true` when access works,
    /// which is what makes `ok: false` in the sandbox mean something.
    #[test]
    fn probes_succeed_where_nothing_is_sandboxed() {
        let env = env_probes();
        assert!(
            env.iter().any(|p| p.op == "env::vars().count()" && p.ok),
            "{env:?}"
        );
        // A canary of its own, so this test never leaves the one a host
        // test looks for.
        let canary = std::env::temp_dir().join(format!("hostile-test-{}", std::process::id()));
        let files = file_probes(canary.to_str().unwrap());
        let _ = std::fs::remove_file(&canary);
        assert!(files.iter().all(|p| p.ok), "{files:?}");
    }
}
