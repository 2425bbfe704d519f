//! A reflector that notices when its watch has gone silent: writes the API server accepted
//! must come back through it.
//!
//! kube-rs restarts a watch when the server ends it, and (client side) when nothing at all
//! came for the watch's timeout (290 s and a margin). Nothing bounds a watch that the server
//! keeps open but stops feeding any sooner. kube-apiserver v1.20 does that under a burst: its
//! watch cache closes watchers it finds too slow ("Forcing watcher close due to
//! unresponsiveness", at `-v=1`), and its audit log shows those requests complete only when
//! the client drops them. With 10,000 Services created at once on a 2-core machine every
//! Service watch was deaf for 4 minutes 20 s, in 2 of 17 runs (more often when the machine
//! had other work): no new Service was allocated, no status followed.
//!
//! A watch is checked with this process's own writes ([`Echoes::expect`]): every accepted
//! write returns the object's new `resourceVersion`, which a live watch delivers within
//! milliseconds. A node that writes nothing of a kind checks its store against the Service
//! controller leader's ([`Echoes::expect_progress`], the versions carried on the Lease). A
//! version neither delivered nor in the store within [`ECHO_TIMEOUT`] means the watch is
//! behind. It is resumed from the last version it delivered (a watch without a list: the
//! API server replays from its watch cache what the silent one missed; relisting 10,000
//! objects on every node at once is what loads a struggling API server most). A resumed
//! watch that goes silent as well, or cannot start, is followed by a fresh list, swapped
//! into the store in one step once complete (the store keeps serving the old state
//! meanwhile), then a new watch.
//!
//! Kubernetes calls resource versions opaque. The API server's etcd storage uses etcd's
//! revision, a number that only grows, and the comparison here uses that; a version that is
//! not a number is not tracked (the check is off, nothing else changes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long an accepted write may go unheard through the watch before the watch is started
/// again. A live watch brings it within milliseconds, a loaded API server within a second or
/// two; a new list of 10,000 Services takes a few seconds, which a false alarm would cost.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(15);
/// How often overdue writes are looked for.
pub const ECHO_CHECK: Duration = Duration::from_secs(5);
/// Writes remembered at most (per kind): beyond this, new ones are not tracked until the
/// watch catches up, so a long outage of the watch holds no unbounded memory.
const ECHO_MAX: usize = 50_000;

/// Watches started again because they left a write unheard, since the process started (the
/// `ferrovip_watch_restarts_total` metric).
static RESTARTS: AtomicU64 = AtomicU64::new(0);

/// How many watches were started again because they left a write of this process unheard.
pub fn restarts() -> u64 {
    RESTARTS.load(Ordering::Relaxed)
}

/// This process's accepted writes of one kind, until its watch brings them back; and a
/// version another process's watch of the same kind has reached, which this one must reach
/// too ([`Echoes::expect_progress`]).
#[derive(Clone, Default)]
pub struct Echoes(Arc<EchoState>);

#[derive(Default)]
struct EchoState {
    pending: Mutex<HashMap<(String, String), Pending>>,
    /// The version another watch reached, while this one has not.
    progress: Mutex<Option<Pending>>,
    /// The highest version this watch has delivered (objects listed, changed or deleted).
    latest: AtomicU64,
    /// The highest version among the objects the store holds (set by [`reflect`]).
    held: std::sync::OnceLock<HeldVersion>,
}

type HeldVersion = Box<dyn Fn() -> u64 + Send + Sync>;

#[derive(Debug, Clone, Copy)]
struct Pending {
    version: u64,
    since: Instant,
}

/// The echoes of every kind this process writes.
#[derive(Clone, Default)]
pub struct WriteEchoes {
    pub virtual_ips: Echoes,
    pub services: Echoes,
    pub pools: Echoes,
}

fn version(meta: &ObjectMeta) -> Option<u64> {
    meta.resource_version.as_deref()?.parse().ok()
}

fn key(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone()?,
    ))
}

impl Echoes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Pending>> {
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.0.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest resource version the watch has delivered (0: none yet, or versions that
    /// are not numbers).
    fn latest(&self) -> u64 {
        self.0.latest.load(Ordering::Relaxed)
    }

    /// The highest resource version among the objects in the store (0: none, or no store
    /// attached). Two watches of one kind that are both current hold the same objects at the
    /// same versions, so they agree on it, deletions included (the highest version a watch
    /// ever delivered would not: a deletion's is in no list). Walks the store: for the
    /// Lease's renewals and rounds, not per event.
    pub fn held(&self) -> u64 {
        self.0.held.get().map_or(0, |held| held())
    }

    fn attach<K>(&self, store: Store<K>)
    where
        K: Resource + Clone + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let _ = self.0.held.set(Box::new(move || {
            store
                .state()
                .iter()
                .filter_map(|o| version(o.meta()))
                .max()
                .unwrap_or(0)
        }));
    }

    /// Another process's store of this kind (the Service controller's leader's, through its
    /// Lease) holds `version` ([`Echoes::held`]): this watch must deliver it, or a later one,
    /// within [`ECHO_TIMEOUT`]. For the nodes that write nothing of a kind, whose own writes
    /// cannot show that their watch went silent.
    pub fn expect_progress(&self, version: u64) {
        if self.latest() >= version || self.held() >= version {
            return;
        }
        let mut progress = self.progress();
        match progress.as_mut() {
            Some(p) => p.version = p.version.max(version),
            None => {
                *progress = Some(Pending {
                    version,
                    since: Instant::now(),
                })
            }
        }
    }

    /// After a write the API server accepted: `meta` is the object it answered with. An
    /// earlier write of the same object still unheard keeps its age.
    pub fn expect(&self, meta: &ObjectMeta) {
        let (Some(key), Some(version)) = (key(meta), version(meta)) else {
            return;
        };
        let mut pending = self.lock();
        if let Some(p) = pending.get_mut(&key) {
            p.version = p.version.max(version);
        } else if pending.len() < ECHO_MAX {
            pending.insert(
                key,
                Pending {
                    version,
                    since: Instant::now(),
                },
            );
        }
    }

    /// An object the watch delivered: the writes it carries are heard.
    fn heard(&self, meta: &ObjectMeta) {
        let Some(version) = version(meta) else {
            return;
        };
        let latest = self
            .0
            .latest
            .fetch_max(version, Ordering::Relaxed)
            .max(version);
        {
            let mut progress = self.progress();
            if progress.is_some_and(|p| latest >= p.version) {
                *progress = None;
            }
        }
        let mut pending = self.lock();
        if pending.is_empty() {
            return;
        }
        if let Some(key) = key(meta)
            && pending.get(&key).is_some_and(|p| version >= p.version)
        {
            pending.remove(&key);
        }
    }

    /// The writes still waiting count from now (a new list just completed: what it missed
    /// comes through the new watch).
    fn restart_clocks(&self) {
        let now = Instant::now();
        for p in self.lock().values_mut() {
            p.since = now;
        }
        if let Some(p) = self.progress().as_mut() {
            p.since = now;
        }
    }

    /// Drops the writes `current` (the version the store holds for a namespace and name, or
    /// `None` for an object not in the store) shows were heard, and returns how long the
    /// oldest of the rest has waited, when longer than `timeout`. An object missing from the
    /// store counts as heard: the watch delivered its deletion (the writer only writes
    /// objects the store holds).
    fn overdue(
        &self,
        timeout: Duration,
        current: impl Fn(&str, &str) -> Option<Option<u64>>,
    ) -> Option<(Duration, usize)> {
        let now = Instant::now();
        let mut pending = self.lock();
        pending.retain(|(ns, name), p| matches!(current(ns, name), Some(Some(v)) if v < p.version));
        let behind =
            (*self.progress()).filter(|p| self.latest() < p.version && self.held() < p.version);
        let late: Vec<Duration> = pending
            .values()
            .chain(behind.as_ref())
            .map(|p| now.duration_since(p.since))
            .filter(|age| *age > timeout)
            .collect();
        let oldest = late.iter().max().copied()?;
        Some((oldest, late.len()))
    }

    /// How many writes wait to be heard.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }
}

/// The version `store` holds of `namespace/name`: `None` when it holds no such object,
/// `Some(None)` when its version is not a number.
fn held<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Option<u64>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut reference = ObjectRef::<K>::new(name);
    if !namespace.is_empty() {
        reference = reference.within(namespace);
    }
    store.get(&reference).map(|object| version(object.meta()))
}

/// One step of [`reflect`]'s loop.
enum Step<K> {
    Item(Option<watcher::Result<watcher::Event<K>>>),
    Check,
}

/// Lists and watches `api` (with `config`) into `writer` (as kube's `reflector`, with its default backoff
/// on errors), with `slim` applied to every object first, and yields each event after the
/// store has it. With `echoes`, a watch that leaves a write of this process unheard for
/// [`ECHO_TIMEOUT`] is started again (see the module's documentation). `kind` names the
/// resource in the log.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    slim: fn(&mut K),
    echoes: Option<Echoes>,
    kind: &'static str,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    restartable(
        move |from: Option<String>| match from {
            None => watcher(api.clone(), config.clone())
                .modify(slim)
                .default_backoff()
                .boxed(),
            Some(version) => resumed(api.clone(), &config, version, slim).boxed(),
        },
        writer,
        echoes,
        kind,
    )
}

/// A watch of `api` from `version` on, without a list (what kube's watcher does when a
/// server ends a watch), carried on from the latest version seen each time the server ends
/// it. It ends at the first error, among them a version the server no longer keeps (410):
/// the caller lists afresh then.
fn resumed<K>(
    api: Api<K>,
    config: &watcher::Config,
    version: String,
    slim: fn(&mut K),
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + use<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let params = WatchParams {
        label_selector: config.label_selector.clone(),
        field_selector: config.field_selector.clone(),
        ..WatchParams::default()
    };
    async_stream::stream! {
        let mut version = version;
        loop {
            let events = match api.watch(&params, &version).await {
                Ok(events) => events,
                Err(e) => {
                    debug!(error = %e, "resuming the watch failed; listing afresh");
                    return;
                }
            };
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Added(mut object) | WatchEvent::Modified(mut object)) => {
                        slim(&mut object);
                        version = object.meta().resource_version.clone().unwrap_or(version);
                        yield Ok(watcher::Event::Apply(object));
                    }
                    Ok(WatchEvent::Deleted(mut object)) => {
                        slim(&mut object);
                        version = object.meta().resource_version.clone().unwrap_or(version);
                        yield Ok(watcher::Event::Delete(object));
                    }
                    Ok(WatchEvent::Bookmark(mark)) => version = mark.metadata.resource_version,
                    Ok(WatchEvent::Error(e)) => {
                        debug!(code = e.code, message = %e.message, "the resumed watch ended; listing afresh");
                        return;
                    }
                    Err(e) => {
                        debug!(error = %e, "the resumed watch failed; listing afresh");
                        return;
                    }
                }
            }
        }
    }
}

/// [`reflect`] over the event streams `open` starts: `open(None)` lists, then watches;
/// `open(Some(version))` watches from `version` without a list, and ends when it cannot.
/// A silent watch is resumed from the latest version delivered (the API server's watch
/// cache replays what it missed: no list of every object, which from every node at once is
/// what loads a struggling API server most); a resumed watch that goes silent again, or
/// ends, is followed by a new list.
fn restartable<K>(
    mut open: impl FnMut(Option<String>) -> BoxStream<'static, watcher::Result<watcher::Event<K>>>
    + Send,
    mut writer: Writer<K>,
    echoes: Option<Echoes>,
    kind: &'static str,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = writer.as_reader();
    if let Some(echoes) = &echoes {
        echoes.attach(store.clone());
    }
    async_stream::stream! {
        // The version to resume from, when the next stream is a resumed watch.
        let mut resume = None;
        loop {
            let resuming = resume.is_some();
            let mut events = open(resume.take());
            let mut check = tokio::time::interval(ECHO_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Checked only between a complete list and the next one (a resumed watch has
            // none).
            let mut watching = resuming;
            loop {
                let step = tokio::select! {
                    item = events.next() => Step::Item(item),
                    _ = check.tick(), if watching && echoes.is_some() => Step::Check,
                };
                match step {
                    // A resumed watch that cannot go on: list afresh.
                    Step::Item(None) if resuming => break,
                    Step::Item(None) => return,
                    Step::Item(Some(Ok(event))) => {
                        writer.apply_watcher_event(&event);
                        if let Some(echoes) = &echoes {
                            match &event {
                                watcher::Event::Apply(o)
                                | watcher::Event::Delete(o)
                                | watcher::Event::InitApply(o) => echoes.heard(o.meta()),
                                watcher::Event::Init => watching = false,
                                watcher::Event::InitDone => {
                                    echoes.restart_clocks();
                                    watching = true;
                                }
                            }
                        }
                        yield Ok(event);
                    }
                    Step::Item(Some(Err(e))) => yield Err(e),
                    Step::Check => {
                        let Some(echoes) = &echoes else { continue };
                        let overdue = echoes.overdue(ECHO_TIMEOUT, |namespace, name| {
                            held(&store, namespace, name)
                        });
                        if let Some((oldest, writes)) = overdue {
                            // From the latest version delivered; resumed once already and
                            // silent again: list.
                            resume = (!resuming && echoes.latest() > 0)
                                .then(|| echoes.latest().to_string());
                            warn!(
                                kind,
                                writes,
                                oldest_ms = oldest.as_millis() as u64,
                                resume_from = resume.as_deref().unwrap_or("(a new list)"),
                                "the watch has not delivered writes the API server accepted: taken as silent, watching anew"
                            );
                            echoes.restart_clocks();
                            RESTARTS.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: Option<&str>, name: &str, version: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(str::to_owned),
            name: Some(name.into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_write_heard_back_at_its_version_or_later_is_done() {
        let e = Echoes::default();
        e.expect(&meta(Some("lb"), "a", "10"));
        e.expect(&meta(Some("lb"), "b", "11"));
        e.heard(&meta(Some("lb"), "a", "9"));
        assert_eq!(e.pending(), 2, "an older version does not answer");
        e.heard(&meta(Some("lb"), "a", "12"));
        e.heard(&meta(Some("other"), "b", "20"));
        assert_eq!(
            e.pending(),
            1,
            "a later version answers; another namespace does not"
        );
        e.heard(&meta(Some("lb"), "b", "11"));
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn a_write_unheard_past_the_timeout_is_overdue_unless_the_store_shows_it() {
        let e = Echoes::default();
        e.expect(&meta(None, "cluster-scoped", "7"));
        e.expect(&meta(Some("lb"), "in-store", "8"));
        e.expect(&meta(Some("lb"), "deleted", "9"));
        e.expect(&meta(Some("lb"), "behind", "10"));
        std::thread::sleep(Duration::from_millis(30));
        let store = |ns: &str, name: &str| match (ns, name) {
            ("", "cluster-scoped") => Some(Some(6)),
            ("lb", "in-store") => Some(Some(8)),
            ("lb", "behind") => Some(Some(3)),
            _ => None,
        };
        assert!(
            e.overdue(Duration::from_secs(10), store).is_none(),
            "nothing waited 10 s"
        );
        assert_eq!(e.pending(), 2, "the store showed two of four heard");
        let (oldest, writes) = e
            .overdue(Duration::from_millis(10), store)
            .expect("two writes are late");
        assert_eq!(writes, 2);
        assert!(oldest >= Duration::from_millis(30));
    }

    #[test]
    fn a_later_write_of_the_same_object_keeps_the_first_ones_age() {
        let e = Echoes::default();
        e.expect(&meta(Some("lb"), "a", "10"));
        std::thread::sleep(Duration::from_millis(30));
        e.expect(&meta(Some("lb"), "a", "12"));
        e.heard(&meta(Some("lb"), "a", "11"));
        let late = e.overdue(Duration::from_millis(20), |_, _| Some(Some(11)));
        assert!(
            late.is_some(),
            "version 12 is unheard since the first write"
        );
        e.restart_clocks();
        assert!(
            e.overdue(Duration::from_millis(20), |_, _| Some(Some(11)))
                .is_none(),
            "a new list restarts the clocks"
        );
    }

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config_map(version: &str) -> ConfigMap {
        ConfigMap {
            metadata: meta(Some("lb"), "a", version),
            ..ConfigMap::default()
        }
    }

    /// A list of one object at `version`, then a watch that delivers `then` (an
    /// object's new version, after a second) or stays silent.
    fn listed_then(
        version: &str,
        then: Option<&str>,
    ) -> impl Stream<Item = watcher::Result<watcher::Event<ConfigMap>>> + Send + use<> {
        let list = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(config_map(version))),
            Ok(watcher::Event::InitDone),
        ];
        let later = then.map(config_map);
        futures::stream::iter(list)
            .chain(futures::stream::iter(later).then(|object| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(watcher::Event::Apply(object))
            }))
            .chain(futures::stream::pending())
    }

    fn held_version(store: &Store<ConfigMap>) -> Option<String> {
        store
            .get(&ObjectRef::new("a").within("lb"))
            .and_then(|o| o.metadata.resource_version.clone())
    }

    /// A watch resumed from a version: delivers `then` after a second, or stays silent.
    fn resumed_then(
        then: Option<&str>,
    ) -> BoxStream<'static, watcher::Result<watcher::Event<ConfigMap>>> {
        let later = then.map(config_map);
        futures::stream::iter(later)
            .then(|object| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(watcher::Event::Apply(object))
            })
            .chain(futures::stream::pending())
            .boxed()
    }

    /// Collects what the reflector asked to open.
    fn opener(
        asked: &Arc<Mutex<Vec<Option<String>>>>,
        open: impl Fn(
            usize,
            Option<&str>,
        ) -> BoxStream<'static, watcher::Result<watcher::Event<ConfigMap>>>
        + Send
        + 'static,
    ) -> impl FnMut(Option<String>) -> BoxStream<'static, watcher::Result<watcher::Event<ConfigMap>>>
    + Send
    + 'static {
        let asked = asked.clone();
        move |from: Option<String>| {
            let mut asked = asked.lock().unwrap();
            asked.push(from.clone());
            open(asked.len() - 1, from.as_deref())
        }
    }

    type Events =
        std::pin::Pin<Box<dyn Stream<Item = watcher::Result<watcher::Event<ConfigMap>>> + Send>>;

    /// A reflector over `open`, past its first list (three events), with its store and
    /// echoes.
    async fn listed(
        open: impl FnMut(
            Option<String>,
        ) -> BoxStream<'static, watcher::Result<watcher::Event<ConfigMap>>>
        + Send
        + 'static,
    ) -> (Store<ConfigMap>, Echoes, Events) {
        let (store, writer) = reflector::store::<ConfigMap>();
        let echoes = Echoes::default();
        let mut stream: Events =
            Box::pin(restartable(open, writer, Some(echoes.clone()), "ConfigMap"));
        for _ in 0..3 {
            stream.next().await.expect("listed").expect("no error");
        }
        (store, echoes, stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_watch_is_resumed_from_its_latest_version() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (store, echoes, mut stream) = listed(opener(&asked, |n, _| match n {
            0 => listed_then("5", None).boxed(),
            // The resumed watch brings what the silent one did not.
            _ => resumed_then(Some("6")),
        }))
        .await;
        // This process wrote version 6; the watch never brings it.
        let written = Instant::now();
        echoes.expect(&config_map("6").metadata);
        let next = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("the silent watch is resumed");
        assert!(
            matches!(next, Some(Ok(watcher::Event::Apply(_)))),
            "{next:?}"
        );
        let waited = written.elapsed();
        assert!(
            waited > ECHO_TIMEOUT && waited <= ECHO_TIMEOUT + ECHO_CHECK + Duration::from_secs(1),
            "resumed after {waited:?}"
        );
        assert_eq!(*asked.lock().unwrap(), vec![None, Some("5".to_owned())]);
        assert_eq!(held_version(&store).as_deref(), Some("6"));
        assert_eq!(echoes.pending(), 0);
        assert!(
            tokio::time::timeout(Duration::from_secs(120), stream.next())
                .await
                .is_err(),
            "a resumed watch that delivered is kept"
        );
        assert_eq!(asked.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_watch_silent_again_or_ended_is_followed_by_a_new_list() {
        for resumed_ends in [false, true] {
            let asked = Arc::new(Mutex::new(Vec::new()));
            let (store, echoes, mut stream) = listed(opener(&asked, move |n, _| match n {
                0 => listed_then("5", None).boxed(),
                1 if resumed_ends => futures::stream::empty().boxed(),
                1 => resumed_then(None),
                // The server holds version 6 from the second list on.
                _ => listed_then("6", None).boxed(),
            }))
            .await;
            echoes.expect(&config_map("6").metadata);
            let written = Instant::now();
            let next = tokio::time::timeout(Duration::from_secs(120), stream.next())
                .await
                .expect("listed again");
            assert!(matches!(next, Some(Ok(watcher::Event::Init))), "{next:?}");
            let waited = written.elapsed();
            let most = if resumed_ends { 1 } else { 2 };
            assert!(
                waited > ECHO_TIMEOUT && waited <= (ECHO_TIMEOUT + ECHO_CHECK) * most,
                "listed again after {waited:?} (resumed watch ends: {resumed_ends})"
            );
            assert_eq!(
                *asked.lock().unwrap(),
                vec![None, Some("5".to_owned()), None]
            );
            for _ in 0..2 {
                stream.next().await.expect("listed").expect("no error");
            }
            assert_eq!(held_version(&store).as_deref(), Some("6"), "the new list");
            assert_eq!(echoes.pending(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_brings_the_write_back_is_kept() {
        let opened = Arc::new(AtomicUsize::new(0));
        let (store, echoes, mut stream) = listed({
            let opened = opened.clone();
            move |_: Option<String>| {
                opened.fetch_add(1, Ordering::SeqCst);
                listed_then("5", Some("6")).boxed()
            }
        })
        .await;
        echoes.expect(&config_map("6").metadata);
        let next = stream.next().await;
        assert!(matches!(next, Some(Ok(watcher::Event::Apply(_)))));
        assert_eq!(held_version(&store).as_deref(), Some("6"));
        assert_eq!(echoes.pending(), 0, "heard");
        assert!(
            tokio::time::timeout(Duration::from_secs(120), stream.next())
                .await
                .is_err(),
            "a watch that delivered is not started again"
        );
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_version_another_watch_reached_must_be_reached_here_too() {
        let e = Echoes::default();
        e.heard(&meta(Some("lb"), "a", "20"));
        assert_eq!(e.latest(), 20);
        e.expect_progress(15);
        e.expect_progress(20);
        let none = |_: &str, _: &str| None;
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(e.overdue(ECHO_TIMEOUT, none).is_none(), "already reached");
        e.expect_progress(30);
        tokio::time::advance(Duration::from_secs(10)).await;
        e.expect_progress(40);
        e.heard(&meta(Some("lb"), "b", "35"));
        assert!(e.overdue(ECHO_TIMEOUT, none).is_none(), "waited 10 s");
        tokio::time::advance(Duration::from_secs(6)).await;
        let (oldest, _) = e
            .overdue(ECHO_TIMEOUT, none)
            .expect("40 not reached in 16 s");
        assert_eq!(
            oldest,
            Duration::from_secs(16),
            "counted from the first hint"
        );
        e.heard(&meta(None, "c", "41"));
        assert!(e.overdue(ECHO_TIMEOUT, none).is_none(), "reached");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_judged_by_the_objects_held_so_a_deletion_raises_no_alarm() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let e = Echoes::default();
        e.attach(store);
        assert_eq!(e.held(), 0);
        // A fresh list after the leader saw something at version 9 deleted: this store's
        // objects are at 5 and 7, the leader's the same, so the leader publishes 7.
        let named = |name: &str, version: &str| ConfigMap {
            metadata: meta(Some("lb"), name, version),
            ..ConfigMap::default()
        };
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(named("a", "5")),
            watcher::Event::InitApply(named("b", "7")),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
        }
        assert_eq!(e.held(), 7);
        e.expect_progress(7);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(e.overdue(ECHO_TIMEOUT, |_, _| None).is_none());
        // The leader's store has moved on to 8; this one gets there through its store.
        e.expect_progress(8);
        tokio::time::advance(Duration::from_secs(10)).await;
        writer.apply_watcher_event(&watcher::Event::Apply(named("a", "8")));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(e.overdue(ECHO_TIMEOUT, |_, _| None).is_none());
    }

    #[test]
    fn versions_that_are_not_numbers_are_not_tracked() {
        let e = Echoes::default();
        e.expect(&meta(Some("lb"), "a", "opaque-1"));
        e.expect(&ObjectMeta::default());
        assert_eq!(e.pending(), 0);
    }
}
