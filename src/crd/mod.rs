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
mod services;
mod validate;
mod virtualip;

pub use check::{CheckKind, CheckProblem, CheckSpec, DEFAULT_EXPECT_STATUS, ValidCheck};
pub use duration::{DurationError, parse_duration};
pub use field::{FieldError, ValidationErrors};
pub use services::{Encapsulation, SCHEDULERS, ServiceMatch, ValidBackends, ValidService};
pub use validate::ValidSpec;
pub use virtualip::*;

use kube::CustomResourceExt;

/// Every CRD of the project, in the order `ferrovip crdgen` writes them.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![VirtualIP::crd()]
}

/// The YAML that `ferrovip crdgen` writes to `crds/` (one document per CRD).
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
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
