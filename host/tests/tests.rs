//! End-to-end tests: real PHP scripts, real sockets, the daemon started
//! in-process (or as the real binary where the process boundary matters).
//! One test binary; each module is one area.

mod util;

mod cli;
mod config_errors;
mod http;
mod injection;
mod original;
mod plugins;
mod processes;
