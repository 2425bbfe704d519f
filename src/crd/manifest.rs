//! Reading VirtualIP manifests from files (standalone mode): a file or a directory of
//! `*.yaml` / `*.yml` files, each holding one or more YAML documents.
//!
//! A broken document is reported and skipped; every other document still loads, so one typo
//! never takes the other VIPs down.

use std::fmt;
use std::path::{Path, PathBuf};

use super::VirtualIP;

const API_VERSION: &str = "ferrovip.io/v1alpha1";

/// Why one file or document was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{location}: {resource}: {message}")]
    Document {
        location: DocLocation,
        /// `VirtualIP "web"`, or `document` when even the name is unreadable.
        resource: String,
        message: String,
    },
}

impl ManifestError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ManifestError::Read { .. } => "read",
            ManifestError::Yaml { .. } => "yaml",
            ManifestError::Document { .. } => "document",
        }
    }
}

/// File and 1-based document number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocLocation {
    pub path: PathBuf,
    pub document: usize,
}

impl fmt::Display for DocLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.path.display(), self.document)
    }
}

/// What a manifest path holds: the resources that parsed, in file order, and the problems.
#[derive(Debug, Default)]
pub struct Manifests {
    pub virtual_ips: Vec<VirtualIP>,
    pub errors: Vec<ManifestError>,
}

/// The files a manifest path names: itself, or the YAML files of a directory sorted by name.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !path.metadata().map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if yaml && !hidden && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every VirtualIP under `path`.
pub fn load(path: &Path) -> Manifests {
    let mut out = Manifests::default();
    match manifest_files(path) {
        Ok(files) => {
            for file in files {
                match std::fs::read_to_string(&file) {
                    Ok(text) => parse_into(&file, &text, &mut out),
                    Err(source) => out.errors.push(ManifestError::Read { path: file, source }),
                }
            }
        }
        Err(e) => out.errors.push(e),
    }
    out
}

/// Parses the documents of one file's text into `out`.
pub fn parse_into(path: &Path, text: &str, out: &mut Manifests) {
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(text) {
        Ok(docs) => docs,
        Err(e) => {
            out.errors.push(ManifestError::Yaml {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let location = DocLocation {
            path: path.to_path_buf(),
            document: i + 1,
        };
        match parse_document(doc) {
            Ok(vip) => {
                let name = vip.metadata.name.clone().unwrap_or_default();
                if out
                    .virtual_ips
                    .iter()
                    .any(|v| v.metadata.name.as_deref() == Some(name.as_str()))
                {
                    out.errors.push(ManifestError::Document {
                        location,
                        resource: format!("VirtualIP {name:?}"),
                        message: "metadata.name: a VirtualIP with this name is already defined"
                            .into(),
                    });
                } else {
                    out.virtual_ips.push(vip);
                }
            }
            Err((resource, message)) => out.errors.push(ManifestError::Document {
                location,
                resource,
                message,
            }),
        }
    }
}

fn parse_document(doc: serde_json::Value) -> Result<VirtualIP, (String, String)> {
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    let name = doc
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .map(str::to_string);
    let resource = match &name {
        Some(n) => format!("{} {n:?}", if kind.is_empty() { "resource" } else { kind }),
        None => "document".to_string(),
    };
    if kind != "VirtualIP" {
        return Err((resource, format!("kind: expected VirtualIP, got {kind:?}")));
    }
    let api_version = doc
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if api_version != API_VERSION {
        return Err((
            resource,
            format!("apiVersion: expected {API_VERSION}, got {api_version:?}"),
        ));
    }
    match &name {
        None => return Err((resource, "metadata.name: required".into())),
        Some(n) if !is_dns_subdomain(n) => {
            return Err((
                resource,
                "metadata.name: must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')".into(),
            ));
        }
        Some(_) => {}
    }
    serde_path_to_error::deserialize::<_, VirtualIP>(doc).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        (resource, format!("{path}: {inner}"))
    })
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: web
spec:
  addresses: ["192.0.2.100/24"]
  interface: eth0
  virtualRouterId: 51
  vrrp:
    version: 3
    advertisementInterval: 100ms
    preempt: true
  priority:
    base: 100
    preferredNodes:
      - nodeName: node-a
        weight: 50
"#;

    fn parse(text: &str) -> Manifests {
        let mut m = Manifests::default();
        parse_into(Path::new("vips.yaml"), text, &mut m);
        m
    }

    #[test]
    fn the_contract_parses() {
        let m = parse(CONTRACT);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let vip = &m.virtual_ips[0];
        assert_eq!(vip.metadata.name.as_deref(), Some("web"));
        assert_eq!(vip.spec.virtual_router_id, Some(51));
        assert_eq!(vip.spec.vrrp.advertisement_interval, "100ms");
        assert_eq!(vip.spec.priority.preferred_nodes[0].weight, 50);
    }

    #[test]
    fn a_broken_document_does_not_hide_the_others() {
        let text = format!(
            "{CONTRACT}\n---\napiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata: {{name: api}}\nspec:\n  addresses: [\"192.0.2.101/24\"]\n  interface: eth0\n  virtualRouterId: fifty\n---\n{}",
            CONTRACT
                .replace("name: web", "name: db")
                .replace("51", "52")
        );
        let m = parse(&text);
        let names: Vec<_> = m
            .virtual_ips
            .iter()
            .map(|v| v.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["web", "db"]);
        assert_eq!(m.errors.len(), 1);
        let msg = m.errors[0].to_string();
        assert!(msg.contains("VirtualIP \"api\""), "{msg}");
        assert!(msg.contains("spec.virtualRouterId"), "{msg}");
        assert!(msg.contains("document 2"), "{msg}");
    }

    #[test]
    fn unknown_fields_and_kinds_are_named() {
        let m = parse(&CONTRACT.replace("preempt: true", "preemt: true"));
        let msg = m.errors[0].to_string();
        assert!(msg.contains("spec.vrrp"), "{msg}");
        assert!(msg.contains("preemt"), "{msg}");

        let m = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
        assert!(m.errors[0].to_string().contains("kind: expected VirtualIP"));

        let m = parse(&CONTRACT.replace("v1alpha1", "v9"));
        assert!(m.errors[0].to_string().contains("apiVersion"));

        let m = parse(&format!("{CONTRACT}\n---\n{CONTRACT}"));
        assert_eq!(m.virtual_ips.len(), 1);
        assert!(m.errors[0].to_string().contains("already defined"));

        let m = parse("a: [unclosed\n");
        assert_eq!(m.errors[0].metric_label(), "yaml");
    }

    #[test]
    fn the_samples_parse_and_validate() {
        for (name, text) in [
            (
                "virtualip-web.yaml",
                include_str!("../../config/samples/virtualip-web.yaml"),
            ),
            (
                "virtualip-health.yaml",
                include_str!("../../config/samples/virtualip-health.yaml"),
            ),
            (
                "virtualip-v2.yaml",
                include_str!("../../config/samples/virtualip-v2.yaml"),
            ),
            (
                "virtualip-services.yaml",
                include_str!("../../config/samples/virtualip-services.yaml"),
            ),
        ] {
            let m = parse(text);
            assert!(m.errors.is_empty(), "{name}: {:?}", m.errors);
            for vip in &m.virtual_ips {
                vip.spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
}
