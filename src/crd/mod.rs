//! The API contract: `VirtualIP` (and later `LoadBalancerPool`) types, their validation, and
//! the manifest reader used by standalone mode.

mod duration;
pub mod manifest;
mod validate;
mod virtualip;

pub use duration::{DurationError, parse_duration};
pub use validate::{CheckKind, FieldError, ValidCheck, ValidSpec, ValidationErrors};
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
