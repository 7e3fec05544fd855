//! `cargo xtask <task>`: everything a developer or CI runs.
//!
//! - `setup`: install the toolchain pieces the eBPF build needs (idempotent)
//! - `build`: build the daemon (and with it the kernel programs), kmeshctl, test pods
//! - `test`: setup, fmt, clippy, then every test, kernel tests included (root)
//! - `demo`: a sandbox node with pods, the daemon on the embedded mesh,
//!   traffic, a table of where connections went, teardown
//! - `bench`: kmesh-rs against no mesh and Envoy, kernel cost per connect,
//!   config scale; writes its section of BENCHMARKS.md (see `bench/mod.rs`)

mod bench;
mod demo;
mod demo_dual;
mod setup;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{bail, Context};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build") => setup::run().and_then(|()| build()),
        Some("test") => test(),
        Some("demo") => demo::run().and_then(|()| demo_dual::run()),
        Some("bench") => bench::run(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <setup|build|test|demo|bench>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Where cargo puts debug binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debug")
}

pub fn step(msg: &str) {
    eprintln!("\n==> {msg}");
}

/// Runs a command in the workspace root, failing with its name.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn build() -> anyhow::Result<()> {
    step("building kmesh-daemon (and the eBPF programs), kmeshctl, kmesh-testpod");
    run_cmd(cargo().args([
        "build",
        "--locked",
        "-p",
        "kmesh-daemon",
        "-p",
        "kmesh-ctl",
        "-p",
        "bpf-tests",
        "--bins",
    ]))
}

fn test() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the kernel tests need root (namespaces, cgroups, BPF): run `sudo -E cargo xtask test`"
        );
    }
    setup::run()?;
    // The observability test scrapes a real daemon with a real Prometheus.
    step("checking Prometheus for the dashboard test");
    setup::ensure_debian(&[("prometheus", "prometheus"), ("promtool", "prometheus")])?;
    step("Envoy for the xDS fixture tests (a real xDS client)");
    let envoy = setup::ensure_envoy()?;
    step("cargo fmt --check");
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    build()?;
    step("cargo clippy --all-targets -- -D warnings");
    run_cmd(cargo().args([
        "clippy",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The bench code is behind a feature; lint it too so it cannot rot.
    run_cmd(cargo().args([
        "clippy",
        "--locked",
        "-p",
        "xtask",
        "--features",
        "bench",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    validate_manifests()?;
    step("unit tests, then kernel tests (bpf-tests: real sockets in network namespaces)");
    run_cmd(
        cargo()
            .args(["test", "--locked", "--workspace"])
            .env("KMESH_TEST_ENVOY", &envoy),
    )?;
    eprintln!("\nall tests passed");
    Ok(())
}

/// Validates `deploy/*.yaml` offline against the Kubernetes schema (strict:
/// unknown fields fail), after checking on a broken copy that the validator
/// really rejects what it should.
fn validate_manifests() -> anyhow::Result<()> {
    step("validating Kubernetes manifests (kubernetes-validate --strict)");
    let validator = setup::ensure_venv_tool("kubernetes-validate==1.37.0", "kubernetes-validate")?;
    let manifests: Vec<PathBuf> = std::fs::read_dir(root().join("deploy"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    anyhow::ensure!(!manifests.is_empty(), "no manifests in deploy/");
    run_cmd(
        Command::new(&validator)
            .args(["--strict", "--quiet"])
            .args(&manifests),
    )?;
    let broken = std::env::temp_dir().join(format!("kmesh-broken-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(root().join("deploy/kmesh.yaml"))?;
    std::fs::write(
        &broken,
        text.replacen("priorityClassName:", "priorityClassNmae:", 1),
    )?;
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .arg(&broken)
        .output()?;
    let _ = std::fs::remove_file(&broken);
    anyhow::ensure!(
        !out.status.success(),
        "kubernetes-validate accepted a manifest with an unknown field: the check is not checking"
    );
    eprintln!(
        "    {} manifest file(s) valid; a broken copy was rejected",
        manifests.len()
    );
    Ok(())
}
