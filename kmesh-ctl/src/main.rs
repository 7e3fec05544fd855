//! `kmeshctl`: talks to a kmesh-daemon's admin API.
//!
//! This version speaks to a daemon directly (`--admin-addr`, for bare metal
//! and tests); reaching the daemon of a pod's node through the Kubernetes
//! API is not implemented yet.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "kmeshctl",
    version,
    about = "Inspect and control a kmesh-rs daemon"
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
            eprintln!("kmeshctl: {e:#}");
            ExitCode::from(1)
        }
    }
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
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot reach the daemon's admin API at {addr} (is kmesh-daemon running? pass --admin-addr)"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kmesh\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    if code != "200" {
        bail!("{path}: HTTP {code}: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("{path}: answer is not JSON"))
}
