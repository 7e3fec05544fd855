//! Which pods of this node kmesh-rs manages, and their network namespaces.
//!
//! - [`policy`]: the enrollment rule (Istio's `istio.io/dataplane-mode`
//!   label on a namespace or pod), pure;
//! - [`locate`]: a pod's network namespace on the host, found from the pod
//!   UID in `/proc/<pid>/cgroup`;
//! - [`kubernetes`]: watches pods of this node and all namespaces and keeps
//!   the kernel's enrolled set equal to the rule's answer.

pub mod kubernetes;
pub mod locate;
pub mod policy;
