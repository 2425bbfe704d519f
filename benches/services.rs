//! The Service controller under load, against a real kube-apiserver v1.20 with etcd (the
//! e2e harness, on loopback) and two `ferrovip controller` processes contending for the Lease
//! (lease 2 s, renewal 500 ms), each with the agent's least-privilege identity.
//!
//! (a) `--services` (1,000) Services of type LoadBalancer created at once (32 requests in
//!     flight): time until all have an address, create → ingress latency per Service (from
//!     the create request sent to a watch seeing the ingress), and writes per Service (PATCH
//!     requests of the controllers on services and services/status, from the API server's
//!     audit log). Repeated `--runs` (3) times; medians reported.
//! (b) `--kills` (100) leader crashes (SIGKILL of the Lease holder; restarted once the other
//!     instance took over) during continuous create/delete churn (about 20 creates and 20
//!     deletes a second, ~100 Services live). After each takeover, once every live Service
//!     is allocated, the API is checked: addresses held by two Services (records or status)
//!     and Services whose recorded address changed (renumbered) must both be 0.
//!
//! `cargo bench --bench services [-- --runs 3 --services 1000 --kills 100]`

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrovip_e2e::{AGENT_GROUP, ApiServer, ApiServerOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_ferrovip");
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
const NAMESPACE: &str = "ferrovip-system";
const LEASE: &str = "ferrovip-controller";
const RECORD: &str = "ferrovip.io/allocated";
const CONTROLLERS: [&str; 2] = ["ctl-a", "ctl-b"];
const CREATES_IN_FLIGHT: usize = 32;
const CHURN_LIVE: usize = 100;
const CHURN_PERIOD: Duration = Duration::from_millis(50);

struct Options {
    runs: usize,
    services: usize,
    kills: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 3,
        services: 1000,
        kills: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| name.to_string())
        };
        match arg.as_str() {
            "--runs" => o.runs = value("--runs")?.max(1),
            "--services" => o.services = value("--services")?,
            "--kills" => o.kills = value("--kills")?,
            // cargo bench passes --bench.
            "--bench" => {}
            other => bail!("unknown argument {other} (--runs N, --services N, --kills N)"),
        }
    }
    Ok(o)
}

struct Bench {
    controllers: BTreeMap<String, Child>,
    api: ApiServer,
    admin: Client,
    rt: tokio::runtime::Runtime,
    logs: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for child in self.controllers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Bench {
    fn start() -> anyhow::Result<Bench> {
        let api = ApiServer::start(ApiServerOptions {
            port: 0,
            node_users: CONTROLLERS.iter().map(|c| c.to_string()).collect(),
            build_script: Some(BUILD_SCRIPT.into()),
            audit_log: true,
            ..ApiServerOptions::default()
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let admin = rt.block_on(client_from(api.admin_kubeconfig()))?;
        let logs = api.dir().join("controllers");
        std::fs::create_dir_all(&logs)?;
        let bench = Bench {
            controllers: BTreeMap::new(),
            api,
            admin,
            rt,
            logs,
        };
        bench.kubectl(&["apply", "-f", CRDS])?;
        bench.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/loadbalancerpools.ferrovip.io",
        ])?;
        bench.kubectl(&["apply", "-f", RBAC])?;
        bench.api.bind_agent_group("ferrovip-agent")?;
        bench.apply(
            "lease-binding",
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "agents-lease", "namespace": NAMESPACE},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ferrovip-controller-lease"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP}],
            }),
        )?;
        bench.apply(
            "pool",
            &json!({
                "apiVersion": "ferrovip.io/v1alpha1",
                "kind": "LoadBalancerPool",
                "metadata": {"name": "bench"},
                "spec": {"addresses": ["10.64.0.0/16"], "template": {"interface": "eth0"}},
            }),
        )?;
        Ok(bench)
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(self.api.kubectl_ok(args)?)
    }

    fn apply(&self, name: &str, doc: &Value) -> anyhow::Result<()> {
        let path = self.api.dir().join(format!("{name}.json"));
        std::fs::write(&path, doc.to_string())?;
        self.kubectl(&["apply", "-f", &path.display().to_string()])?;
        Ok(())
    }

    fn start_controller(&mut self, id: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{id}.log")))?;
        let child = Command::new(BINARY)
            .args([
                "controller",
                "--identity",
                id,
                "--lease-duration",
                "2s",
                "--lease-renew",
                "500ms",
            ])
            .env("KUBECONFIG", self.api.node_kubeconfig(id))
            .env("FERROVIP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("start ferrovip controller")?;
        self.controllers.insert(id.to_string(), child);
        Ok(())
    }

    fn kill_controller(&mut self, id: &str) -> anyhow::Result<()> {
        let mut child = self
            .controllers
            .remove(id)
            .with_context(|| format!("{id} not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    fn holder(&self) -> anyhow::Result<Option<String>> {
        let api: Api<Lease> = Api::namespaced(self.admin.clone(), NAMESPACE);
        let lease = self.rt.block_on(api.get_opt(LEASE))?;
        Ok(lease
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty()))
    }

    fn wait_holder(&self, not: Option<&str>, timeout: Duration) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            if let Some(h) = self.holder()?
                && Some(h.as_str()) != not
            {
                return Ok(h);
            }
            if started.elapsed() > timeout {
                bail!("no new Lease holder after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn services(&self) -> anyhow::Result<Vec<Service>> {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), "default");
        Ok(self
            .rt
            .block_on(api.list(&ListParams::default().labels("bench")))?
            .items)
    }

    /// PATCH requests of the controllers on Services (metadata and status), by response code.
    fn controller_patches(&self) -> anyhow::Result<BTreeMap<u16, usize>> {
        count_patches(&self.api.audit_log_path())
    }

    fn delete_all(&self, selector: &str) -> anyhow::Result<()> {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), "default");
        self.rt.block_on(async {
            let names: Vec<String> = api
                .list(&ListParams::default().labels(selector))
                .await?
                .items
                .into_iter()
                .filter_map(|s| s.metadata.name)
                .collect();
            futures::stream::iter(names)
                .map(|n| {
                    let api = api.clone();
                    async move { api.delete(&n, &DeleteParams::default()).await.map(drop) }
                })
                .buffer_unordered(CREATES_IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await
        })?;
        Ok(())
    }
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn count_patches(audit: &Path) -> anyhow::Result<BTreeMap<u16, usize>> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["verb"] == "patch"
            && v["objectRef"]["resource"] == "services"
            && v["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with("ferrovip:ctl-"))
        {
            let code = v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16;
            *out.entry(code).or_default() += 1;
        }
    }
    Ok(out)
}

fn service(name: &str, group: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": {"bench": group}},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": name},
            "ports": [{"port": 80, "protocol": "TCP"}],
        },
    }))
    .expect("a Service")
}

fn ingress(svc: &Service) -> Vec<String> {
    ferrovip::crd::service_lb::ingress_entries(svc)
        .filter_map(|i| i.ip.clone())
        .collect()
}

fn record(svc: &Service) -> Option<String> {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RECORD).cloned())
}

fn record_addresses(svc: &Service) -> Vec<String> {
    record(svc)
        .iter()
        .flat_map(|r| r.split(','))
        .filter_map(|e| e.split('@').next().map(str::to_string))
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

struct BurstRun {
    all_allocated: Duration,
    p50: f64,
    p99: f64,
    max: f64,
    answered_p50: f64,
    answered_p99: f64,
    writes_per_service: f64,
    conflicts: usize,
}

/// (a) `n` Services created at once.
fn burst(bench: &Bench, run: usize, n: usize) -> anyhow::Result<BurstRun> {
    let group = format!("burst-{run}");
    let before = bench.controller_patches()?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let api: Api<Service> = Api::namespaced(bench.admin.clone(), "default");
    // The watch first, so that no ingress is missed.
    let watch = {
        let seen = seen.clone();
        let api = api.clone();
        let selector = format!("bench={group}");
        bench.rt.spawn(async move {
            let stream = watcher(api, watcher::Config::default().labels(&selector))
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(svc)) = stream.next().await {
                if !ingress(&svc).is_empty()
                    && let Some(name) = svc.metadata.name
                {
                    seen.lock()
                        .unwrap()
                        .entry(name)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let sent: HashMap<String, (Instant, Instant)> = bench.rt.block_on(async {
        futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                let name = format!("b{run}-{i:04}");
                let svc = service(&name, &group);
                async move {
                    let at = Instant::now();
                    api.create(&PostParams::default(), &svc).await?;
                    Ok::<_, kube::Error>((name, (at, Instant::now())))
                }
            })
            .buffer_unordered(CREATES_IN_FLIGHT)
            .try_collect()
            .await
    })?;
    let created_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.lock().unwrap().len() < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} Services got an address in 120 s",
                seen.lock().unwrap().len()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    watch.abort();
    let seen = seen.lock().unwrap().clone();
    let last = seen.values().max().copied().unwrap_or(started);
    let mut latencies: Vec<f64> = sent
        .iter()
        .map(|(name, (at, _))| seen[name].saturating_duration_since(*at).as_secs_f64())
        .collect();
    latencies.sort_by(f64::total_cmp);
    // From the create's answer (the Service exists): without the create's own queueing.
    let mut from_answer: Vec<f64> = sent
        .iter()
        .map(|(name, (_, done))| seen[name].saturating_duration_since(*done).as_secs_f64())
        .collect();
    from_answer.sort_by(f64::total_cmp);
    let mut create_took: Vec<f64> = sent
        .values()
        .map(|(at, done)| done.duration_since(*at).as_secs_f64())
        .collect();
    create_took.sort_by(f64::total_cmp);
    // Let the last writes reach the audit log.
    std::thread::sleep(Duration::from_secs(1));
    let after = bench.controller_patches()?;
    let ok = after.get(&200).copied().unwrap_or(0) - before.get(&200).copied().unwrap_or(0);
    let all: usize = after.values().sum::<usize>() - before.values().sum::<usize>();
    let conflicts = after.get(&409).copied().unwrap_or(0) - before.get(&409).copied().unwrap_or(0);
    eprintln!(
        "  run {run}: created in {:.2} s (create request p50 {:.0} ms p99 {:.0} ms), all allocated {:.2} s after the first create; create sent → ingress p50 {:.0} ms p99 {:.0} ms max {:.0} ms; create answered → ingress p50 {:.0} ms p99 {:.0} ms; {all} PATCHes ({ok} ok, {conflicts} conflicts) = {:.2} per Service",
        created_in.as_secs_f64(),
        percentile(&create_took, 50.0) * 1000.0,
        percentile(&create_took, 99.0) * 1000.0,
        last.duration_since(started).as_secs_f64(),
        percentile(&latencies, 50.0) * 1000.0,
        percentile(&latencies, 99.0) * 1000.0,
        percentile(&latencies, 100.0) * 1000.0,
        percentile(&from_answer, 50.0) * 1000.0,
        percentile(&from_answer, 99.0) * 1000.0,
        all as f64 / n as f64,
    );
    bench.delete_all(&format!("bench={group}"))?;
    // Let the controller see the deletions before the next run.
    std::thread::sleep(Duration::from_secs(2));
    Ok(BurstRun {
        all_allocated: last.duration_since(started),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: percentile(&latencies, 100.0),
        answered_p50: percentile(&from_answer, 50.0),
        answered_p99: percentile(&from_answer, 99.0),
        writes_per_service: all as f64 / n as f64,
        conflicts,
    })
}

struct KillReport {
    kills: usize,
    duplicates: usize,
    renumbered: usize,
    takeover: Vec<f64>,
    settled: Vec<f64>,
    churned: usize,
}

/// (b) leader crashes during churn.
fn kills(bench: &mut Bench, kills: usize) -> anyhow::Result<KillReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(Mutex::new(0usize));
    let churn = {
        let stop = stop.clone();
        let churned = churned.clone();
        let api: Api<Service> = Api::namespaced(bench.admin.clone(), "default");
        bench.rt.spawn(async move {
            let mut live = std::collections::VecDeque::new();
            let mut next = 0usize;
            let mut tick = tokio::time::interval(CHURN_PERIOD);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let name = format!("churn-{next:06}");
                next += 1;
                if api
                    .create(&PostParams::default(), &service(&name, "churn"))
                    .await
                    .is_ok()
                {
                    live.push_back(name);
                    *churned.lock().unwrap() += 1;
                }
                if live.len() > CHURN_LIVE
                    && let Some(old) = live.pop_front()
                {
                    let _ = api.delete(&old, &DeleteParams::default()).await;
                }
            }
        })
    };
    let mut first_record: HashMap<String, Vec<String>> = HashMap::new();
    let mut report = KillReport {
        kills: 0,
        duplicates: 0,
        renumbered: 0,
        takeover: Vec::new(),
        settled: Vec::new(),
        churned: 0,
    };
    std::thread::sleep(Duration::from_secs(2));
    for k in 0..kills {
        let leader = bench.wait_holder(None, Duration::from_secs(10))?;
        let killed = Instant::now();
        bench.kill_controller(&leader)?;
        let next = bench.wait_holder(Some(&leader), Duration::from_secs(10))?;
        let takeover = killed.elapsed();
        bench.start_controller(&leader)?;
        // Settled: every live Service recorded and shown alike.
        let deadline = Instant::now() + Duration::from_secs(30);
        let services = loop {
            let services = bench.services()?;
            let pending = services
                .iter()
                .filter(|s| s.metadata.deletion_timestamp.is_none())
                .filter(|s| {
                    let r = record_addresses(s);
                    r.is_empty() || r != ingress(s)
                })
                .count();
            if pending == 0 {
                break services;
            }
            if Instant::now() > deadline {
                bail!("kill {k}: {pending} Services still unallocated 30 s after the kill");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let settled = killed.elapsed();
        let mut holders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for svc in &services {
            let uid = svc.metadata.uid.clone().unwrap_or_default();
            let name = svc.metadata.name.clone().unwrap_or_default();
            let recorded = record_addresses(svc);
            for a in recorded.iter().chain(ingress(svc).iter()) {
                holders.entry(a.clone()).or_default().insert(name.clone());
            }
            if recorded.is_empty() {
                continue;
            }
            match first_record.get(&uid) {
                Some(first) if *first != recorded => {
                    eprintln!("  kill {k}: {name} renumbered {first:?} → {recorded:?}");
                    report.renumbered += 1;
                    first_record.insert(uid, recorded);
                }
                Some(_) => {}
                None => {
                    first_record.insert(uid, recorded);
                }
            }
        }
        let dups: Vec<_> = holders.iter().filter(|(_, h)| h.len() > 1).collect();
        if !dups.is_empty() {
            eprintln!("  kill {k}: duplicates {dups:?}");
        }
        report.duplicates += dups.len();
        report.kills += 1;
        report.takeover.push(takeover.as_secs_f64());
        report.settled.push(settled.as_secs_f64());
        if k % 10 == 9 || k + 1 == kills {
            eprintln!(
                "  {} kills: {leader} → {next}, takeover {:.2} s, all allocated {:.2} s after the kill; {} Services live; duplicates so far {}, renumbered {}",
                k + 1,
                takeover.as_secs_f64(),
                settled.as_secs_f64(),
                services.len(),
                report.duplicates,
                report.renumbered
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = bench.rt.block_on(churn);
    report.churned = *churned.lock().unwrap();
    bench.delete_all("bench=churn")?;
    Ok(report)
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let command = format!(
        "cargo bench --bench services -- --runs {} --services {} --kills {}",
        o.runs, o.services, o.kills
    );
    eprintln!("{command}");
    let mut bench = Bench::start()?;
    for id in CONTROLLERS {
        bench.start_controller(id)?;
    }
    bench.wait_holder(None, Duration::from_secs(15))?;
    // Warm-up: the leader allocates one Service.
    bench.rt.block_on(async {
        let api: Api<Service> = Api::namespaced(bench.admin.clone(), "default");
        api.create(&PostParams::default(), &service("warm-up", "warm-up"))
            .await
    })?;
    let started = Instant::now();
    while !bench.services()?.iter().any(|s| !ingress(s).is_empty()) {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the warm-up Service got no address");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bench.delete_all("bench=warm-up")?;

    eprintln!(
        "(a) {} Services created at once, {} runs",
        o.services, o.runs
    );
    let mut runs = Vec::new();
    for run in 0..o.runs {
        runs.push(burst(&bench, run, o.services)?);
    }
    let report_kills = if o.kills > 0 {
        eprintln!("(b) {} leader kills during create/delete churn", o.kills);
        match kills(&mut bench, o.kills) {
            Ok(k) => Some(k),
            Err(e) => {
                // Keep the controllers' logs and the audit log for a look.
                bench.api.keep_dir(true);
                eprintln!("logs kept in {}", bench.api.dir().display());
                return Err(e);
            }
        }
    } else {
        None
    };

    println!("\n{command}");
    println!(
        "(a) {} Services at once, medians of {} runs [min–max]:",
        o.services, o.runs
    );
    let line = |label: &str, values: Vec<f64>, unit: &str, scale: f64| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "  {label:<34} {:>8.2} {unit} [{:.2}–{:.2}]",
            median(&values) * scale,
            min * scale,
            max * scale
        );
    };
    line(
        "all allocated after first create",
        runs.iter().map(|r| r.all_allocated.as_secs_f64()).collect(),
        "s",
        1.0,
    );
    line(
        "create sent → ingress p50",
        runs.iter().map(|r| r.p50).collect(),
        "ms",
        1000.0,
    );
    line(
        "create sent → ingress p99 (≤ 1 s)",
        runs.iter().map(|r| r.p99).collect(),
        "ms",
        1000.0,
    );
    line(
        "create sent → ingress max",
        runs.iter().map(|r| r.max).collect(),
        "ms",
        1000.0,
    );
    line(
        "create answered → ingress p50",
        runs.iter().map(|r| r.answered_p50).collect(),
        "ms",
        1000.0,
    );
    line(
        "create answered → ingress p99",
        runs.iter().map(|r| r.answered_p99).collect(),
        "ms",
        1000.0,
    );
    line(
        "PATCHes per Service (target ≤ 2)",
        runs.iter().map(|r| r.writes_per_service).collect(),
        "",
        1.0,
    );
    line(
        "conflicts (409) per run",
        runs.iter().map(|r| r.conflicts as f64).collect(),
        "",
        1.0,
    );
    if let Some(k) = report_kills {
        println!(
            "(b) {} leader kills during churn ({} Services created meanwhile):",
            k.kills, k.churned
        );
        println!("  duplicate addresses                 {}", k.duplicates);
        println!("  renumbered Services                 {}", k.renumbered);
        let mut t = k.takeover.clone();
        t.sort_by(f64::total_cmp);
        let mut s = k.settled.clone();
        s.sort_by(f64::total_cmp);
        println!(
            "  kill → new Lease holder            p50 {:.2} s, max {:.2} s",
            percentile(&t, 50.0),
            percentile(&t, 100.0)
        );
        println!(
            "  kill → every live Service allocated p50 {:.2} s, max {:.2} s",
            percentile(&s, 50.0),
            percentile(&s, 100.0)
        );
        if k.duplicates > 0 || k.renumbered > 0 {
            bail!("duplicates or renumbered Services after leader kills");
        }
    }
    Ok(())
}
