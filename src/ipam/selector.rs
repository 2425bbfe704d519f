//! Kubernetes label-selector semantics for `serviceSelector` and `namespaceSelector` (ipam
//! sits above `model`, which uses this one for node selectors too).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// matchLabels AND every matchExpression; an unknown operator matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement as Req;

    #[test]
    fn semantics() {
        let labels: BTreeMap<String, String> = [("zone", "a"), ("role", "lb")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sel = |op: &str, key: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![Req {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..LabelSelector::default()
        };
        assert!(matches(&sel("In", "zone", &["a", "b"]), &labels));
        assert!(!matches(&sel("In", "zone", &["b"]), &labels));
        assert!(matches(&sel("NotIn", "zone", &["b"]), &labels));
        assert!(matches(&sel("NotIn", "missing", &["b"]), &labels));
        assert!(matches(&sel("Exists", "role", &[]), &labels));
        assert!(!matches(&sel("DoesNotExist", "role", &[]), &labels));
        assert!(!matches(&sel("Bogus", "role", &[]), &labels));
        assert!(matches(&LabelSelector::default(), &labels));
        let by_label = LabelSelector {
            match_labels: Some([("zone".to_string(), "b".to_string())].into()),
            ..LabelSelector::default()
        };
        assert!(!matches(&by_label, &labels));
    }
}
