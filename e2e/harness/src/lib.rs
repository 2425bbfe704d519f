//! Test harnesses with real components, for ferrovip's tests and benchmarks only: a
//! dev-dependency of the root package, never part of the shipped library or a release build.
//!
//! - [`apiserver`]: [`ApiServer`] runs a real kube-apiserver (v1.20.2, built by
//!   `e2e/apiserver/build.sh`) with its own etcd, optionally inside a lab's switch namespace,
//!   with an identity per node; [`node_object`] is a lab node's Node as a kubelet registers it.
//! - [`cluster`]: [`cluster::Cluster`] runs a real cluster on top of those: controller-manager,
//!   scheduler and three nodes, each a network namespace with its own containerd and kubelet
//!   (built by `e2e/cluster/build.sh`).
//! - [`vm`]: [`vm::VmRun`] boots the cached Debian kernel and initramfs (`e2e/vm/build.sh`)
//!   under qemu for the tests that need a real IPVS kernel, and the guest-side helpers
//!   (namespaces, bridges, TCP servers) those tests run inside it.
//!
//! The namespace lab itself ([`ferrovip::lab`]) stays in the library: `ferrovip lab` ships it.

pub mod apiserver;
pub mod cluster;
pub mod vm;

pub use apiserver::{
    ADMIN_USER, AGENT_GROUP, APISERVER_ENV, APISERVER_VERSION, ApiServer, ApiServerError,
    ApiServerOptions, ApiUser, SERVICE_ACCOUNT_ISSUER, in_netns, node_object, node_ready_condition,
    node_user,
};
