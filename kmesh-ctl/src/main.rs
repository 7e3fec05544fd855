//! `kmeshctl`: talks to a kmesh-daemon's admin API.
//!
//! The daemon is reached directly (`--admin-addr`, for bare metal and
//! tests) or, given a pod name or `--node`, through the Kubernetes API: the
//! kmesh pod of that node is looked up and its admin port forwarded
//! (`pod.rs`). Without either, the local daemon at 127.0.0.1:15200.
//!
//! Exit codes: 0 done; 1 the daemon cannot be reached or answered
//! something unreadable; 2 bad usage; 3 the daemon refused the request
//! (its message is printed); 4 the daemon does not support it; 5 no such
//! pod, no kmesh pod on that node, or it is not running; 6 the Kubernetes
//! API cannot be used (no kubeconfig, credentials, RBAC, unreachable).
#![forbid(unsafe_code)]

mod pod;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The admin API of a daemon on this host, when nothing else is named.
const LOCAL_ADMIN: &str = "127.0.0.1:15200";

#[derive(Parser)]
#[command(
    name = "kmeshctl",
    version,
    about = "Inspect and control a kmesh-rs daemon",
    after_help = "Which daemon: POD (a kmesh pod, or NAMESPACE/NAME of any pod: the kmesh pod of its \
node), or --node NODE, reached by port-forward through the Kubernetes API (kubeconfig from \
KUBECONFIG, ~/.kube/config or in-cluster; needs get/list pods and create pods/portforward); or \
--admin-addr ADDR directly (then there is no POD argument). Neither: the local daemon at 127.0.0.1:15200.\n\
Exit codes: 0 done, 1 daemon unreachable, 2 bad usage, 3 refused by the daemon, 4 not supported \
by the daemon, 5 pod or kmesh pod not found or not running, 6 Kubernetes API unusable (no \
kubeconfig, credentials, RBAC forbidden, API server unreachable)."
)]
struct Cli {
    /// The daemon's admin API, reached directly.
    #[arg(long, global = true, env = "KMESH_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// The kmesh pod on this Kubernetes node.
    #[arg(long, global = true)]
    node: Option<String>,
    /// Namespace of the kmesh pods.
    #[arg(
        long,
        global = true,
        env = "KMESH_NAMESPACE",
        default_value = "kmesh-system"
    )]
    kmesh_namespace: String,
    /// Label selector of the kmesh pods.
    #[arg(long, global = true, default_value = "app=kmesh")]
    kmesh_selector: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Versions of kmeshctl and of the daemon.
    Version { pod: Option<String> },
    /// What the daemon holds, or (`--bpf`) what the kernel maps hold.
    Dump {
        pod: Option<String>,
        /// [default: kernel-native]
        #[arg(value_enum)]
        mode: Option<DumpMode>,
        /// Read back from the kernel maps instead of the daemon's config.
        #[arg(long)]
        bpf: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show the daemon's log levels, or set one (`--set telemetry:debug`).
    Log {
        /// With --admin-addr or --node there is no POD: the first argument is NAME.
        pod: Option<String>,
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
        pod: Option<String>,
        #[arg(value_enum)]
        action: Option<Switch>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Switch connection tracking in the kernel (feeds metrics and access log).
    Monitoring {
        pod: Option<String>,
        #[arg(value_enum)]
        action: Option<Switch>,
        /// With `enable`: also enable the access log.
        #[arg(long)]
        accesslog: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Authorization switch (dual-engine mode).
    Authz {
        pod: Option<String>,
        #[arg(value_enum)]
        action: Option<Switch>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// `[POD] VALUE` where POD is optional: a lone argument that is a VALUE is
/// the value, not a pod name.
fn pod_and<T: ValueEnum>(pod: &Option<String>, v: Option<T>) -> (Option<String>, Option<T>) {
    match (pod, v) {
        (Some(p), None) => match T::from_str(p, true) {
            Ok(t) => (None, Some(t)),
            Err(_) => (Some(p.clone()), None),
        },
        (p, v) => (p.clone(), v),
    }
}

/// Which daemon the command talks to.
enum Target {
    Direct(SocketAddr),
    Pod(pod::KmeshPod),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Direct(a) => format!("the daemon's admin API at {a}"),
            Target::Pod(p) => format!("the daemon of {}", p.describe()),
        }
    }
}

impl Cli {
    /// Whether the command line leaves no POD slot (the daemon is named otherwise).
    fn pod_slot(&self) -> bool {
        self.admin_addr.is_none() && self.node.is_none()
    }

    async fn target(&self, pod: Option<&str>) -> anyhow::Result<Target> {
        let pods = || pod::KmeshPods {
            namespace: self.kmesh_namespace.clone(),
            selector: self.kmesh_selector.clone(),
        };
        Ok(match (self.admin_addr, self.node.as_deref(), pod) {
            (Some(_), Some(_), _) => bail!(CtlError::Usage(
                "--admin-addr and --node name two different daemons: give one".into()
            )),
            (Some(_), None, Some(p)) | (None, Some(_), Some(p)) => bail!(CtlError::Usage(format!(
                "unexpected argument {p:?}: a pod name goes without --admin-addr/--node (or KMESH_ADMIN_ADDR)"
            ))),
            (Some(a), None, None) => Target::Direct(a),
            (None, Some(n), None) => Target::Pod(pods().resolve(pod::Which::Node(n)).await?),
            (None, None, Some(p)) => Target::Pod(pods().resolve(pod::Which::Pod(p)).await?),
            (None, None, None) => Target::Direct(LOCAL_ADMIN.parse().expect("constant")),
        })
    }
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
pub(crate) enum CtlError {
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Kubernetes(String),
}

impl CtlError {
    fn code(&self) -> u8 {
        match self {
            CtlError::Unreachable(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Refused(_) => 3,
            CtlError::Unsupported(_) => 4,
            CtlError::NotFound(_) => 5,
            CtlError::Kubernetes(_) => 6,
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
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(&cli)));
    match result {
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

async fn switch(
    t: &Target,
    path: &str,
    action: Switch,
    output: Output,
) -> anyhow::Result<serde_json::Value> {
    let v = match action.query() {
        Some(q) => request(t, "POST", &format!("{path}{q}"), None).await?,
        None => request(t, "GET", path, None).await?,
    };
    if output == Output::Json {
        print_json(&v)?;
    } else {
        print_switches(path.trim_start_matches('/'), &v);
    }
    Ok(v)
}

/// The action of a switch command, which is not optional.
fn action_of(
    cli: &Cli,
    pod: &Option<String>,
    action: Option<Switch>,
) -> anyhow::Result<(Option<String>, Switch)> {
    let (pod, action) = pod_and(pod, action);
    match action {
        Some(a) => Ok((pod, a)),
        None => bail!(CtlError::Usage(format!(
            "missing the action: enable, disable or status{}",
            if cli.pod_slot() {
                " (after the pod name)"
            } else {
                ""
            }
        ))),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Version { pod } => {
            println!("kmeshctl {}", env!("CARGO_PKG_VERSION"));
            let t = cli.target(pod.as_deref()).await?;
            match request(&t, "GET", "/version", None).await {
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
            pod,
            mode,
            bpf,
            output,
        } => {
            let (pod, mode) = pod_and(pod, *mode);
            let t = cli.target(pod.as_deref()).await?;
            let (path, table) = match (mode.unwrap_or(DumpMode::KernelNative), *bpf) {
                (DumpMode::KernelNative, false) => ("/debug/config_dump/kernel-native", true),
                (DumpMode::KernelNative, true) => ("/debug/config_dump/bpf/kernel-native", true),
                (DumpMode::DualEngine, false) => ("/debug/config_dump/dual-engine", false),
                (DumpMode::DualEngine, true) => ("/debug/config_dump/bpf/dual-engine", false),
            };
            let v = request(&t, "GET", path, None).await?;
            if table && *output == Output::Table {
                print_services(&v);
            } else {
                print_json(&v)?;
            }
            Ok(())
        }
        Cmd::Log {
            pod,
            name,
            set,
            output,
        } => {
            // Without a POD slot the one positional is the logger name.
            let (pod, name) = match (cli.pod_slot(), pod, name) {
                (true, p, n) => (p.clone(), n.clone()),
                (false, p, None) => (None, p.clone()),
                (false, Some(p), Some(n)) => bail!(CtlError::Usage(format!(
                    "unexpected argument {n:?} after logger {p:?} (no pod name with --admin-addr/--node)"
                ))),
                (false, None, Some(_)) => unreachable!("clap fills positionals in order"),
            };
            let t = cli.target(pod.as_deref()).await?;
            let v = match set {
                Some(spec) => {
                    let Some((n, level)) = spec.split_once(':') else {
                        bail!(CtlError::Usage(format!(
                            "--set {spec:?}: expected NAME:LEVEL, e.g. default:debug"
                        )));
                    };
                    let body = serde_json::json!({"name": n, "level": level});
                    request(&t, "POST", "/debug/loggers", Some(&body)).await?
                }
                None => request(&t, "GET", "/debug/loggers", None).await?,
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
            if let Some(n) = &name {
                if shown.is_empty() {
                    bail!(CtlError::Refused(format!(
                        "no logger {n:?} in {}; known: {}",
                        t.describe(),
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
        Cmd::Accesslog {
            pod,
            action,
            output,
        }
        | Cmd::Authz {
            pod,
            action,
            output,
        } => {
            let path = match &cli.command {
                Cmd::Accesslog { .. } => "/accesslog",
                _ => "/authz",
            };
            let (pod, action) = action_of(cli, pod, *action)?;
            let t = cli.target(pod.as_deref()).await?;
            switch(&t, path, action, *output).await.map(|_| ())
        }
        Cmd::Monitoring {
            pod,
            action,
            accesslog,
            output,
        } => {
            let (pod, action) = action_of(cli, pod, *action)?;
            if *accesslog && action != Switch::Enable {
                bail!(CtlError::Usage(
                    "--accesslog goes with `monitoring enable` (disabling monitoring disables the access log too)".into()
                ));
            }
            let t = cli.target(pod.as_deref()).await?;
            if *accesslog {
                request(&t, "POST", "/monitoring?enable=true", None).await?;
                switch(&t, "/accesslog", Switch::Enable, *output)
                    .await
                    .map(|_| ())
            } else {
                switch(&t, "/monitoring", action, *output).await.map(|_| ())
            }
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

/// One HTTP/1.1 request to the admin API; a JSON answer, or a [`CtlError`]
/// carrying the daemon's own message.
async fn request(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let resp = match t {
        Target::Direct(addr) => {
            let unreachable = |e: String| {
                CtlError::Unreachable(anyhow::anyhow!(
                    "cannot reach the daemon's admin API at {addr}: {e} (is kmesh-daemon running? pass --admin-addr or set KMESH_ADMIN_ADDR)"
                ))
            };
            let s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
            exchange(s, method, path, body).await
        }
        Target::Pod(p) => exchange(p.connect().await?, method, path, body)
            .await
            .map_err(|e| {
                CtlError::Unreachable(anyhow::anyhow!(
                    "{e:#} (through the port-forward to {}: is its daemon serving the admin API on 127.0.0.1:{}?)",
                    p.describe(),
                    pod::ADMIN_PORT
                ))
                .into()
            }),
    }?;
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

/// Writes the request and reads the response: the head, then
/// `Content-Length` bytes (or up to EOF without one). Not relying on EOF
/// matters through a port-forward, whose stream may stay open after the
/// daemon closed its side.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: kmesh\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let io = async {
        s.write_all(req.as_bytes()).await?;
        s.flush().await?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head.lines().find_map(|l| {
                    l.strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                });
                if len.is_some_and(|n| buf.len() >= end + 4 + n) {
                    break;
                }
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| CtlError::Unreachable(anyhow::anyhow!("{path}: no answer in 10 s")))?
        .map_err(|e| CtlError::Unreachable(anyhow::anyhow!("{path}: {e}")))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
