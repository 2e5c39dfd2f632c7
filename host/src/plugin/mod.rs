//! The WebAssembly plugin host: components compiled once at load, linked
//! once (`InstancePre`), and run in a fresh store per call with an epoch
//! deadline, a memory cap and a WASI context that grants nothing.
//!
//! The contract is `wit/execd-plugin.wit`. A plugin exports `config` and
//! one or both of `pre` and `post`; which phases it has is read from its
//! exports at load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Instance, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::{OnError, PluginSpec};

pub mod author;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/execd-plugin.wit",
        world: "plugin",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::execd::plugin::types as wit;
use bindings::exports::execd::plugin::{
    config as config_export, post as post_export, pre as pre_export,
};

/// How often the epoch ticks: the granularity of plugin deadlines.
const TICK: Duration = Duration::from_millis(2);

/// The largest memory any plugin may be given (`memory:` in the config).
pub const MAX_PLUGIN_MEMORY: u64 = 256 * 1024 * 1024;

/// Log lines one call may write before the rest are dropped.
const LOG_LINES_PER_CALL: u32 = 20;

/// Whether the kernel has PAGEMAP_SCAN, so a pool slot's reset can skip
/// the pages a call did not touch.
fn pagemap_scan() -> bool {
    wasmtime::PoolingAllocationConfig::is_pagemap_scan_available()
}

/// Plugin calls running at once, daemon-wide. Each holds one component
/// instance of the pool (256), and up to 8 core instances (1024) and 4
/// memories (512); calls beyond wait for a slot. The other half of the
/// pool is headroom for the config checks of a reload.
const CALLS_AT_ONCE: usize = 128;

fn call_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(CALLS_AT_ONCE))
}

/// The engine settings plugins are compiled for and run with. Compiled
/// code is only accepted by an engine with the same settings, so the
/// engine that compiles and the one that runs are both built from this.
fn engine_config(pooling: bool) -> wasmtime::Config {
    let mut cfg = wasmtime::Config::new();
    cfg.epoch_interruption(true)
        .memory_init_cow(true)
        .max_wasm_stack(512 * 1024);
    if pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_stacks(256)
            .total_core_instances(1024)
            .total_memories(512)
            .total_tables(1024)
            .max_memory_size(MAX_PLUGIN_MEMORY as usize)
            // Reset a slot after a call by rewriting the pages the call
            // dirtied instead of unmapping them: an madvise in a
            // multi-threaded process costs a TLB shootdown on every core,
            // and the next call's page faults on top. With PAGEMAP_SCAN
            // (Linux 6.7+) only the dirtied pages of the kept region are
            // rewritten, so it can cover a Rust guest's stack (its first
            // MiB), data and small heap; without it the whole kept region
            // is rewritten, so it stays small.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(if pagemap_scan() { 4 << 20 } else { 64 << 10 })
            .table_keep_resident(if pagemap_scan() { 64 << 10 } else { 16 << 10 })
            .decommit_batch_size(16);
        cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    cfg
}

/// The engine every plugin runs on, shared across config reloads so the
/// pooling allocator's slots are reserved once. It never compiles: see
/// [`Compiler`].
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let engine =
            Engine::new(&engine_config(true)).expect("the plugin engine configuration is valid");
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("execd-epoch".into())
            .spawn(move || TICKER.run(weak))
            .expect("spawn the epoch ticker");
        engine
    })
}

/// How long the epoch keeps ticking after the last plugin call ends, so
/// that steady traffic does not wake the ticker once per call.
const TICKER_LINGER: Duration = Duration::from_secs(1);

/// Advances the engine's epoch, which is what stops a plugin at its
/// deadline, every [`TICK`], but only while plugin code may run: ticking
/// all the time would wake an idle daemon 500 times a second (about 1% of
/// a core, measured). A call holds a [`Ticking`] for as long as its store
/// lives.
struct Ticker {
    /// Stores alive now.
    calls: AtomicUsize,
    /// The ticker is waiting (or about to wait) on `wake`.
    parked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

static TICKER: Ticker = Ticker {
    calls: AtomicUsize::new(0),
    parked: AtomicBool::new(false),
    lock: Mutex::new(()),
    wake: Condvar::new(),
};

/// Keeps the epoch ticking while it lives.
struct Ticking(());

impl Ticker {
    fn hold(&'static self) -> Ticking {
        // SeqCst on both sides: either the ticker sees this call before it
        // waits, or this sees `parked` and wakes it (under the lock it
        // holds from setting `parked` until it waits).
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.wake.notify_one();
        }
        Ticking(())
    }

    fn run(&'static self, engine: wasmtime::EngineWeak) {
        let mut idle_since: Option<Instant> = None;
        while let Some(engine) = engine.upgrade() {
            if self.calls.load(Ordering::SeqCst) > 0 {
                idle_since = None;
            } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= TICKER_LINGER {
                drop(engine);
                let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.parked.store(true, Ordering::SeqCst);
                let guard = self
                    .wake
                    .wait_while(guard, |_| self.calls.load(Ordering::SeqCst) == 0)
                    .unwrap_or_else(|e| e.into_inner());
                self.parked.store(false, Ordering::SeqCst);
                drop(guard);
                idle_since = None;
                continue;
            }
            engine.increment_epoch();
            drop(engine);
            std::thread::sleep(TICK);
        }
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        TICKER.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where compiled plugins are kept between starts (`--plugin-cache`).
static CACHE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Keeps compiled plugins in `dir` from now on. The directory is created
/// if need be and must be private to execd's user: a compiled plugin is
/// native code, loaded without further checks, so nobody else may be able
/// to write there.
pub fn use_cache_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the plugin cache {}", dir.display()))?;
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read the plugin cache {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        anyhow::bail!(
            "the plugin cache {} must belong to uid {me} and be writable by it alone \
             (it holds native code that execd runs); it is uid {} mode {:o}",
            dir.display(),
            meta.uid(),
            meta.permissions().mode() & 0o7777
        );
    }
    let _ = CACHE_DIR.set(dir.to_path_buf());
    Ok(())
}

/// Compiles components on an engine of its own.
///
/// Cranelift keeps its working memory (one context per compiling thread,
/// each as large as the largest function it compiled) for as long as its
/// engine lives. A `Compiler` compiles on a throwaway engine with the
/// serving engine's settings and takes that memory with it when dropped;
/// the serving engine ([`engine`]) only ever loads compiled code.
pub(crate) struct Compiler {
    engine: Option<Engine>,
}

impl Compiler {
    pub(crate) fn new() -> Compiler {
        Compiler { engine: None }
    }

    /// Native code for [`engine`] from a component's bytes.
    pub(crate) fn native(&mut self, wasm: &[u8]) -> anyhow::Result<Vec<u8>> {
        let engine = match &mut self.engine {
            Some(e) => e,
            None => self.engine.insert(
                Engine::new(&engine_config(false))
                    .map_err(|e| anyhow::anyhow!("cannot set up the plugin compiler: {e}"))?,
            ),
        };
        Ok(engine.precompile_component(wasm)?)
    }
}

impl Drop for Compiler {
    fn drop(&mut self) {
        let engine = self.engine.take();
        if engine.is_some() {
            drop(engine);
            release_compiler_memory();
        }
    }
}

/// The program that compiles plugins in a child process, when set.
static COMPILER_PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Compiles plugins in a child process from now on: `program` run with the
/// arguments `plugin compile-stdio` (execd's own binary: `/proc/self/exe`).
///
/// The compiler's code and working memory then never enter the daemon: a
/// daemon that compiled its plugins at start-up holds what one that found
/// them in the plugin cache holds, and a component that crashes the
/// compiler fails its own load instead of taking the daemon down. When the
/// child cannot be started at all, plugins are compiled in-process.
pub fn compile_in_child(program: PathBuf) {
    let _ = COMPILER_PROGRAM.set(program);
}

/// The child side of [`compile_in_child`]: reads components from stdin,
/// each as a little-endian u64 length and the bytes, and answers each on
/// stdout with a tag (0: native code follows, 1: an error message follows),
/// a u64 length and the bytes.
pub fn compile_stdio() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut input = Vec::new();
    std::io::stdin().lock().read_to_end(&mut input)?;
    let mut inputs = Vec::new();
    let mut rest = &input[..];
    while !rest.is_empty() {
        let (wasm, tail) =
            split_frame(rest).ok_or_else(|| anyhow::anyhow!("compile-stdio: truncated input"))?;
        inputs.push(wasm);
        rest = tail;
    }
    let mut compiler = Compiler::new();
    let mut out = std::io::stdout().lock();
    for wasm in inputs {
        let (tag, bytes) = match compiler.native(wasm) {
            Ok(native) => (0u8, native),
            Err(e) => (1u8, format!("{e:#}").into_bytes()),
        };
        out.write_all(&[tag])?;
        out.write_all(&(bytes.len() as u64).to_le_bytes())?;
        out.write_all(&bytes)?;
    }
    out.flush()?;
    Ok(())
}

/// Splits a length-prefixed frame off `buf`.
fn split_frame(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = buf.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Native code for each component, compiled by a child process running
/// `program`. `Err` when the child could not be started; otherwise one
/// result per component.
fn native_in_child(
    program: &Path,
    wasms: &[&[u8]],
) -> std::io::Result<Vec<anyhow::Result<Vec<u8>>>> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(["plugin", "compile-stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The child reads all of its input before it writes anything, so
    // writing all, then reading all, cannot deadlock.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let written = wasms.iter().try_for_each(|wasm| {
        stdin.write_all(&(wasm.len() as u64).to_le_bytes())?;
        stdin.write_all(wasm)
    });
    drop(stdin);
    let mut output = Vec::new();
    let read = child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_end(&mut output);
    let status = child.wait();
    let stderr_text = errors.join().unwrap_or_default();
    let mut results = Vec::with_capacity(wasms.len());
    let mut rest = &output[..];
    while results.len() < wasms.len() {
        let Some((&tag, tail)) = rest.split_first() else {
            break;
        };
        let Some((bytes, tail)) = split_frame(tail) else {
            break;
        };
        rest = tail;
        results.push(match tag {
            0 => Ok(bytes.to_vec()),
            _ => Err(anyhow::anyhow!("{}", String::from_utf8_lossy(bytes))),
        });
    }
    if results.len() < wasms.len() {
        let why = match (&written, &read, &status) {
            (_, _, Ok(st)) if !st.success() => format!("it exited with {st}"),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => e.to_string(),
            _ => "its answer was cut short".to_string(),
        };
        let last = stderr_text.lines().last().unwrap_or("").trim();
        while results.len() < wasms.len() {
            results.push(Err(anyhow::anyhow!(
                "the plugin compiler (a child `{} plugin compile-stdio`) failed: {why}{}{last}",
                program.display(),
                if last.is_empty() { "" } else { "; it said: " },
            )));
        }
    }
    Ok(results)
}

/// Compiled components for these files, in order: from the plugin cache
/// where an earlier start left them, the rest compiled (in a child process
/// when [`compile_in_child`] was called) and, with a cache, kept there.
fn load_components(paths: &[&Path]) -> Vec<anyhow::Result<Component>> {
    use anyhow::Context;
    let mut out: Vec<Option<anyhow::Result<Component>>> = Vec::with_capacity(paths.len());
    // (index, wasm bytes, cache file) of what still needs compiling.
    let mut todo: Vec<(usize, Vec<u8>, Option<PathBuf>)> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                out.push(Some(Err(
                    anyhow::Error::from(e).context(format!("cannot read {}", path.display()))
                )));
                continue;
            }
        };
        let cached = CACHE_DIR.get().map(|dir| dir.join(cache_name(&bytes)));
        if let Some(file) = cached.as_deref().filter(|c| c.is_file()) {
            // SAFETY: the file was written by `keep` into a directory only
            // execd's user can write (checked by `use_cache_dir`), under a
            // name that pins the wasm's bytes and the engine's settings;
            // wasmtime checks its version and settings again.
            match unsafe { Component::deserialize_file(engine(), file) } {
                Ok(c) => {
                    out.push(Some(Ok(c)));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(plugin = %path.display(), cache = %file.display(), error = %e, "cached plugin not usable; compiling again");
                }
            }
        }
        out.push(None);
        todo.push((i, bytes, cached));
    }
    if todo.is_empty() {
        return out.into_iter().flatten().collect();
    }
    let wasms: Vec<&[u8]> = todo.iter().map(|(_, b, _)| &b[..]).collect();
    let in_child = COMPILER_PROGRAM
        .get()
        .and_then(|program| match native_in_child(program, &wasms) {
            Ok(natives) => Some(natives),
            Err(e) => {
                tracing::warn!(program = %program.display(), error = %e, "cannot start the plugin compiler; compiling in-process");
                None
            }
        });
    let natives = in_child.unwrap_or_else(|| {
        let mut compiler = Compiler::new();
        wasms.iter().map(|w| compiler.native(w)).collect()
    });
    for ((i, _, cached), native) in todo.into_iter().zip(natives) {
        let path = paths[i];
        let component = native
            .with_context(|| format!("cannot load {} as a WebAssembly component", path.display()))
            .and_then(|native| {
                if let Some(c) = cached.as_deref().and_then(|file| keep(file, &native)) {
                    return Ok(c);
                }
                // SAFETY: `native` is what `precompile_component` produced
                // for an engine with `engine()`'s settings; wasmtime checks
                // its version and settings again.
                unsafe { Component::deserialize(engine(), &native) }
                    .map_err(anyhow::Error::from)
                    .with_context(|| format!("cannot load the compiled {}", path.display()))
            });
        out[i] = Some(component);
    }
    out.into_iter().flatten().collect()
}

/// Writes compiled code into the plugin cache and loads it from there (so
/// its pages are the file's, read in as they are used); `None`, with a
/// warning, when that fails.
fn keep(file: &Path, native: &[u8]) -> Option<Component> {
    // Written whole, then renamed: a concurrent start never reads half a
    // file.
    let tmp = file.with_file_name(format!(".{}.tmp", crate::ids::random_hex(8)));
    if let Err(e) = std::fs::write(&tmp, native).and_then(|()| std::fs::rename(&tmp, file)) {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(cache = %file.display(), error = %e, "cannot write to the plugin cache");
        return None;
    }
    // SAFETY: as for a cache hit in `load_components`; the file holds the
    // code just compiled.
    match unsafe { Component::deserialize_file(engine(), file) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(cache = %file.display(), error = %e, "cannot load from the plugin cache");
            None
        }
    }
}

/// The cache file for these wasm bytes on this engine: a digest of the
/// bytes and of what makes compiled code compatible (wasmtime's version,
/// the engine's settings, the CPU features used).
fn cache_name(wasm: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let digest = ring::digest::digest(&ring::digest::SHA256, wasm);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine().precompile_compatibility_hash().hash(&mut h);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{:016x}.cwasm", h.finish())
}

/// What one plugin call may use and see; lives as long as the call's store.
pub struct CallState {
    /// Built at the guest's first WASI call: most calls make none (a
    /// component built without WASI cannot), and building it seeds two
    /// random number generators.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    limits: CallLimits,
    plugin: Arc<str>,
    route: Arc<str>,
    request_id: Arc<str>,
    log_lines: u32,
    _ticking: Ticking,
}

/// wasmtime's [`StoreLimits`], which cap each linear memory on its own,
/// and one cap on all of a call's memories together: a component made of
/// several core modules has one memory each, and `memory:` is what the
/// whole call may use.
struct CallLimits {
    each: StoreLimits,
    /// Bytes of linear memory the call holds now, all memories together.
    memory: usize,
    memory_cap: usize,
}

impl wasmtime::ResourceLimiter for CallLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if !self.each.memory_growing(current, desired, maximum)? {
            return Ok(false);
        }
        let total = self.memory.saturating_sub(current).saturating_add(desired);
        if total > self.memory_cap {
            wasmtime::bail!(
                "forcing trap: the call's memories would hold {total} bytes in all, over its limit of {} bytes (memory:)",
                self.memory_cap
            );
        }
        self.memory = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.each.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.each.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.each.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.each.instances()
    }

    fn tables(&self) -> usize {
        self.each.tables()
    }

    fn memories(&self) -> usize {
        self.each.memories()
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self.wasi.get_or_insert_with(sandboxed_wasi),
            table: &mut self.table,
        }
    }
}

/// A plugin's WASI: nothing granted. No preopened directories, no
/// environment, no arguments, no sockets, stdio discarded.
fn sandboxed_wasi() -> WasiCtx {
    WasiCtx::builder()
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

impl bindings::execd::plugin::log::Host for CallState {
    async fn log(&mut self, level: bindings::execd::plugin::log::Level, message: String) {
        use bindings::execd::plugin::log::Level;
        self.log_lines += 1;
        if self.log_lines > LOG_LINES_PER_CALL {
            if self.log_lines == LOG_LINES_PER_CALL + 1 {
                tracing::warn!(plugin = %self.plugin, route = %self.route, request_id = %self.request_id, "plugin log limit reached; dropping further lines of this call");
            }
            return;
        }
        // At most 2048 characters; most lines are shorter and are not scanned.
        let end = if message.len() <= 2048 {
            message.len()
        } else {
            message
                .char_indices()
                .nth(2048)
                .map_or(message.len(), |(i, _)| i)
        };
        // One log line per call of `log`: a newline in the message (which
        // may quote what a client sent) must not start a line of its own.
        let message = one_line(&message[..end]);
        let (p, r, id) = (&*self.plugin, &*self.route, &*self.request_id);
        match level {
            Level::Trace => tracing::trace!(plugin = p, route = r, request_id = id, "{message}"),
            Level::Debug => tracing::debug!(plugin = p, route = r, request_id = id, "{message}"),
            Level::Info => tracing::info!(plugin = p, route = r, request_id = id, "{message}"),
            Level::Warn => tracing::warn!(plugin = p, route = r, request_id = id, "{message}"),
            Level::Error => tracing::error!(plugin = p, route = r, request_id = id, "{message}"),
        }
    }
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`), so that it
/// stays one line and cannot pass for a line of execd's own.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Why a plugin call produced no result.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin returned an error of its own.
    #[error("{0}")]
    Rejected(String),
    /// It ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// It trapped (including running out of memory).
    #[error("trapped: {0}")]
    Trap(String),
}

/// A loaded, linked plugin.
pub struct Plugin {
    pub spec: PluginSpec,
    name: Arc<str>,
    instance_pre: InstancePre<CallState>,
    pre: Option<pre_export::GuestIndices>,
    post: Option<post_export::GuestIndices>,
    config: config_export::GuestIndices,
    deadline_ticks: u64,
}

/// Per-call facts that are not part of the invocation.
pub struct CallInfo<'a> {
    pub route: &'a Arc<str>,
    pub request_id: &'a Arc<str>,
    pub origin: wit::Origin,
}

impl Plugin {
    /// Compiles and links a plugin, then checks its config through its own
    /// `validate` export.
    pub fn load(spec: &PluginSpec) -> anyhow::Result<Plugin> {
        let component = load_components(&[&spec.path])
            .pop()
            .expect("one result per file")?;
        Self::load_compiled(spec, component)
    }

    /// Like [`Plugin::load`], with the component already compiled (one
    /// file named by several plugin entries is compiled once).
    fn load_compiled(spec: &PluginSpec, component: Component) -> anyhow::Result<Plugin> {
        use anyhow::Context;
        if spec.memory > MAX_PLUGIN_MEMORY {
            anyhow::bail!(
                "memory {} is over the maximum of {MAX_PLUGIN_MEMORY} bytes",
                spec.memory
            );
        }
        let engine = engine();
        let mut linker: Linker<CallState> = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::execd::plugin::log::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |s| s,
        )?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                "the component imports something execd does not provide (plugins may import only \
             execd:plugin/log and WASI)"
            })?;
        let config = config_export::GuestIndices::new(&instance_pre).map_err(|_| {
            anyhow::anyhow!(
                "the component does not export execd:plugin/config@0.1.0; is it built against this version of wit/execd-plugin.wit?"
            )
        })?;
        let pre = pre_export::GuestIndices::new(&instance_pre).ok();
        let post = post_export::GuestIndices::new(&instance_pre).ok();
        if pre.is_none() && post.is_none() {
            anyhow::bail!(
                "the component exports neither execd:plugin/pre@0.1.0 nor execd:plugin/post@0.1.0"
            );
        }
        let deadline_ticks = (spec.timeout.as_micros() / TICK.as_micros()).max(1) as u64 + 1;
        let plugin = Plugin {
            spec: spec.clone(),
            name: spec.name.as_str().into(),
            instance_pre,
            pre,
            post,
            config,
            deadline_ticks,
        };
        let route: Arc<str> = "(load)".into();
        let validated = block_on(plugin.on_fresh_instance(
            &route,
            &route,
            |store, instance| plugin.config.load(store, instance),
            async |guest: &config_export::Guest, store| {
                guest.call_validate(store, &spec.config).await
            },
        ));
        match validated {
            Ok(()) => Ok(plugin),
            Err(PluginError::Rejected(msg)) => {
                anyhow::bail!("config rejected by the plugin: {msg}")
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn has_pre(&self) -> bool {
        self.pre.is_some()
    }

    pub fn has_post(&self) -> bool {
        self.post.is_some()
    }

    pub fn on_error(&self) -> OnError {
        self.spec.on_error
    }

    fn store(&self, route: &Arc<str>, request_id: &Arc<str>) -> Store<CallState> {
        let state = CallState {
            wasi: None,
            table: ResourceTable::new(),
            limits: CallLimits {
                each: StoreLimitsBuilder::new()
                    .memory_size(self.spec.memory as usize)
                    .instances(64)
                    .tables(64)
                    .memories(16)
                    .trap_on_grow_failure(true)
                    .build(),
                memory: 0,
                memory_cap: self.spec.memory as usize,
            },
            plugin: self.name.clone(),
            route: route.clone(),
            request_id: request_id.clone(),
            log_lines: 0,
            _ticking: TICKER.hold(),
        };
        let mut store = Store::new(engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        store
    }

    async fn instantiate(&self, store: &mut Store<CallState>) -> Result<Instance, PluginError> {
        self.instance_pre
            .instantiate_async(&mut *store)
            .await
            .map_err(|e| self.classify(e))
    }

    /// Runs a call to its end or to the plugin's deadline. The epoch stops
    /// guest code at the deadline; this also stops a guest that waits in a
    /// host call (a sleep, a poll) past it, where no guest code runs to be
    /// stopped.
    async fn within_deadline<T>(
        &self,
        call: impl std::future::Future<Output = wasmtime::Result<T>>,
    ) -> Result<T, PluginError> {
        match tokio::time::timeout(self.spec.timeout + 4 * TICK, call).await {
            Ok(result) => result.map_err(|e| self.classify(e)),
            Err(_) => Err(PluginError::Timeout(self.spec.timeout)),
        }
    }

    fn classify(&self, e: wasmtime::Error) -> PluginError {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::Timeout(self.spec.timeout),
            _ => PluginError::Trap(format!("{e:#}")),
        }
    }

    fn context(&self, info: &CallInfo<'_>) -> wit::Context {
        wit::Context {
            route: info.route.to_string(),
            request_id: info.request_id.to_string(),
            origin: info.origin.clone(),
            config: self.spec.config.clone(),
        }
    }

    /// One call on a fresh instance: a store, the instance, the exports
    /// the call needs (`load`), then `call` within the deadline. A guest's
    /// `Err` is [`PluginError::Rejected`].
    async fn on_fresh_instance<G, T>(
        &self,
        route: &Arc<str>,
        request_id: &Arc<str>,
        load: impl FnOnce(&mut Store<CallState>, &Instance) -> wasmtime::Result<G>,
        call: impl AsyncFnOnce(&G, &mut Store<CallState>) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, PluginError> {
        let mut store = self.store(route, request_id);
        let instance = self.instantiate(&mut store).await?;
        let guest = load(&mut store, &instance).map_err(|e| self.classify(e))?;
        let result = self.within_deadline(call(&guest, &mut store)).await;
        result?.map_err(PluginError::Rejected)
    }

    /// A place among the calls that may run at once: past the pool's size a
    /// call would fail as if the plugin had trapped, so it waits instead,
    /// within its deadline. Only request and message calls take one; the
    /// config check at load uses the pool's headroom, so that a reload is
    /// never refused because the daemon is busy.
    async fn call_slot(&self) -> Result<tokio::sync::SemaphorePermit<'static>, PluginError> {
        let permit = tokio::time::timeout(self.spec.timeout, call_slots().acquire())
            .await
            .map_err(|_| PluginError::Timeout(self.spec.timeout))?;
        Ok(permit.expect("the call semaphore is never closed"))
    }

    /// Runs the pre phase.
    pub async fn call_pre(
        &self,
        info: &CallInfo<'_>,
        inv: &wit::Invocation,
    ) -> Result<wit::Decision, PluginError> {
        let indices = self
            .pre
            .as_ref()
            .expect("call_pre on a plugin without a pre phase");
        let ctx = self.context(info);
        let _slot = self.call_slot().await?;
        self.on_fresh_instance(
            info.route,
            info.request_id,
            |store, instance| indices.load(store, instance),
            async |guest: &pre_export::Guest, store| guest.call_pre(store, &ctx, inv).await,
        )
        .await
    }

    /// Runs the post phase.
    pub async fn call_post(
        &self,
        info: &CallInfo<'_>,
        inv: &wit::Invocation,
        outcome: &wit::Outcome,
        reply: &wit::Reply,
    ) -> Result<wit::Reply, PluginError> {
        let indices = self
            .post
            .as_ref()
            .expect("call_post on a plugin without a post phase");
        let ctx = self.context(info);
        let _slot = self.call_slot().await?;
        self.on_fresh_instance(
            info.route,
            info.request_id,
            |store, instance| indices.load(store, instance),
            async |guest: &post_export::Guest, store| {
                guest.call_post(store, &ctx, inv, outcome, reply).await
            },
        )
        .await
    }
}

/// Runs a future to its end from synchronous code, inside a tokio runtime
/// or not (loading plugins is synchronous and happens in both): on a
/// thread of its own with a runtime of its own.
pub(crate) fn block_on<F: std::future::Future + Send>(future: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds")
                .block_on(future)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The plugins of one config generation, by name.
#[derive(Default)]
pub struct Plugins {
    by_name: HashMap<String, Arc<Plugin>>,
}

impl Plugins {
    /// Loads every plugin of a config; the errors name each plugin.
    pub fn load(specs: &[PluginSpec]) -> Result<Plugins, Vec<(PluginSpec, String)>> {
        let mut by_name = HashMap::new();
        let mut errors = Vec::new();
        // Each file once, however many entries name it.
        let mut paths: Vec<&Path> = specs.iter().map(|s| s.path.as_path()).collect();
        paths.sort();
        paths.dedup();
        let compiled: HashMap<&Path, Result<Component, String>> = paths
            .iter()
            .copied()
            .zip(
                load_components(&paths)
                    .into_iter()
                    .map(|r| r.map_err(|e| format!("{e:#}"))),
            )
            .collect();
        for spec in specs {
            let started = Instant::now();
            let component = compiled[spec.path.as_path()].clone();
            match component
                .map_err(anyhow::Error::msg)
                .and_then(|c| Plugin::load_compiled(spec, c))
            {
                Ok(p) => {
                    tracing::debug!(plugin = %spec.name, ms = started.elapsed().as_millis() as u64, pre = p.has_pre(), post = p.has_post(), "plugin loaded");
                    by_name.insert(spec.name.clone(), Arc::new(p));
                }
                Err(e) => errors.push((spec.clone(), format!("{e:#}"))),
            }
        }
        if errors.is_empty() {
            Ok(Plugins { by_name })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Gives the memory Cranelift used while compiling back to the system.
/// glibc keeps freed memory in per-thread arenas (compilation runs on
/// several threads), which would otherwise stay in execd's resident set for
/// its whole life.
fn release_compiler_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter as _;

    const MIB: usize = 1 << 20;

    fn limits(cap: usize) -> CallLimits {
        CallLimits {
            each: StoreLimitsBuilder::new()
                .memory_size(cap)
                .trap_on_grow_failure(true)
                .build(),
            memory: 0,
            memory_cap: cap,
        }
    }

    #[test]
    fn the_memory_cap_holds_for_all_memories_together() {
        let mut l = limits(16 * MIB);
        // Two memories of 10 MiB: each under the cap, not both.
        assert!(l.memory_growing(0, 10 * MIB, None).unwrap());
        let err = l.memory_growing(0, 10 * MIB, None).unwrap_err();
        assert!(err.to_string().contains("20971520 bytes in all"), "{err}");
        // The first one grows within what is left, then no further.
        assert!(l.memory_growing(10 * MIB, 16 * MIB, None).unwrap());
        assert!(l.memory_growing(0, 64 * 1024, None).is_err());
        // One memory alone past the cap is refused as before.
        assert!(limits(16 * MIB).memory_growing(0, 17 * MIB, None).is_err());
    }
}
