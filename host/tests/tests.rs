//! End-to-end tests: real PHP scripts, real sockets, the daemon started
//! in-process (or as the real binary where the process boundary matters).
//! One test binary; each module is one area.

mod util;

mod amqp;
mod cli;
mod config_errors;
mod http;
mod injection;
mod ops;
mod original;
pub mod plugins;
mod processes;
mod reply_socket;
