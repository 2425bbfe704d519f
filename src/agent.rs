//! The node agent. Standalone mode reads VirtualIPs from manifest files; the Kubernetes mode
//! (next) will feed the same engine from the API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::crd::VirtualIP;
use crate::crd::manifest::{self, ManifestError, Manifests};
use crate::dataplane::addr::{AddrError, AddressManager};
use crate::model::{Snapshot, plan};
use crate::vrrp::driver::{Command, Engine};

/// Settings of the agent process (what users ask for lives in VirtualIP resources).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Name of this node: matched against `spec.priority.preferredNodes[].nodeName`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// A VirtualIP manifest file, or a directory of `*.yaml` files (standalone mode).
    #[arg(long, env = "FERROVIP_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// How often manifest files are checked for changes (SIGHUP reloads at once).
    #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
    pub manifest_poll: Duration,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::crd::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the kernel over netlink: {0}")]
    Netlink(#[source] AddrError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(
        "Kubernetes mode is not available yet: start the agent with --manifests PATH (standalone mode)"
    )]
    NoSource,
}

impl AgentError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Netlink(_) => "netlink",
            AgentError::Signals(_) => "signals",
            AgentError::NoSource => "no_source",
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT, then leaves gracefully (priority 0, addresses
/// released).
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let Some(path) = args.manifests.clone() else {
        return Err(AgentError::NoSource);
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;

    let addresses = AddressManager::connect().map_err(AgentError::Netlink)?;
    let engine = Engine::start(args.node_name.clone(), addresses).await;
    let (commands, commands_rx) = mpsc::channel(16);
    let engine_task = tokio::spawn(engine.run(commands_rx));
    info!(node = %args.node_name, manifests = %path.display(), "agent started in standalone mode");

    let mut source = ManifestSource::new(path);
    let mut reported = Reported::default();
    let mut poll = tokio::time::interval(args.manifest_poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reload = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                info!("SIGHUP: reloading manifests");
                true
            }
            _ = poll.tick() => source.changed(),
        };
        if reload {
            let snapshot = source.load(&mut reported);
            let desired = plan(&snapshot, &args.node_name);
            reported.refusals(&desired);
            if commands.send(Command::Apply(desired)).await.is_err() {
                warn!("the VRRP engine stopped unexpectedly");
                break;
            }
        }
    }

    info!("shutting down: sending priority 0 and releasing addresses");
    let (done, wait) = oneshot::channel();
    if commands.send(Command::Shutdown(done)).await.is_ok() {
        let _ = wait.await;
    }
    let _ = engine_task.await;
    Ok(())
}

/// The manifest files, with change detection and the last good content of each file.
struct ManifestSource {
    path: PathBuf,
    fingerprint: Option<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    /// Per file, the VirtualIPs of its last successful parse: a file that becomes unreadable
    /// or stops being valid YAML keeps its previous VIPs running instead of dropping them.
    last_good: BTreeMap<PathBuf, Vec<VirtualIP>>,
}

impl ManifestSource {
    fn new(path: PathBuf) -> Self {
        ManifestSource {
            path,
            fingerprint: None,
            last_good: BTreeMap::new(),
        }
    }

    /// Whether the files changed since the last load (true before the first load).
    fn changed(&mut self) -> bool {
        let now = fingerprint(&self.path);
        if self.fingerprint.as_ref() == Some(&now) {
            return false;
        }
        self.fingerprint = Some(now);
        true
    }

    fn load(&mut self, reported: &mut Reported) -> Snapshot {
        self.fingerprint = Some(fingerprint(&self.path));
        let files = match manifest::manifest_files(&self.path) {
            Ok(files) => files,
            Err(e) => {
                reported.manifest_errors(&[e], "keeping the VirtualIPs loaded before");
                return self.snapshot();
            }
        };
        let mut errors = Vec::new();
        let mut fresh = BTreeMap::new();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(source) => {
                    errors.push(ManifestError::Read {
                        path: file.clone(),
                        source,
                    });
                    if let Some(prev) = self.last_good.remove(&file) {
                        fresh.insert(file, prev);
                    }
                    continue;
                }
            };
            let mut parsed = Manifests::default();
            manifest::parse_into(&file, &text, &mut parsed);
            let whole_file_broken = parsed
                .errors
                .iter()
                .any(|e| matches!(e, ManifestError::Yaml { .. }));
            if whole_file_broken && let Some(prev) = self.last_good.remove(&file) {
                fresh.insert(file, prev);
            } else {
                fresh.insert(file, parsed.virtual_ips);
            }
            errors.extend(parsed.errors);
        }
        self.last_good = fresh;
        reported.manifest_errors(&errors, "the other VirtualIPs keep running");
        self.snapshot()
    }

    fn snapshot(&self) -> Snapshot {
        // Names must be unique across files too: the first definition wins.
        let mut seen = std::collections::HashSet::new();
        let mut virtual_ips = Vec::new();
        for (file, vips) in &self.last_good {
            for vip in vips {
                let name = vip.metadata.name.clone().unwrap_or_default();
                if seen.insert(name.clone()) {
                    virtual_ips.push(vip.clone());
                } else {
                    warn!(resource = %format!("VirtualIP {name:?}"), file = %file.display(), "metadata.name: defined in more than one file; the first definition is used");
                }
            }
        }
        Snapshot {
            virtual_ips,
            ..Snapshot::default()
        }
    }
}

fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let files = manifest::manifest_files(path).unwrap_or_default();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (f, mtime, len)
        })
        .collect()
}

/// Logs problems once per change instead of on every reload.
#[derive(Default)]
struct Reported {
    manifest: Vec<String>,
    refused: Vec<String>,
}

impl Reported {
    fn manifest_errors(&mut self, errors: &[ManifestError], consequence: &str) {
        let now: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        if now != self.manifest {
            for e in &now {
                warn!(error = %e, "manifest refused; {consequence}");
            }
            self.manifest = now;
        }
    }

    fn refusals(&mut self, desired: &crate::model::Desired) {
        let now: Vec<String> = desired
            .refused
            .iter()
            .map(|r| format!("VirtualIP {:?}: {}", r.resource, r.reason))
            .collect();
        if now != self.refused {
            for (r, text) in desired.refused.iter().zip(&now) {
                warn!(resource = %r.resource, reason = r.reason.metric_label(), "refused {text}; the other VirtualIPs keep running");
            }
            self.refused = now;
        }
    }
}
