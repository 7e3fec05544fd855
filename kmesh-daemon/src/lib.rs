//! kmesh-rs node agent as a library: the daemon binary and the kernel tests
//! drive the same code.
//!
//! - [`dataplane`]: load the kernel programs, attach them, write the maps;
//! - [`writer`]: the make-before-break, all-or-nothing map update protocol;
//! - [`netns`]: network namespace cookies for enrollment;
//! - [`sys`]: cgroup v2 and bpffs discovery;
//! - [`pinlock`]: one daemon per pin directory;
//! - [`admin`]: the admin HTTP API on 127.0.0.1:15200;
//! - [`telemetry`]: connection events → access log and Istio metrics on :15020;
//! - [`logging`]: tracing output with levels adjustable at runtime.
//! - [`xds`]: the ADS client (and a test control plane).
//! - [`l7`], [`connector`]: HTTP routing decided per request (kernel sk_msg
//!   decision, userspace relay).

pub mod admin;
pub mod authz;
pub mod connector;
pub mod dataplane;
pub mod enroll;
pub mod l7;
pub mod logging;
pub mod netns;
pub mod pinlock;
pub mod sys;
pub mod telemetry;
pub mod writer;
pub mod xds;

/// The daemon's version, as `/version` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
