//! Guest-side SDK for execd plugins.
//!
//! An execd plugin is a WebAssembly component that transforms a call before
//! the command runs (`pre`), after it ran (`post`), or both. The contract is
//! `wit/execd-plugin.wit`; this crate hides the bindings so that a plugin is
//! a trait impl and one macro:
//!
//! ```no_run
//! use execd_plugin_sdk::prelude::*;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings { greeting: String }
//!
//! struct Greeter;
//!
//! impl Plugin for Greeter {
//!     type Config = Settings;
//! }
//!
//! impl Pre for Greeter {
//!     fn pre(config: &Settings, _ctx: &Context, mut inv: Invocation) -> Result<Decision, String> {
//!         inv.set_var("greeting", &config.greeting);
//!         Ok(Decision::Continue(inv))
//!     }
//! }
//!
//! export_plugin!(Greeter, pre);
//! # fn main() {}
//! ```
//!
//! Map of the crate:
//!
//! - [`Plugin`], [`Pre`], [`Post`]: what a plugin implements. The plugin's
//!   configuration is a typed value ([`Plugin::Config`]) that the SDK parses
//!   from the YAML entry (handed over as JSON) with [`parse_config`] — once at
//!   load for `config.validate`, and again on every call, because every call
//!   runs in a fresh instance and nothing survives between calls.
//! - [`export_plugin!`]: generates the component's exports for the chosen
//!   phases. The host learns which phases a plugin has from those exports.
//! - [`types`]: the contract's records ([`Context`], [`Invocation`],
//!   [`Outcome`], [`Reply`], [`Decision`]) with helper methods: headers
//!   (case-insensitive), query, params and vars, JSON bodies, and reply
//!   builders including RFC 9457 problem details ([`Reply::problem`]).
//! - [`headers`]: the case-insensitive operations on an ordered header list
//!   that the helper methods share.
//! - [`log`] and the [`trace!`], [`debug!`], [`info!`], [`warn!`],
//!   [`error!`] macros: the only thing a plugin may ask of the host.
//! - [`time`]: the wall clock, for plugins that check timestamps.
//!
//! A plugin is built for `wasm32-wasip2`, or, when it needs nothing of
//! WASI beyond this crate's clock, for `wasm32-unknown-unknown` linked by
//! `wasm-component-ld`, as `plugins/build.sh` does for the plugins that
//! say so in their manifest. Such a component imports the contract and, if
//! it reads [`time`], WASI's wall clock alone, and each call costs less (no
//! other WASI imports to wire up per instance); the SDK then brings an
//! allocator that serves a call from the initial memory before it grows it.
//!
//! The bindings compile on native targets too (imports become stubs), so a
//! plugin keeps its logic in plain functions and tests them with
//! `cargo test` on the host; [`log`] writes to stderr there instead of
//! calling the import.

mod config;
pub mod headers;
pub mod log;
mod messages;

// Used by the allocator of builds without WASI only; its logic is tested
// everywhere.
#[cfg_attr(
    not(all(target_arch = "wasm32", target_os = "unknown")),
    allow(dead_code)
)]
mod heap;

pub mod time;

pub use config::parse_config;
pub use messages::{PROBLEM_JSON, check_var_name};

/// Bindings generated from the contract for the SDK itself: the shared types
/// and the log import, no exports (those are generated in the plugin's crate
/// by [`export_plugin!`], for the world its phases select).
#[allow(missing_docs, clippy::all)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/sdk_bindings.rs"));
}

/// The contract's records and variants, shared by every plugin world.
///
/// Helper methods live in this crate's `messages` module; the types
/// themselves are generated from `wit/execd-plugin.wit`.
pub mod types {
    pub use crate::bindings::execd::plugin::types::*;
}

pub use types::{AmqpOrigin, Context, Decision, HttpOrigin, Invocation, Origin, Outcome, Reply};

/// Everything a plugin usually needs: `use execd_plugin_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::headers::HeaderList;
    pub use crate::types::{
        AmqpOrigin, Context, Decision, HttpOrigin, Invocation, Origin, Outcome, Reply,
    };
    pub use crate::{
        NoConfig, Plugin, Post, Pre, check_var_name, export_plugin, parse_config, validate_config,
    };
    pub use crate::{debug, error, info, trace, warn};
}

/// A plugin: its configuration type and the checks on it.
///
/// Every plugin implements this, and [`Pre`], [`Post`] or both.
pub trait Plugin {
    /// The plugin's configuration: its YAML entry, handed over as JSON and
    /// deserialized with [`parse_config`]. Derive `Deserialize` with
    /// `#[serde(deny_unknown_fields)]` so that a misspelt key stops start-up
    /// instead of being ignored. Use [`NoConfig`] for a plugin without one.
    type Config: serde::de::DeserializeOwned;

    /// Checks that deserialization cannot express (one field needs another,
    /// a key must parse, a list must not be empty). Runs once at load, after
    /// the config parsed; an error stops start-up with this message, so name
    /// the field in it. The default accepts every config that parses.
    fn validate(config: &Self::Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
}

/// A plugin that acts before the command runs.
pub trait Pre: Plugin {
    /// Returns [`Decision::Continue`] with the (possibly changed) invocation
    /// to run the command, or [`Decision::Reply`] to answer now without
    /// running it. An `Err` fails the call closed (HTTP 500 problem) unless
    /// the route says `on-error: skip`; prefer a reply (such as a 400 or 401
    /// problem) for anything the caller did wrong.
    fn pre(config: &Self::Config, ctx: &Context, inv: Invocation) -> Result<Decision, String>;
}

/// A plugin that acts after the command ran.
pub trait Post: Plugin {
    /// Returns the reply to send, built from the reply so far (`reply`: the
    /// command's output as the host shaped it, or the previous post plugin's
    /// result), the invocation the command ran with and how it ended.
    fn post(
        config: &Self::Config,
        ctx: &Context,
        inv: &Invocation,
        outcome: &Outcome,
        reply: Reply,
    ) -> Result<Reply, String>;
}

/// What the component's `config.validate` export does: parses `config` into
/// [`Plugin::Config`] with [`parse_config`], then runs [`Plugin::validate`].
/// Plugin tests call it to check that a config is accepted or refused with
/// the message a user would see at start-up.
pub fn validate_config<P: Plugin>(config: &str) -> Result<(), String> {
    P::validate(&parse_config::<P::Config>(config)?)
}

/// The configuration of a plugin that takes none: accepts and ignores any
/// value, including the `null` the host sends when the entry has none.
pub type NoConfig = serde::de::IgnoredAny;

/// Exports a type as an execd plugin with the given phases.
///
/// `export_plugin!(MyPlugin, pre)`, `export_plugin!(MyPlugin, post)` or
/// `export_plugin!(MyPlugin, pre, post)`. The type implements [`Plugin`] and
/// [`Pre`] and/or [`Post`] to match. Use it once per crate, at the crate
/// root or in any module. The crate must be a `cdylib` built for
/// `wasm32-wasip2` (or without WASI, see the crate docs), and must name
/// this dependency `execd-plugin-sdk`
/// (the generated code refers to `::execd_plugin_sdk`).
///
/// The phases select the world the component targets (`pre-plugin`,
/// `post-plugin` or `plugin`); the host detects them from the exports.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, pre $(,)?) => {
        $crate::__export_plugin!($plugin; pre; pre);
    };
    ($plugin:ty, post $(,)?) => {
        $crate::__export_plugin!($plugin; post; post);
    };
    ($plugin:ty, pre, post $(,)?) => {
        $crate::__export_plugin!($plugin; pre, post; pre post);
    };
}

/// The body of [`export_plugin!`]: bindings for the world, then one
/// `Guest` impl per exported interface, each forwarding to the SDK traits.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($plugin:ty; $($world:ident),+; $($phase:ident)+) => {
        #[doc(hidden)]
        type __ExecdPlugin = $plugin;

        #[doc(hidden)]
        #[allow(missing_docs, unsafe_code, clippy::all)]
        mod __execd_plugin_exports {
            $crate::__execd_plugin_world!($($world),+);

            struct Component;

            impl exports::execd::plugin::config::Guest for Component {
                fn validate(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::validate_config::<super::__ExecdPlugin>(&config)
                }
            }

            $( $crate::__export_plugin!(@phase $phase); )+

            export!(Component);
        }
    };
    (@phase pre) => {
        impl exports::execd::plugin::pre::Guest for Component {
            fn pre(
                ctx: $crate::types::Context,
                inv: $crate::types::Invocation,
            ) -> ::std::result::Result<$crate::types::Decision, ::std::string::String> {
                $crate::__private::pre::<super::__ExecdPlugin>(ctx, inv)
            }
        }
    };
    (@phase post) => {
        impl exports::execd::plugin::post::Guest for Component {
            fn post(
                ctx: $crate::types::Context,
                inv: $crate::types::Invocation,
                outcome: $crate::types::Outcome,
                reply: $crate::types::Reply,
            ) -> ::std::result::Result<$crate::types::Reply, ::std::string::String> {
                $crate::__private::post::<super::__ExecdPlugin>(ctx, inv, outcome, reply)
            }
        }
    };
}

// `__execd_plugin_world!`, written by build.rs from the WIT contract.
include!(concat!(env!("OUT_DIR"), "/world_macro.rs"));

/// Not public API: what the macros expand to.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::execd::plugin::log as log_import;
    pub use wit_bindgen;

    use crate::{Context, Decision, Invocation, Outcome, Plugin, Post, Pre, Reply, parse_config};

    /// The config again, on a call: the host validated it at load, so a
    /// failure here means the host and plugin disagree about the contract.
    fn call_config<P: Plugin>(ctx: &Context) -> Result<P::Config, String> {
        parse_config::<P::Config>(&ctx.config)
            .map_err(|err| format!("configuration rejected on call: {err}"))
    }

    /// `pre.pre`.
    pub fn pre<P: Pre>(ctx: Context, inv: Invocation) -> Result<Decision, String> {
        let config = call_config::<P>(&ctx)?;
        P::pre(&config, &ctx, inv)
    }

    /// `post.post`.
    pub fn post<P: Post>(
        ctx: Context,
        inv: Invocation,
        outcome: Outcome,
        reply: Reply,
    ) -> Result<Reply, String> {
        let config = call_config::<P>(&ctx)?;
        P::post(&config, &ctx, &inv, &outcome, reply)
    }
}
