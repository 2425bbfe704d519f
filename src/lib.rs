//! ferrovip: highly available virtual IPs for bare-metal Kubernetes.
//!
//! Data flow (see `ARCHITECTURE.md`): sources (manifest files or the Kubernetes API) produce a
//! [`model::Snapshot`]; the pure [`model::plan`] turns it into the desired VRRP instances of one
//! node; the [`vrrp`] engine runs them and the [`dataplane`] converges the kernel.

pub mod agent;
pub mod controller;
pub mod crd;
pub mod dataplane;
pub mod driver;
pub mod engine;
pub mod health;
pub mod ipam;
pub mod k8s;
pub mod lab;
pub mod metrics;
pub mod model;
pub mod node;
pub mod source;
pub mod staticpod;
pub mod vocab;
pub mod vrrp;
