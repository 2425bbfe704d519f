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
    /// Past what one file may hold ([`MAX_FILE_BYTES`], or a parser limit that grows with
    /// the file): the file is refused whole, every other file still loads.
    #[error(
        "{path}: too large to load as one file ({what}); split it into several files in one directory and give the agent the directory"
    )]
    TooLarge { path: PathBuf, what: String },
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
            ManifestError::TooLarge { .. } => "too_large",
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
                match read(&file) {
                    Ok(text) => parse_into(&file, &text, &mut out),
                    Err(e) => out.errors.push(e),
                }
            }
        }
        Err(e) => out.errors.push(e),
    }
    out
}

/// The largest manifest file read (64 MiB: about 250,000 VirtualIPs of a few lines each).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The parser's budget for a text of `len` bytes. The parser's defaults (1,024 documents,
/// 250,000 nodes, a million events, 50,000 aliases...) are for a whole input; they are
/// granted here once per started MiB of text, and the document count is left to the size
/// (a document costs at least its `---` line). So every limit grows linearly with the file
/// (no input costs more than a constant factor of its bytes: an alias bomb still breaches
/// the retained-copies limit and the alias/anchor ratio), while nesting keeps the defaults
/// (depth 64, flow nesting 255), which do not depend on the size.
fn budget_for(len: usize) -> serde_saphyr::Budget {
    let d = serde_saphyr::Budget::default();
    let mib = len.div_ceil(1 << 20).max(1);
    let mut b = d.clone();
    b.max_documents = len.max(d.max_documents);
    b.max_events = d.max_events.saturating_mul(mib);
    b.max_nodes = d.max_nodes.saturating_mul(mib);
    b.max_aliases = d.max_aliases.saturating_mul(mib);
    b.max_anchors = d.max_anchors.saturating_mul(mib);
    b.max_merge_keys = d.max_merge_keys.saturating_mul(mib);
    b.max_recorded_anchor_events = d.max_recorded_anchor_events.saturating_mul(mib);
    b
}

/// The text of one manifest file; a file larger than [`MAX_FILE_BYTES`] is not read.
pub fn read(path: &Path) -> Result<String, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(too_large(path, len));
    }
    std::fs::read_to_string(path).map_err(read_err)
}

fn too_large(path: &Path, len: u64) -> ManifestError {
    ManifestError::TooLarge {
        path: path.to_path_buf(),
        what: format!("{len} bytes, more than the {MAX_FILE_BYTES} one file may hold"),
    }
}

/// The parser's budget breach behind `e`, if that is what it is.
fn budget_breach(mut e: &serde_saphyr::Error) -> Option<&serde_saphyr::budget::BudgetBreach> {
    loop {
        match e {
            serde_saphyr::Error::Budget { breach, .. } => return Some(breach),
            serde_saphyr::Error::WithSnippet { error, .. }
            | serde_saphyr::Error::AliasError { error, .. } => e = error,
            _ => return None,
        }
    }
}

/// Parses the documents of one file's text into `out`.
pub fn parse_into(path: &Path, text: &str, out: &mut Manifests) {
    if text.len() as u64 > MAX_FILE_BYTES {
        out.errors.push(too_large(path, text.len() as u64));
        return;
    }
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget_for(text.len()));
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple_with_options(text, options)
    {
        Ok(docs) => docs,
        Err(ref e) if let Some(breach) = budget_breach(e) => {
            // With the limits granted per MiB, no manifest of VirtualIPs comes near them:
            // what breaches them is dense or repetitive text (alias expansion, empty
            // collections) or deep nesting, which splitting the file would not cure.
            out.errors.push(ManifestError::Yaml {
                path: path.to_path_buf(),
                message: format!(
                    "refused by the YAML parser's limits (per MiB of file; nesting at most 64 levels; aliases that expand without bound): {breach:?}"
                ),
            });
            return;
        }
        Err(e) => {
            out.errors.push(ManifestError::Yaml {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
            return;
        }
    };
    let mut names: std::collections::HashSet<String> = out
        .virtual_ips
        .iter()
        .filter_map(|v| v.metadata.name.clone())
        .collect();
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
                if !names.insert(name.clone()) {
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

    fn bulk_doc(i: usize) -> String {
        format!(
            "apiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata:\n  name: vip-{i:05}\nspec:\n  addresses: [\"10.{}.{}.{}/32\"]\n  interface: eth0\n  vrrp:\n    advertisementInterval: 100ms\n",
            i / 65536,
            i / 256 % 256,
            i % 256
        )
    }

    #[test]
    fn twelve_thousand_documents_in_one_file_load() {
        let text: Vec<String> = (0..12_000).map(bulk_doc).collect();
        let m = parse(&text.join("---\n"));
        assert!(m.errors.is_empty(), "{:?}", m.errors.first());
        assert_eq!(m.virtual_ips.len(), 12_000);
        assert_eq!(
            m.virtual_ips[11_999].metadata.name.as_deref(),
            Some("vip-11999")
        );
    }

    #[test]
    fn hostile_yaml_is_still_refused_by_limits() {
        // Billion laughs: nine levels of ten aliases each.
        let mut bomb = String::from("a0: &a0 [\"lol\", \"lol\"]\n");
        for level in 1..10 {
            let prev = level - 1;
            let refs = vec![format!("*a{prev}"); 10].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        let m = parse(&bomb);
        assert_eq!(m.virtual_ips.len(), 0);
        assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
        assert_eq!(m.errors[0].metric_label(), "yaml", "{}", m.errors[0]);
        assert!(
            m.errors[0].to_string().contains("limits"),
            "{}",
            m.errors[0]
        );
        // Nesting deeper than 64 levels.
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let m = parse(&deep);
        assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
        assert_eq!(m.errors[0].metric_label(), "yaml");
    }

    #[test]
    fn a_file_past_the_size_limit_is_named_and_says_how_to_split() {
        let dir = std::env::temp_dir().join(format!("ferrovip-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.yaml");
        // Sparse: the size is checked before reading.
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let e = read(&big).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.metric_label(), "too_large");
        let msg = e.to_string();
        assert!(msg.contains("big.yaml: too large"), "{msg}");
        assert!(msg.contains("split it into several files"), "{msg}");
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
