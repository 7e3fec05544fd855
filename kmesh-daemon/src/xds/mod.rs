//! The xDS (ADS) client: subscribes to a control plane (Istiod or the test
//! fixture), keeps the last good version of every resource, and writes each
//! accepted update to the kernel through the adapter and
//! [`crate::dataplane::Dataplane::apply`] (all-or-nothing,
//! make-before-break).
//!
//! - [`client`]: the ADS stream (state of the world and delta), warming
//!   order, ACK/NACK, reconnect with backoff;
//! - [`store`]: the held resources, per-resource checks, removal rules;
//! - [`node`]: the Istio sidecar node id and metadata;
//! - [`workload`]: the workload API client of dual-engine mode (delta
//!   ADS for `istio.workload.Address` and `istio.security.Authorization`);
//! - [`fixture`]: an in-process ADS server for tests.

pub mod client;
pub mod fixture;
pub mod node;
pub mod store;
pub mod workload;

use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::Name;

pub use client::{run, ClientOptions, SharedStatus, Sink, XdsStatus};
pub use node::NodeIdentity;

/// Wraps a message as an `Any` with its type URL.
pub fn to_any<M: prost::Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The daemon's sink: writes to the loaded dataplane and publishes the
/// config for the admin API.
pub struct DataplaneSink {
    pub state: Arc<crate::admin::AdminState>,
}

impl Sink for DataplaneSink {
    fn apply(&mut self, compiled: &xds_adapter::Compiled, _: &store::Store) -> Result<(), String> {
        let mut dp = self
            .state
            .dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(dp) = dp.as_mut() else {
            return Err("the dataplane is not loaded".into());
        };
        let t = std::time::Instant::now();
        let applied = dp.apply(&compiled.flat);
        crate::telemetry::record_config_apply(applied.is_ok());
        let summary = applied.map_err(|e| e.to_string())?;
        if let Some(c) = self.state.l7.get() {
            c.update(&compiled.flat.l7).map_err(|e| e.to_string())?;
        }
        // Metric labels (service names by VIP and backend) follow the config.
        // Incremental updates (apply_services) redo this O(services) step
        // only when services come or go; a backend added by an endpoint
        // change is labelled on the next such update.
        if let Some(tel) = self.state.telemetry.get() {
            tel.set_config(&compiled.flat);
        }
        tracing::info!(
            added = summary.added,
            changed = summary.changed,
            removed = summary.removed,
            slots = summary.slots_written,
            excluded = compiled.excluded.len(),
            micros = t.elapsed().as_micros() as u64,
            "xDS update written to the kernel"
        );
        *self.state.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(compiled.flat.clone());
        // Ready once the first control-plane config is in the kernel.
        // (apply_services only ever follows an apply.)
        self.state
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn apply_services(
        &mut self,
        compiled: &xds_adapter::Compiled,
        vips: &[std::net::SocketAddr],
        _: &store::Store,
    ) -> Result<(), String> {
        let mut dp = self
            .state
            .dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(dp) = dp.as_mut() else {
            return Err("the dataplane is not loaded".into());
        };
        let t = std::time::Instant::now();
        let summary = dp
            .apply_services(&compiled.flat, vips)
            .map_err(|e| e.to_string())?;
        tracing::debug!(
            added = summary.added,
            changed = summary.changed,
            removed = summary.removed,
            slots = summary.slots_written,
            micros = t.elapsed().as_micros() as u64,
            "xDS incremental update written to the kernel"
        );
        // Metric labels follow the set of services (O(services): only when
        // services come or go, not for endpoint changes).
        if summary.added + summary.removed > 0 {
            if let Some(tel) = self.state.telemetry.get() {
                tel.set_config(&compiled.flat);
            }
        }
        let mut cfg = self.state.config.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cfg) = cfg.as_mut() {
            for v in vips {
                match compiled.flat.services.get(v) {
                    Some(s) => {
                        cfg.services.insert(*v, s.clone());
                    }
                    None => {
                        cfg.services.remove(v);
                    }
                }
            }
            if summary.added + summary.removed > 0 {
                cfg.warnings.clone_from(&compiled.flat.warnings);
            }
        }
        Ok(())
    }
}

impl workload::WorkloadSink for DataplaneSink {
    /// Authorization first, then routing: a new endpoint is protected by
    /// its policies before any connect is sent to it.
    fn apply(&mut self, de: &xds_adapter::workload::DualEngineConfig) -> Result<(), String> {
        {
            let mut dual = self
                .state
                .dual_engine
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let Some(dual) = dual.as_mut() else {
                return Err("the authorization tables are not loaded".into());
            };
            dual.authz.write(&de.authz).map_err(|e| e.to_string())?;
            dual.config = de.config.clone();
        }
        let mut dp = self
            .state
            .dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(dp) = dp.as_mut() else {
            return Err("the dataplane is not loaded".into());
        };
        let applied = dp.apply(&de.flat);
        crate::telemetry::record_config_apply(applied.is_ok());
        applied.map_err(|e| e.to_string())?;
        if let Some(tel) = self.state.telemetry.get() {
            tel.set_config(&de.flat);
        }
        *self.state.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(de.flat.clone());
        self.state
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
