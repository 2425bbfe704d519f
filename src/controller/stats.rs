//! What the Service controller counts, read by the metrics endpoint at scrape time
//! (`crate::metrics` exports it; nothing here knows Prometheus' registry).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the allocation-latency histogram (seconds).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Addresses of one pool and family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolFigures {
    pub total: i64,
    pub in_use: i64,
}

/// Kinds of writes the controller sends (the `kind` label).
pub const WRITE_KINDS: [&str; 4] = ["record", "status", "pool_status", "event"];
/// Outcomes of a write (the `result` label).
pub const WRITE_RESULTS: [&str; 3] = ["ok", "conflict", "error"];

/// The Service controller's figures. Shared (`Arc`) between the controller and metrics.
#[derive(Debug)]
pub struct ControllerStats {
    leading: AtomicBool,
    /// (pool, family label) → figures; replaced as a whole on every pass that decided pools.
    pools: Mutex<BTreeMap<(String, &'static str), PoolFigures>>,
    /// reason label → allocation failures (counted once per change of a Service's reason).
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// (kind, result) → count.
    writes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// From the controller first seeing a Service without an address to its allocation
    /// record written.
    latency: Histogram,
    passes: AtomicU64,
}

impl Default for ControllerStats {
    fn default() -> Self {
        ControllerStats {
            leading: AtomicBool::new(false),
            pools: Mutex::default(),
            failures: Mutex::default(),
            writes: Mutex::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            passes: AtomicU64::new(0),
        }
    }
}

impl ControllerStats {
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    pub fn set_pools(&self, pools: BTreeMap<(String, &'static str), PoolFigures>) {
        *self.pools.lock().unwrap_or_else(PoisonError::into_inner) = pools;
    }

    pub fn pools(&self) -> BTreeMap<(String, &'static str), PoolFigures> {
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn failure(&self, reason: &'static str) {
        *self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn write(&self, kind: &'static str, result: &'static str) {
        *self
            .writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((kind, result))
            .or_default() += 1;
    }

    pub fn writes(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn allocated_after(&self, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
    }

    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    pub fn pass(&self) {
        self.passes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }
}
