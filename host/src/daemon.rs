//! Starting and stopping the daemon: bind the listener, start the queue
//! consumers beside it, serve, drain both.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{Config, ConfigErrors, Listen};
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
    /// The AMQP consumers (none when the config has no `amqp:` section).
    amqp: Workers,
    /// Where the admin listener answers, when there is one.
    pub admin_addr: Option<String>,
    /// Stops the admin listener after the drain.
    admin_stop: CancellationToken,
}

/// Binds the configured listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    crate::runner::start_orphan_reaper();
    let app = App::build(Arc::new(config))?;
    let listener = bind(&app.config.listen, app.config.tls.as_ref()).await?;
    let addr = listener.local_addr();
    let plugins = app.plugins.clone();
    let amqp_config = app.config.amqp.clone();
    let admin_listener = match app.config.admin {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| {
            format!("cannot listen on {a} (admin: set `admin:` to another address, or off)")
        })?),
        None => None,
    };
    let shared = Arc::new(Shared {
        app: Arc::new(ArcSwap::from_pointee(app)),
        abort: CancellationToken::new(),
        in_flight: Default::default(),
    });
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, shared.clone(), shutdown.clone()));
    // Consumers connect in the background: a broker that is down delays
    // them, never the HTTP intake.
    let amqp = Workers::start(
        amqp_config.as_ref(),
        plugins,
        shutdown.clone(),
        shared.abort.clone(),
    );
    let admin_stop = CancellationToken::new();
    let admin_addr = admin_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    if let Some(listener) = admin_listener {
        let state = Arc::new(crate::admin::AdminState {
            shared: shared.clone(),
            shutdown: shutdown.clone(),
            amqp: amqp.health.clone(),
        });
        tokio::spawn(crate::admin::serve(listener, state, admin_stop.clone()));
    }
    Ok(Running {
        addr,
        shutdown,
        shared,
        server,
        amqp,
        admin_addr,
        admin_stop,
    })
}

async fn bind(listen: &Listen, tls: Option<&crate::config::TlsFiles>) -> anyhow::Result<Listener> {
    match listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            Ok(match tls {
                None => Listener::Tcp(l),
                Some(files) => Listener::Tls(l, tls_acceptor(files)?),
            })
        }
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

/// A TLS acceptor from PEM files (rustls with the ring provider; TLS 1.2
/// and 1.3).
fn tls_acceptor(files: &crate::config::TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("cannot read {}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", files.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", files.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("{} is not a PEM private key", files.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the certificate and key do not go together")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Running {
    /// The config generation now being served.
    pub fn app(&self) -> Arc<App> {
        self.shared.app.load_full()
    }

    /// The AMQP consumers' health (an empty list without consumers).
    pub fn amqp_health(&self) -> Arc<amqp::Health> {
        self.amqp.health.clone()
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
            workers.wait().await;
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
        self.admin_stop.cancel();
    }

    /// Reads the config file again, compiles it and its plugins off the
    /// request path, and swaps it in; requests already running finish on
    /// the config they started with. On any error the old config keeps
    /// serving and every error is returned.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        let old = self.shared.app.load_full();
        let path = old.config.source.clone();
        let built = tokio::task::spawn_blocking(move || {
            let config = crate::config::load(&path)?;
            App::build(Arc::new(config))
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfigErrors(vec![crate::config::ConfigError {
                file: old.config.source.display().to_string().into(),
                pos: Default::default(),
                field: String::new(),
                message: format!("reload panicked: {e}"),
            }]))
        });
        match built {
            Ok(app) => {
                if app.config.listen != old.config.listen || app.config.admin != old.config.admin {
                    tracing::warn!(
                        "listen and admin addresses change only on restart; the old ones stay"
                    );
                }
                let routes = app.config.routes.len();
                let consumers = self
                    .amqp
                    .update(app.config.amqp.as_ref(), app.plugins.clone());
                self.shared.app.store(Arc::new(app));
                crate::metrics::inc("execd_reloads_total", &[("result", "ok")]);
                tracing::info!(
                    routes,
                    consumers_kept = consumers.kept,
                    consumers_started = consumers.started,
                    consumers_stopped = consumers.stopped,
                    "config reloaded"
                );
                Ok(())
            }
            Err(errors) => {
                crate::metrics::inc("execd_reloads_total", &[("result", "error")]);
                for e in &errors.0 {
                    tracing::error!("reload rejected: {e}");
                }
                tracing::error!(
                    errors = errors.0.len(),
                    "reload rejected; the previous config keeps serving"
                );
                Err(errors)
            }
        }
    }

    /// Files whose change should trigger a reload with `--watch`: the config
    /// and every plugin it names.
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let app = self.shared.app.load();
        let mut files = vec![app.config.source.clone()];
        files.extend(app.config.plugins.iter().map(|p| p.path.clone()));
        files
    }

    /// Runs until `signal` resolves, reloading on SIGHUP (and on file
    /// changes with `watch`), then drains with the config's deadline.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>, watch: bool) {
        use tokio::signal::unix::{SignalKind, signal as unix_signal};
        let mut hup = unix_signal(SignalKind::hangup()).expect("SIGHUP handler");
        let mut stamps = file_stamps(&self.watched_files());
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received; reloading");
                    let _ = self.reload().await;
                    stamps = file_stamps(&self.watched_files());
                }
                _ = tick.tick(), if watch => {
                    let now = file_stamps(&self.watched_files());
                    if now != stamps {
                        // Debounce: editors write in several steps; wait for
                        // the files to settle before reading them.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        tracing::info!("config or plugin file changed; reloading");
                        let _ = self.reload().await;
                        stamps = file_stamps(&self.watched_files());
                    }
                }
            }
        }
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

/// Modification time and size of each file, to notice changes.
fn file_stamps(files: &[std::path::PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}
