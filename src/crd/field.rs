//! How validation reports problems: one [`FieldError`] per problem, naming the field by its
//! JSON path, all of a spec's problems at once ([`ValidationErrors`]). Shared by the
//! validation of every part of a spec.

use std::fmt;

use crate::vocab::NON_OWNER_PRIORITIES;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.vrrp.advertisementInterval`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems found in one spec (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Gathers the problems of one spec, in the order the fields are checked.
#[derive(Default)]
pub(super) struct Collector(Vec<FieldError>);

impl Collector {
    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// `Ok(value)` when nothing was pushed.
    pub(super) fn finish<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

/// A Kubernetes name of a namespace or Service (RFC 1123 label).
pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A priority penalty: 0 to the highest priority a node can have.
pub(super) fn check_weight(field: &str, value: i64, errors: &mut Collector) {
    let max = i64::from(*NON_OWNER_PRIORITIES.end());
    if !(0..=max).contains(&value) {
        errors.push(field, format!("must be between 0 and {max}, got {value}"));
    }
}

/// The namespace and name of an object reference at `field`.
pub(super) fn check_object_ref(field: &str, namespace: &str, name: &str, errors: &mut Collector) {
    for (f, value) in [("namespace", namespace), ("name", name)] {
        if !is_dns_label(value) {
            errors.push(
                format!("{field}.{f}"),
                format!("{value:?} is not a valid name (lowercase DNS label)"),
            );
        }
    }
}

/// A port number 1-65535, or the message for `field`.
pub(super) fn port(field: String, value: i64, errors: &mut Collector) -> Option<u16> {
    match u16::try_from(value) {
        Ok(p) if p >= 1 => Some(p),
        _ => {
            errors.push(field, format!("must be between 1 and 65535, got {value}"));
            None
        }
    }
}
