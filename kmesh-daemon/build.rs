//! Builds the kernel programs (`../kmesh-ebpf`, nightly + bpf-linker) and
//! leaves the object in OUT_DIR, where `src/bpf.rs` embeds it.
//!
//! `KMESH_EBPF_OBJECT=<path>` skips the build and embeds a prebuilt object
//! (for packaging, or hosts without the nightly toolchain).
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("kmesh-ebpf.o");
    let workspace = manifest.parent().unwrap().to_path_buf();
    let ebpf = workspace.join("kmesh-ebpf");
    for p in [
        "kmesh-ebpf/src",
        "kmesh-ebpf/Cargo.toml",
        "kmesh-ebpf/Cargo.lock",
        "kmesh-ebpf/.cargo/config.toml",
        "kmesh-abi/src",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=KMESH_EBPF_OBJECT");

    if let Some(prebuilt) = env::var_os("KMESH_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &out)
            .unwrap_or_else(|e| panic!("KMESH_EBPF_OBJECT={prebuilt:?} cannot be copied: {e}"));
        return;
    }

    // One target dir shared by debug and release host builds: the kernel
    // object is always built optimised, so there is nothing to rebuild when
    // only the host profile changes.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("kmesh-ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf);
    // The outer cargo's settings describe the host build, not this one.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(&*k);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo build` for the eBPF programs: {e}; run `cargo xtask setup` first")
    });
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status}); if the nightly toolchain, rust-src or bpf-linker is missing, run `cargo xtask setup`",
            ebpf.display()
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/kmesh-ebpf");
    std::fs::copy(&built, &out)
        .unwrap_or_else(|e| panic!("eBPF object {} missing after build: {e}", built.display()));
}
