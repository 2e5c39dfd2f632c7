//! The `amqp:` section: the broker URL and the queue consumers.
//!
//! A consumer shares every command field with a route (`cmd`, `wd`, `env`,
//! `timeout`, `payload-to`, `reply-socket`, `pre`/`post`, ...), read by the
//! same [`read_command`](super::read_command), and adds what a queue needs:
//! the queue and its declaration, bindings, prefetch and concurrency, the
//! retry schedule, the dead-letter target and the exit-code -> action map.
//! Cross-field rules (an action that needs a target, prefetch below
//! concurrency, duplicate queues) are checked here, once, before anything
//! connects.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::node::{Kind, Node, Pos};
use super::read::Reader;
use super::template::Placeholder;
use super::{CommandSpec, Limits};

/// The validated `amqp:` section.
#[derive(Clone)]
pub struct AmqpConfig {
    /// The broker address as parsed, with the host taken verbatim (see
    /// [`broker_uri`]); holds the password, so it is never logged.
    pub uri: lapin::uri::AMQPUri,
    /// The URL with the password masked, for log lines and health output.
    pub url_redacted: String,
    /// The consumers, in file order.
    pub consumers: Vec<Arc<Consumer>>,
}

impl std::fmt::Debug for AmqpConfig {
    // Hand-written so that `{:?}` of a config can never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.url_redacted)
            .field("consumers", &self.consumers)
            .finish()
    }
}

/// One queue consumer: where messages come from and what runs for each.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    /// For logs, `EXECD_ROUTE` and health; the queue name unless `name` says
    /// otherwise.
    pub name: String,
    /// The queue consumed.
    pub queue: String,
    /// Declare the queue at connect (and after every reconnect); `None`
    /// expects it to exist already.
    pub declare: Option<QueueDeclare>,
    /// Exchange bindings made at connect.
    pub bindings: Vec<Binding>,
    /// Unacknowledged messages the broker may hand over at once; never below
    /// `concurrency`, or slots would sit idle.
    pub prefetch: u16,
    /// Commands of this consumer running at once.
    pub concurrency: usize,
    /// Delayed redelivery of failed messages; `None` means failures are not
    /// retried.
    pub retry: Option<Retry>,
    /// Where messages go that will not be retried any more.
    pub dead_letter: Option<DeadLetter>,
    /// What each way of ending does to the message.
    pub on_exit: OnExit,
    /// Largest body handed to the command; a bigger message is poison.
    pub max_body: u64,
    /// What runs per message; the same fields as a route.
    pub command: CommandSpec,
    /// Where the consumer was defined, for messages.
    pub pos: Pos,
}

impl Consumer {
    /// Whether `other` consumes and runs exactly as this one does; where it
    /// stands in the file does not count. A reload keeps such a consumer
    /// running on its channel.
    pub fn same_settings(&self, other: &Consumer) -> bool {
        Consumer {
            pos: other.pos,
            ..self.clone()
        } == *other
    }
}

/// How execd declares a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDeclare {
    /// Survives a broker restart (the messages too, when published
    /// persistent).
    pub durable: bool,
    /// Deleted by the broker when its last consumer goes.
    pub auto_delete: bool,
    /// `x-queue-type`, `x-max-length`, ... passed as given.
    pub arguments: Vec<(String, ArgValue)>,
}

/// A value in an AMQP argument table, as written in YAML.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// A binding of the consumer's queue to an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The exchange bound from.
    pub exchange: String,
    /// Declare the exchange (durable) with this type; `None` expects it to
    /// exist.
    pub kind: Option<ExchangeType>,
    /// One binding per key; a fanout or headers exchange takes `[""]`.
    pub routing_keys: Vec<String>,
    /// Binding arguments (`x-match` for a headers exchange).
    pub arguments: Vec<(String, ArgValue)>,
}

/// The exchange types RabbitMQ ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

/// The retry schedule: attempt `n` that fails waits
/// `delay * backoff^(n-1)` (at most `max-delay`) before attempt `n + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait after the first failure.
    pub delay: Duration,
    /// Factor applied to the wait after each further failure.
    pub backoff: f64,
    /// Upper bound of any one wait.
    pub max_delay: Duration,
}

impl Retry {
    /// The wait after attempt `attempt` (1-based) failed, rounded to whole
    /// milliseconds because it becomes a queue TTL.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let factor = self
            .backoff
            .powi(attempt.saturating_sub(1).min(1000) as i32);
        let secs = (self.delay.as_secs_f64() * factor).min(self.max_delay.as_secs_f64());
        Duration::from_millis((secs * 1000.0).round().max(1.0) as u64)
    }

    /// Every distinct wait of the schedule, shortest first: one delay queue
    /// each.
    pub fn delays(&self) -> Vec<Duration> {
        let mut out: Vec<Duration> = (1..self.max_attempts)
            .map(|a| self.delay_after(a))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Where dead-lettered messages are published.
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetter {
    /// Publish to an existing exchange; the routing key is the message's own
    /// unless one is given.
    Exchange {
        exchange: String,
        routing_key: Option<String>,
    },
    /// Publish straight into this queue (declared durable when missing).
    Queue(String),
}

/// What happens to a message once its command has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Done: acknowledge it (and send the RPC reply).
    Ack,
    /// Run it again later, through the delay queue; dead-lettered (or
    /// rejected) once `max-attempts` is reached.
    Retry,
    /// Publish it to the dead-letter target with the reasons, then ack.
    DeadLetter,
    /// Put it back at the head of the queue at once (beware of loops).
    Requeue,
    /// Drop it (the queue's own `x-dead-letter-exchange`, if any, applies).
    Reject,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "ack" => Action::Ack,
            "retry" => Action::Retry,
            "dead-letter" => Action::DeadLetter,
            "requeue" => Action::Requeue,
            "reject" => Action::Reject,
            _ => return None,
        })
    }

    /// The name used in the config and in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ack => "ack",
            Action::Retry => "retry",
            Action::DeadLetter => "dead-letter",
            Action::Requeue => "requeue",
            Action::Reject => "reject",
        }
    }
}

/// The `on-exit` map, with the defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct OnExit {
    /// Exit code -> action; holds `0 -> ack` unless the file says otherwise.
    pub codes: BTreeMap<i32, Action>,
    /// Any other failure: an unlisted exit code, a signal, a command that
    /// could not start, output over `max-output`.
    pub other: Action,
    /// The command ran past its `timeout`.
    pub timeout: Action,
}

impl OnExit {
    /// The action for a normal exit with `code`.
    pub fn for_code(&self, code: i32) -> Action {
        self.codes.get(&code).copied().unwrap_or(self.other)
    }
}

impl Consumer {
    /// The delay queue that holds messages waiting `delay` before going back
    /// to this consumer's queue.
    pub fn delay_queue(&self, delay: Duration) -> String {
        delay_queue_name(&self.queue, delay)
    }
}

fn delay_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.execd-retry-{}ms", delay.as_millis())
}

/// AMQP short strings (queue, exchange, routing key names) hold at most 255
/// bytes.
const MAX_NAME: usize = 255;

const CONSUMER_KEYS: &[&str] = &[
    "name",
    "queue",
    "declare",
    "bindings",
    "prefetch",
    "concurrency",
    "retry",
    "dead-letter",
    "on-exit",
    "max-body",
    // The command fields, shared with routes.
    "cmd",
    "shell",
    "wd",
    "env",
    "content-type",
    "timeout",
    "kill-grace",
    "payload-to",
    "payload-env",
    "escape-shell-args",
    "max-output",
    "status",
    "exit-status",
    "output",
    "expose-stderr",
    "reply-socket",
    "user",
    "group",
    "rlimits",
    "pre",
    "post",
];

/// Reads the `amqp:` mapping.
pub(super) fn read_amqp(
    r: &mut Reader<'_>,
    n: &Node,
    base: &Path,
    limits: &Limits,
    plugin_names: &[&str],
) -> Option<AmqpConfig> {
    let mut f = r.map(n, "amqp")?;
    let errors_before = r.errors.len();
    let uri = match f.get("url") {
        None => {
            r.error(
                n.pos,
                "amqp.url",
                "missing field `url`: the broker, e.g. `url: amqp://guest:guest@127.0.0.1:5672/%2f` \
                 (or \"${AMQP_URL}\" to take it from the environment)",
            );
            None
        }
        Some(u) => r.string(u, "amqp.url").and_then(|s| match broker_uri(&s) {
            Ok(uri) => Some((uri, redact(&s))),
            Err(e) => {
                r.error(u.pos, "amqp.url", e);
                None
            }
        }),
    };
    let mut consumers: Vec<Arc<Consumer>> = Vec::new();
    match f.get("consumers") {
        None => r.error(
            n.pos,
            "amqp.consumers",
            "missing field `consumers`: the queues to consume (may be empty: `consumers: []`)",
        ),
        Some(c) => match &c.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let field = format!("amqp.consumers[{i}]");
                    if let Some(consumer) =
                        read_consumer(r, item, &field, base, limits, plugin_names)
                    {
                        consumers.push(Arc::new(consumer));
                    }
                }
            }
            Kind::Null => {}
            other => r.error(
                c.pos,
                "amqp.consumers",
                format!("expected a list of consumers, found {}", other.describe()),
            ),
        },
    }
    f.finish(r, &["url", "consumers"]);
    // Two consumers on one queue would also share its delay queues with
    // different schedules; one consumer with more concurrency does the job.
    for (i, a) in consumers.iter().enumerate() {
        // The first clash is enough to name.
        if let Some(b) = consumers[..i]
            .iter()
            .find(|b| a.queue == b.queue || a.name == b.name)
        {
            if a.queue == b.queue {
                r.error(
                    a.pos,
                    &format!("amqp.consumers[{i}].queue"),
                    format!(
                        "queue {:?} is already consumed by the consumer at line {}; raise its `concurrency` instead",
                        a.queue, b.pos.line
                    ),
                );
            } else {
                r.error(
                    a.pos,
                    &format!("amqp.consumers[{i}].name"),
                    format!(
                        "consumer name {:?} is already used at line {}",
                        a.name, b.pos.line
                    ),
                );
            }
        }
    }
    if r.errors.len() > errors_before {
        return None;
    }
    let (uri, url_redacted) = uri?;
    Some(AmqpConfig {
        uri,
        url_redacted,
        consumers,
    })
}

fn read_consumer(
    r: &mut Reader<'_>,
    n: &Node,
    field: &str,
    base: &Path,
    limits: &Limits,
    plugin_names: &[&str],
) -> Option<Consumer> {
    let mut f = r.map(n, field)?;
    let errors_before = r.errors.len();
    let queue = match f.get("queue") {
        None => {
            r.error(
                n.pos,
                &f.field("queue"),
                "missing field `queue`: the queue to consume, e.g. `queue: orders`",
            );
            None
        }
        Some(q) => r.string(q, &f.field("queue")).and_then(|s| {
            if s.is_empty() || s.starts_with("amq.") {
                r.error(
                    q.pos,
                    &f.field("queue"),
                    format!(
                        "{s:?}: a consumed queue needs a name of its own (not empty, not `amq.*`)"
                    ),
                );
                None
            } else if delay_queue_name(&s, Duration::from_secs(86_400_000)).len() > MAX_NAME {
                // Leave room for the delay queue names derived from it.
                r.error(
                    q.pos,
                    &f.field("queue"),
                    format!(
                        "queue name is {} bytes; at most 220 leave room for its delay queues",
                        s.len()
                    ),
                );
                None
            } else {
                Some(s)
            }
        }),
    };
    let name = f
        .get("name")
        .and_then(|v| r.string(v, &f.field("name")))
        .or_else(|| queue.clone())
        .unwrap_or_default();
    let declare = f
        .get("declare")
        .and_then(|d| read_declare(r, d, &f.field("declare")));
    let bindings = f
        .get("bindings")
        .map(|b| read_bindings(r, b, &f.field("bindings")))
        .unwrap_or_default();
    let concurrency = f
        .get("concurrency")
        .and_then(|v| r.int(v, &f.field("concurrency"), 1, 1000))
        .map_or(1, |v| v as usize);
    // Twice the slots by default: the next message is already here when a
    // command ends, instead of one broker round trip after its ack.
    let prefetch = match f.get("prefetch") {
        None => (concurrency * 2).min(65_535) as u16,
        Some(v) => match r.int(v, &f.field("prefetch"), 1, 65_535) {
            Some(p) if (p as usize) < concurrency => {
                r.error(
                    v.pos,
                    &f.field("prefetch"),
                    format!("prefetch {p} is below concurrency {concurrency}: slots would wait for messages the broker holds back; use at least {concurrency}"),
                );
                concurrency as u16
            }
            Some(p) => p as u16,
            None => concurrency as u16,
        },
    };
    let retry = f
        .get("retry")
        .and_then(|v| read_retry(r, v, &f.field("retry")));
    let dead_letter = f
        .get("dead-letter")
        .and_then(|v| read_dead_letter(r, v, &f.field("dead-letter")));
    let max_body = f
        .get("max-body")
        .and_then(|v| r.size(v, &f.field("max-body")))
        .unwrap_or(limits.max_body);
    // Present counts, valid or not: a broken `retry:` has its own error.
    let has_retry = f.get("retry").is_some();
    let has_dead_letter = f.get("dead-letter").is_some();
    let on_exit = read_on_exit(r, &mut f, has_retry, has_dead_letter);
    let command = super::read_command(r, &mut f, n, base, limits, plugin_names);
    if let Some(cmd) = &command {
        for word in &cmd.argv {
            for ph in word.placeholders() {
                if matches!(ph, Placeholder::Path(_) | Placeholder::Query(_)) {
                    let pos = f.get("cmd").map_or(n.pos, |c| c.pos);
                    r.error(
                        pos,
                        &f.field("cmd"),
                        format!("{ph}: a message has no url or query string; use ${{header.NAME}} for a message header"),
                    );
                }
            }
        }
    }
    f.finish(r, CONSUMER_KEYS);
    if r.errors.len() > errors_before {
        return None;
    }
    Some(Consumer {
        name,
        queue: queue?,
        declare,
        bindings,
        prefetch,
        concurrency,
        retry,
        dead_letter,
        on_exit,
        max_body,
        command: command?,
        pos: n.pos,
    })
}

fn read_declare(r: &mut Reader<'_>, n: &Node, field: &str) -> Option<QueueDeclare> {
    let durable_default = QueueDeclare {
        durable: true,
        auto_delete: false,
        arguments: Vec::new(),
    };
    match &n.kind {
        Kind::Bool(true) => Some(durable_default),
        Kind::Bool(false) => None,
        Kind::Map(_) => {
            let mut f = r.map(n, field)?;
            let durable = f
                .get("durable")
                .and_then(|v| r.bool(v, &f.field("durable")))
                .unwrap_or(true);
            let auto_delete = f
                .get("auto-delete")
                .and_then(|v| r.bool(v, &f.field("auto-delete")))
                .unwrap_or(false);
            let arguments = f
                .get("arguments")
                .map(|a| read_arguments(r, a, &f.field("arguments")))
                .unwrap_or_default();
            f.finish(r, &["durable", "auto-delete", "arguments"]);
            Some(QueueDeclare {
                durable,
                auto_delete,
                arguments,
            })
        }
        other => {
            r.error(
                n.pos,
                field,
                format!(
                    "expected true, false or a mapping (durable, auto-delete, arguments), found {}",
                    other.describe()
                ),
            );
            None
        }
    }
}

fn read_arguments(r: &mut Reader<'_>, n: &Node, field: &str) -> Vec<(String, ArgValue)> {
    let Kind::Map(entries) = &n.kind else {
        r.error(
            n.pos,
            field,
            format!(
                "expected a mapping of argument names to values, found {}",
                n.kind.describe()
            ),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, _, v) in entries {
        let f = format!("{field}.{k}");
        let value = match &v.kind {
            Kind::Bool(b) => Some(ArgValue::Bool(*b)),
            Kind::Int(i) => Some(ArgValue::Int(*i)),
            Kind::Float(x) => Some(ArgValue::Float(*x)),
            Kind::Str(_) => r.string(v, &f).map(ArgValue::Str),
            other => {
                r.error(
                    v.pos,
                    &f,
                    format!(
                        "expected a string, number or boolean, found {}",
                        other.describe()
                    ),
                );
                None
            }
        };
        if let Some(value) = value {
            out.push((k.clone(), value));
        }
    }
    out
}

fn read_bindings(r: &mut Reader<'_>, n: &Node, field: &str) -> Vec<Binding> {
    let Kind::Seq(items) = &n.kind else {
        r.error(
            n.pos,
            field,
            format!(
                "expected a list of bindings ({{exchange, type, routing-keys}}), found {}",
                n.kind.describe()
            ),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let Some(mut f) = r.map(item, &field) else {
            continue;
        };
        let exchange = match f.get("exchange") {
            None => {
                r.error(item.pos, &f.field("exchange"), "missing field `exchange`: the exchange to bind the queue to");
                None
            }
            Some(e) => r.string(e, &f.field("exchange")).and_then(|s| {
                if s.is_empty() {
                    r.error(e.pos, &f.field("exchange"), "the default exchange (\"\") cannot be bound; it already routes by queue name");
                    None
                } else if s.len() > MAX_NAME {
                    r.error(e.pos, &f.field("exchange"), "an exchange name holds at most 255 bytes");
                    None
                } else {
                    Some(s)
                }
            }),
        };
        let kind = f
            .get("type")
            .and_then(|t| match r.string(t, &f.field("type")).as_deref() {
                Some("direct") => Some(ExchangeType::Direct),
                Some("fanout") => Some(ExchangeType::Fanout),
                Some("topic") => Some(ExchangeType::Topic),
                Some("headers") => Some(ExchangeType::Headers),
                Some(other) => {
                    r.error(
                        t.pos,
                        &f.field("type"),
                        format!("{other:?}: expected direct, fanout, topic or headers"),
                    );
                    None
                }
                None => None,
            });
        let mut routing_keys = Vec::new();
        for key in ["routing-keys", "routing-key"] {
            if let Some(k) = f.get(key) {
                for (s, pos) in r.string_list(k, &f.field(key)).unwrap_or_default() {
                    if s.len() > MAX_NAME {
                        r.error(pos, &f.field(key), "a routing key holds at most 255 bytes");
                    } else {
                        routing_keys.push(s);
                    }
                }
            }
        }
        if routing_keys.is_empty() {
            routing_keys.push(String::new());
        }
        let arguments = f
            .get("arguments")
            .map(|a| read_arguments(r, a, &f.field("arguments")))
            .unwrap_or_default();
        f.finish(
            r,
            &[
                "exchange",
                "type",
                "routing-keys",
                "routing-key",
                "arguments",
            ],
        );
        if let Some(exchange) = exchange {
            out.push(Binding {
                exchange,
                kind,
                routing_keys,
                arguments,
            });
        }
    }
    out
}

fn read_retry(r: &mut Reader<'_>, n: &Node, field: &str) -> Option<Retry> {
    let mut f = r.map(n, field)?;
    let before = r.errors.len();
    let max_attempts = match f.get("max-attempts") {
        Some(v) => r
            .int(v, &f.field("max-attempts"), 2, 1000)
            .map(|v| v as u32),
        None => {
            r.error(
                n.pos,
                &f.field("max-attempts"),
                "missing field `max-attempts`: attempts in all, the first included (at least 2)",
            );
            None
        }
    };
    let delay = match f.get("delay") {
        Some(v) => r.duration(v, &f.field("delay")),
        None => Some(Duration::from_secs(5)),
    };
    if let (Some(d), Some(v)) = (delay, f.get("delay"))
        && d < Duration::from_millis(1)
    {
        r.error(
            v.pos,
            &f.field("delay"),
            "the retry delay must be at least 1ms",
        );
    }
    let backoff = match f.get("backoff") {
        None => Some(1.0),
        Some(v) => {
            let b = match &v.kind {
                Kind::Int(i) => Some(*i as f64),
                Kind::Float(x) => Some(*x),
                _ => None,
            };
            match b {
                Some(b) if (1.0..=100.0).contains(&b) => Some(b),
                _ => {
                    r.error(
                        v.pos,
                        &f.field("backoff"),
                        format!(
                            "expected a factor from 1 (fixed delay) to 100, e.g. 2, found {}",
                            v.kind.describe()
                        ),
                    );
                    None
                }
            }
        }
    };
    let max_delay = match f.get("max-delay") {
        Some(v) => r.duration(v, &f.field("max-delay")),
        None => Some(Duration::from_secs(24 * 3600)),
    };
    f.finish(r, &["max-attempts", "delay", "backoff", "max-delay"]);
    if r.errors.len() > before {
        return None;
    }
    Some(Retry {
        max_attempts: max_attempts?,
        delay: delay?,
        backoff: backoff?,
        max_delay: max_delay?,
    })
}

fn read_dead_letter(r: &mut Reader<'_>, n: &Node, field: &str) -> Option<DeadLetter> {
    let check_name = |r: &mut Reader<'_>, s: String, pos: Pos, f: &str| {
        if s.len() > MAX_NAME {
            r.error(pos, f, "a name holds at most 255 bytes");
            None
        } else {
            Some(s)
        }
    };
    match &n.kind {
        // `dead-letter: orders.failed` is a queue.
        Kind::Str(_) => r
            .string(n, field)
            .and_then(|s| check_name(r, s, n.pos, field))
            .map(DeadLetter::Queue),
        Kind::Map(_) => {
            let mut f = r.map(n, field)?;
            let queue = f.get("queue");
            let exchange = f.get("exchange");
            let routing_key = f.get("routing-key");
            let out = match (queue, exchange) {
                (Some(q), None) => {
                    if let Some(k) = routing_key {
                        r.error(k.pos, &f.field("routing-key"), "`routing-key` goes with `exchange`; a `queue` target is addressed by its name");
                    }
                    r.string(q, &f.field("queue"))
                        .and_then(|s| check_name(r, s, q.pos, &f.field("queue")))
                        .map(DeadLetter::Queue)
                }
                (None, Some(e)) => {
                    let exchange = r
                        .string(e, &f.field("exchange"))
                        .and_then(|s| check_name(r, s, e.pos, &f.field("exchange")));
                    let routing_key = routing_key
                        .and_then(|k| r.string(k, &f.field("routing-key")))
                        .and_then(|s| check_name(r, s, n.pos, &f.field("routing-key")));
                    exchange.map(|exchange| DeadLetter::Exchange {
                        exchange,
                        routing_key,
                    })
                }
                (Some(_), Some(_)) => {
                    r.error(n.pos, field, "give either `queue` or `exchange` (with an optional `routing-key`), not both");
                    None
                }
                (None, None) => {
                    r.error(n.pos, field, "expected `queue: NAME` or `exchange: NAME` (with an optional `routing-key`)");
                    None
                }
            };
            f.finish(r, &["queue", "exchange", "routing-key"]);
            out
        }
        other => {
            r.error(
                n.pos,
                field,
                format!(
                    "expected a queue name or a mapping with `queue` or `exchange`, found {}",
                    other.describe()
                ),
            );
            None
        }
    }
}

fn read_on_exit(
    r: &mut Reader<'_>,
    f: &mut super::read::Fields<'_>,
    has_retry: bool,
    has_dead_letter: bool,
) -> OnExit {
    // A failure retries when it can, else goes where it can be looked at,
    // else is dropped (never requeued at once: that would spin).
    let default_failure = if has_retry {
        Action::Retry
    } else if has_dead_letter {
        Action::DeadLetter
    } else {
        Action::Reject
    };
    let mut codes = BTreeMap::from([(0, Action::Ack)]);
    let mut other = default_failure;
    let mut timeout = None;
    if let Some(m) = f.get("on-exit") {
        let field = f.field("on-exit");
        match &m.kind {
            Kind::Map(entries) => {
                for (k, kpos, v) in entries {
                    let vf = format!("{field}.{k}");
                    let action = match r.string(v, &vf) {
                        Some(s) => match Action::parse(&s) {
                            Some(a) => Some(a),
                            None => {
                                r.error(v.pos, &vf, format!("{s:?}: expected ack, retry, dead-letter, requeue or reject"));
                                None
                            }
                        },
                        None => None,
                    };
                    let Some(action) = action else { continue };
                    if action == Action::Retry && !has_retry {
                        r.error(v.pos, &vf, "`retry` needs a `retry:` schedule on this consumer (max-attempts, delay, backoff)");
                    }
                    if action == Action::DeadLetter && !has_dead_letter {
                        r.error(v.pos, &vf, "`dead-letter` needs a `dead-letter:` target on this consumer (a queue, or an exchange)");
                    }
                    match k.as_str() {
                        "*" => other = action,
                        "timeout" => timeout = Some(action),
                        code => match code.parse::<i32>() {
                            Ok(c) if (0..=255).contains(&c) => {
                                codes.insert(c, action);
                            }
                            _ => r.error(*kpos, &field, format!("{k:?} is not an exit code (0-255), \"*\" or \"timeout\"")),
                        },
                    }
                }
            }
            other_kind => r.error(
                m.pos,
                &field,
                format!("expected a mapping of exit codes to actions, e.g. {{0: ack, 3: dead-letter, \"*\": retry, timeout: retry}}, found {}", other_kind.describe()),
            ),
        }
    }
    OnExit {
        codes,
        other,
        timeout: timeout.unwrap_or(other),
    }
}

/// Parses an `amqp://` or `amqps://` URL.
///
/// The host is taken from the URL as written: the URL parser lapin uses
/// only knows domain names and silently replaces an IP address such as
/// `10.0.0.5` with `localhost`, which would connect somewhere else.
pub fn broker_uri(url: &str) -> Result<lapin::uri::AMQPUri, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "{:?} is not a URL; expected amqp://user:password@host:5672/vhost",
            redact(url)
        ));
    };
    if scheme != "amqp" && scheme != "amqps" {
        return Err(format!(
            "unsupported scheme {scheme:?}; expected amqp:// or amqps:// (TLS)"
        ));
    }
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| format!("{} is not a valid AMQP URL: {e}", redact(url)))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(h, _)| h).unwrap_or(v6),
        None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(format!("{} names no host", redact(url)));
    }
    uri.authority.host = host.to_string();
    Ok(uri)
}

/// The URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<crate::config::Config, Vec<String>> {
        let dir = std::env::temp_dir();
        let env = |name: &str| (name == "AMQP_PASS").then(|| "s3cret".to_string());
        crate::config::from_text(Path::new("execd.yaml"), yaml, &dir, &env)
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn a_full_consumer_loads_with_its_defaults() {
        let c = load(
            r#"routes: []
amqp:
  url: amqp://guest:${AMQP_PASS}@10.1.2.3:5673/%2f
  consumers:
    - queue: orders
      declare: {durable: true, arguments: {x-queue-type: quorum, x-max-length: 1000}}
      bindings:
        - {exchange: shop, type: topic, routing-keys: ["order.*", "refund.#"]}
      concurrency: 4
      retry: {max-attempts: 4, delay: 1s, backoff: 3, max-delay: 5s}
      dead-letter: orders.failed
      on-exit: {3: dead-letter, 75: requeue, timeout: reject}
      cmd: cat
"#,
        )
        .unwrap();
        let a = c.amqp.unwrap();
        assert_eq!(a.uri.authority.host, "10.1.2.3");
        assert_eq!(a.uri.authority.port, 5673);
        assert_eq!(a.uri.authority.userinfo.password, "s3cret");
        assert_eq!(a.url_redacted, "amqp://guest:***@10.1.2.3:5673/%2f");
        assert!(!format!("{a:?}").contains("s3cret"));
        let o = &a.consumers[0];
        assert_eq!(
            (o.name.as_str(), o.prefetch, o.concurrency),
            ("orders", 8, 4)
        );
        assert_eq!(
            o.declare.as_ref().unwrap().arguments[1],
            ("x-max-length".into(), ArgValue::Int(1000))
        );
        assert_eq!(o.bindings[0].routing_keys, ["order.*", "refund.#"]);
        let retry = o.retry.as_ref().unwrap();
        // 1s, 3s, then 9s capped at 5s.
        assert_eq!(
            retry.delays(),
            [
                Duration::from_secs(1),
                Duration::from_secs(3),
                Duration::from_secs(5)
            ]
        );
        assert_eq!(
            o.delay_queue(Duration::from_secs(3)),
            "orders.execd-retry-3000ms"
        );
        assert_eq!(
            o.dead_letter,
            Some(DeadLetter::Queue("orders.failed".into()))
        );
        assert_eq!(o.on_exit.for_code(0), Action::Ack);
        assert_eq!(o.on_exit.for_code(3), Action::DeadLetter);
        assert_eq!(o.on_exit.for_code(75), Action::Requeue);
        assert_eq!(o.on_exit.for_code(1), Action::Retry);
        assert_eq!(o.on_exit.timeout, Action::Reject);
    }

    #[test]
    fn failures_default_to_dead_letter_then_reject() {
        let c = load(
            "routes: []\namqp:\n  url: amqps://h.example/v\n  consumers:\n    - {queue: a, cmd: cat, dead-letter: {exchange: dlx}}\n    - {queue: b, cmd: cat}\n",
        )
        .unwrap();
        let a = c.amqp.unwrap();
        assert_eq!(a.consumers[0].on_exit.for_code(1), Action::DeadLetter);
        assert_eq!(a.consumers[0].on_exit.timeout, Action::DeadLetter);
        assert_eq!(a.consumers[1].on_exit.for_code(1), Action::Reject);
        assert_eq!(a.uri.authority.port, 5671);
    }

    #[test]
    fn every_consumer_error_with_its_position() {
        let errors = load(
            r#"routes: []
amqp:
  url: http://broker
  consumers:
    - queue: q1
      cmd: cat ${query.id}
      prefetch: 2
      concurrency: 8
      on-exit: {3: retry, 4: dead-letter, x: ack, 5: explode}
      bindings: [{exchange: ex, type: fan}]
      retry: {delay: 1s}
      prefech: 9
"#,
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for (needle, at) in [
            ("unsupported scheme \"http\"", "3:8"),
            ("${query.id}: a message has no url", "6:12"),
            ("prefetch 2 is below concurrency 8", "7:17"),
            // `3: retry` is not reported: `retry:` is there, broken on its own.
            ("`dead-letter` needs a `dead-letter:` target", "9:30"),
            ("\"x\" is not an exit code", "9:43"),
            ("\"explode\": expected ack, retry", "9:54"),
            ("\"fan\": expected direct, fanout", "10:39"),
            ("missing field `max-attempts`", "11:14"),
            ("unknown field `prefech`; did you mean `prefetch`?", "12:7"),
        ] {
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains(needle) && e.contains(&format!("execd.yaml:{at}:"))),
                "no error containing {needle:?} at {at} in\n{joined}"
            );
        }
        assert_eq!(errors.len(), 9, "{joined}");
    }

    #[test]
    fn a_queue_has_one_consumer_and_a_name_is_unique() {
        let errors = load(
            "amqp:\n  url: amqp://h\n  consumers:\n    - {queue: q1, cmd: cat}\n    - {queue: q1, cmd: cat}\n    - {queue: q2, name: q1, cmd: cat}\n",
        )
        .unwrap_err();
        let joined = errors.join("\n");
        assert!(joined.contains("execd.yaml:5:7: amqp.consumers[1].queue: queue \"q1\" is already consumed by the consumer at line 4"), "{joined}");
        assert!(joined.contains("execd.yaml:6:7: amqp.consumers[2].name: consumer name \"q1\" is already used at line 4"), "{joined}");
        // Without `routes:`, a worker-only file.
        assert_eq!(errors.len(), 2, "{joined}");
    }

    #[test]
    fn urls_keep_ip_hosts_and_hide_passwords() {
        assert_eq!(
            broker_uri("amqp://u:p@[::1]:5672/%2f")
                .unwrap()
                .authority
                .host,
            "::1"
        );
        assert_eq!(
            broker_uri("amqp://127.0.0.1").unwrap().authority.host,
            "127.0.0.1"
        );
        assert_eq!(broker_uri("amqp://rabbit.internal/vh").unwrap().vhost, "vh");
        assert!(
            broker_uri("127.0.0.1:5672")
                .unwrap_err()
                .contains("not a URL")
        );
        assert_eq!(
            redact("amqps://me:pw@h:1/v?heartbeat=5"),
            "amqps://me:***@h:1/v?heartbeat=5"
        );
        assert_eq!(redact("amqp://h/v"), "amqp://h/v");
    }
}
