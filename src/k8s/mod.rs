//! Kubernetes mode, reporting side: VirtualIP status and Events written back from what the
//! engine observes and the dataplane programs. The watchers that feed the planner are a
//! source, beside the manifest files: `crate::source::cluster`.

pub mod departure;
pub mod kube_proxy;
pub mod lease;
pub mod status;
