//! Kernel dataplane: virtual addresses (rtnetlink), virtual services (IPVS over generic
//! netlink) and the nftables rules their return path needs.
//!
//! Virtual services go through the [`Dataplane`] trait: the agent hands it the whole desired
//! [`service::ServiceSet`] every time, and the implementation writes only the difference. IPVS
//! is the implementation today; an nftables one (kube-proxy's IPVS mode is deprecated) fits
//! the same trait.

pub mod ipvs;
pub mod kube_proxy;
pub mod nft;
pub mod setup;
pub mod sysctl;
pub mod worker;

use std::future::Future;

use crate::model::service::{ServiceKey, ServiceSet};

/// Converges the kernel's virtual services to a desired set.
pub trait Dataplane: Send {
    /// Short name for logs, status and metric labels (`ipvs`, `nftables`).
    fn name(&self) -> &'static str;

    /// Makes the kernel forward exactly `desired`, as far as this node owns it: reads the
    /// kernel once (adopting what an earlier run created), then writes only the difference.
    /// Applying the same set twice writes nothing. One failing service never stops the
    /// others; failures are reported for a later retry.
    fn apply(&mut self, desired: &ServiceSet) -> impl Future<Output = ApplyReport> + Send;

    /// Forgets what is known of the kernel, so that the next apply reads it again and repairs
    /// changes made behind the agent's back.
    fn invalidate(&mut self);
}

/// The outcome of one [`Dataplane::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Set when the dataplane cannot run at all (e.g. no IPVS in the kernel); nothing else
    /// in the report is meaningful then.
    pub unavailable: Option<String>,
    /// Set when the kernel's tables could not be read this time (retried); nothing was
    /// changed then.
    pub error: Option<ApplyError>,
    /// Write requests sent to the kernel.
    pub writes: u64,
    /// Services and backends this node has programmed after the apply.
    pub services: usize,
    pub backends: usize,
    /// Services that did not converge; retried later.
    pub failures: Vec<ServiceFailure>,
}

impl ApplyReport {
    pub fn result_label(&self) -> &'static str {
        if self.unavailable.is_some() {
            "unavailable"
        } else if self.error.is_some() {
            "error"
        } else if self.failures.is_empty() {
            "ok"
        } else {
            "partial"
        }
    }

    /// Whether retrying can help soon (some failure is transient).
    pub fn retry_soon(&self) -> bool {
        self.failures.iter().any(|f| f.transient)
    }

    /// Whether something is left to converge.
    pub fn incomplete(&self) -> bool {
        self.error.is_some() || !self.failures.is_empty()
    }
}

/// A failure of the whole apply, not of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    pub message: String,
    /// A bounded label for metrics.
    pub reason: &'static str,
}

/// One service that failed to converge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFailure {
    pub key: ServiceKey,
    /// The VirtualIP the service belongs to.
    pub owner: String,
    /// What failed, in words (names the object and the kernel's error).
    pub error: String,
    /// A bounded label for metrics.
    pub reason: &'static str,
    pub transient: bool,
}
