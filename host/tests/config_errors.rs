//! A bad config names file, line, column and field — every problem at once.

use crate::util::*;

fn errors_of(yaml: &str) -> Vec<String> {
    let (_dir, path) = write_config(yaml);
    match execd::config::load(&path) {
        Ok(_) => panic!("config should not load:\n{yaml}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn every_error_at_once_with_line_and_column() {
    let yaml = r#"listen: 127.0.0.1:0
routes:
  - url: /a
    cmd: php x.php
    tiemout: 5
  - url: /b
    cmd: php x.php
    timeout: soon
  - url: /c
    cmd: php x.php ${qurey.x}
  - url: /d
    wd: {dir}/does-not-exist
    cmd: php x.php
  - url: /e
    method: FETCH
    cmd: no-such-program-anywhere
"#;
    let errors = errors_of(yaml);
    let joined = errors.join("\n");
    assert_eq!(errors.len(), 6, "{joined}");
    let has = |needle: &str, line: u32, col: u32| {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(needle) && e.contains(&format!("execd.yaml:{line}:{col}:"))),
            "no error containing {needle:?} at {line}:{col} in\n{joined}"
        )
    };
    has(
        "routes[0].tiemout: unknown field `tiemout`; did you mean `timeout`?",
        5,
        5,
    );
    has("routes[1].timeout: expected a duration", 8, 14);
    has("routes[2].cmd: unknown placeholder kind `qurey`", 10, 10);
    has("routes[3].wd: working directory", 12, 9);
    has("routes[4].method: unknown method \"FETCH\"", 15, 13);
    has(
        "routes[4].cmd: program \"no-such-program-anywhere\" is not found in PATH",
        16,
        10,
    );
}

#[test]
fn bad_types_and_yaml_syntax() {
    let errors = errors_of("routes:\n  - url: [1]\n    cmd: {a: b}\n    env: 3\n");
    let joined = errors.join("\n");
    assert!(
        joined.contains(":2:10: routes[0].url: expected a string, found a list"),
        "{joined}"
    );
    assert!(
        joined.contains(":3:10: routes[0].cmd: expected a string, found a mapping"),
        "{joined}"
    );
    assert!(
        joined.contains(":4:10: routes[0].env: expected a mapping of names to values"),
        "{joined}"
    );

    let errors = errors_of("routes:\n  - url: /a\n   cmd: [\n");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("execd.yaml:3:") && errors[0].contains("invalid YAML"),
        "{errors:?}"
    );
}

#[test]
fn placeholders_must_be_suppliable() {
    let errors = errors_of(
        "routes:\n  - url: /a/{id}\n    cmd: /bin/echo ${path.name}\n  - url: /z\n    cmd: /bin/echo $body\n  - url: /b\n    shell: true\n    cmd: echo ${query.x}\n  - url: /c\n    cmd: $body\n    payload-to: body\n",
    );
    let joined = errors.join("\n");
    assert!(
        joined.contains("${path.name} names no `{name}` segment of url /a/{id}"),
        "{joined}"
    );
    assert!(
        joined.contains("$body is used in cmd but payload-to is not `body`"),
        "{joined}"
    );
    assert!(
        joined.contains("placeholders are not allowed with `shell: true`"),
        "{joined}"
    );
    assert!(
        joined.contains("the program (first word of cmd) must be fixed text"),
        "{joined}"
    );
}

#[test]
fn env_interpolation_and_missing_variables() {
    let errors = errors_of("listen: ${EXECD_TEST_SURELY_UNSET}\nroutes: []\n");
    assert!(
        errors[0].contains(
            "execd.yaml:1:9: listen: environment variable EXECD_TEST_SURELY_UNSET is not set"
        ),
        "{errors:?}"
    );
    let (_d, path) =
        write_config("listen: ${EXECD_TEST_SURELY_UNSET:-127.0.0.1:9999}\nroutes: []\n");
    let c = execd::config::load(&path).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:9999");
}

#[test]
fn duplicate_routes_are_reported() {
    let errors = errors_of(
        "routes:\n  - url: /a/{x}\n    cmd: /bin/true\n  - url: /a/{y}\n    method: [POST, GET]\n    cmd: /bin/true\n",
    );
    assert!(
        errors[0].contains("GET /a/{y} is already served by the route at line 2"),
        "{errors:?}"
    );
}

#[test]
fn a_zero_timeout_is_refused_not_a_504_for_every_request() {
    let yaml = r#"listen: 127.0.0.1:0
limits:
  timeout: 0
  body-timeout: 0s
  kill-grace: 0
routes:
  - url: /a
    timeout: 0ms
    cmd: /bin/true
"#;
    let errors = errors_of(yaml);
    let joined = errors.join("\n");
    assert_eq!(errors.len(), 3, "{joined}");
    for (field, at) in [
        ("limits.timeout", "3:12"),
        ("limits.body-timeout", "4:17"),
        ("routes[0].timeout", "8:14"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("execd.yaml:{at}: {field}: must be more than 0"))),
            "no error for {field} at {at} in\n{joined}"
        );
    }
}

#[test]
fn tls_files_are_read_at_load_and_need_a_tcp_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    let errors = errors_of(&format!(
        "listen: 127.0.0.1:0\ntls:\n  cert: {}\n  key: {}\nroutes: []\n",
        cert.display(),
        key.display()
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("execd.yaml:3:3: tls: ") && errors[0].contains("cert.pem"),
        "{errors:?}"
    );
    let errors = errors_of(&format!(
        "listen: unix:{}/execd.sock\ntls:\n  cert: {}\n  key: {}\nroutes: []\n",
        dir.path().display(),
        cert.display(),
        key.display()
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("HTTPS needs a TCP `listen:`")),
        "{errors:?}"
    );
}
