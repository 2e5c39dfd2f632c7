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
    /// The unix socket this process bound, to remove at shutdown only if
    /// it is still this one.
    socket: Option<BoundSocket>,
    /// The HTTPS listener's acceptor, which a reload renews.
    tls: Option<Arc<ArcSwap<tokio_rustls::TlsAcceptor>>>,
}

/// A socket file by path and identity (device, inode).
struct BoundSocket {
    path: std::path::PathBuf,
    id: (u64, u64),
}

impl BoundSocket {
    fn of(path: &std::path::Path) -> Option<BoundSocket> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(BoundSocket {
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }

    /// Removes the file unless it has been replaced since (another
    /// instance started on the same path, say).
    fn remove(&self) {
        if BoundSocket::of(&self.path).is_some_and(|now| now.id == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the configured listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    crate::runner::start_orphan_reaper();
    let app = App::build(Arc::new(config))?;
    let listener = bind(&app.config.listen, app.config.tls.as_ref()).await?;
    let addr = listener.local_addr();
    let tls = match &listener {
        Listener::Tls(_, acceptor) => Some(acceptor.clone()),
        _ => None,
    };
    let socket = match &app.config.listen {
        Listen::Unix(path) => BoundSocket::of(path),
        Listen::Tcp(_) => None,
    };
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
        socket,
        tls,
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
                Some(files) => {
                    Listener::Tls(l, Arc::new(ArcSwap::from_pointee(tls_acceptor(files)?)))
                }
            })
        }
        Listen::Unix(path) => {
            // A socket file left by a previous run would make bind fail; one
            // that a live process still listens on is not ours to take.
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            });
            if is_socket {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => anyhow::bail!(
                        "cannot listen on unix:{}: another process is listening on it",
                        path.display()
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        let _ = std::fs::remove_file(path);
                    }
                    Err(_) => {}
                }
            }
            Ok(Listener::Unix(
                tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on unix:{}", path.display()))?,
            ))
        }
    }
}

/// A TLS acceptor from the config's PEM files.
fn tls_acceptor(files: &crate::config::TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(
        files.server_config()?,
    )))
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
            // The commands are gone within their kill grace; what may be
            // left is a client that does not read its answer, or a broker
            // that does not answer. Neither holds the process.
            let last = longest_kill_grace(&self.shared.app.load().config) + LAST_WAIT;
            if tokio::time::timeout(last, &mut drained).await.is_err() {
                tracing::warn!(
                    ?last,
                    "connections still open after the commands were stopped; leaving them"
                );
            }
        }
        if let Some(socket) = &self.socket {
            socket.remove();
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
            Ok(mut app) => {
                app.carry_gates(&old);
                if app.config.listen != old.config.listen || app.config.admin != old.config.admin {
                    tracing::warn!(
                        "listen and admin addresses change only on restart; the old ones stay"
                    );
                }
                // A renewed certificate takes effect for new connections;
                // the files were read and checked when the config loaded.
                match (&self.tls, &app.config.tls) {
                    (Some(acceptor), Some(files)) => match tls_acceptor(files) {
                        Ok(a) => acceptor.store(Arc::new(a)),
                        Err(e) => tracing::warn!(
                            "cannot read the tls files again ({e:#}); the old certificate stays"
                        ),
                    },
                    (None, Some(_)) | (Some(_), None) => tracing::warn!(
                        "turning tls on or off changes only on restart; the listener stays as it is"
                    ),
                    (None, None) => {}
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

    /// Files whose change should trigger a reload with `--watch`: the config,
    /// every plugin it names, and its TLS certificate and key.
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let app = self.shared.app.load();
        let mut files = vec![app.config.source.clone()];
        files.extend(app.config.plugins.iter().map(|p| p.path.clone()));
        if let Some(tls) = &app.config.tls {
            files.extend([tls.cert.clone(), tls.key.clone()]);
        }
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
        let abort = self.shared.abort.clone();
        let stopping = self.stop(drain);
        tokio::pin!(stopping);
        tokio::select! {
            () = &mut stopping => {}
            // A second signal: an operator who will not wait for the drain.
            () = termination_signal() => {
                tracing::warn!("second signal: stopping the commands still running now");
                abort.cancel();
                stopping.await;
            }
        }
        tracing::info!("stopped");
    }
}

/// How long the drain waits, beyond the longest kill grace, once the
/// commands still running have been told to stop.
const LAST_WAIT: Duration = Duration::from_secs(5);

/// The longest SIGTERM-to-SIGKILL delay any route or consumer has.
fn longest_kill_grace(config: &Config) -> Duration {
    let routes = config.routes.iter().map(|r| r.command.kill_grace);
    let consumers = config
        .amqp
        .iter()
        .flat_map(|a| &a.consumers)
        .map(|c| c.command.kill_grace);
    routes
        .chain(consumers)
        .fold(config.limits.kill_grace, Duration::max)
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
