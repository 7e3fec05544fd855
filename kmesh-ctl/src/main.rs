//! `kmeshctl`: talks to a kmesh-daemon's admin API.
//!
//! This version speaks to a daemon directly (`--admin-addr`, for bare metal
//! and tests); reaching the daemon of a pod's node through the Kubernetes
//! API (port-forward with the `kube` crate) is not implemented yet.
//!
//! Exit codes: 0 done; 1 the daemon cannot be reached or answered
//! something unreadable; 2 bad usage; 3 the daemon refused the request
//! (its message is printed); 4 the daemon does not support it.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "kmeshctl",
    version,
    about = "Inspect and control a kmesh-rs daemon",
    after_help = "Talks to one daemon's admin API (--admin-addr). Selecting the daemon of a \
Kubernetes pod's node by pod name (port-forward) is not implemented yet.\n\
Exit codes: 0 done, 1 daemon unreachable, 2 bad usage, 3 refused by the daemon, 4 not supported by the daemon."
)]
struct Cli {
    /// The daemon's admin API.
    #[arg(
        long,
        global = true,
        env = "KMESH_ADMIN_ADDR",
        default_value = "127.0.0.1:15200"
    )]
    admin_addr: SocketAddr,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Versions of kmeshctl and of the daemon.
    Version,
    /// What the daemon holds, or (`--bpf`) what the kernel maps hold.
    Dump {
        #[arg(value_enum, default_value = "kernel-native")]
        mode: DumpMode,
        /// Read back from the kernel maps instead of the daemon's config.
        #[arg(long)]
        bpf: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show the daemon's log levels, or set one (`--set telemetry:debug`).
    Log {
        /// Show only this logger.
        name: Option<String>,
        /// NAME:LEVEL, e.g. default:debug; levels off|error|warn|info|debug|trace.
        #[arg(long, value_name = "NAME:LEVEL")]
        set: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Switch the access log (one line per closed connection, in the daemon's output).
    Accesslog {
        #[arg(value_enum)]
        action: Switch,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Switch connection tracking in the kernel (feeds metrics and access log).
    Monitoring {
        #[arg(value_enum)]
        action: Switch,
        /// With `enable`: also enable the access log.
        #[arg(long)]
        accesslog: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Authorization switch (not supported by this daemon version: says so).
    Authz {
        #[arg(value_enum)]
        action: Switch,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(ValueEnum, Clone, Copy, PartialEq)]
enum Switch {
    Enable,
    Disable,
    Status,
}

impl Switch {
    /// The query of a POST, or None for a status GET.
    fn query(self) -> Option<&'static str> {
        match self {
            Switch::Enable => Some("?enable=true"),
            Switch::Disable => Some("?enable=false"),
            Switch::Status => None,
        }
    }
}

/// Failures with their exit code.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unsupported(String),
}

impl CtlError {
    fn code(&self) -> u8 {
        match self {
            CtlError::Unreachable(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Refused(_) => 3,
            CtlError::Unsupported(_) => 4,
        }
    }
}

#[derive(ValueEnum, Clone, Copy)]
enum DumpMode {
    KernelNative,
    /// Workloads, services and policies (`--bpf`: authorization maps and
    /// decision counters); printed as JSON.
    DualEngine,
}

#[derive(ValueEnum, Clone, Copy, PartialEq)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<CtlError>() {
                Some(c) => c.code(),
                None => 1,
            };
            eprintln!("kmeshctl: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `{"accesslog":bool,"monitoring":bool}` or `{"enabled":bool}` as a table.
fn print_switches(what: &str, v: &serde_json::Value) {
    println!("{:<12} STATE", "SWITCH");
    let show = |b: &serde_json::Value| match b.as_bool() {
        Some(true) => "enabled",
        Some(false) => "disabled",
        None => "?",
    };
    if let Some(e) = v.get("enabled") {
        println!("{what:<12} {}", show(e));
    }
    for k in ["monitoring", "accesslog"] {
        if let Some(e) = v.get(k) {
            println!("{k:<12} {}", show(e));
        }
    }
}

fn switch(
    addr: SocketAddr,
    path: &str,
    action: Switch,
    output: Output,
) -> anyhow::Result<serde_json::Value> {
    let v = match action.query() {
        Some(q) => request(addr, "POST", &format!("{path}{q}"), None)?,
        None => request(addr, "GET", path, None)?,
    };
    if output == Output::Json {
        print_json(&v)?;
    } else {
        print_switches(path.trim_start_matches('/'), &v);
    }
    Ok(v)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Version => {
            println!("kmeshctl {}", env!("CARGO_PKG_VERSION"));
            match get(cli.admin_addr, "/version") {
                Ok(v) => println!(
                    "daemon   {} (abi {})",
                    v["version"].as_str().unwrap_or("?"),
                    v["abi_version"]
                ),
                Err(e) => println!("daemon   unreachable: {e:#}"),
            }
            Ok(())
        }
        Cmd::Dump {
            mode: DumpMode::DualEngine,
            bpf,
            ..
        } => {
            let path = if *bpf {
                "/debug/config_dump/bpf/dual-engine"
            } else {
                "/debug/config_dump/dual-engine"
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&get(cli.admin_addr, path)?)?
            );
            Ok(())
        }
        Cmd::Dump {
            mode: DumpMode::KernelNative,
            bpf,
            output,
        } => {
            let path = if *bpf {
                "/debug/config_dump/bpf/kernel-native"
            } else {
                "/debug/config_dump/kernel-native"
            };
            let v = get(cli.admin_addr, path)?;
            if *output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_services(&v);
            }
            Ok(())
        }
        Cmd::Log { name, set, output } => {
            let v = match set {
                Some(spec) => {
                    let Some((n, level)) = spec.split_once(':') else {
                        bail!(CtlError::Usage(format!(
                            "--set {spec:?}: expected NAME:LEVEL, e.g. default:debug"
                        )));
                    };
                    let body = serde_json::json!({"name": n, "level": level});
                    request(cli.admin_addr, "POST", "/debug/loggers", Some(&body))?
                }
                None => request(cli.admin_addr, "GET", "/debug/loggers", None)?,
            };
            let shown: serde_json::Map<String, serde_json::Value> = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| name.as_ref().is_none_or(|n| n == *k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(n) = name {
                if shown.is_empty() {
                    bail!(CtlError::Refused(format!(
                        "no logger {n:?}; known: {} (selecting a daemon by pod name is not implemented yet: use --admin-addr)",
                        v.as_object()
                            .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                            .unwrap_or_default()
                    )));
                }
            }
            if *output == Output::Json {
                print_json(&serde_json::Value::Object(shown))?;
            } else {
                println!("{:<12} LEVEL", "LOGGER");
                for (k, l) in &shown {
                    println!("{k:<12} {}", l.as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
        Cmd::Accesslog { action, output } => {
            switch(cli.admin_addr, "/accesslog", *action, *output).map(|_| ())
        }
        Cmd::Monitoring {
            action,
            accesslog,
            output,
        } => {
            if *accesslog && *action != Switch::Enable {
                bail!(CtlError::Usage(
                    "--accesslog goes with `monitoring enable` (disabling monitoring disables the access log too)".into()
                ));
            }
            if *accesslog {
                request(cli.admin_addr, "POST", "/monitoring?enable=true", None)?;
                switch(cli.admin_addr, "/accesslog", Switch::Enable, *output).map(|_| ())
            } else {
                switch(cli.admin_addr, "/monitoring", *action, *output).map(|_| ())
            }
        }
        Cmd::Authz { action, output } => {
            switch(cli.admin_addr, "/authz", *action, *output).map(|_| ())
        }
    }
}

/// One table row per service: VIP, LB policy, slots (or endpoints).
fn print_services(v: &serde_json::Value) {
    let services: Vec<&serde_json::Value> = match &v["services"] {
        serde_json::Value::Array(a) => a.iter().collect(),
        serde_json::Value::Object(o) => o.values().collect(),
        _ => Vec::new(),
    };
    println!(
        "{:<26} {:<12} {:<12} BACKENDS (one per slot)",
        "VIP", "NAME", "LB"
    );
    for s in services {
        let lb = match &s["lb_policy"] {
            serde_json::Value::String(x) => x.clone(),
            serde_json::Value::Number(n) if n.as_u64() == Some(1) => "RANDOM".into(),
            _ => "ROUND_ROBIN".into(),
        };
        let slots: Vec<String> = s["slots"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<26} {:<12} {:<12} {}",
            s["vip"].as_str().unwrap_or("?"),
            s["listener"].as_str().unwrap_or("-"),
            lb,
            slots.join(", ")
        );
    }
}

fn get(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    request(addr, "GET", path, None)
}

/// One HTTP/1.1 request to the admin API; a JSON answer, or a [`CtlError`]
/// carrying the daemon's own message.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| {
        CtlError::Unreachable(anyhow::anyhow!(
            "cannot reach the daemon's admin API at {addr}: {e} (is kmesh-daemon running? pass --admin-addr or set KMESH_ADMIN_ADDR)"
        ))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kmesh\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| CtlError::Unreachable(anyhow::anyhow!("{path}: reading the answer: {e}")))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    let message = || {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string())
    };
    match code {
        "200" => {}
        "501" => bail!(CtlError::Unsupported(format!("{path}: {}", message()))),
        "404" => bail!(CtlError::Unsupported(format!(
            "{path}: the daemon does not know this endpoint (older daemon version?)"
        ))),
        _ => bail!(CtlError::Refused(format!(
            "{path}: HTTP {code}: {}",
            message()
        ))),
    }
    serde_json::from_str(body).map_err(|_| {
        CtlError::Unreachable(anyhow::anyhow!(
            "{path}: answer is not JSON: {}",
            body.trim()
        ))
        .into()
    })
}
