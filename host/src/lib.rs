//! execd runs unmodified command-line programs — above all legacy PHP CLI
//! scripts — behind HTTP routes, configured by one YAML file.
//!
//! How the parts connect:
//!
//! - [`config`] reads the YAML into a located node tree and validates it
//!   into a [`config::Config`]: routes with their command templates
//!   ([`config::template`]), limits, plugins. Every error is collected with
//!   file, line, column and field.
//! - [`app`] turns a config into what is served: routes with their
//!   concurrency [`app::Gate`]s. One [`app::App`] per config generation.
//! - [`intake::http`] accepts connections (hyper), routes each request,
//!   enforces body and concurrency limits and turns it into a
//!   [`pipeline::Invocation`].
//! - [`pipeline`] runs an invocation through the route's pre plugins,
//!   renders argv and environment, runs the command, and shapes the [`pipeline::Reply`] (exit-code mapping, CGI
//!   output, problem+json errors from [`problem`]) before the post plugins.
//! - [`plugin`] hosts the WebAssembly pre/post plugins (wasmtime,
//!   component model, `wit/execd-plugin.wit`): compiled and linked once,
//!   a fresh sandboxed store per call.
//! - [`intake::amqp`] consumes RabbitMQ queues: one invocation per
//!   message, acked only once its outcome is settled (retry through delay
//!   queues, dead-letter with the reasons, RPC reply), reconnecting by
//!   itself; [`config::amqp`] is its part of the config.
//! - [`reply`] is the reply socket a command may answer on instead of
//!   stdout (status, headers, binary body), for routes and consumers.
//! - [`runner`] spawns the process: no shell, clean environment, own
//!   process group, capped output, timeout that stops the whole group, and
//!   an orphan reaper so nothing is left behind.
//! - [`admin`] serves `/metrics` ([`metrics`]), `/healthz` and `/readyz`
//!   on a listener of its own.
//! - [`daemon`] binds, serves, and drains on shutdown; [`telemetry`] sets up
//!   logs.

pub mod admin;
pub mod app;
pub mod config;
pub mod daemon;
pub mod ids;
pub mod intake;
pub mod metrics;
pub mod pipeline;
pub mod plugin;
pub mod problem;
pub mod reply;
pub mod runner;
pub mod telemetry;
