//! Waiting until the API server serves ferrovip's kinds: `ferrovip wait-for-crds`, which the
//! chart's post-install hook runs before Helm creates the initial VirtualIPs and pools.
//!
//! Why: Helm maps a hook's kind through its discovery cache, refreshed once on a miss. A CRD
//! that Helm created moments earlier is listed by discovery only after the API server's
//! establishing and discovery controllers have run; when that takes longer than Helm's next
//! step, `helm install` fails with "no matches for kind". A hook Job is the one thing Helm
//! waits for, so the chart runs this command in one when it is about to create objects of
//! kinds that were not served when it rendered.

use std::time::Duration;

use kube::{Client, Resource};
use tokio::time::Instant;

use crate::crd::{LoadBalancerPool, VirtualIP};

/// The group/version and the plural names that must be listed.
fn wanted() -> (String, Vec<String>) {
    let api_version = VirtualIP::api_version(&()).into_owned();
    debug_assert_eq!(api_version, LoadBalancerPool::api_version(&()));
    (
        api_version,
        vec![
            VirtualIP::plural(&()).into_owned(),
            LoadBalancerPool::plural(&()).into_owned(),
        ],
    )
}

/// What is still missing from discovery: empty once the group is in `/apis` and its version
/// lists every kind (what Helm's discovery needs).
async fn missing(client: &Client) -> Result<Vec<String>, kube::Error> {
    let (api_version, plurals) = wanted();
    let group = api_version.split('/').next().unwrap_or_default();
    let groups = client.list_api_groups().await?;
    if !groups
        .groups
        .iter()
        .any(|g| g.name == group && g.versions.iter().any(|v| v.group_version == api_version))
    {
        return Ok(vec![format!("{api_version} in /apis")]);
    }
    let resources = match client.list_api_group_resources(&api_version).await {
        Ok(list) => list.resources,
        // Listed in /apis a moment before the version's own document: not yet.
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(plurals
        .into_iter()
        .filter(|p| !resources.iter().any(|r| &r.name == p))
        .map(|p| format!("{api_version}/{p}"))
        .collect())
}

/// Polls discovery every 250 ms until both kinds are served; an error naming what is still
/// missing after `timeout`. Errors talking to the API server are retried until then too (the
/// hook's pod may start before its network is ready).
pub async fn wait_for_crds(client: &Client, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let last = match missing(client).await {
            Ok(gaps) if gaps.is_empty() => return Ok(started.elapsed()),
            Ok(gaps) => format!("not served yet: {}", gaps.join(", ")),
            Err(e) => format!("discovery failed: {e}"),
        };
        if started.elapsed() >= timeout {
            anyhow::bail!(
                "the API server does not serve ferrovip's kinds after {timeout:?} ({last}); \
                 are the CRDs installed (`kubectl get crd virtualips.ferrovip.io \
                 loadbalancerpools.ferrovip.io`) and Established?"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
