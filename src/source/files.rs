//! The file source (standalone mode): VirtualIP manifests in a file or a directory of
//! `*.yaml`, polled for changes, each file keeping its last good content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::warn;

use crate::crd::VirtualIP;
use crate::crd::manifest::{self, ManifestError, Manifests};
use crate::model::{Completeness, Desired, Snapshot};

/// The manifest files, with change detection and the last good content of each file.
pub struct ManifestSource {
    path: PathBuf,
    fingerprint: Option<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    /// Per file, the VirtualIPs of its last successful parse: a file that becomes unreadable
    /// or stops being valid YAML keeps its previous VIPs running instead of dropping them.
    last_good: BTreeMap<PathBuf, Vec<VirtualIP>>,
}

impl ManifestSource {
    pub fn new(path: PathBuf) -> Self {
        ManifestSource {
            path,
            fingerprint: None,
            last_good: BTreeMap::new(),
        }
    }

    /// Whether the files changed since the last load (true before the first load).
    pub fn changed(&mut self) -> bool {
        let now = fingerprint(&self.path);
        if self.fingerprint.as_ref() == Some(&now) {
            return false;
        }
        self.fingerprint = Some(now);
        true
    }

    pub fn load(&mut self, reported: &mut Reported) -> Snapshot {
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
            let text = match manifest::read(&file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e);
                    if let Some(prev) = self.last_good.remove(&file) {
                        fresh.insert(file, prev);
                    }
                    continue;
                }
            };
            let mut parsed = Manifests::default();
            manifest::parse_into(&file, &text, &mut parsed);
            let whole_file_broken = parsed.errors.iter().any(|e| {
                matches!(
                    e,
                    ManifestError::Yaml { .. } | ManifestError::TooLarge { .. }
                )
            });
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
            completeness: Completeness::Complete,
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
pub struct Reported {
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

    /// Refused resources, and refused instances (one family) of running ones.
    pub fn refusals(&mut self, desired: &Desired) {
        let whole = desired
            .refused
            .iter()
            .map(|r| (&r.resource, &r.reason, "the other VirtualIPs keep running"));
        let partly = desired.resources.iter().flat_map(|(name, plan)| {
            plan.refused_instances
                .iter()
                .map(move |r| (name, r, "its other address family keeps running"))
        });
        let all: Vec<_> = whole.chain(partly).collect();
        let now: Vec<String> = all
            .iter()
            .map(|(name, reason, _)| format!("VirtualIP {name:?}: {reason}"))
            .collect();
        if now != self.refused {
            for ((name, reason, rest), text) in all.iter().zip(&now) {
                warn!(resource = %name, reason = reason.metric_label(), "refused {text}; {rest}");
            }
            self.refused = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_past_the_limits_leaves_the_files_beside_it_loaded() {
        let dir = std::env::temp_dir().join(format!("ferrovip-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let docs: Vec<String> = (0..12_000)
            .map(|i| {
                format!(
                    "apiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata:\n  name: vip-{i:05}\nspec:\n  addresses: [\"10.0.{}.{}/32\"]\n  interface: eth0\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect();
        std::fs::write(dir.join("a-good.yaml"), docs.join("---\n")).unwrap();
        // Past the size limit (sparse: never read), and an alias bomb.
        std::fs::File::create(dir.join("b-huge.yaml"))
            .unwrap()
            .set_len(manifest::MAX_FILE_BYTES + 1)
            .unwrap();
        let mut bomb = String::from("a0: &a0 [x, x]\n");
        for level in 1..10 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        std::fs::write(dir.join("c-bomb.yaml"), bomb).unwrap();

        let mut source = ManifestSource::new(dir.clone());
        let mut reported = Reported::default();
        let snapshot = source.load(&mut reported);
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(snapshot.virtual_ips.len(), 12_000);
        let errors = &reported.manifest;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("b-huge.yaml: too large"),
            "{}",
            errors[0]
        );
        assert!(
            errors[0].contains("split it into several files"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].contains("c-bomb.yaml: not valid YAML: refused by the YAML parser's limits"),
            "{}",
            errors[1]
        );
    }
}
