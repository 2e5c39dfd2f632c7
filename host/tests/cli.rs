//! The `execd` binary: exit codes, `check`, `run`, and signals.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn execd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_execd"))
}

#[test]
fn check_prints_the_route_table() {
    let out = execd()
        .args(["check", "-c"])
        .arg(repo().join("config/execd.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("/template-new"), "{stdout}");
    assert!(stdout.contains("php addtemplate.php '${body}'"), "{stdout}");
}

#[test]
fn check_exits_64_with_every_error() {
    let (_dir, path) = write_config("routes:\n  - url: nope\n    cmd: /bin/true\n    bogus: 1\n");
    let out = execd().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 errors in config"), "{stderr}");
    assert!(
        stderr.contains("execd.yaml:2:10: routes[0].url: \"nope\" must start with `/`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("execd.yaml:4:5: routes[0].bogus: unknown field"),
        "{stderr}"
    );
}

#[test]
fn run_invokes_one_route_without_a_server() {
    let out = execd()
        .args(["run", "-c"])
        .arg(repo().join("config/execd.yaml"))
        .args(["POST", "/upper", "--body", "quiet please"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "QUIET PLEASE");
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 200"));
    let out = execd()
        .args(["run", "-c"])
        .arg(repo().join("config/execd.yaml"))
        .args(["GET", "/nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route serves /nowhere"));
}

#[test]
fn a_second_sigterm_stops_the_drain() {
    let port = free_port();
    let (_dir, path) = write_config(&format!(
        "listen: 127.0.0.1:{port}\nadmin: off\nlimits: {{drain-timeout: 60s, kill-grace: 0s}}\nroutes:\n  - url: /s\n    cmd: /bin/sleep 30\n"
    ));
    let addr = format!("127.0.0.1:{port}");
    let mut execd = Binary::serve(&[], &path, &addr);
    block_on(async {
        let a = addr.clone();
        let inflight = tokio::spawn(async move { request(&a, "GET", "/s", &[], b"").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The first signal drains: the 30 s command may finish, for up to
        // 60 s. The second means now.
        execd.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        execd.signal(libc::SIGTERM);
        let r = inflight.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answered after {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, 503, "the stopped command's answer: {}", r.text());
    });
    assert_eq!(execd.wait(), Some(0));
    let log = execd.log();
    assert!(log.contains("second signal"), "{log}");
}

#[test]
fn serve_drains_on_sigterm_and_exits_zero() {
    let port = free_port();
    let (_dir, path) = write_config(&format!(
        "listen: 127.0.0.1:{port}\nadmin: off\nroutes:\n  - url: /s\n    cmd: /bin/sleep 1\n  - url: /x\n    cmd: /bin/echo x\n"
    ));
    let addr = format!("127.0.0.1:{port}");
    let mut execd = Binary::serve(&[], &path, &addr);
    block_on(async {
        assert_eq!(request(&addr, "GET", "/x", &[], b"").await.status, 200);
        let a = addr.clone();
        let inflight = tokio::spawn(async move { request(&a, "GET", "/s", &[], b"").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        execd.signal(libc::SIGTERM);
        assert_eq!(
            inflight.await.unwrap().status,
            200,
            "the running request completes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            tokio::net::TcpStream::connect(&addr).await.is_err(),
            "no longer accepting"
        );
    });
    assert_eq!(execd.wait(), Some(0));
    // The log went to a file: plain lines, no terminal colour codes.
    let log = execd.log();
    assert!(log.contains("execd listening"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log file: {log}");
}

#[test]
fn plugin_run_prints_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    let wasm = crate::plugins::wasm("api-key");
    let run = |headers: &str| {
        std::fs::write(
            &req,
            format!(r#"{{"method": "POST", "path": "/x", "headers": {headers}, "body": "hi"}}"#),
        )
        .unwrap();
        let out = execd()
            .args([
                "plugin",
                "run",
                &wasm,
                "--config",
                r#"{"keys": ["k-1"]}"#,
                "--request",
            ])
            .arg(&req)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let d = run("{}");
    assert_eq!(d["decision"], "reply");
    assert_eq!(d["reply"]["status"], 401);
    let d = run(r#"[["X-Api-Key", "k-1"]]"#);
    assert_eq!(d["decision"], "continue");
    assert_eq!(d["invocation"]["body"], "hi");

    // A bad config is the plugin's own message, and a failure exit.
    let out = execd()
        .args([
            "plugin",
            "run",
            &wasm,
            "--config",
            r#"{"keys": []}"#,
            "--request",
        ])
        .arg(&req)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config rejected by the plugin"));

    // --memory caps the call as a served plugin's `memory` does: api-key
    // starts with 640 KiB of memory, so 512 KiB is too little.
    let out = execd()
        .args([
            "plugin",
            "run",
            &wasm,
            "--memory",
            "512KiB",
            "--config",
            r#"{"keys": ["k-1"]}"#,
            "--request",
        ])
        .arg(&req)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("memory"), "{stderr}");
}

#[test]
fn plugin_new_writes_a_crate_from_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let out = execd()
        .args(["plugin", "new", "my-auth", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cargo = std::fs::read_to_string(dir.path().join("my-auth/Cargo.toml")).unwrap();
    assert!(cargo.contains("name = \"my-auth\""), "{cargo}");
    assert!(cargo.contains("execd-plugin-sdk = { path = "), "{cargo}");
    let lib = std::fs::read_to_string(dir.path().join("my-auth/src/lib.rs")).unwrap();
    assert!(
        lib.contains("export_plugin!") && !lib.contains("{{name}}"),
        "{lib}"
    );
    let again = execd()
        .args(["plugin", "new", "my-auth", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing directory is not overwritten"
    );
}
