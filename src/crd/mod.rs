//! The API contract: `VirtualIP` (and later `LoadBalancerPool`) types, their validation, and
//! the manifest reader used by standalone mode.
//!
//! Validation turns a spec into the engines' types ([`ValidSpec`]). Its modules import one
//! way: `validate` uses `check` and `services`, and all of them use `field` (how problems
//! are reported) and `duration`.

mod check;
mod duration;
mod field;
pub mod manifest;
mod pool;
pub mod rbac;
pub mod service_lb;
mod services;
mod validate;
mod virtualip;

pub use check::{CheckKind, CheckProblem, CheckSpec, DEFAULT_EXPECT_STATUS, ValidCheck};
pub use duration::{DurationError, parse_duration};
pub use field::{FieldError, ValidationErrors};
pub use pool::*;
pub use services::{Encapsulation, SCHEDULERS, ServiceMatch, ValidBackends, ValidService};
pub use validate::ValidSpec;
pub use virtualip::*;

use kube::CustomResourceExt;

/// Every CRD of the project, in the order `ferrovip crdgen` writes them.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![VirtualIP::crd(), LoadBalancerPool::crd()]
}

/// The files of `crds/`: (`<group>_<plural>.yaml`, its YAML), in the order of [`all_crds`].
pub fn crd_files() -> Result<Vec<(String, String)>, serde_saphyr::SerializeError> {
    all_crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            Ok((name, format!("---\n{}", serde_saphyr::to_string(&crd)?)))
        })
        .collect()
}

/// Every CRD as one YAML stream (what `ferrovip crdgen` prints).
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    Ok(crd_files()?.into_iter().map(|(_, yaml)| yaml).collect())
}

/// The contract example of the issue (`web`: VRID 51, 100 ms, node-a preferred by 50) with
/// other addresses and VRID, for the tests of every module.
#[cfg(test)]
pub(crate) fn sample_spec(addresses: &[&str], vrid: i64) -> VirtualIPSpec {
    VirtualIPSpec {
        addresses: addresses.iter().map(|s| s.to_string()).collect(),
        allow_wide_prefix: false,
        interface: "eth0".into(),
        virtual_router_id: Some(vrid),
        node_selector: None,
        vrrp: VrrpSpec {
            advertisement_interval: "100ms".into(),
            ..VrrpSpec::default()
        },
        priority: PrioritySpec {
            base: 100,
            preferred_nodes: vec![PreferredNode {
                node_name: "node-a".into(),
                weight: 50,
            }],
            ..PrioritySpec::default()
        },
        services: Vec::new(),
    }
}
