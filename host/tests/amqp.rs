//! The AMQP intake against the real broker on 127.0.0.1:5672 (guest/guest),
//! with real PHP workers. Every test makes queues of its own with random
//! names and deletes them (and the delay and dead-letter queues execd made
//! for them) when it ends, pass or fail.
//!
//! The worker (`fixtures/amqp-worker.php`) appends one JSON line per run to
//! a record file before doing anything else, so the tests count runs the
//! way a user would count side effects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::util::*;

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A test's own client connection, and the queues to delete at the end.
pub struct Broker {
    conn: Connection,
    /// Publishes with confirms, so a publish has landed when it returns.
    ch: Channel,
    queues: std::sync::Mutex<Vec<String>>,
}

impl Broker {
    pub async fn connect() -> Broker {
        let conn = Connection::connect(BROKER, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!("no RabbitMQ broker at {BROKER} ({e}); `make test` starts one (scripts/setup.sh)")
            });
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Broker {
            conn,
            ch,
            queues: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A fresh queue name, deleted (with the queues execd derives from it)
    /// when the test ends.
    pub fn name(&self, tag: &str) -> String {
        let name = format!("execd-test-{tag}-{}", execd::ids::random_hex(4));
        self.forget_later(&name);
        name
    }

    /// Deletes `queue` when the test ends.
    pub fn forget_later(&self, queue: &str) {
        self.queues.lock().unwrap().push(queue.to_string());
    }

    /// Declares a transient queue of the test's own (a reply queue, say).
    pub async fn declare(&self, queue: &str) {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
        self.ch
            .queue_declare(queue.into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap();
    }

    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.is_ack() && confirm.take_message().is_none(),
            "publish to {queue} not routed"
        );
    }

    /// Messages ready in `queue` (not counting unacked ones).
    pub async fn count(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
        let _ = ch.close(200, "OK".into()).await;
        q.message_count()
    }

    /// Takes `n` messages off `queue`, failing after `limit`.
    pub async fn take(&self, queue: &str, n: usize, limit: Duration) -> Vec<Delivery> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let end = tokio::time::Instant::now() + limit;
        while out.len() < n {
            match tokio::time::timeout_at(end, consumer.next()).await {
                Ok(Some(Ok(d))) => out.push(d),
                Ok(other) => panic!("consuming {queue} ended: {other:?}"),
                Err(_) => panic!(
                    "only {} of {n} messages arrived on {queue} within {limit:?}",
                    out.len()
                ),
            }
        }
        let _ = ch.close(200, "OK".into()).await;
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        // Drop cannot wait on this runtime: a thread of its own with a
        // runtime of its own deletes the queues, also after a panic.
        let _ = std::thread::spawn(move || {
            block_on(async move {
                let Ok(conn) = Connection::connect(BROKER, ConnectionProperties::default()).await
                else {
                    return;
                };
                for q in queues {
                    for name in [q.clone(), format!("{q}.dead")] {
                        delete_queue(&conn, &name).await;
                    }
                    // The delay queues execd made for it.
                    for ms in [100, 200, 300, 400, 600, 800, 1000, 1200, 2000] {
                        delete_queue(&conn, &format!("{q}.execd-retry-{ms}ms")).await;
                    }
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

async fn delete_queue(conn: &Connection, name: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
        let _ = ch.close(200, "OK".into()).await;
    }
}

/// execd serving a worker config in this process.
pub struct Worker {
    running: Option<execd::daemon::Running>,
    /// The config's directory; the record file lives here.
    pub dir: tempfile::TempDir,
}

impl Worker {
    /// Starts a daemon on `yaml` (`{fixtures}`, `{repo}`, `{dir}` filled
    /// in) and waits until every consumer is consuming.
    pub async fn start(yaml: &str) -> Worker {
        execd::telemetry::init(execd::telemetry::LogFormat::Text);
        let (dir, path) = write_config(yaml);
        let config = execd::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let running = execd::daemon::start(config).await.unwrap();
        let health = running.amqp_health();
        assert!(
            eventually(Duration::from_secs(10), || health.all_connected()).await,
            "consumers not connected: {:?}",
            health
                .consumers()
                .iter()
                .map(|c| c.snapshot())
                .collect::<Vec<_>>()
        );
        Worker {
            running: Some(running),
            dir,
        }
    }

    pub fn health(&self) -> Arc<execd::intake::amqp::Health> {
        self.running.as_ref().unwrap().amqp_health()
    }

    /// Rewrites the config file (placeholders filled in as at start) and
    /// reloads it.
    pub async fn reload(&self, yaml: &str) -> Result<(), execd::config::ConfigErrors> {
        std::fs::write(
            self.dir.path().join("execd.yaml"),
            fill_placeholders(yaml, self.dir.path()),
        )
        .unwrap();
        self.running.as_ref().unwrap().reload().await
    }

    /// The admin listener's address (the config must not say `admin: off`).
    pub fn admin(&self) -> String {
        self.running
            .as_ref()
            .unwrap()
            .admin_addr
            .clone()
            .expect("the config has an admin listener")
    }

    pub fn record(&self) -> Vec<Run> {
        read_record(&self.dir.path().join("record.jsonl"))
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop(Duration::from_secs(10)).await;
        }
    }
}

/// One run of the worker script, as it recorded itself.
#[derive(Debug, Clone)]
pub struct Run {
    pub body: Vec<u8>,
    pub attempt: u64,
    pub argv: Vec<String>,
    /// When it started (seconds since the epoch).
    pub t: f64,
    pub env: BTreeMap<String, String>,
}

pub fn read_record(path: &std::path::Path) -> Vec<Run> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line still being written has no newline yet; it counts next time.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            Run {
                body: b64(v["body"].as_str().unwrap()),
                attempt: v["attempt"].as_u64().unwrap(),
                argv: v["argv"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
                t: v["t"].as_f64().unwrap(),
                env: v["env"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect(),
            }
        })
        .collect()
}

/// Runs per body.
fn runs_by_body(runs: &[Run]) -> BTreeMap<Vec<u8>, Vec<&Run>> {
    let mut out: BTreeMap<Vec<u8>, Vec<&Run>> = BTreeMap::new();
    for r in runs {
        out.entry(r.body.clone()).or_default().push(r);
    }
    out
}

/// A worker config with one consumer of `queue` running the recording
/// worker; `extra` adds lines to the consumer (indented six spaces).
fn consumer_config(queue: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: off
limits: {{drain-timeout: 10s}}
amqp:
  url: {BROKER}
  consumers:
    - queue: {queue}
      declare: {{durable: false, arguments: {{x-expires: 600000}}}}
      cmd: php {{fixtures}}/amqp-worker.php
      env: {{RECORD: \"{{dir}}/record.jsonl\", HOLD: \"{{dir}}/hold\"}}
{extra}"
    )
}

fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(name)
}

fn header_text(d: &Delivery, name: &str) -> String {
    match header(d, name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::LongInt(i)) => i.to_string(),
        Some(AMQPValue::LongLongInt(i)) => i.to_string(),
        Some(AMQPValue::Boolean(b)) => b.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

/// Replies by their correlation id.
fn by_correlation(replies: &[Delivery]) -> BTreeMap<String, &Delivery> {
    replies
        .iter()
        .map(|d| {
            (
                d.properties.correlation_id().as_ref().unwrap().to_string(),
                d,
            )
        })
        .collect()
}

fn props_with_reply(reply_to: &str, correlation: &str) -> BasicProperties {
    BasicProperties::default()
        .with_reply_to(reply_to.into())
        .with_correlation_id(correlation.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_runs_every_message_once_and_replies() {
    let broker = Broker::connect().await;
    let queue = broker.name("happy");
    let replies = broker.name("happy-replies");
    broker.declare(&replies).await;
    let worker = Worker::start(&consumer_config(&queue, "      concurrency: 4\n")).await;

    let n = 40;
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-tenant".into(),
            AMQPValue::LongString(format!("acme-{i}").into()),
        );
        let props = props_with_reply(&replies, &format!("c-{i}"))
            .with_message_id(format!("m-{i}").into())
            .with_content_type("text/plain".into())
            .with_headers(headers);
        broker
            .publish(&queue, format!("msg-{i}").as_bytes(), props)
            .await;
    }
    let got = broker.take(&replies, n, Duration::from_secs(30)).await;
    for d in &got {
        let c = d
            .properties
            .correlation_id()
            .as_ref()
            .expect("reply has the correlation id")
            .to_string();
        let i = c.strip_prefix("c-").unwrap();
        assert_eq!(
            String::from_utf8_lossy(&d.data),
            format!("MSG-{i}"),
            "reply to {c}"
        );
        assert_eq!(header_text(d, "x-execd-status"), "200");
        assert_eq!(
            d.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain; charset=utf-8")
        );
    }

    let runs = worker.record();
    let by_body = runs_by_body(&runs);
    assert_eq!(runs.len(), n, "one run per message");
    for i in 0..n {
        let r = by_body
            .get(format!("msg-{i}").as_bytes())
            .unwrap_or_else(|| panic!("msg-{i} never ran"));
        assert_eq!(r.len(), 1, "msg-{i} ran {} times", r.len());
        let env = &r[0].env;
        assert_eq!(env["AMQP_HEADER_X_TENANT"], format!("acme-{i}"));
        assert_eq!(env["AMQP_MESSAGE_ID"], format!("m-{i}"));
        assert_eq!(env["EXECD_REQUEST_ID"], format!("m-{i}"));
        assert_eq!(env["AMQP_CORRELATION_ID"], format!("c-{i}"));
        assert_eq!(env["AMQP_REPLY_TO"], replies);
        assert_eq!(env["AMQP_CONTENT_TYPE"], "text/plain");
        assert_eq!(env["AMQP_ROUTING_KEY"], queue);
        assert_eq!(env["AMQP_QUEUE"], queue);
        assert_eq!(env["AMQP_EXCHANGE"], "");
        assert_eq!(env["AMQP_REDELIVERED"], "0");
        assert_eq!(env["AMQP_ATTEMPT"], "1");
        assert_eq!(env["EXECD_ROUTE"], queue);
    }

    // Four at once, never more: eight 300ms jobs take two rounds.
    let started = Instant::now();
    for i in 0..8 {
        broker
            .publish(
                &queue,
                format!("sleep:300:{i}").as_bytes(),
                props_with_reply(&replies, &format!("s-{i}")),
            )
            .await;
    }
    broker.take(&replies, 8, Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "8 x 300ms with concurrency 4 took only {took:?}"
    );
    assert!(
        took < Duration::from_millis(1800),
        "8 x 300ms with concurrency 4 took {took:?}: not concurrent"
    );

    // A reply can reach this test before execd has acked and counted its
    // message.
    let consumer = worker.health().consumers()[0].clone();
    eventually(Duration::from_secs(5), || {
        consumer.snapshot().in_flight == 0
    })
    .await;
    let health = consumer.snapshot();
    assert_eq!(
        (
            health.acked,
            health.retried,
            health.unsettled,
            health.in_flight
        ),
        (48, 0, 0, 0)
    );
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0, "every message acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_is_retried_with_delays_then_dead_lettered_with_reasons() {
    let broker = Broker::connect().await;
    let queue = broker.name("retry");
    let dead = format!("{queue}.dead");
    let worker = Worker::start(&consumer_config(
        &queue,
        &format!(
            "      concurrency: 3
      retry: {{max-attempts: 3, delay: 300ms, backoff: 2}}
      dead-letter: {dead}
"
        ),
    ))
    .await;
    for i in 0..6 {
        let mut headers = FieldTable::default();
        headers.insert("x-order".into(), AMQPValue::LongLongInt(i));
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_message_id(format!("f-{i}").into());
        broker
            .publish(&queue, format!("fail-{i}").as_bytes(), props)
            .await;
    }
    broker
        .publish(&queue, b"ok-1", BasicProperties::default())
        .await;

    let dead_letters = broker.take(&dead, 6, Duration::from_secs(20)).await;
    let mut seen = Vec::new();
    for d in &dead_letters {
        let body = String::from_utf8_lossy(&d.data).into_owned();
        let i: i64 = body.strip_prefix("fail-").unwrap().parse().unwrap();
        seen.push(i);
        assert_eq!(header_text(d, "x-execd-attempts"), "3", "{body}");
        // Sent back to the work queue after a fix, it starts at attempt 1.
        assert_eq!(header(d, "x-execd-attempt"), None, "{body}");
        assert_eq!(header_text(d, "x-execd-exit-code"), "3", "{body}");
        assert_eq!(header_text(d, "x-execd-reason"), "exit code 3");
        assert_eq!(header_text(d, "x-execd-timed-out"), "false");
        assert_eq!(header_text(d, "x-execd-queue"), queue);
        assert!(
            header_text(d, "x-execd-stderr")
                .contains(&format!("cannot process {body}: the ledger is locked")),
            "stderr tail: {}",
            header_text(d, "x-execd-stderr")
        );
        let (first, last) = (
            header_text(d, "x-execd-first-failure"),
            header_text(d, "x-execd-last-failure"),
        );
        assert!(
            first.ends_with('Z') && first < last,
            "first {first} should be before last {last}"
        );
        // The message's own headers and id travel with it.
        assert_eq!(header_text(d, "x-order"), i.to_string());
        assert_eq!(
            d.properties.message_id().as_ref().unwrap().as_str(),
            format!("f-{i}")
        );
        assert_eq!(
            *d.properties.delivery_mode(),
            Some(2),
            "dead letters are persistent"
        );
    }
    seen.sort();
    assert_eq!(
        seen,
        [0, 1, 2, 3, 4, 5],
        "every failing message dead-lettered once"
    );

    let runs = worker.record();
    let by_body = runs_by_body(&runs);
    assert_eq!(by_body[&b"ok-1".to_vec()].len(), 1);
    for i in 0..6 {
        let r = &by_body[format!("fail-{i}").as_bytes()];
        let attempts: Vec<u64> = r.iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, [1, 2, 3], "fail-{i}");
        // Waited 300ms, then 600ms, in the broker.
        let gaps = [r[1].t - r[0].t, r[2].t - r[1].t];
        assert!(
            gaps[0] >= 0.29 && gaps[0] < 2.0,
            "fail-{i}: first retry after {:.3}s, want 0.3s",
            gaps[0]
        );
        assert!(
            gaps[1] >= 0.59 && gaps[1] < 2.5,
            "fail-{i}: second retry after {:.3}s, want 0.6s",
            gaps[1]
        );
        // One request id for all attempts of a message.
        assert!(
            r.iter()
                .all(|x| x.env["EXECD_REQUEST_ID"] == format!("f-{i}"))
        );
    }
    // The dead letter can reach this test before execd has its confirm and
    // has counted it.
    let health = worker.health();
    eventually(Duration::from_secs(5), || {
        health.consumers()[0].snapshot().dead_lettered == 6
    })
    .await;
    let h = health.consumers()[0].snapshot();
    assert_eq!(
        (h.acked, h.retried, h.dead_lettered, h.unsettled),
        (1, 12, 6, 0)
    );
    for delay_queue in [
        format!("{queue}.execd-retry-300ms"),
        format!("{queue}.execd-retry-600ms"),
    ] {
        assert_eq!(broker.count(&delay_queue).await, 0, "{delay_queue} empty");
    }
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_timeouts_follow_the_on_exit_map() {
    let broker = Broker::connect().await;
    let queue = broker.name("onexit");
    let dead = format!("{queue}.dead");
    let worker = Worker::start(&consumer_config(
        &queue,
        &format!(
            "      concurrency: 4
      timeout: 1s
      kill-grace: 100ms
      dead-letter: {{queue: {dead}}}
      on-exit: {{4: dead-letter, 5: reject, 6: ack, timeout: dead-letter}}
"
        ),
    ))
    .await;
    for body in ["exit:4", "exit:5", "exit:6", "hang", "exit:9"] {
        broker
            .publish(&queue, body.as_bytes(), BasicProperties::default())
            .await;
    }
    // 4 -> dead-letter; the timeout -> dead-letter; 9 is unlisted and there
    // is no retry schedule, but a dead-letter target: dead-letter.
    let dead_letters = broker.take(&dead, 3, Duration::from_secs(20)).await;
    let mut by_body: BTreeMap<String, &Delivery> = BTreeMap::new();
    for d in &dead_letters {
        by_body.insert(String::from_utf8_lossy(&d.data).into_owned(), d);
    }
    let exit4 = by_body["exit:4"];
    assert_eq!(
        header_text(exit4, "x-execd-attempts"),
        "1",
        "no retry schedule: dead-lettered at once"
    );
    assert_eq!(header_text(exit4, "x-execd-exit-code"), "4");
    let hang = by_body["hang"];
    assert_eq!(header_text(hang, "x-execd-timed-out"), "true");
    assert_eq!(header_text(hang, "x-execd-reason"), "timed out after 1s");
    assert!(header(hang, "x-execd-exit-code").is_none());
    assert_eq!(header_text(by_body["exit:9"], "x-execd-exit-code"), "9");

    let h = worker.health();
    assert!(
        eventually(Duration::from_secs(5), || {
            let s = h.consumers()[0].snapshot();
            s.acked + s.rejected + s.dead_lettered == 5
        })
        .await
    );
    let s = h.consumers()[0].snapshot();
    // 5 -> reject (gone, not dead-lettered); 6 -> ack although non-zero.
    assert_eq!((s.acked, s.rejected, s.dead_lettered), (1, 1, 3), "{s:?}");
    assert_eq!(broker.count(&dead).await, 0, "nothing else dead-lettered");
    assert_eq!(worker.record().len(), 5, "each ran once");
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0);
}

/// Closes the broker connections whose client name contains `fragment`,
/// with `rabbitmqctl close_connection`, as an operator would. Targeted
/// rather than `close_all_connections`, so tests running beside this one on
/// the same broker keep their connections. Returns how many were closed.
fn close_connections(fragment: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let mut closed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(fragment) {
            continue;
        }
        let pid = line.split('\t').next().unwrap().trim();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: forced close mid-run"])
            .status()
            .unwrap();
        assert!(status.success(), "rabbitmqctl close_connection {pid}");
        closed += 1;
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_by_itself_when_the_broker_closes_the_connection() {
    let broker = Broker::connect().await;
    let queue = broker.name("reconnect");
    let worker = Worker::start(&consumer_config(
        &queue,
        "      concurrency: 4\n      prefetch: 8\n",
    ))
    .await;
    let hold = worker.dir.path().join("hold");
    let n = 150;
    for i in 0..n {
        broker
            .publish(
                &queue,
                format!("sleep:5:{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    assert!(
        eventually(Duration::from_secs(30), || worker.record().len() >= n / 4).await,
        "a quarter of the messages should run first"
    );
    // Hold the commands that start from now on, so that the connection
    // goes while they run, however long rabbitmqctl takes.
    std::fs::write(&hold, "").unwrap();
    let health = worker.health();
    assert!(
        eventually(Duration::from_secs(10), || health.consumers()[0]
            .snapshot()
            .in_flight
            == 4)
        .await
    );
    let closed = tokio::task::spawn_blocking({
        let q = queue.clone();
        move || close_connections(&format!("execd {q} on "))
    })
    .await
    .unwrap();
    assert_eq!(
        closed, 1,
        "execd's connection should have been found and closed"
    );
    assert!(
        eventually(Duration::from_secs(10), || health.consumers()[0]
            .snapshot()
            .reconnects
            >= 1)
        .await,
        "execd should reconnect by itself: {:?}",
        health.consumers()[0].snapshot()
    );
    let held = worker.record().len();
    std::fs::remove_file(&hold).unwrap();

    let all_ran = |runs: &[Run]| {
        (0..n).all(|i| {
            runs.iter()
                .any(|r| r.body == format!("sleep:5:{i}").as_bytes())
        })
    };
    assert!(
        eventually(Duration::from_secs(60), || all_ran(&worker.record())).await,
        "not every message ran after the reconnect; health: {:?}",
        health.consumers()[0].snapshot()
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = health.consumers()[0].snapshot();
            s.connected && s.in_flight == 0
        })
        .await
    );
    let s = health.consumers()[0].snapshot();
    assert!(
        s.last_error
            .as_deref()
            .unwrap_or("")
            .contains("CONNECTION_FORCED"),
        "{s:?}"
    );
    let runs = worker.record();
    let duplicates = runs.len() - n;
    println!(
        "forced close: {n} messages, {} runs, {duplicates} duplicate(s): the {} commands running when the connection went could not be acked and ran again; {} unsettled, {} reconnect(s)",
        runs.len(),
        s.unsettled,
        s.unsettled,
        s.reconnects
    );
    assert!(
        held < n,
        "the close should come mid-run ({held} of {n} had run)"
    );
    assert_eq!(
        s.unsettled, 4,
        "the four held commands finished on a dead channel"
    );
    assert!(duplicates >= 4, "their messages come back and run again");
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing() {
    let broker = Broker::connect().await;
    let queue = broker.name("sigkill");
    let (dir, path) = write_config(&consumer_config(&queue, "      concurrency: 2\n"));
    let record = dir.path().join("record.jsonl");
    // Declared as execd will, so the messages have somewhere to wait.
    broker.declare(&queue).await;
    let n = 60;
    for i in 0..n {
        broker
            .publish(
                &queue,
                format!("sleep:40:{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
            .args(["serve", "-c"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    assert!(
        eventually(Duration::from_secs(30), || read_record(&record).len() >= 15).await,
        "the first execd should get going"
    );
    first.kill().unwrap(); // SIGKILL: no drain, no acks for what was running
    first.wait().unwrap();
    let at_kill = read_record(&record).len();
    assert!(
        at_kill < n,
        "killed too late to test anything ({at_kill} of {n} ran)"
    );

    let mut second = spawn();
    let all_ran = |runs: &[Run]| {
        (0..n).all(|i| {
            runs.iter()
                .any(|r| r.body == format!("sleep:40:{i}").as_bytes())
        })
    };
    let done = eventually(Duration::from_secs(60), || all_ran(&read_record(&record))).await;
    // SIGTERM: drain and exit cleanly.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let status = second.wait().unwrap();
    assert!(done, "messages were lost across the SIGKILL");
    assert!(status.success(), "second execd exited with {status}");
    let runs = read_record(&record);
    println!(
        "SIGKILL after {at_kill} runs: {n} messages, {} runs, {} duplicate(s) (unacked when killed, redelivered)",
        runs.len(),
        runs.len() - n
    );
    let redelivered = runs
        .iter()
        .filter(|r| r.env["AMQP_REDELIVERED"] == "1")
        .count();
    assert!(
        redelivered >= 1,
        "what was unacked at the kill should come back marked redelivered"
    );
    assert_eq!(broker.count(&queue).await, 0, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_round_trip_through_a_php_reply_socket() {
    let broker = Broker::connect().await;
    let queue = broker.name("rpc");
    let replies = broker.name("rpc-replies");
    broker.declare(&replies).await;
    let worker = Worker::start(&format!(
        "listen: 127.0.0.1:0
admin: off
amqp:
  url: {BROKER}
  consumers:
    - queue: {queue}
      declare: {{durable: false, arguments: {{x-expires: 600000}}}}
      reply-socket: true
      cmd: php {{fixtures}}/reply-socket.php
"
    ))
    .await;
    broker
        .publish(
            &queue,
            br#"{"mode": "json", "n": 41}"#,
            props_with_reply(&replies, "corr-41"),
        )
        .await;
    broker
        .publish(
            &queue,
            br#"{"mode": "stdout"}"#,
            props_with_reply(&replies, "corr-stdout"),
        )
        .await;
    let got = broker.take(&replies, 2, Duration::from_secs(20)).await;
    let by_corr = by_correlation(&got);
    let r = by_corr["corr-41"];
    assert_eq!(header_text(r, "x-execd-status"), "201");
    assert_eq!(header_text(r, "x-job"), "priced");
    assert_eq!(
        r.properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
    assert_eq!(v["answer"], 42);
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["correlation"], "corr-41");
    assert_eq!(v["dir_mode"], "700");
    // Without a reply on the socket, stdout answers.
    let s = by_corr["corr-stdout"];
    assert_eq!(
        String::from_utf8_lossy(&s.data),
        "this stdout is not the answer\n"
    );
    assert_eq!(header_text(s, "x-execd-status"), "200");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_input_is_handled_not_fatal() {
    let broker = Broker::connect().await;
    let queue = broker.name("poison");
    let strict = broker.name("poison-strict");
    let (dead, strict_dead) = (format!("{queue}.dead"), format!("{strict}.dead"));
    let replies = broker.name("poison-replies");
    broker.declare(&replies).await;
    let worker = Worker::start(&format!(
        "{}    - queue: {strict}
      declare: {{durable: false, arguments: {{x-expires: 600000}}}}
      dead-letter: {strict_dead}
      cmd: php {{fixtures}}/amqp-worker.php ${{header.customer}}
      env: {{RECORD: \"{{dir}}/record.jsonl\"}}
",
        consumer_config(
            &queue,
            &format!("      max-body: 1KiB\n      dead-letter: {dead}\n")
        )
    ))
    .await;

    // Not UTF-8, with a NUL: passed through byte for byte.
    let binary = b"\xff\xfe\x00abc\x80".to_vec();
    broker
        .publish(&queue, &binary, props_with_reply(&replies, "binary"))
        .await;
    // Over max-body: never run, dead-lettered, and the caller told 413.
    let huge = vec![b'h'; 2048];
    broker
        .publish(&queue, &huge, props_with_reply(&replies, "huge"))
        .await;
    // No properties at all.
    broker
        .publish(&queue, b"bare", BasicProperties::default())
        .await;
    // Headers of every type, one with a NUL byte.
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongInt(5));
    headers.insert("flag".into(), AMQPValue::Boolean(true));
    let mut inner = FieldTable::default();
    inner.insert("k".into(), AMQPValue::LongString("v".into()));
    headers.insert("table".into(), AMQPValue::FieldTable(inner));
    headers.insert(
        "nul".into(),
        AMQPValue::LongString(LongString::from(b"a\0b".to_vec())),
    );
    broker
        .publish(
            &queue,
            b"typed",
            BasicProperties::default().with_headers(headers),
        )
        .await;
    // The strict consumer's command needs a header that is missing.
    broker
        .publish(&strict, b"anonymous", BasicProperties::default())
        .await;
    let mut h = FieldTable::default();
    h.insert("customer".into(), AMQPValue::LongString("c-7".into()));
    broker
        .publish(
            &strict,
            b"known",
            BasicProperties::default().with_headers(h),
        )
        .await;

    let got = broker.take(&replies, 2, Duration::from_secs(20)).await;
    let by_corr = by_correlation(&got);
    assert_eq!(by_corr["binary"].data, b"\xff\xfe\x00ABC\x80");
    assert_eq!(header_text(by_corr["huge"], "x-execd-status"), "413");

    let d = &broker.take(&dead, 1, Duration::from_secs(10)).await[0];
    assert_eq!(d.data, huge);
    assert!(
        header_text(d, "x-execd-reason")
            .contains("2048 bytes, over this consumer's max-body of 1024 bytes")
    );
    let d = &broker.take(&strict_dead, 1, Duration::from_secs(10)).await[0];
    assert_eq!(d.data, b"anonymous");
    assert!(
        header_text(d, "x-execd-reason").contains("header `customer` is required"),
        "{}",
        header_text(d, "x-execd-reason")
    );

    assert!(
        eventually(Duration::from_secs(10), || worker.record().len() == 4).await,
        "{:?}",
        worker.record()
    );
    let runs = worker.record();
    let by_body = runs_by_body(&runs);
    assert!(
        !by_body.contains_key(&huge),
        "an oversized message never runs"
    );
    assert!(!by_body.contains_key(b"anonymous".as_slice()));
    assert_eq!(by_body[&binary].len(), 1);
    let bare = &by_body[b"bare".as_slice()][0].env;
    for absent in [
        "AMQP_MESSAGE_ID",
        "AMQP_CONTENT_TYPE",
        "AMQP_CORRELATION_ID",
        "AMQP_REPLY_TO",
    ] {
        assert!(
            !bare.contains_key(absent),
            "{absent} set without the property"
        );
    }
    assert_eq!(bare["EXECD_REQUEST_ID"].len(), 32, "a generated request id");
    let typed = &by_body[b"typed".as_slice()][0].env;
    assert_eq!(typed["AMQP_HEADER_N"], "5");
    assert_eq!(typed["AMQP_HEADER_FLAG"], "true");
    assert_eq!(typed["AMQP_HEADER_TABLE"], r#"{"k":"v"}"#);
    assert!(
        !typed.contains_key("AMQP_HEADER_NUL"),
        "a NUL byte cannot be in the environment"
    );
    assert_eq!(by_body[b"known".as_slice()][0].argv, ["c-7"]);

    let h = worker.health();
    assert!(
        eventually(Duration::from_secs(5), || h
            .consumers()
            .iter()
            .map(|c| c.snapshot().acked)
            .sum::<u64>()
            == 4)
        .await,
        "binary, bare, typed and known acked"
    );
    assert!(h.all_connected(), "poison never takes a consumer down");
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0);
    assert_eq!(broker.count(&strict).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_running_commands_and_acks_them() {
    let broker = Broker::connect().await;
    let queue = broker.name("drain");
    let worker = Worker::start(&consumer_config(
        &queue,
        "      concurrency: 2\n      prefetch: 10\n",
    ))
    .await;
    for i in 0..10 {
        broker
            .publish(
                &queue,
                format!("sleep:500:{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    let h = worker.health();
    assert!(
        eventually(Duration::from_secs(10), || h.consumers()[0]
            .snapshot()
            .in_flight
            == 2)
        .await
    );
    worker.stop().await;
    let s = h.consumers()[0].snapshot();
    assert_eq!(
        (s.acked, s.in_flight, s.unsettled, s.connected),
        (2, 0, 0, false),
        "{s:?}"
    );
    // The two that ran are done; the eight prefetched but never started are
    // back in the queue, untouched.
    assert_eq!(broker.count(&queue).await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_worker_config_runs_its_scripts() {
    use execd::config::amqp::{DeadLetter, Retry};
    let broker = Broker::connect().await;
    let mut config =
        execd::config::load(&repo().join("config/worker.yaml")).unwrap_or_else(|e| panic!("{e}"));
    config.admin = None;
    if let execd::config::Listen::Tcp(a) = &mut config.listen {
        a.set_port(0);
    }
    let outbox = tempfile::tempdir().unwrap();
    let amqp = config.amqp.as_mut().unwrap();
    // The example's consumers on queues of this test's own, with shorter
    // waits and without the exchange binding.
    let (mail, quotes) = (broker.name("example-mail"), broker.name("example-quotes"));
    let mut m = (*amqp.consumers[0]).clone();
    m.name = mail.clone();
    m.queue = mail.clone();
    m.bindings.clear();
    m.dead_letter = Some(DeadLetter::Queue(format!("{mail}.dead")));
    m.retry = Some(Retry {
        delay: Duration::from_millis(200),
        ..m.retry.clone().unwrap()
    });
    for d in m.retry.as_ref().unwrap().delays() {
        broker.forget_later(&m.delay_queue(d));
    }
    m.command.env = vec![("OUTBOX".into(), outbox.path().display().to_string())];
    let mut q = (*amqp.consumers[1]).clone();
    q.name = quotes.clone();
    q.queue = quotes.clone();
    amqp.consumers = vec![Arc::new(m), Arc::new(q)];
    let running = execd::daemon::start(config).await.unwrap();
    let health = running.amqp_health();
    assert!(eventually(Duration::from_secs(10), || health.all_connected()).await);

    let replies = broker.name("example-replies");
    broker.declare(&replies).await;
    broker
        .publish(
            &quotes,
            br#"{"items": [{"sku": "a", "price": 2.5, "qty": 2}, {"sku": "b", "price": 1.25}]}"#,
            props_with_reply(&replies, "q-1"),
        )
        .await;
    broker
        .publish(&quotes, b"not json", props_with_reply(&replies, "q-2"))
        .await;
    for job in [
        r#"{"to": "ada@example.org", "subject": "Welcome"}"#,
        r#"{"to": "bob@flaky.example", "subject": "Receipt"}"#,
        r#"{"to": "nobody"}"#,
    ] {
        broker
            .publish(&mail, job.as_bytes(), BasicProperties::default())
            .await;
    }

    let got = broker.take(&replies, 2, Duration::from_secs(20)).await;
    let by_corr = by_correlation(&got);
    let quote: serde_json::Value = serde_json::from_slice(&by_corr["q-1"].data).unwrap();
    assert_eq!(
        (quote["total"].as_f64(), quote["items"].as_i64()),
        (Some(6.25), Some(2))
    );
    assert_eq!(header_text(by_corr["q-1"], "x-priced-by"), "rpc-quote.php");
    assert_eq!(header_text(by_corr["q-2"], "x-execd-status"), "422");

    let dead = &broker
        .take(&format!("{mail}.dead"), 1, Duration::from_secs(20))
        .await[0];
    assert_eq!(dead.data, br#"{"to": "nobody"}"#);
    assert_eq!(header_text(dead, "x-execd-exit-code"), "2");
    assert_eq!(
        header_text(dead, "x-execd-attempts"),
        "1",
        "exit 2 is dead-lettered at once"
    );
    assert!(header_text(dead, "x-execd-stderr").contains("invalid job"));
    let sent = outbox.path().join("sent.log");
    assert!(
        eventually(Duration::from_secs(20), || std::fs::read_to_string(&sent)
            .unwrap_or_default()
            .lines()
            .count()
            == 2)
        .await,
        "two mails sent: {:?}",
        std::fs::read_to_string(&sent)
    );
    let log = std::fs::read_to_string(&sent).unwrap();
    assert!(log.contains("ada@example.org\tWelcome\tattempt 1"), "{log}");
    assert!(
        log.contains("bob@flaky.example\tReceipt\tattempt 3"),
        "retried twice (exit 75), then sent: {log}"
    );

    let r = request(&running.addr, "GET", "/report?month=2024-02", &[], b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"orders-2024-02.csv\"")
    );
    let csv = String::from_utf8(r.body).unwrap();
    assert_eq!(csv.lines().count(), 1 + 29, "a header and 29 days: {csv}");
    running.stop(Duration::from_secs(10)).await;
}

/// Three consumers' worth of config: `qa` as given first, and the others.
fn reload_config(consumers: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "listen: 127.0.0.1:0\nadmin: off\nlimits: {{drain-timeout: 10s}}\namqp:\n  url: {BROKER}\n  consumers:\n"
    );
    for (queue, arg) in consumers {
        yaml.push_str(&format!(
            "    - queue: {queue}
      declare: {{durable: false, arguments: {{x-expires: 600000}}}}
      cmd: php {{fixtures}}/amqp-worker.php {arg}
      env: {{RECORD: \"{{dir}}/record.jsonl\", HOLD: \"{{dir}}/hold\"}}
"
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_consumers_and_swaps_the_rest() {
    let broker = Broker::connect().await;
    let (qa, qb, qc) = (
        broker.name("reload-a"),
        broker.name("reload-b"),
        broker.name("reload-c"),
    );
    let worker = Worker::start(&reload_config(&[(&qa, "a"), (&qb, "b1")])).await;
    let health = worker.health();
    let a_before = health.consumers()[0].clone();
    let b_before = health.consumers()[1].clone();
    let since = a_before.snapshot().since_unix_ms;

    // A command of the unchanged consumer runs across the reload, and so
    // does one of the consumer that changes.
    let hold = worker.dir.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    broker
        .publish(&qa, b"held-a", BasicProperties::default())
        .await;
    broker
        .publish(&qb, b"held-b", BasicProperties::default())
        .await;
    assert!(eventually(Duration::from_secs(10), || worker.record().len() == 2).await);

    // qa moves down the file but keeps its settings; qb's command changes;
    // qc is new.
    worker
        .reload(&reload_config(&[(&qc, "c"), (&qa, "a"), (&qb, "b2")]))
        .await
        .expect("the new config loads");
    let now = health.consumers();
    assert_eq!(
        now.iter().map(|c| c.queue.clone()).collect::<Vec<_>>(),
        [qc.clone(), qa.clone(), qb.clone()]
    );
    assert!(
        Arc::ptr_eq(&now[1], &a_before),
        "the unchanged consumer keeps running as it was"
    );
    assert!(!Arc::ptr_eq(&now[2], &b_before), "the changed one is new");
    let a = now[1].snapshot();
    assert!(
        a.connected && a.reconnects == 0 && a.since_unix_ms == since,
        "the unchanged consumer kept its connection: {a:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || health.all_connected()).await,
        "{:?}",
        health
            .consumers()
            .iter()
            .map(|c| c.snapshot())
            .collect::<Vec<_>>()
    );

    // The held commands finish and are acked once each, by the consumers
    // that started them.
    std::fs::remove_file(&hold).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || a_before.snapshot().acked == 1
            && b_before.snapshot().acked == 1)
        .await,
        "a: {:?} b: {:?}",
        a_before.snapshot(),
        b_before.snapshot()
    );
    for q in [&qa, &qb, &qc] {
        broker
            .publish(q, b"after", BasicProperties::default())
            .await;
    }
    assert!(eventually(Duration::from_secs(15), || worker.record().len() == 5).await);
    // Let a redelivery, if there were one, show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = worker.record();
    assert_eq!(runs.len(), 5, "no message ran twice: {runs:?}");
    let argv_of = |body: &[u8], queue: &str| {
        runs.iter()
            .find(|r| r.body == body && r.env.get("AMQP_QUEUE").map(String::as_str) == Some(queue))
            .unwrap_or_else(|| {
                panic!(
                    "{} on {queue} did not run: {runs:?}",
                    String::from_utf8_lossy(body)
                )
            })
            .argv
            .clone()
    };
    assert_eq!(argv_of(b"held-b", &qb), ["b1"], "started before the reload");
    assert_eq!(argv_of(b"after", &qb), ["b2"], "the changed command");
    assert_eq!(argv_of(b"after", &qa), ["a"]);
    assert_eq!(argv_of(b"after", &qc), ["c"], "the new consumer");
    for q in [&qa, &qb, &qc] {
        assert_eq!(broker.count(q).await, 0, "{q} drained");
    }

    // A reload that breaks the file changes nothing.
    let err = worker
        .reload("amqp:\n  consumers:\n    - queue: [oops]\n")
        .await
        .expect_err("a broken config is refused");
    assert!(err.to_string().contains("queue"), "{err}");
    assert_eq!(health.consumers().len(), 3);
    assert!(Arc::ptr_eq(&health.consumers()[1], &a_before));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happens_to_messages() {
    let broker = Broker::connect().await;
    let queue = broker.name("metrics");
    let dead = format!("{queue}.dead");
    let yaml = consumer_config(
        &queue,
        &format!(
            "      concurrency: 2
      retry: {{max-attempts: 2, delay: 100ms}}
      dead-letter: {dead}
"
        ),
    )
    .replace("admin: off", "admin: 127.0.0.1:0");
    let worker = Worker::start(&yaml).await;
    let admin = worker.admin();
    let series = |name: &str| format!("{name}{{consumer=\"{queue}\"}}");
    let before = crate::ops::scrape(&admin).await;
    assert_eq!(
        crate::ops::get(&before, "execd_amqp_consumers_connected"),
        1.0
    );
    for body in ["ok-1", "ok-2", "ok-3", "fail-1"] {
        broker
            .publish(&queue, body.as_bytes(), BasicProperties::default())
            .await;
    }
    broker.take(&dead, 1, Duration::from_secs(15)).await;
    let mut after = crate::ops::scrape(&admin).await;
    for _ in 0..50 {
        // A dead letter can reach this test before execd has counted it.
        if crate::ops::get(&after, &series("execd_amqp_acks_total")) >= 3.0
            && crate::ops::get(&after, &series("execd_amqp_dead_letters_total")) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = crate::ops::scrape(&admin).await;
    }
    let delta = |name: &str| {
        crate::ops::get(&after, &series(name)) - crate::ops::get(&before, &series(name))
    };
    assert_eq!(delta("execd_amqp_acks_total"), 3.0, "three successes acked");
    assert_eq!(
        delta("execd_amqp_retries_total"),
        1.0,
        "fail-1 retried once"
    );
    assert_eq!(
        delta("execd_amqp_dead_letters_total"),
        1.0,
        "then dead-lettered"
    );
    assert_eq!(delta("execd_amqp_rejects_total"), 0.0);
    assert_eq!(crate::ops::get(&after, "execd_amqp_in_flight"), 0.0);
    // The commands behind the messages count like a route's.
    let route = format!("execd_command_exits_total{{route=\"{queue}\",code=\"0\"}}");
    assert_eq!(
        crate::ops::get(&after, &route) - crate::ops::get(&before, &route),
        3.0,
        "{route}"
    );
    let ready = request(&admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_a_plugin_refuses_is_dead_lettered_not_acked_away() {
    let broker = Broker::connect().await;
    let queue = broker.name("refused");
    let dead = format!("{queue}.dead");
    let worker = Worker::start(&format!(
        "listen: 127.0.0.1:0
admin: off
limits: {{drain-timeout: 10s}}
plugins:
  auth:
    path: {{repo}}/plugins/dist/api-key.wasm
    config: {{keys: [k-good]}}
amqp:
  url: {BROKER}
  consumers:
    - queue: {queue}
      declare: {{durable: false, arguments: {{x-expires: 600000}}}}
      pre: [auth]
      cmd: php {{fixtures}}/amqp-worker.php
      env: {{RECORD: \"{{dir}}/record.jsonl\", HOLD: \"{{dir}}/hold\"}}
      dead-letter: {dead}
"
    ))
    .await;
    let with_key = |key: &str| {
        let mut headers = FieldTable::default();
        headers.insert("x-api-key".into(), AMQPValue::LongString(key.into()));
        BasicProperties::default().with_headers(headers)
    };
    broker
        .publish(&queue, b"no-key", BasicProperties::default())
        .await;
    broker.publish(&queue, b"bad-key", with_key("k-bad")).await;
    broker
        .publish(&queue, b"good-key", with_key("k-good"))
        .await;

    let mut dead_letters = broker.take(&dead, 2, Duration::from_secs(20)).await;
    dead_letters.sort_by(|a, b| a.data.cmp(&b.data));
    let bodies: Vec<&[u8]> = dead_letters.iter().map(|d| &d.data[..]).collect();
    assert_eq!(bodies, [&b"bad-key"[..], &b"no-key"[..]]);
    for d in &dead_letters {
        let reason = header_text(d, "x-execd-reason");
        assert!(
            reason.starts_with("refused by a plugin with status 401"),
            "{reason}"
        );
    }
    let health = worker.health();
    eventually(Duration::from_secs(5), || {
        let h = health.consumers()[0].snapshot();
        h.acked == 1 && h.dead_lettered == 2
    })
    .await;
    let h = health.consumers()[0].snapshot();
    assert_eq!((h.acked, h.dead_lettered, h.unsettled), (1, 2, 0));
    // Only the message with a good key reached the command.
    let runs = worker.record();
    let ran: Vec<&[u8]> = runs.iter().map(|r| &r.body[..]).collect();
    assert_eq!(ran, [&b"good-key"[..]]);
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_dead_lettered_is_kept_without_spinning() {
    let broker = Broker::connect().await;
    let queue = broker.name("unroutable");
    // An exchange nothing is bound to: the dead-letter copy is returned
    // unroutable, so the message cannot be settled.
    let exchange = format!("{queue}.dlx");
    broker
        .ch
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let worker = Worker::start(&consumer_config(
        &queue,
        &format!("      dead-letter: {{exchange: {exchange}, routing-key: nowhere}}\n"),
    ))
    .await;
    broker
        .publish(&queue, b"fail-unroutable", BasicProperties::default())
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // It ran once and waits to go back to its queue; it is not run again
    // and again as fast as the command fails.
    assert_eq!(worker.record().len(), 1, "runs: {:?}", worker.record());
    let h = worker.health().consumers()[0].snapshot();
    assert_eq!((h.dead_lettered, h.acked, h.in_flight), (0, 0, 1));
    // Stopping ends the wait: the message goes back to its queue, kept.
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 1);
    let _ = broker
        .ch
        .exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_consumer_keeps_its_concurrency() {
    let broker = Broker::connect().await;
    let queue = broker.name("serial");
    let config = |arg: &str| {
        reload_config(&[(&queue, arg)]).replace(
            "      cmd: php",
            "      concurrency: 1\n      prefetch: 1\n      cmd: php",
        )
    };
    let worker = Worker::start(&config("before")).await;
    // A command of the old consumer holds its one slot across the reload.
    let hold = worker.dir.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    broker
        .publish(&queue, b"first", BasicProperties::default())
        .await;
    assert!(eventually(Duration::from_secs(10), || worker.record().len() == 1).await);
    worker
        .reload(&config("after"))
        .await
        .expect("the new config loads");
    let health = worker.health();
    assert!(eventually(Duration::from_secs(10), || health.all_connected()).await);
    broker
        .publish(&queue, b"second", BasicProperties::default())
        .await;
    // The new consumer does not start a second command while the old one's
    // still runs: `concurrency: 1` holds across the reload.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let runs = worker.record();
    assert_eq!(runs.len(), 1, "ran side by side: {runs:?}");
    std::fs::remove_file(&hold).unwrap();
    assert!(eventually(Duration::from_secs(10), || worker.record().len() == 2).await);
    let runs = worker.record();
    assert_eq!(
        runs.iter()
            .map(|r| (
                String::from_utf8_lossy(&r.body).into_owned(),
                r.argv.clone()
            ))
            .collect::<Vec<_>>(),
        [
            ("first".to_string(), vec!["before".to_string()]),
            ("second".to_string(), vec!["after".to_string()])
        ]
    );
    worker.stop().await;
    assert_eq!(broker.count(&queue).await, 0);
}
