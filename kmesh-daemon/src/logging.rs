//! The daemon's `tracing` output with levels adjustable at runtime
//! (`/debug/loggers`, `kmeshctl log --set name:level`).
//!
//! Loggers: `default` (everything), one per daemon module (`dataplane`,
//! `writer`, `admin`, `telemetry`, `netns`), and `bpf`: the kernel
//! programs' log statements, switched in the kernel (a disabled statement
//! costs one array read) and forwarded through aya-log into this output.
//! `RUST_LOG`, if set, is the starting filter of `default`.

use std::{collections::BTreeMap, sync::Mutex};

use tracing_subscriber::{filter::LevelFilter, prelude::*, reload, EnvFilter, Registry};

/// Loggers other than `default`: module names under `kmesh_daemon::`.
pub const MODULES: [&str; 5] = ["dataplane", "writer", "admin", "telemetry", "netns"];

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Kernel log level at start: warnings (ring buffer full) and errors.
pub const KERNEL_LOG_DEFAULT: u32 = 2;

/// The kernel's number for a level name (aya-log's numbering, 0 = off).
pub fn kernel_level(level: &str) -> Option<u32> {
    LEVELS
        .iter()
        .position(|l| l.eq_ignore_ascii_case(level))
        .map(|i| i as u32)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("unknown logger {0:?}: known loggers are default, bpf, {modules}", modules = MODULES.join(", "))]
    Name(String),
    #[error("unknown level {0:?}: use one of off, error, warn, info, debug, trace")]
    Level(String),
    #[error("logger \"bpf\": the kernel programs are not loaded yet, so there is no kernel log level to set")]
    Bpf,
    #[error("applying the new filter failed: {0}")]
    Reload(String),
}

/// Current levels and the handle to apply them.
pub struct LogControl {
    levels: Mutex<BTreeMap<String, String>>,
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// Levels by logger name.
    pub fn levels(&self) -> BTreeMap<String, String> {
        self.levels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets one logger's level and applies the whole filter at once.
    ///
    /// For `bpf` this sets the userspace filter of the forwarded kernel
    /// lines (target `kmesh_ebpf`); the caller sets the kernel side.
    pub fn set(&self, name: &str, level: &str) -> Result<(), LogError> {
        if name != "default" && name != "bpf" && !MODULES.contains(&name) {
            return Err(LogError::Name(name.into()));
        }
        let level = level.to_ascii_lowercase();
        if !LEVELS.contains(&level.as_str()) {
            return Err(LogError::Level(level));
        }
        let mut levels = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = levels.clone();
        next.insert(name.into(), level.clone());
        self.handle
            .reload(filter_of(&next))
            .map_err(|e| LogError::Reload(e.to_string()))?;
        *levels = next;
        tracing::info!(logger = name, level, "log level changed");
        Ok(())
    }
}

fn filter_of(levels: &BTreeMap<String, String>) -> EnvFilter {
    let mut spec = levels
        .get("default")
        .cloned()
        .unwrap_or_else(|| "info".into());
    for (name, level) in levels {
        match name.as_str() {
            "default" => {}
            "bpf" => spec.push_str(&format!(",kmesh_ebpf={level}")),
            _ => spec.push_str(&format!(",kmesh_daemon::{name}={level}")),
        }
    }
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber (stderr) and returns its control.
pub fn init() -> LogControl {
    let default = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut levels = BTreeMap::new();
    // A RUST_LOG that is a plain level is the default logger's level; a
    // complex directive applies as given until the first change through
    // /debug/loggers, which rebuilds the filter from the per-logger levels
    // (the default one being the directive's most verbose level).
    let start = EnvFilter::try_new(&default).unwrap_or_else(|_| EnvFilter::new("info"));
    levels.insert(
        "default".to_string(),
        if LEVELS.contains(&default.as_str()) {
            default
        } else {
            start
                .max_level_hint()
                .unwrap_or(LevelFilter::INFO)
                .to_string()
                .to_lowercase()
        },
    );
    let kernel = LEVELS[KERNEL_LOG_DEFAULT as usize].to_string();
    let start = start.add_directive(
        format!("kmesh_ebpf={kernel}")
            .parse()
            .expect("a valid directive"),
    );
    levels.insert("bpf".to_string(), kernel);
    let (filter, handle) = reload::Layer::new(start);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    LogControl {
        levels: Mutex::new(levels),
        handle,
    }
}
