//! The AMQP intake: consumes RabbitMQ queues and runs a command per
//! message, through the same [`pipeline`](crate::pipeline) as an HTTP
//! request.
//!
//! Delivery is at least once; no message is lost:
//!
//! - Acks are manual, and a message is acked only once its outcome is
//!   settled: the command succeeded (and its RPC reply, if asked for, was
//!   confirmed by the broker), or the copy that carries it on — to a delay
//!   queue for a retry, to the dead-letter target — was confirmed first
//!   (publisher confirms, `mandatory`, so an unroutable copy counts as a
//!   failure and the original is put back instead of acked).
//! - A retry never holds a delivery while it waits: the copy goes to a
//!   per-delay queue (`<queue>.execd-retry-<ms>ms`, `x-message-ttl`) that
//!   dead-letters it back to the work queue when the time is up. One queue
//!   per distinct delay, because RabbitMQ expires messages only at a queue's
//!   head: one queue with mixed per-message TTLs would hold a short wait
//!   behind a long one. The attempt number travels in `x-execd-attempt`.
//! - Each consumer has its own connection, reconnected with exponential
//!   backoff and jitter whenever the connection or channel goes; topology
//!   is declared again and consuming resumes. Results whose channel died
//!   are not acked: the broker redelivers those messages.
//! - On shutdown the consumers are cancelled, running commands finish (the
//!   daemon's drain deadline bounds that, then stops them and their
//!   messages are requeued), are settled, and the connection is closed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::amqp::{Action, AmqpConfig, ArgValue, Consumer, DeadLetter, ExchangeType};
use crate::pipeline::{self, AmqpOrigin, Failure, Invocation, Origin, Reply};
use crate::plugin::Plugins;
use crate::problem;
use crate::runner::RunResult;

/// The header that counts attempts (1 for a fresh message).
pub const ATTEMPT_HEADER: &str = "x-execd-attempt";

/// Reconnect waits grow from this...
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// ...to at most this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The running consumers. A reload ([`Workers::update`]) keeps those whose
/// settings did not change on their channels, stops those that went or
/// changed (they finish what they run, settle it and close) and starts the
/// new ones.
pub struct Workers {
    /// What the consumers are doing, for health checks.
    pub health: Arc<Health>,
    /// One supervisor task per consumer; each ends after its drain.
    supervisors: TaskTracker,
    /// The consumers running now, in config order.
    running: Mutex<Vec<RunningConsumer>>,
    /// The daemon's shutdown; every consumer's stop token is a child.
    shutdown: CancellationToken,
    /// The drain deadline passed: stop running commands.
    abort: CancellationToken,
}

/// A consumer as [`Workers`] keeps it.
struct RunningConsumer {
    spec: Arc<Consumer>,
    /// The broker it is connected to.
    uri: lapin::uri::AMQPUri,
    /// The plugins its messages go through; a reload stores the new
    /// generation here when the consumer itself is unchanged.
    plugins: Arc<ArcSwap<Plugins>>,
    /// Stops this consumer alone (a child of the daemon's shutdown).
    stop: CancellationToken,
    health: Arc<ConsumerHealth>,
    /// Its `concurrency` permits; a changed consumer that replaces it on a
    /// reload takes them over.
    slots: Arc<Semaphore>,
}

impl Workers {
    /// Starts one supervisor per consumer of `config` (none when `None`).
    /// They stop consuming when `shutdown` is cancelled; `abort` (the drain
    /// deadline) stops running commands.
    pub fn start(
        config: Option<&AmqpConfig>,
        plugins: Arc<Plugins>,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) -> Workers {
        let workers = Workers {
            health: Arc::new(Health::default()),
            supervisors: TaskTracker::new(),
            running: Mutex::new(Vec::new()),
            shutdown,
            abort,
        };
        workers.update(config, plugins);
        workers
    }

    /// Brings the consumers in line with a new config: unchanged consumers
    /// (same settings, same broker) keep their connection and take the new
    /// plugins for their next messages; changed and removed ones stop
    /// gracefully; new and changed ones start. Returns how many consumers
    /// were kept, started and stopped.
    pub fn update(&self, config: Option<&AmqpConfig>, plugins: Arc<Plugins>) -> ConsumerChanges {
        if self.shutdown.is_cancelled() {
            return ConsumerChanges::default();
        }
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut old: Vec<Option<RunningConsumer>> = running.drain(..).map(Some).collect();
        let mut changes = ConsumerChanges::default();
        for spec in config.iter().flat_map(|c| &c.consumers) {
            let config = config.expect("consumers come from a config");
            let kept = old
                .iter_mut()
                .find(|o| {
                    o.as_ref()
                        .is_some_and(|o| o.uri == config.uri && o.spec.same_settings(spec))
                })
                .and_then(Option::take);
            match kept {
                Some(kept) => {
                    kept.plugins.store(plugins.clone());
                    running.push(kept);
                    changes.kept += 1;
                }
                None => {
                    // The same consumer, changed: its commands still running
                    // count against the new one's `concurrency`, so that a
                    // reload never runs more at once than the config says.
                    let slots = old.iter().flatten().find_map(|o| {
                        (o.spec.name == spec.name && o.uri == config.uri)
                            .then(|| (o.slots.clone(), o.spec.concurrency))
                    });
                    running.push(self.spawn(spec, config, plugins.clone(), slots));
                    changes.started += 1;
                }
            }
        }
        for gone in old.into_iter().flatten() {
            tracing::info!(consumer = %gone.spec.name, "consumer removed or changed by a reload: finishing its running commands, then stopping");
            gone.stop.cancel();
            changes.stopped += 1;
        }
        self.health
            .set(running.iter().map(|r| r.health.clone()).collect());
        changes
    }

    fn spawn(
        &self,
        spec: &Arc<Consumer>,
        config: &AmqpConfig,
        plugins: Arc<Plugins>,
        inherited: Option<(Arc<Semaphore>, usize)>,
    ) -> RunningConsumer {
        let slots = match inherited {
            Some((slots, before)) => {
                crate::app::resize(&slots, before, spec.concurrency);
                slots
            }
            None => Arc::new(Semaphore::new(spec.concurrency)),
        };
        let health = Arc::new(ConsumerHealth::new(spec));
        let plugins = Arc::new(ArcSwap::new(plugins));
        let stop = self.shutdown.child_token();
        let ctx = Arc::new(Ctx {
            spec: spec.clone(),
            route: spec.name.as_str().into(),
            uri: config.uri.clone(),
            url: config.url_redacted.clone(),
            plugins: plugins.clone(),
            slots: slots.clone(),
            in_flight: TaskTracker::new(),
            health: health.clone(),
            shutdown: stop.clone(),
            abort: self.abort.clone(),
        });
        self.supervisors.spawn(supervise(ctx));
        RunningConsumer {
            spec: spec.clone(),
            uri: config.uri.clone(),
            plugins,
            stop,
            health,
            slots,
        }
    }

    /// Resolves when every consumer, including those a reload stopped, has
    /// drained and closed (after shutdown).
    pub async fn wait(&self) {
        self.supervisors.close();
        self.supervisors.wait().await;
    }

    /// Whether any consumer is configured.
    pub fn is_empty(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// What [`Workers::update`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerChanges {
    /// Consumers left running on their channels.
    pub kept: usize,
    /// Consumers started (new, or changed).
    pub started: usize,
    /// Consumers stopped (removed, or changed).
    pub stopped: usize,
}

/// Health of the AMQP intake: one entry per consumer.
#[derive(Default)]
pub struct Health {
    /// In config order; replaced by a reload.
    consumers: Mutex<Vec<Arc<ConsumerHealth>>>,
}

impl Health {
    /// The consumers configured now, in config order.
    pub fn consumers(&self) -> Vec<Arc<ConsumerHealth>> {
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, consumers: Vec<Arc<ConsumerHealth>>) {
        *self.consumers.lock().unwrap_or_else(|e| e.into_inner()) = consumers;
    }

    /// Whether every consumer is consuming now.
    pub fn all_connected(&self) -> bool {
        self.consumers().iter().all(|c| c.snapshot().connected)
    }
}

/// One consumer's connection state and message counts.
pub struct ConsumerHealth {
    /// The consumer's name.
    pub name: String,
    /// The queue it consumes.
    pub queue: String,
    /// Connection state; changes rarely, read by health checks.
    state: Mutex<ConnState>,
    /// Messages whose command is running now.
    in_flight: AtomicUsize,
    /// Per-outcome message counts since start.
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    rejected: AtomicU64,
    requeued: AtomicU64,
    /// Outcomes that could not be settled (channel gone, copy refused);
    /// the broker redelivers these messages.
    unsettled: AtomicU64,
}

#[derive(Debug, Clone)]
struct ConnState {
    connected: bool,
    since: SystemTime,
    last_error: Option<String>,
    sessions: u64,
}

/// A point-in-time copy of a consumer's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerStatus {
    /// The consumer's name.
    pub name: String,
    /// The queue it consumes.
    pub queue: String,
    /// Consuming right now.
    pub connected: bool,
    /// When `connected` last changed, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// Why the last connection attempt or session failed, if one did.
    pub last_error: Option<String>,
    /// Times consuming started again after a loss (0 after a clean start).
    pub reconnects: u64,
    /// Commands running now.
    pub in_flight: usize,
    /// Messages acked after success (or an `ack` exit code).
    pub acked: u64,
    /// Messages sent to a delay queue for another attempt.
    pub retried: u64,
    /// Messages published to the dead-letter target.
    pub dead_lettered: u64,
    /// Messages rejected without requeue.
    pub rejected: u64,
    /// Messages put back on the queue.
    pub requeued: u64,
    /// Outcomes not settled; the broker redelivers those.
    pub unsettled: u64,
}

impl ConsumerHealth {
    fn new(spec: &Consumer) -> Self {
        ConsumerHealth {
            name: spec.name.clone(),
            queue: spec.queue.clone(),
            state: Mutex::new(ConnState {
                connected: false,
                since: SystemTime::now(),
                last_error: None,
                sessions: 0,
            }),
            in_flight: AtomicUsize::new(0),
            acked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            unsettled: AtomicU64::new(0),
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> ConsumerStatus {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerStatus {
            name: self.name.clone(),
            queue: self.queue.clone(),
            connected: s.connected,
            since_unix_ms: unix_ms(s.since),
            last_error: s.last_error,
            reconnects: s.sessions.saturating_sub(1),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            acked: n(&self.acked),
            retried: n(&self.retried),
            dead_lettered: n(&self.dead_lettered),
            rejected: n(&self.rejected),
            requeued: n(&self.requeued),
            unsettled: n(&self.unsettled),
        }
    }

    fn set(&self, connected: bool, error: Option<String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if connected {
            s.sessions += 1;
        }
        if s.connected != connected {
            s.since = SystemTime::now();
        }
        s.connected = connected;
        if error.is_some() {
            s.last_error = error;
        }
    }

    fn count(&self, settled: Settled) {
        let counter = match settled {
            Settled::Acked => &self.acked,
            Settled::Retried => &self.retried,
            Settled::DeadLettered => &self.dead_lettered,
            Settled::Rejected => &self.rejected,
            Settled::Requeued => &self.requeued,
            Settled::Unsettled => &self.unsettled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything one consumer's tasks share.
struct Ctx {
    /// The consumer as configured.
    spec: Arc<Consumer>,
    /// Its name, as invocations carry it.
    route: Arc<str>,
    /// The broker to connect to.
    uri: lapin::uri::AMQPUri,
    /// The broker URL without its password, for log lines.
    url: String,
    /// The plugins for `pre`/`post`; a reload that keeps this consumer
    /// stores the new generation here.
    plugins: Arc<ArcSwap<Plugins>>,
    /// `concurrency` permits; shared across sessions, so commands still
    /// running from a lost session count against the next one.
    slots: Arc<Semaphore>,
    /// Message tasks, across sessions; drained on shutdown.
    in_flight: TaskTracker,
    /// What health checks read.
    health: Arc<ConsumerHealth>,
    /// Stop consuming.
    shutdown: CancellationToken,
    /// The drain deadline passed: stop running commands.
    abort: CancellationToken,
}

/// Keeps one consumer consuming: connect, declare, consume; on any loss,
/// wait (backoff with jitter) and do it again, until shutdown.
async fn supervise(ctx: Arc<Ctx>) {
    let mut backoff = Backoff::new();
    while !ctx.shutdown.is_cancelled() {
        match session(&ctx, &mut backoff).await {
            Ok(()) => break,
            Err(e) => {
                ctx.health.set(false, Some(e.clone()));
                let wait = backoff.next();
                tracing::warn!(
                    consumer = %ctx.spec.name,
                    broker = %ctx.url,
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "AMQP connection lost or refused; reconnecting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.shutdown.cancelled() => {}
                }
            }
        }
    }
    // Commands started by a lost session still run to their end (their
    // messages come back anyway); shutdown waits for them too.
    ctx.in_flight.close();
    ctx.in_flight.wait().await;
    ctx.health.set(false, None);
}

/// One connection's life. `Ok` after a clean shutdown, `Err` with the
/// reason when the connection or channel was lost or could not be set up.
async fn session(ctx: &Arc<Ctx>, backoff: &mut Backoff) -> Result<(), String> {
    let spec = &ctx.spec;
    let name = format!(
        "execd {} on {} pid {}",
        spec.name,
        hostname(),
        std::process::id()
    );
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = tokio::select! {
        c = Connection::connect_uri(ctx.uri.clone(), props) => c.map_err(|e| format!("cannot connect to {}: {e}", ctx.url))?,
        _ = ctx.shutdown.cancelled() => return Ok(()),
    };
    let consume = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    declare(&conn, &consume, spec).await?;
    let publish = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open the publishing channel: {e}"))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
    consume
        .basic_qos(spec.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(|e| format!("cannot set prefetch {}: {e}", spec.prefetch))?;
    let tag = format!("execd-{}-{}", spec.name, crate::ids::random_hex(4));
    let tag = ShortString::try_new(tag)
        .unwrap_or_else(|_| format!("execd-{}", crate::ids::random_hex(8)).into());
    let mut deliveries = consume
        .basic_consume(
            spec.queue.as_str().into(),
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            let hint = if spec.declare.is_none() {
                " (does the queue exist? `declare: true` makes execd create it)"
            } else {
                ""
            };
            format!("cannot consume queue {:?}: {e}{hint}", spec.queue)
        })?;
    ctx.health.set(true, None);
    backoff.reset();
    tracing::info!(
        consumer = %spec.name,
        queue = %spec.queue,
        broker = %ctx.url,
        concurrency = spec.concurrency,
        prefetch = spec.prefetch,
        "consuming"
    );
    let publish = Arc::new(publish);
    // Connection and channel errors arrive here even while every slot is
    // busy and nobody polls the deliveries: health must not say
    // "connected" about a dead connection for as long as a command runs.
    let mut events = Box::pin(conn.events_listener());
    loop {
        // A slot first: a delivery is taken only when it can run at once.
        let permit = tokio::select! {
            p = ctx.slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
            _ = ctx.shutdown.cancelled() => break,
            lost = connection_lost(&mut events, &spec.name) => return Err(lost),
        };
        let next = tokio::select! {
            d = deliveries.next() => d,
            _ = ctx.shutdown.cancelled() => break,
            lost = connection_lost(&mut events, &spec.name) => return Err(lost),
        };
        match next {
            // Prefetched before its channel died: the broker has it back
            // already, and running it now would only run it twice.
            Some(Ok(delivery)) if delivery.acker.poisoned() => {}
            Some(Ok(delivery)) => {
                ctx.in_flight
                    .spawn(handle(ctx.clone(), publish.clone(), delivery, permit));
            }
            Some(Err(e)) => return Err(format!("consuming {:?} stopped: {e}", spec.queue)),
            None => {
                return Err(format!(
                    "the broker cancelled the consumer of {:?} (queue deleted?)",
                    spec.queue
                ));
            }
        }
    }
    // Shutdown: no new deliveries; those prefetched but not started go back
    // to the queue when the channel closes.
    tracing::info!(consumer = %spec.name, "stopping: consumer cancelled, finishing running commands");
    let _ = consume
        .basic_cancel(tag, BasicCancelOptions::default())
        .await;
    ctx.in_flight.close();
    ctx.in_flight.wait().await;
    let closing = async {
        let _ = consume.close(200, "execd shutting down".into()).await;
        let _ = publish.close(200, "execd shutting down".into()).await;
        let _ = conn.close(200, "execd shutting down".into()).await;
    };
    // A broker that blocked the connection may never answer a close; what
    // is unacked goes back to its queue when the socket closes anyway.
    if tokio::time::timeout(CLOSE_WITHIN, closing).await.is_err() {
        tracing::warn!(consumer = %spec.name, "the broker did not answer the close within {}s; leaving the connection", CLOSE_WITHIN.as_secs());
    }
    Ok(())
}

/// Resolves with the reason when the connection or one of its channels
/// fails; logs flow control on the way.
async fn connection_lost<S>(events: &mut S, consumer: &str) -> String
where
    S: futures_util::Stream<Item = lapin::Event> + Unpin,
{
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::Error(e) => return e.to_string(),
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(consumer, reason = %reason, "the broker blocked the connection; replies, retries and dead letters wait")
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!(consumer, "the broker unblocked the connection")
            }
            _ => {}
        }
    }
    "the connection ended".to_string()
}

/// Declares what the consumer needs: its queue (when asked), exchanges and
/// bindings, the delay queues of its retry schedule, its dead-letter
/// target. Runs after every reconnect: a broker that lost its state gets it
/// back.
async fn declare(conn: &Connection, ch: &Channel, spec: &Consumer) -> Result<(), String> {
    if let Some(d) = &spec.declare {
        let opts = QueueDeclareOptions {
            durable: d.durable,
            auto_delete: d.auto_delete,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(spec.queue.as_str().into(), opts, table(&d.arguments))
            .await
            .map_err(|e| format!("cannot declare queue {:?}: {e}", spec.queue))?;
    }
    for b in &spec.bindings {
        if let Some(kind) = b.kind {
            let kind = match kind {
                ExchangeType::Direct => ExchangeKind::Direct,
                ExchangeType::Fanout => ExchangeKind::Fanout,
                ExchangeType::Topic => ExchangeKind::Topic,
                ExchangeType::Headers => ExchangeKind::Headers,
            };
            let opts = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            ch.exchange_declare(
                b.exchange.as_str().into(),
                kind,
                opts,
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot declare exchange {:?}: {e}", b.exchange))?;
        }
        for key in &b.routing_keys {
            ch.queue_bind(
                spec.queue.as_str().into(),
                b.exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                table(&b.arguments),
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot bind queue {:?} to exchange {:?} with key {key:?}: {e}",
                    spec.queue, b.exchange
                )
            })?;
        }
    }
    if let Some(retry) = &spec.retry {
        for delay in retry.delays() {
            let name = spec.delay_queue(delay);
            let args = [
                (
                    "x-message-ttl".to_string(),
                    ArgValue::Int(delay.as_millis() as i64),
                ),
                (
                    "x-dead-letter-exchange".to_string(),
                    ArgValue::Str(String::new()),
                ),
                (
                    "x-dead-letter-routing-key".to_string(),
                    ArgValue::Str(spec.queue.clone()),
                ),
            ];
            let opts = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            ch.queue_declare(name.as_str().into(), opts, table(&args))
                .await
                .map_err(|e| format!("cannot declare delay queue {name:?}: {e}"))?;
        }
    }
    match &spec.dead_letter {
        None => {}
        Some(DeadLetter::Queue(q)) => {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            let declared = on_own_channel(conn, |c| async move {
                c.queue_declare(q.as_str().into(), durable, FieldTable::default())
                    .await
                    .map(|_| ())
            })
            .await?;
            if let Err(e) = declared {
                // Refused when it exists with arguments of its own (a quorum
                // queue, a length limit): fine, as long as it exists.
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                on_own_channel(conn, |c| async move {
                    c.queue_declare(q.as_str().into(), passive, FieldTable::default())
                        .await
                        .map(|_| ())
                })
                .await?
                .map_err(|_| format!("cannot declare dead-letter queue {q:?}: {e}"))?;
            }
        }
        Some(DeadLetter::Exchange { exchange, .. }) => {
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            on_own_channel(conn, |c| async move {
                c.exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, passive, FieldTable::default())
                    .await
            })
            .await?
            .map_err(|e| {
                format!("dead-letter exchange {exchange:?} cannot be used ({e}); declare it, or use `dead-letter: {{queue: NAME}}`")
            })?;
        }
    }
    Ok(())
}

/// Runs one declare on a throwaway channel: the broker closes a channel
/// that a declare was refused on, and the consuming one must stay open.
/// The outer error is about the channel itself, the inner one the declare.
async fn on_own_channel<F, Fut>(conn: &Connection, op: F) -> Result<lapin::Result<()>, String>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<()>>,
{
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    let result = op(ch.clone()).await;
    if result.is_ok() {
        let _ = ch.close(200, "OK".into()).await;
    }
    Ok(result)
}

fn table(args: &[(String, ArgValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let value = match v {
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
            ArgValue::Float(f) => AMQPValue::Double(*f),
            ArgValue::Str(s) => AMQPValue::LongString(s.as_str().into()),
        };
        if let Ok(key) = ShortString::try_new(k.as_str()) {
            t.insert(key, value);
        }
    }
    t
}

/// How a message's handling ended, for the health counts and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Acked,
    Retried,
    DeadLettered,
    Rejected,
    Requeued,
    Unsettled,
}

impl Settled {
    fn as_str(self) -> &'static str {
        match self {
            Settled::Acked => "acked",
            Settled::Retried => "retried",
            Settled::DeadLettered => "dead-lettered",
            Settled::Rejected => "rejected",
            Settled::Requeued => "requeued",
            Settled::Unsettled => "unsettled",
        }
    }
}

/// What the message carries, read once from the delivery.
struct Message {
    /// Attempt number: 1, or what `x-execd-attempt` says.
    attempt: u32,
    /// The exchange and routing key it was first published with (a retried
    /// copy arrives from the delay queue; these say where it came from).
    exchange: String,
    routing_key: String,
    /// When the first attempt failed, carried by retried copies.
    first_failure: Option<String>,
    /// For log lines and `EXECD_REQUEST_ID`: the message id when it is a
    /// sane one, else the first attempt's id (carried by retried copies, so
    /// every attempt logs under one id), else a new one.
    request_id: Arc<str>,
    /// Headers as text, for the environment and `${header.NAME}`.
    headers: Vec<(String, String)>,
}

/// How the command ended, in the words the dead-letter headers use.
struct Ending {
    /// One line for people: "exit code 3", "timed out after 2s", ...
    reason: String,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stderr_tail: Vec<u8>,
}

impl Ending {
    fn of_run(run: &RunResult, timeout: Duration) -> Ending {
        let reason = if run.timed_out {
            format!("timed out after {timeout:?}")
        } else if run.aborted {
            "stopped: execd was shutting down".to_string()
        } else if run.output_overflow {
            "output over max-output".to_string()
        } else {
            match (run.exit_code, run.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "ended without a status".to_string(),
            }
        };
        Ending {
            reason,
            exit_code: run.exit_code,
            signal: run.signal,
            timed_out: run.timed_out,
            stderr_tail: run.stderr_tail.clone(),
        }
    }

    fn of(reason: String) -> Ending {
        Ending {
            reason,
            exit_code: None,
            signal: None,
            timed_out: false,
            stderr_tail: Vec::new(),
        }
    }
}

/// What to do with a message, before the retry budget is looked at.
enum Verdict {
    /// Follow the configured action.
    Act(Action),
    /// The message itself is unusable (too big, not expressible as the
    /// command's input): retrying cannot help.
    Poison,
}

/// One message, start to finish: run, decide, settle, log.
async fn handle(ctx: Arc<Ctx>, publish: Arc<Channel>, d: Delivery, slot: OwnedSemaphorePermit) {
    let started = Instant::now();
    let spec = &ctx.spec;
    ctx.health.in_flight.fetch_add(1, Ordering::Relaxed);
    let msg = read_message(&d);
    let props = &d.properties;
    let request_id = msg.request_id.clone();

    let (verdict, ending, reply) = if d.data.len() as u64 > spec.max_body {
        let detail = format!(
            "the message body is {} bytes, over this consumer's max-body of {} bytes",
            d.data.len(),
            spec.max_body
        );
        let reply = problem::reply(
            413,
            "payload-too-large",
            "Payload too large",
            &detail,
            &request_id,
        );
        (Verdict::Poison, Ending::of(detail), reply)
    } else {
        let inv = Invocation {
            route: ctx.route.clone(),
            request_id: request_id.clone(),
            origin: Origin::Amqp(AmqpOrigin {
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
                queue: spec.queue.clone(),
                redelivered: d.redelivered,
                attempt: msg.attempt,
                reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
                correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
                message_id: props.message_id().as_ref().map(|s| s.to_string()),
                content_type: props.content_type().as_ref().map(|s| s.to_string()),
            }),
            headers: msg.headers.clone(),
            params: Vec::new(),
            query: Vec::new(),
            vars: Vec::new(),
            body: Bytes::from(d.data.clone()),
        };
        let plugins = ctx.plugins.load_full();
        match pipeline::execute(&spec.command, &plugins, inv, &ctx.abort).await {
            Ok(done) => match &done.run {
                // A pre plugin answered for the command: done.
                None if done.reply.status < 400 => (
                    Verdict::Act(Action::Ack),
                    Ending::of("answered by a plugin".into()),
                    done.reply,
                ),
                // A pre plugin refused the message (a bad signature, a
                // body it cannot map, a plugin that failed with `on-error:
                // deny`): a failure like any other, never a silent ack.
                None => {
                    let ending = Ending::of(format!(
                        "refused by a plugin with status {}: {}",
                        done.reply.status,
                        refusal_detail(&done.reply)
                    ));
                    (Verdict::Act(spec.on_exit.other), ending, done.reply)
                }
                Some(run) => {
                    let ending = Ending::of_run(run, spec.command.timeout);
                    let action = if run.aborted {
                        // Not the message's fault: give it back untouched.
                        Action::Requeue
                    } else if run.timed_out {
                        spec.on_exit.timeout
                    } else if run.output_overflow {
                        spec.on_exit.other
                    } else {
                        match run.exit_code {
                            Some(c) => spec.on_exit.for_code(c),
                            None => spec.on_exit.other,
                        }
                    };
                    (Verdict::Act(action), ending, done.reply)
                }
            },
            Err(f @ (Failure::BadRequest(_) | Failure::TooLarge(_))) => {
                let reply = f.to_reply(&request_id);
                (Verdict::Poison, Ending::of(f.to_string()), reply)
            }
            Err(f) => {
                let reply = f.to_reply(&request_id);
                (
                    Verdict::Act(spec.on_exit.other),
                    Ending::of(f.to_string()),
                    reply,
                )
            }
        }
    };

    // The command is over: its slot goes to the next message while this one
    // is settled (the ack, or the confirmed copy for a retry or the
    // dead-letter target, is a broker round trip).
    drop(slot);
    let settled = tokio::select! {
        biased;
        s = settle(&ctx, &publish, &d, &msg, verdict, &ending, &reply) => s,
        // Past the drain deadline a settle that waits on the broker (a
        // connection it blocked, a confirm that does not come) is left
        // unfinished: the message is unacked, so the broker gets it back
        // when execd closes the connection.
        () = ctx.abort.cancelled() => {
            tracing::warn!(consumer = %spec.name, delivery_tag = d.delivery_tag, "not settled by the drain deadline; the broker will redeliver the message");
            Settled::Unsettled
        }
    };
    ctx.health.count(settled);
    ctx.health.in_flight.fetch_sub(1, Ordering::Relaxed);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if settled == Settled::Acked {
        tracing::info!(consumer = %spec.name, request_id = %request_id, attempt = msg.attempt, outcome = settled.as_str(), ms, "message");
    } else {
        tracing::warn!(consumer = %spec.name, request_id = %request_id, attempt = msg.attempt, outcome = settled.as_str(), reason = %ending.reason, ms, "message");
    }
}

/// Carries out the verdict. The original is acked only after whatever
/// carries the message on has been confirmed by the broker; when that
/// fails, the message is put back (or left to the broker, if the channel
/// is gone), never dropped.
async fn settle(
    ctx: &Ctx,
    publish: &Channel,
    d: &Delivery,
    msg: &Message,
    verdict: Verdict,
    ending: &Ending,
    reply: &Reply,
) -> Settled {
    let spec = &ctx.spec;
    if !d.acker.usable() {
        // The channel the message came on is gone, so the broker has put
        // it back already: a retry or dead-letter copy, or a reply, sent
        // now would be a second one.
        return finish(ctx, d, Settled::Unsettled, Ok(false));
    }
    let final_failure = |why: &'static str| async move {
        match &spec.dead_letter {
            Some(target) => {
                let (exchange, key) = match target {
                    DeadLetter::Queue(q) => (String::new(), q.clone()),
                    DeadLetter::Exchange {
                        exchange,
                        routing_key,
                    } => (
                        exchange.clone(),
                        routing_key
                            .clone()
                            .unwrap_or_else(|| msg.routing_key.clone()),
                    ),
                };
                let props = copy_properties(d, why_headers(ctx, d, msg, ending));
                match publish_confirmed(publish, &exchange, &key, &d.data, props).await {
                    Ok(()) => {
                        rpc_reply(ctx, publish, d, reply).await;
                        finish(ctx, d, Settled::DeadLettered, ack(d).await)
                    }
                    Err(e) => {
                        tracing::error!(consumer = %spec.name, target = %describe_target(target), error = %e, "cannot dead-letter the message; putting it back on the queue in {}s", SETTLE_FAILED_PAUSE.as_secs());
                        give_back_later(ctx, d).await
                    }
                }
            }
            None => {
                tracing::debug!(consumer = %spec.name, why, "no dead-letter target; rejecting");
                rpc_reply(ctx, publish, d, reply).await;
                let done = d.acker.reject(BasicRejectOptions { requeue: false }).await;
                finish(ctx, d, Settled::Rejected, done)
            }
        }
    };
    match verdict {
        Verdict::Poison => final_failure("poison").await,
        Verdict::Act(Action::Ack) => {
            if !rpc_reply(ctx, publish, d, reply).await {
                return give_back_later(ctx, d).await;
            }
            finish(ctx, d, Settled::Acked, ack(d).await)
        }
        Verdict::Act(Action::Retry) => {
            let retry = spec
                .retry
                .as_ref()
                .expect("config checks: retry needs a schedule");
            if msg.attempt >= retry.max_attempts {
                return final_failure("attempts exhausted").await;
            }
            let delay = retry.delay_after(msg.attempt);
            let queue = spec.delay_queue(delay);
            let now = rfc3339(SystemTime::now());
            let mut headers = own_headers(d);
            set(
                &mut headers,
                ATTEMPT_HEADER,
                AMQPValue::LongLongInt(i64::from(msg.attempt) + 1),
            );
            set(&mut headers, "x-execd-exchange", long(&msg.exchange));
            set(&mut headers, "x-execd-routing-key", long(&msg.routing_key));
            set(
                &mut headers,
                "x-execd-first-failure",
                long(msg.first_failure.as_deref().unwrap_or(&now)),
            );
            set(&mut headers, "x-execd-last-failure", long(&now));
            set(&mut headers, "x-execd-last-reason", long(&ending.reason));
            set(&mut headers, "x-execd-request-id", long(&msg.request_id));
            let props = copy_properties(d, headers);
            match publish_confirmed(publish, "", &queue, &d.data, props).await {
                Ok(()) => finish(ctx, d, Settled::Retried, ack(d).await),
                Err(e) => {
                    tracing::error!(consumer = %spec.name, delay_queue = %queue, error = %e, "cannot schedule the retry; putting the message back on the queue in {}s", SETTLE_FAILED_PAUSE.as_secs());
                    give_back_later(ctx, d).await
                }
            }
        }
        Verdict::Act(Action::DeadLetter) => final_failure("dead-letter").await,
        Verdict::Act(Action::Requeue) => give_back(ctx, d).await,
        Verdict::Act(Action::Reject) => {
            rpc_reply(ctx, publish, d, reply).await;
            let done = d.acker.reject(BasicRejectOptions { requeue: false }).await;
            finish(ctx, d, Settled::Rejected, done)
        }
    }
}

async fn ack(d: &Delivery) -> lapin::Result<bool> {
    d.acker.ack(BasicAckOptions::default()).await
}

/// How long a consumer waits for the broker to answer its close at shutdown.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// How long a message whose settling failed (its retry or dead-letter copy,
/// or its RPC reply, not taken by the broker) waits before it goes back to
/// its queue.
const SETTLE_FAILED_PAUSE: Duration = Duration::from_secs(10);

/// Puts back a message whose settling failed, but not at once: at the
/// head of its queue it would run again straight away and fail to settle
/// again, as fast as its command runs, repeating what the command does.
/// The pause ends early when the consumer stops.
async fn give_back_later(ctx: &Ctx, d: &Delivery) -> Settled {
    tokio::select! {
        () = tokio::time::sleep(SETTLE_FAILED_PAUSE) => {}
        () = ctx.shutdown.cancelled() => {}
    }
    give_back(ctx, d).await
}

/// Puts the message back at the head of its queue.
async fn give_back(ctx: &Ctx, d: &Delivery) -> Settled {
    let done = d
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
    finish(ctx, d, Settled::Requeued, done)
}

/// The outcome, unless the ack/nack/reject did not reach the broker; then
/// the message is the broker's to redeliver.
fn finish(ctx: &Ctx, d: &Delivery, settled: Settled, done: lapin::Result<bool>) -> Settled {
    match done {
        Ok(true) => settled,
        Ok(false) => {
            tracing::warn!(consumer = %ctx.spec.name, delivery_tag = d.delivery_tag, "not settled: the channel closed; the broker will redeliver the message");
            Settled::Unsettled
        }
        Err(e) => {
            tracing::warn!(consumer = %ctx.spec.name, delivery_tag = d.delivery_tag, error = %e, "not settled; the broker will redeliver the message");
            Settled::Unsettled
        }
    }
}

/// Publishes the RPC reply when the message asked for one. `false` only
/// when the broker did not take it (worth a redelivery); a reply queue that
/// no longer exists is the caller's loss, logged.
async fn rpc_reply(ctx: &Ctx, publish: &Channel, d: &Delivery, reply: &Reply) -> bool {
    let Some(reply_to) = d.properties.reply_to().as_ref() else {
        return true;
    };
    let mut headers = FieldTable::default();
    headers.insert(
        "x-execd-status".into(),
        AMQPValue::LongInt(i32::from(reply.status)),
    );
    let mut props = BasicProperties::default();
    for (k, v) in &reply.headers {
        if k.eq_ignore_ascii_case("content-type") {
            if let Ok(ct) = ShortString::try_new(v.as_str()) {
                props = props.with_content_type(ct);
            }
        } else if let Ok(key) = ShortString::try_new(k.as_str()) {
            headers.insert(key, long(v));
        }
    }
    props = props.with_headers(headers);
    if let Some(c) = d.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    match publish_confirmed(publish, "", reply_to.as_str(), &reply.body, props).await {
        Ok(()) => true,
        Err(PublishError::Unroutable(why)) => {
            tracing::warn!(consumer = %ctx.spec.name, reply_to = %reply_to, "RPC reply dropped: {why} (the caller's reply queue is gone)");
            true
        }
        Err(e) => {
            tracing::error!(consumer = %ctx.spec.name, reply_to = %reply_to, error = %e, "cannot publish the RPC reply");
            false
        }
    }
}

/// Why a publish did not end up safely with the broker.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("no queue took it: {0}")]
    Unroutable(String),
    #[error("the broker refused it (nack)")]
    Nacked,
    #[error("{0}")]
    Channel(#[from] lapin::Error),
}

/// Publishes with `mandatory` and waits for the broker's confirm.
async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            ShortString::try_new(routing_key)
                .map_err(|e| PublishError::Unroutable(e.to_string()))?,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable(format!(
            "{} {}",
            returned.reply_code, returned.reply_text
        ))),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

/// The properties a copy (retry or dead-letter) keeps: everything that
/// describes the message, made persistent; not `expiration` (a copy must
/// not vanish while it waits) nor `user-id` (the broker checks it against
/// the connection's user).
fn copy_properties(d: &Delivery, headers: FieldTable) -> BasicProperties {
    let p = &d.properties;
    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// The headers a dead-lettered message carries: its own, plus why.
fn why_headers(ctx: &Ctx, d: &Delivery, msg: &Message, ending: &Ending) -> FieldTable {
    let now = rfc3339(SystemTime::now());
    // The retry count starts again if the message is sent back after a
    // fix; `x-execd-attempts` below keeps how many were made.
    let mut h: FieldTable = own_headers(d)
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != ATTEMPT_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    set(&mut h, "x-execd-reason", long(&ending.reason));
    if let Some(c) = ending.exit_code {
        set(&mut h, "x-execd-exit-code", AMQPValue::LongInt(c));
    }
    if let Some(s) = ending.signal {
        set(&mut h, "x-execd-signal", AMQPValue::LongInt(s));
    }
    set(
        &mut h,
        "x-execd-timed-out",
        AMQPValue::Boolean(ending.timed_out),
    );
    set(
        &mut h,
        "x-execd-stderr",
        AMQPValue::LongString(LongString::from(ending.stderr_tail.clone())),
    );
    set(
        &mut h,
        "x-execd-attempts",
        AMQPValue::LongLongInt(i64::from(msg.attempt)),
    );
    set(
        &mut h,
        "x-execd-first-failure",
        long(msg.first_failure.as_deref().unwrap_or(&now)),
    );
    set(&mut h, "x-execd-last-failure", long(&now));
    set(&mut h, "x-execd-queue", long(&ctx.spec.queue));
    set(&mut h, "x-execd-consumer", long(&ctx.spec.name));
    set(&mut h, "x-execd-exchange", long(&msg.exchange));
    set(&mut h, "x-execd-routing-key", long(&msg.routing_key));
    h
}

/// What a plugin's refusal says: the `detail` of a problem+json body, or
/// the start of any other body.
fn refusal_detail(reply: &Reply) -> String {
    let from_problem = serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| v.get("detail")?.as_str().map(str::to_string));
    from_problem.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&reply.body);
        text.chars()
            .take(200)
            .collect::<String>()
            .trim()
            .to_string()
    })
}

fn own_headers(d: &Delivery) -> FieldTable {
    d.properties.headers().clone().unwrap_or_default()
}

fn set(t: &mut FieldTable, k: &str, v: AMQPValue) {
    t.insert(k.into(), v);
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn describe_target(t: &DeadLetter) -> String {
    match t {
        DeadLetter::Queue(q) => format!("queue {q:?}"),
        DeadLetter::Exchange { exchange, .. } => format!("exchange {exchange:?}"),
    }
}

fn read_message(d: &Delivery) -> Message {
    let mut attempt = 1;
    let mut exchange = d.exchange.to_string();
    let mut routing_key = d.routing_key.to_string();
    let mut first_failure = None;
    let mut carried_id = None;
    let mut headers = Vec::new();
    if let Some(table) = d.properties.headers() {
        for (k, v) in table {
            let text = value_text(v);
            match k.as_str() {
                ATTEMPT_HEADER => {
                    if let Some(n) = int_value(v) {
                        attempt = n.clamp(1, i64::from(u32::MAX)) as u32;
                    }
                }
                "x-execd-exchange" => exchange = text.clone(),
                "x-execd-routing-key" => routing_key = text.clone(),
                "x-execd-first-failure" => first_failure = Some(text.clone()),
                "x-execd-request-id" => carried_id = Some(text.clone()),
                _ => {}
            }
            // An environment variable cannot hold a NUL byte.
            if text.contains('\0') {
                tracing::warn!(header = %k, "message header holds a NUL byte; not passed to the command");
                continue;
            }
            headers.push((k.to_string(), text));
        }
    }
    Message {
        attempt,
        exchange,
        routing_key,
        first_failure,
        request_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .or(carried_id)
            .filter(|m| crate::ids::is_sane_request_id(m))
            .map_or_else(|| crate::ids::request_id().into(), Into::into),
        headers,
    }
}

fn int_value(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// A header value as the text a script sees: numbers in decimal, booleans
/// as `true`/`false`, tables and arrays as JSON, bytes as (lossy) UTF-8.
fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Void => String::new(),
        other => json_value(other).to_string().trim_matches('"').to_string(),
    }
}

fn json_value(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let x = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json_value).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| (k.to_string(), json_value(v)))
                .collect(),
        ),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) | AMQPValue::ByteArray(_) => {
            Value::String(value_text(v))
        }
        AMQPValue::Void => Value::Null,
        other => int_value(other).map_or(Value::Null, Value::from),
    }
}

/// Reconnect waits: doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], each
/// drawn between half and all of the current step, so that many workers
/// cut off together do not all come back in the same instant.
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { step: BACKOFF_MIN }
    }

    fn next(&mut self) -> Duration {
        use rand::Rng;
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_MAX);
        let half = step.as_millis() as u64 / 2;
        Duration::from_millis(half + rand::rng().random_range(0..=half))
    }

    fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `2024-05-06T07:08:09.123Z`: readable in a management UI and parseable
/// everywhere, unlike a bare AMQP timestamp (whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let ms = unix_ms(t);
    let (secs, millis) = (ms / 1000, ms % 1000);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_251_199_007);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.007Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn header_values_become_text() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongLongInt(5));
        assert_eq!(value_text(&AMQPValue::LongInt(-3)), "-3");
        assert_eq!(value_text(&AMQPValue::Boolean(true)), "true");
        assert_eq!(
            value_text(&AMQPValue::LongString(b"caf\xc3\xa9".to_vec().into())),
            "café"
        );
        assert_eq!(value_text(&AMQPValue::FieldTable(t)), r#"{"n":5}"#);
        assert_eq!(int_value(&AMQPValue::LongString("3".into())), Some(3));
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(
            first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
            "{first:?}"
        );
        for _ in 0..20 {
            assert!(b.next() <= BACKOFF_MAX);
        }
        assert!(b.next() >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next() <= BACKOFF_MIN);
    }
}
