//! Nothing a command starts outlives its request.

use std::time::{Duration, Instant};

use crate::util::*;

fn read_pids(path: &std::path::Path) -> (i32, i32, i32) {
    let text = std::fs::read_to_string(path).unwrap();
    let v: Vec<i32> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0], v[1], v[2])
}

#[tokio::test]
async fn timeout_kills_the_whole_group_including_term_ignoring_grandchildren() {
    let server = start(
        r#"
  - url: /fork
    timeout: 500ms
    kill-grace: 200ms
    cmd: {fixtures}/forker.sh {dir}/pids
"#,
    )
    .await;
    let started = Instant::now();
    server.get("/fork").await.problem(504);
    assert!(started.elapsed() < Duration::from_secs(3));
    let (child, grandchild, pgid) = read_pids(&server.dir.path().join("pids"));
    assert_eq!(child, pgid, "the command leads its own process group");
    assert!(
        eventually(Duration::from_secs(3), || !process_exists(child)
            && !process_exists(grandchild))
        .await,
        "a process survived (or was left a zombie): child {child} {}, grandchild {grandchild} {}",
        process_exists(child),
        process_exists(grandchild)
    );
    assert!(
        eventually(Duration::from_secs(3), || !group_exists(pgid)).await,
        "process group {pgid} still has members"
    );
}

#[tokio::test]
async fn background_processes_die_with_their_command() {
    // The command exits at once but leaves a grandchild running in the
    // background: it must not survive the request.
    // `$$` is a literal `$` in cmd: `$!` and `$1` are the shell's own.
    let script = r#"sleep 300 & echo $$! > "$$1"; echo done"#;
    let server = start(&format!(
        r#"
  - url: /bg
    cmd: /bin/sh -c '{script}' sh {{dir}}/bgpid
"#
    ))
    .await;
    let r = server.get("/bg").await;
    assert_eq!((r.status, r.text().as_str()), (200, "done\n"));
    let pid: i32 = std::fs::read_to_string(server.dir.path().join("bgpid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || !process_exists(pid)).await,
        "background process {pid} survived its request"
    );
}

#[tokio::test]
async fn drain_lets_running_commands_finish_then_kills_the_rest() {
    let server = start(
        r#"
  - url: /s
    cmd: /bin/sleep ${query.t}
"#,
    )
    .await;
    let addr = server.addr.clone();
    let short = tokio::spawn({
        let addr = addr.clone();
        async move { request(&addr, "GET", "/s?t=0.5", &[], b"").await }
    });
    let long = tokio::spawn(async move { request(&addr, "GET", "/s?t=30", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop(Duration::from_secs(1)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        started.elapsed()
    );
    assert_eq!(
        short.await.unwrap().status,
        200,
        "a command within the drain deadline finishes"
    );
    long.await.unwrap().problem(503);
}

#[tokio::test]
async fn user_and_rlimits_apply_in_the_child() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let server = start(
        r#"
  - url: /whoami
    user: nobody
    cmd: /bin/sh -c 'echo "$$(id -u) $$(id -g)"; ulimit -n'
    rlimits:
      open-files: 64
  - url: /bomb
    user: nobody
    timeout: 3s
    kill-grace: 0s
    rlimits:
      processes: 20
    cmd: /bin/sh -c 'bomb() { bomb | bomb & }; bomb; sleep 10'
  - url: /hog
    rlimits:
      memory: 128MiB
    cmd: php -d memory_limit=-1 -r '$$s = str_repeat("x", 512 * 1024 * 1024); echo strlen($$s);'
  - url: /plain
    cmd: /bin/sh -c 'id -u'
"#,
    )
    .await;
    let r = server.get("/whoami").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let nobody = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
    let (uid, gid) = unsafe { ((*nobody).pw_uid, (*nobody).pw_gid) };
    assert_eq!(r.text(), format!("{uid} {gid}\n64\n"));
    assert_eq!(
        server.get("/plain").await.text(),
        "0\n",
        "routes without user: keep execd's user"
    );

    // The fork bomb hits its process cap, is stopped at its timeout, and
    // leaves nothing behind; the daemon keeps serving.
    let started = Instant::now();
    let r = server.get("/bomb").await;
    assert!(r.status == 504 || r.status == 500, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(8));
    let left = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .map(|s| {
                        s.lines().any(|l| {
                            l.starts_with("Uid:")
                                && l.split_whitespace().nth(1) == Some(&uid.to_string())
                        })
                    })
                    .unwrap_or(false)
            })
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || left() == 0).await,
        "{} processes of nobody survived",
        left()
    );

    // The memory hog cannot get its 512 MiB.
    let r = server.get("/hog").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(server.get("/plain").await.status, 200);
}

#[tokio::test]
async fn a_process_that_leaves_the_group_cannot_hold_the_answer() {
    let server = start(
        r#"
  - url: /escape
    shell: true
    cmd: "setsid sh -c 'echo $$$$ > {dir}/escaped.pid; exec sleep 30' & while [ ! -s {dir}/escaped.pid ]; do sleep 0.05; done; echo started"
"#,
    )
    .await;
    // The background process left the command's process group, so the
    // group kill at the end does not reach it, and it holds a copy of
    // stdout and stderr for 30 s.
    let t = Instant::now();
    let r = server.get("/escape").await;
    let took = t.elapsed();
    assert_eq!((r.status, r.text().as_str()), (200, "started\n"));
    let pidfile = server.dir.path().join("escaped.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = process_exists(pid);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        alive,
        "the escaped process was running while execd answered"
    );
    assert!(
        took < Duration::from_secs(6),
        "answered after {took:?}: execd waited on the escaped process"
    );
}
