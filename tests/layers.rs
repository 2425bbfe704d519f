//! The crate's layers point one way (ARCHITECTURE.md, "Layers"): a module imports only from
//! modules above it in `LAYERS`, and no two files of one module import each other.
//!
//! Reads the sources as text: `crate::X` paths in code (not comments) and, for file pairs,
//! `super::X` / `crate::m::X` references.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first: each may import only what is listed before it.
const LAYERS: &[&str] = &[
    "vocab",
    "crd",
    "ipam",
    "model",
    "vrrp",
    "engine",
    "node",
    "driver",
    "health",
    "dataplane",
    "source",
    "k8s",
    "controller",
    "metrics",
    "agent",
    "staticpod",
    "lab",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under src/: `src/engine/sim/property.rs` → [engine, sim, property].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Code lines: without `//` comments (doc comments included) and without `#[cfg(test)]`
/// test modules' bodies being treated differently (tests may reach anywhere below them too).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `prefix` + identifier path in `code`, as segments after the prefix.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segments = Vec::new();
        let mut tail = rest;
        loop {
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if end == 0 {
                break;
            }
            segments.push(tail[..end].to_string());
            if !tail[end..].starts_with("::") {
                break;
            }
            tail = &tail[end + 2..];
        }
        if !segments.is_empty() {
            found.push(segments);
        }
    }
    found
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let module = module_path(&src, file);
        let Some(top) = module.first() else { continue };
        if top == "main" || top == "lib" {
            continue;
        }
        let Some(own) = rank(top) else {
            violations.push(format!("{}: module {top} is not in LAYERS", file.display()));
            continue;
        };
        let text = code(&std::fs::read_to_string(file).unwrap());
        for path in paths_after(&text, "crate::") {
            checked += 1;
            let target = &path[0];
            match rank(target) {
                Some(r) if r <= own => {}
                Some(_) => violations.push(format!(
                    "{}: {top} imports crate::{} (above it)",
                    file.display(),
                    path.join("::")
                )),
                None => violations.push(format!(
                    "{}: crate::{target} is not in LAYERS",
                    file.display()
                )),
            }
        }
    }
    assert!(checked > 50, "found only {checked} crate:: paths");
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn no_two_files_of_a_module_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    // File module path → the module paths it names (resolved to file granularity).
    let mut names: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&src, f)).collect();
    for file in &files {
        let module = module_path(&src, file);
        let text = code(&std::fs::read_to_string(file).unwrap());
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        // `super::` of a foo.rs file is its parent module; of a mod.rs its grandparent.
        let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
        let mut named = BTreeSet::new();
        let mut add = |mut full: Vec<String>| {
            // The longest prefix that is a file module is what this refers to.
            while !full.is_empty() && !modules.contains(&full) {
                full.pop();
            }
            if !full.is_empty() && full != module {
                named.insert(full);
            }
        };
        for path in paths_after(&text, "crate::") {
            add(path);
        }
        for path in paths_after(&text, "super::") {
            let base = if is_mod_rs {
                module[..module.len().saturating_sub(1)].to_vec()
            } else {
                parent.clone()
            };
            add([base, path].concat());
        }
        names.insert(module, named);
    }
    let mut cycles = Vec::new();
    for (a, named) in &names {
        for b in named {
            // Only siblings and parent/child pairs count: a module's mod.rs re-exporting
            // its children is how Rust modules work.
            let related = a.len() == b.len() && a[..a.len() - 1] == b[..b.len() - 1];
            if a < b
                && related
                && names.get(b).is_some_and(|n| n.contains(a))
                && !a.iter().chain(b.iter()).any(|s| s == "tests")
            {
                cycles.push(format!("{} <-> {}", a.join("::"), b.join("::")));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "files importing each other:\n{}",
        cycles.join("\n")
    );
}
