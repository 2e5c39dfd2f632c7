//! Hostile bodies and query values reach the script as exactly one argv
//! element, byte for byte, and run nothing.

use crate::util::*;

/// Strings that would do harm if anything on the way were a shell or an
/// option parser. `CANARY` is replaced by a path that a successful
/// injection would create.
const CORPUS: &[&str] = &[
    "; touch CANARY",
    "&& touch CANARY",
    "|| touch CANARY",
    "| touch CANARY",
    "$(touch CANARY)",
    "`touch CANARY`",
    "${IFS}touch${IFS}CANARY",
    "\ntouch CANARY",
    "\r\ntouch CANARY\r\n",
    "'; touch CANARY; echo '",
    "\"; touch CANARY; echo \"",
    "\\\"; touch CANARY",
    "a' 'b",
    "a\" \"b",
    "$(IFS=,;cmd=touch,CANARY;$cmd)",
    "> CANARY",
    ">> CANARY",
    "< /etc/passwd",
    "2> CANARY",
    "&touch CANARY&",
    "-r system('touch CANARY');",
    "-rsystem('touch CANARY');",
    "--define=auto_prepend_file=/etc/passwd",
    "-d auto_prepend_file=data://text/plain,<?php touch('CANARY');",
    "-f /etc/passwd",
    "-",
    "--",
    "--help",
    "-h",
    "-i",
    "-n -r 'touch(\"CANARY\");'",
    "*",
    "/*",
    "~",
    "~root",
    "{a,b}",
    "$HOME",
    "${HOME}",
    "$((1+1))",
    "!!",
    "#comment touch CANARY",
    "\\",
    "\t\ttabs\t",
    "   ",
    "",
    "%s%s%s%n",
    "../../../../etc/passwd",
    "$body",
    "${query.x}",
    "${body}",
    "<?php touch('CANARY'); ?>",
    "\u{202e}rtl\u{200b}zero-width",
    "emoji 🦀 and ünïcödé",
    "a\u{0}b",
    "x=1 touch CANARY",
    "() { :; }; touch CANARY",
    "$'\\x74ouch' CANARY",
];

#[tokio::test]
async fn hostile_bodies_arrive_as_one_argument() {
    let server = start(
        r#"
  - url: /arg
    method: POST
    payload-to: body
    cmd: php {fixtures}/argv.php $body
"#,
    )
    .await;
    let canary = server.dir.path().join("canary");
    let mut checked = 0;
    for raw in CORPUS {
        let body = raw.replace("CANARY", &canary.display().to_string());
        let r = server.post("/arg", body.as_bytes()).await;
        if body.contains('\0') {
            // No argv element can hold a NUL: refused, precisely.
            let p = r.problem(400);
            assert!(p["detail"].as_str().unwrap().contains("NUL"), "{p}");
            continue;
        }
        assert_eq!(r.status, 200, "{body:?}: {}", r.text());
        let argv = r.json()["argv"].as_array().unwrap().clone();
        assert_eq!(argv.len(), 1, "{body:?} became {argv:?}");
        assert_eq!(b64(argv[0].as_str().unwrap()), body.as_bytes(), "{body:?}");
        checked += 1;
    }
    // Bytes that are not UTF-8 are passed through untouched too.
    let raw: &[u8] = b"\xff\xfe; touch x \x80";
    let r = server.post("/arg", raw).await;
    assert_eq!(b64(r.json()["argv"][0].as_str().unwrap()), raw);
    assert!(checked >= 50, "corpus too small: {checked}");
    assert!(!canary.exists(), "an injection ran a command");
}

#[tokio::test]
async fn hostile_query_values_arrive_as_one_argument() {
    let server = start(
        r#"
  - url: /q
    cmd: php {fixtures}/argv.php --x=${query.x} ${query.y:-none}
"#,
    )
    .await;
    let canary = server.dir.path().join("canary");
    for raw in CORPUS.iter().filter(|s| !s.contains('\0')) {
        let value = raw.replace("CANARY", &canary.display().to_string());
        let r = server
            .get(&format!(
                "/q?x={}&y={}",
                pct(value.as_bytes()),
                pct(value.as_bytes())
            ))
            .await;
        assert_eq!(r.status, 200, "{value:?}: {}", r.text());
        let argv = r.json()["argv"].as_array().unwrap().clone();
        assert_eq!(argv.len(), 2, "{value:?} became {argv:?}");
        assert_eq!(
            b64(argv[0].as_str().unwrap()),
            format!("--x={value}").as_bytes()
        );
        assert_eq!(b64(argv[1].as_str().unwrap()), value.as_bytes());
    }
    // Absent with a default: the default. Absent without one: a 400 naming it.
    let r = server.get("/q?x=1").await;
    assert_eq!(b64(r.json()["argv"][1].as_str().unwrap()), b"none");
    let p = server.get("/q").await.problem(400);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("query parameter `x`"),
        "{p}"
    );
    assert!(!canary.exists(), "an injection ran a command");
}
