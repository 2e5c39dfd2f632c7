//! The `execd` command: parse arguments, set up logs, call the library, map
//! errors to exit codes (64 for a config error, 1 for anything else).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use execd::config;
use execd::telemetry::{self, LogFormat};

/// Exit code for a config that does not validate (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "execd",
    version,
    about = "Run command-line programs behind HTTP routes"
)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "EXECD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the routes of a config file until SIGTERM or SIGINT.
    Serve {
        /// The YAML config file.
        #[arg(short, long, env = "EXECD_CONFIG")]
        config: PathBuf,
        /// Reload when the config file or a plugin file it names changes
        /// (SIGHUP always reloads).
        #[arg(long)]
        watch: bool,
        /// Keep compiled plugins in this directory (made private to execd)
        /// and load them from there at the next start instead of compiling
        /// again.
        #[arg(long, env = "EXECD_PLUGIN_CACHE")]
        plugin_cache: Option<PathBuf>,
    },
    /// Validate a config file and print its route table.
    Check {
        #[arg(short, long, env = "EXECD_CONFIG")]
        config: PathBuf,
    },
    /// Run one request through a route without a server, for debugging.
    Run {
        #[arg(short, long, env = "EXECD_CONFIG")]
        config: PathBuf,
        /// HTTP method, e.g. GET.
        method: String,
        /// Path with an optional query string, e.g. '/templates?x=1'.
        path: String,
        /// Request body.
        #[arg(long, conflicts_with = "body_file")]
        body: Option<String>,
        /// Read the request body from a file (`-` for stdin).
        #[arg(long)]
        body_file: Option<PathBuf>,
        /// A request header, `Name: value`; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run one phase of a plugin on a request file and print the decision.
    Run {
        /// The plugin component (.wasm).
        wasm: PathBuf,
        /// The plugin's config as JSON (what its YAML entry's `config` holds).
        #[arg(long, default_value = "null")]
        config: String,
        /// A JSON request file (see docs/plugins.md).
        #[arg(long)]
        request: PathBuf,
        /// The phase to run; by default pre when the plugin has one.
        #[arg(long, value_enum)]
        phase: Option<execd::plugin::author::Phase>,
        /// Deadline for the call.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// Memory cap for the call, as the `memory` of a config's plugin
        /// entry (16MiB there too when it names none).
        #[arg(long, default_value = "16MiB", value_parser = parse_memory)]
        memory: u64,
    },
    /// Create a new plugin crate from the template.
    New {
        /// Crate name, e.g. my-auth.
        name: String,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Cargo dependency spec of the SDK, e.g. '{ path = "../execd/plugins/sdk" }'.
        #[arg(long)]
        sdk: Option<String>,
    },
    /// Compile components from stdin to native code on stdout: how the
    /// daemon keeps the compiler out of its own memory.
    #[command(hide = true)]
    CompileStdio,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    config::parse_size(s)
        .filter(|&n| n > 0 && n <= execd::plugin::MAX_PLUGIN_MEMORY)
        .ok_or_else(|| format!("{s:?} is not a size from 1 byte to 256MiB (e.g. 16MiB)"))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration (e.g. 500ms, 2s)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    // Plugins are compiled by a child process running this same binary
    // (even if the file was replaced since execd started).
    execd::plugin::compile_in_child("/proc/self/exe".into());
    let result = match cli.command {
        Command::Serve {
            config,
            watch,
            plugin_cache,
        } => serve(config, watch, plugin_cache),
        Command::Check { config } => check(config),
        Command::Run {
            config,
            method,
            path,
            body,
            body_file,
            headers,
        } => run_once(config, method, path, body, body_file, headers),
        Command::Plugin(PluginCommand::Run {
            wasm,
            config,
            request,
            phase,
            timeout,
            memory,
        }) => execd::plugin::author::run(&wasm, &config, &request, phase, timeout, memory).and_then(|decision| {
            println!("{}", serde_json::to_string_pretty(&decision)?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Plugin(PluginCommand::CompileStdio) => {
            execd::plugin::compile_stdio().map(|()| ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => {
            execd::plugin::author::new(&name, &dir, sdk.as_deref()).map(|root| {
                println!("created {}", root.display());
                println!("build it: cargo build --release --target wasm32-wasip2 --manifest-path {}/Cargo.toml", root.display());
                ExitCode::SUCCESS
            })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(errors) = e.downcast_ref::<config::ConfigErrors>() {
                eprint!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            } else {
                eprintln!("execd: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(path: PathBuf, watch: bool, plugin_cache: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if let Some(dir) = plugin_cache {
        execd::plugin::use_cache_dir(&dir)?;
    }
    let config = config::load(&path)?;
    runtime()?.block_on(async {
        let routes = config.routes.len();
        let running = execd::daemon::start(config).await?;
        tracing::info!(
            addr = %running.addr,
            admin = running.admin_addr.as_deref().unwrap_or("off"),
            routes,
            config = %path.display(),
            "execd listening"
        );
        running
            .run_until(execd::daemon::termination_signal(), watch)
            .await;
        Ok(ExitCode::SUCCESS)
    })
}

fn check(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = std::sync::Arc::new(config::load(&path)?);
    // Compiles every plugin and lets each validate its own config.
    let app = execd::app::App::build(config.clone())?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: ok, listening on {}",
        path.display(),
        config.listen
    )?;
    writeln!(
        out,
        "{:<8} {:<28} {:<8} {:<9} COMMAND",
        "METHOD", "URL", "TIMEOUT", "PAYLOAD"
    )?;
    for r in &config.routes {
        let argv: Vec<String> = r.command.argv.iter().map(|w| w.to_string()).collect();
        writeln!(
            out,
            "{:<8} {:<28} {:<8} {:<9} {}",
            r.methods.join(","),
            r.url.text,
            format!("{:?}", r.command.timeout),
            format!("{:?}", r.command.payload_to).to_lowercase(),
            shell_words::join(argv)
        )?;
    }
    for p in &config.plugins {
        let plugin = app.plugins.get(&p.name).expect("loaded");
        let phases = match (plugin.has_pre(), plugin.has_post()) {
            (true, true) => "pre+post",
            (true, false) => "pre",
            _ => "post",
        };
        writeln!(
            out,
            "plugin {:<16} {:<8} {}",
            p.name,
            phases,
            p.path.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_once(
    path: PathBuf,
    method: String,
    target: String,
    body: Option<String>,
    body_file: Option<PathBuf>,
    headers: Vec<String>,
) -> anyhow::Result<ExitCode> {
    use execd::pipeline::{HttpOrigin, Invocation, Origin};
    let config = config::load(&path)?;
    let app = execd::app::App::build(std::sync::Arc::new(config))?;
    let method = method.to_ascii_uppercase();
    let (path_part, query) = target.split_once('?').unwrap_or((&target, ""));
    let (slot, params) = match app.lookup(&method, path_part) {
        execd::app::Lookup::Found(slot, params) => (slot, params),
        execd::app::Lookup::WrongMethod(allowed) => {
            anyhow::bail!(
                "{method} is not served at {path_part}; allowed: {}",
                allowed.join(", ")
            )
        }
        execd::app::Lookup::NotFound => anyhow::bail!("no route serves {path_part}"),
    };
    let body = match (body, body_file) {
        (Some(b), _) => b.into_bytes(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
            v
        }
        (None, Some(f)) => std::fs::read(&f)?,
        (None, None) => Vec::new(),
    };
    let mut header_list = Vec::new();
    for h in headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("header {h:?} is not `Name: value`"))?;
        header_list.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let query_pairs = execd::intake::http::parse_query(query)
        .ok_or_else(|| anyhow::anyhow!("the query string has a malformed %-escape"))?;
    let request_id = execd::ids::request_id();
    let inv = Invocation {
        route: slot.route.name.as_str().into(),
        request_id: request_id.as_str().into(),
        origin: Origin::Http(HttpOrigin {
            method,
            path: path_part.to_string(),
            query: query.to_string(),
            remote_addr: "127.0.0.1:0".into(),
            protocol: "HTTP/1.1",
        }),
        headers: header_list,
        params,
        query: query_pairs,
        vars: Vec::new(),
        body: body.into(),
    };
    let route = slot.route.clone();
    let app = &app;
    let reply = runtime()?.block_on(async move {
        execd::runner::start_orphan_reaper();
        let abort = tokio_util::sync::CancellationToken::new();
        match execd::pipeline::execute(&route.command, &app.plugins, inv, &abort).await {
            Ok(done) => done.reply,
            Err(f) => f.to_reply(&request_id),
        }
    });
    let mut err = std::io::stderr().lock();
    writeln!(err, "HTTP {}", reply.status)?;
    for (k, v) in &reply.headers {
        writeln!(err, "{k}: {v}")?;
    }
    std::io::stdout().lock().write_all(&reply.body)?;
    Ok(if reply.status < 400 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
