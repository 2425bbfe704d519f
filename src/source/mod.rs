//! Where VirtualIPs come from: manifest files ([`files`], standalone mode) or the API server
//! ([`cluster`], Kubernetes mode). Both produce the same [`Snapshot`] for the planner.

pub mod cache;
pub mod cluster;
pub mod files;
pub mod offload;
pub mod reflect;

pub use offload::off_runtime;

use crate::model::{Desired, Snapshot};
use cluster::ClusterSource;
use files::{ManifestSource, Reported};

/// Where VirtualIPs come from.
pub enum Source {
    Files {
        files: ManifestSource,
        poll: tokio::time::Interval,
        reported: Reported,
    },
    /// Boxed: the cluster source (stores, cache, a saved snapshot) is much the larger.
    Cluster(Box<ClusterSource>),
}

impl Source {
    /// Resolves when the source may have changed. Cancel-safe: it races other wake-ups.
    pub async fn changed(&mut self) {
        match self {
            Source::Files { files, poll, .. } => loop {
                poll.tick().await;
                if files.changed() {
                    return;
                }
            },
            Source::Cluster(c) => c.changed().await,
        }
    }

    pub async fn snapshot(&mut self) -> Snapshot {
        match self {
            Source::Files {
                files, reported, ..
            } => files.load(reported),
            Source::Cluster(c) => c.snapshot().await,
        }
    }
}

impl Source {
    /// The files source polling `path` every `poll`.
    pub fn files(path: std::path::PathBuf, poll: std::time::Duration) -> Source {
        let mut poll = tokio::time::interval(poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Source::Files {
            files: ManifestSource::new(path),
            poll,
            reported: Reported::default(),
        }
    }

    /// Lets a burst of cluster changes settle before the next snapshot.
    pub async fn settle(&mut self) {
        if let Source::Cluster(c) = self {
            c.settle().await;
        }
    }

    /// Logs refusals once per change (standalone mode has no status to show them in).
    pub fn report_refusals(&mut self, desired: &Desired) {
        if let Source::Files { reported, .. } = self {
            reported.refusals(desired);
        }
    }
}
