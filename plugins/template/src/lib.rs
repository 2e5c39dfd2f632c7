//! {{name}}: an execd pre plugin that sets the variable `greeting` from its
//! config, so the route's `cmd` can say `${var.greeting}`.
//!
//! Config: `{ "greeting": "hello" }`.

use execd_plugin_sdk::prelude::*;
use serde::Deserialize;

/// The plugin's YAML entry; unknown keys are errors at load.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The text to hand to the command.
    greeting: String,
}

struct Greeter;

impl Plugin for Greeter {
    type Config = Settings;

    fn validate(config: &Settings) -> Result<(), String> {
        if config.greeting.is_empty() {
            return Err("greeting: must not be empty".into());
        }
        Ok(())
    }
}

impl Pre for Greeter {
    fn pre(config: &Settings, ctx: &Context, mut inv: Invocation) -> Result<Decision, String> {
        info!("greeting request {}", ctx.request_id);
        inv.set_var("greeting", &config.greeting);
        Ok(Decision::Continue(inv))
    }
}

export_plugin!(Greeter, pre);
