//! Starting and stopping the daemon: bind the listener, start the queue
//! consumers beside it, serve, drain both.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{Config, Listen};
use crate::intake::amqp::{self, Workers};
use crate::intake::http::{self, Listener, Shared};

/// A running daemon.
pub struct Running {
    /// Where the HTTP intake listens (`127.0.0.1:8080`, `unix:/path`).
    pub addr: String,
    /// Cancel to stop accepting and start draining.
    pub shutdown: CancellationToken,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    /// The AMQP consumers, when the config has an `amqp:` section.
    amqp: Option<Workers>,
}

/// Binds the configured listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    crate::runner::start_orphan_reaper();
    let app = App::build(Arc::new(config))?;
    let listener = bind(&app.config.listen).await?;
    let addr = listener.local_addr();
    let plugins = app.plugins.clone();
    let amqp_config = app.config.amqp.clone();
    let shared = Arc::new(Shared {
        app: Arc::new(ArcSwap::from_pointee(app)),
        abort: CancellationToken::new(),
    });
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, shared.clone(), shutdown.clone()));
    // Consumers connect in the background: a broker that is down delays
    // them, never the HTTP intake.
    let amqp =
        amqp_config.map(|c| Workers::start(&c, plugins, shutdown.clone(), shared.abort.clone()));
    Ok(Running {
        addr,
        shutdown,
        shared,
        server,
        amqp,
    })
}

async fn bind(listen: &Listen) -> anyhow::Result<Listener> {
    match listen {
        Listen::Tcp(addr) => Ok(Listener::Tcp(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        )),
        Listen::Unix(path) => {
            // A socket file left by a previous run would make bind fail.
            if std::fs::symlink_metadata(path)
                .map(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                })
                .unwrap_or(false)
            {
                let _ = std::fs::remove_file(path);
            }
            Ok(Listener::Unix(
                tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on unix:{}", path.display()))?,
            ))
        }
    }
}

impl Running {
    /// The config generation now being served.
    pub fn app(&self) -> Arc<App> {
        self.shared.app.load_full()
    }

    /// The AMQP consumers' health, when there are consumers.
    pub fn amqp_health(&self) -> Option<Arc<amqp::Health>> {
        self.amqp.as_ref().map(|w| w.health.clone())
    }

    /// Stops accepting requests and messages, lets running commands finish
    /// for up to `drain`, then kills those still running and waits for
    /// their replies (and, for messages, their settling).
    pub async fn stop(self, drain: Duration) {
        self.shutdown.cancel();
        let mut server = self.server;
        let workers = self.amqp;
        let drained = async {
            let _ = (&mut server).await;
            if let Some(w) = &workers {
                w.wait().await;
            }
        };
        tokio::pin!(drained);
        if tokio::time::timeout(drain, &mut drained).await.is_err() {
            tracing::warn!(
                ?drain,
                "drain deadline passed; stopping the commands still running"
            );
            self.shared.abort.cancel();
            drained.await;
        }
        if let Listen::Unix(path) = &self.shared.app.load().config.listen {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Runs until `signal` resolves, then drains with the config's deadline.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        let drain = self.shared.app.load().config.limits.drain_timeout;
        tracing::info!(?drain, "shutting down: no new requests; draining");
        self.stop(drain).await;
        tracing::info!("stopped");
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
