//! The servable form of one config: its routes with their concurrency
//! gates. Built off the request path and swapped whole on reload, so a
//! request sees one consistent config from start to end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, ConfigError, ConfigErrors, Route};
use crate::plugin::Plugins;

/// Everything a request needs, for one config generation.
pub struct App {
    pub config: Arc<Config>,
    pub routes: Vec<RouteSlot>,
    /// The daemon-wide cap on commands running at once.
    pub global: Arc<Gate>,
    /// The config's plugins, compiled and linked.
    pub plugins: Arc<Plugins>,
}

/// A route and its own cap, when it has one.
pub struct RouteSlot {
    pub route: Arc<Route>,
    pub gate: Option<Arc<Gate>>,
}

/// What a request path and method resolve to.
pub enum Lookup<'a> {
    Found(&'a RouteSlot, Vec<(String, String)>),
    /// The path exists, the method does not; the methods that do.
    WrongMethod(Vec<String>),
    NotFound,
}

impl App {
    /// Builds the servable form of a config, compiling its plugins and
    /// checking their configs; plugin errors carry the plugin's position.
    pub fn build(config: Arc<Config>) -> Result<Self, ConfigErrors> {
        let plugins = Plugins::load(&config.plugins).map_err(|errors| {
            let file: Arc<str> = config.source.display().to_string().into();
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|(spec, message)| ConfigError {
                        file: file.clone(),
                        pos: spec.pos,
                        field: format!("plugins.{}", spec.name),
                        message,
                    })
                    .collect(),
            )
        })?;
        let mut errors = Vec::new();
        // Routes and queue consumers alike: a plugin listed under a phase it
        // does not have would fail every call.
        let routes = config
            .routes
            .iter()
            .map(|r| ("route", r.name.as_str(), r.pos, &r.command));
        let consumers = config
            .amqp
            .iter()
            .flat_map(|a| &a.consumers)
            .map(|c| ("consumer", c.name.as_str(), c.pos, &c.command));
        for (kind, owner, pos, command) in routes.chain(consumers) {
            for (phase, names) in [("pre", &command.pre), ("post", &command.post)] {
                for name in names {
                    let plugin = plugins
                        .get(name)
                        .expect("names were checked against plugins:");
                    let has = if phase == "pre" {
                        plugin.has_pre()
                    } else {
                        plugin.has_post()
                    };
                    if !has {
                        errors.push(ConfigError {
                            file: config.source.display().to_string().into(),
                            pos,
                            field: phase.to_string(),
                            message: format!("{kind} {owner}: plugin {name} has no {phase} phase"),
                        });
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Self::with_plugins(config, Arc::new(plugins)))
    }

    /// Takes over the slots of `old`'s gates (the global one, and each
    /// route's by name), so that commands still running under the previous
    /// config count against this one's caps.
    pub fn carry_gates(&mut self, old: &App) {
        let limits = &self.config.limits;
        self.global = Arc::new(Gate::carry(
            &old.global,
            limits.max_concurrency,
            limits.queue,
            limits.queue_timeout,
        ));
        for slot in &mut self.routes {
            let (Some(n), Some(before)) = (
                slot.route.max_concurrency,
                old.routes
                    .iter()
                    .find(|o| o.route.name == slot.route.name)
                    .and_then(|o| o.gate.as_ref()),
            ) else {
                continue;
            };
            slot.gate = Some(Arc::new(Gate::carry(
                before,
                n,
                limits.queue,
                limits.queue_timeout,
            )));
        }
    }

    /// Builds with plugins already loaded.
    pub fn with_plugins(config: Arc<Config>, plugins: Arc<Plugins>) -> Self {
        let limits = &config.limits;
        let global = Arc::new(Gate::new(
            limits.max_concurrency,
            limits.queue,
            limits.queue_timeout,
        ));
        let routes = config
            .routes
            .iter()
            .map(|r| RouteSlot {
                route: r.clone(),
                gate: r
                    .max_concurrency
                    .map(|n| Arc::new(Gate::new(n, limits.queue, limits.queue_timeout))),
            })
            .collect();
        App {
            config,
            routes,
            global,
            plugins,
        }
    }

    /// Finds the route for a request. Among routes whose url matches, the
    /// one with the fewest `{params}` wins, so `/items/new` beats
    /// `/items/{id}` whatever the file order.
    pub fn lookup(&self, method: &str, path: &str) -> Lookup<'_> {
        let mut best: Option<(&RouteSlot, Vec<(String, String)>)> = None;
        let mut allowed: Vec<String> = Vec::new();
        for slot in &self.routes {
            let Some(params) = slot.route.url.matches(path) else {
                continue;
            };
            if slot.route.methods.iter().any(|m| m == method) {
                if best.as_ref().is_none_or(|(_, p)| params.len() < p.len()) {
                    best = Some((slot, params));
                }
            } else {
                allowed.extend(slot.route.methods.iter().cloned());
            }
        }
        match best {
            Some((slot, params)) => Lookup::Found(slot, params),
            None if !allowed.is_empty() => {
                allowed.sort();
                allowed.dedup();
                Lookup::WrongMethod(allowed)
            }
            None => Lookup::NotFound,
        }
    }
}

/// Why a request could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The wait queue is full.
    QueueFull,
    /// It waited `queue-timeout` without a slot coming free.
    Timeout,
}

/// A concurrency cap with a bounded wait queue.
pub struct Gate {
    slots: Arc<Semaphore>,
    /// How many slots there are, taken or not.
    capacity: usize,
    waiting: AtomicUsize,
    queue: usize,
    queue_timeout: Duration,
}

impl Gate {
    pub fn new(slots: usize, queue: usize, queue_timeout: Duration) -> Self {
        Gate {
            slots: Arc::new(Semaphore::new(slots)),
            capacity: slots,
            waiting: AtomicUsize::new(0),
            queue,
            queue_timeout,
        }
    }

    /// A gate of `slots` that takes over `old`'s slots, so that what still
    /// runs under `old` counts against the new cap (a reload never runs
    /// more at once than the config says).
    pub fn carry(old: &Gate, slots: usize, queue: usize, queue_timeout: Duration) -> Self {
        resize(&old.slots, old.capacity, slots);
        Gate {
            slots: old.slots.clone(),
            capacity: slots,
            waiting: AtomicUsize::new(0),
            queue,
            queue_timeout,
        }
    }

    /// Takes a slot, waiting in the queue when none is free.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        // Counted out on drop: a request whose client goes away while it
        // waits has its future dropped here, and must leave the queue too.
        let _in_queue = Waiting::join(&self.waiting);
        if self.waiting.load(Ordering::Acquire) > self.queue {
            return Err(Busy::QueueFull);
        }
        let waited =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        match waited {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Busy::Timeout),
        }
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Makes `slots`, a semaphore of `before` permits some of which may be
/// held, one of `after`: a larger one at once, a smaller one as the held
/// permits come back. Needs a tokio runtime when it shrinks.
pub fn resize(slots: &Arc<Semaphore>, before: usize, after: usize) {
    if after > before {
        slots.add_permits(after - before);
    } else if after < before {
        let slots = slots.clone();
        let surplus = u32::try_from(before - after).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            if let Ok(p) = slots.acquire_many_owned(surplus).await {
                p.forget();
            }
        });
    }
}

/// One place in a [`Gate`]'s queue, given back when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn join(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_whose_request_is_dropped_leaves_the_queue() {
        let gate = Arc::new(Gate::new(1, 1, Duration::from_secs(30)));
        let held = gate.enter().await.unwrap();
        // One waiter fills the queue of one; a second is turned away.
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.map(drop) }
        });
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.enter().await.unwrap_err(), Busy::QueueFull);
        // The client goes away: its request's future is dropped mid-wait.
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(gate.queued(), 0);
        // Its place is free again: the next request waits for the slot
        // instead of being refused, and gets it when the slot comes free.
        let next = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.map(drop) }
        });
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(next.await.unwrap(), Ok(()));
    }
}
