//! The original route list, keys exactly as first written, loads and both
//! routes answer from the real PHP scripts.

use crate::util::*;

#[tokio::test]
async fn original_route_list_serves_both_routes() {
    // The scripts of the original list live in a home directory; make one.
    let home = tempfile::tempdir().unwrap();
    let tdir = home.path().join("templates");
    std::fs::create_dir(&tdir).unwrap();
    for f in ["listtemplate.php", "addtemplate.php"] {
        std::fs::copy(repo().join("examples/php/templates").join(f), tdir.join(f)).unwrap();
    }
    let h = home.path().display();
    let yaml = format!(
        r#"- url: /templates
  method: GET
  wd: {h}/templates/
  content-type: "application/json"
  timeout: 30
  cmd: php {h}/templates/listtemplate.php
  env:
    - HOME: "{h}"
- url: /template-new
  method: POST
  payload-to: body
  escape-shell-args: true
  cmd: php {h}/templates/addtemplate.php $body
  env:
    HOME: "{h}"
"#
    );
    let server = start(&yaml).await;

    let r = server.get("/templates").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let list = r.json();
    assert_eq!(list["templates"], serde_json::json!([]));
    assert_eq!(
        list["home"],
        h.to_string(),
        "HOME from the route's env list"
    );

    let body = br#"{"name":"welcome","text":"Hello $(whoami); `id`"}"#;
    let r = server.post("/template-new", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["created"], "welcome");
    let stored = std::fs::read(home.path().join("templates-data/welcome.json")).unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        stored["text"], "Hello $(whoami); `id`",
        "the body arrived verbatim"
    );

    let r = server.get("/templates").await;
    assert_eq!(r.json()["templates"][0]["name"], "welcome");

    // A bad template makes the script exit 2: unmapped, so a 500 problem
    // that does not leak the script's stderr.
    let r = server.post("/template-new", b"not json").await;
    let p = r.problem(500);
    assert_eq!(p["exit_code"], 2);
    assert!(
        !r.text().contains("addtemplate:"),
        "stderr must not leak: {}",
        r.text()
    );
}

#[tokio::test]
async fn example_config_loads_and_serves() {
    let data = tempfile::tempdir().unwrap();
    // SAFETY: tests in this binary read TEMPLATE_DIR only through config
    // loading, and every value set is a fresh directory.
    unsafe { std::env::set_var("TEMPLATE_DIR", data.path()) };
    let mut config =
        execd::config::load(&repo().join("config/execd.yaml")).unwrap_or_else(|e| panic!("{e}"));
    config.listen = execd::config::Listen::Tcp("127.0.0.1:0".parse().unwrap());
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let running = execd::daemon::start(config).await.unwrap();
    let addr = running.addr.clone();

    let r = request(
        &addr,
        "POST",
        "/template-new",
        &[],
        br#"{"name":"a","text":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(&addr, "GET", "/templates/a", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["text"], "x");
    let r = request(&addr, "GET", "/templates/nope", &[], b"").await;
    assert_eq!(r.status, 404, "exit 3 maps to 404");
    assert_eq!(
        r.json()["error"],
        "no template named nope",
        "a mapped exit code answers with stdout"
    );
    let r = request(
        &addr,
        "POST",
        "/template-new",
        &[],
        br#"{"name":"bad name!","text":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 422);
    let r = request(&addr, "GET", "/hello?name=Ada", &[], b"").await;
    assert_eq!(r.json()["greeting"], "Hello, Ada!");
    let r = request(&addr, "POST", "/upper", &[], b"shout").await;
    assert_eq!(r.text(), "SHOUT");
    running.stop(std::time::Duration::from_secs(5)).await;
}
