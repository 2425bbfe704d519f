//! A real kube-apiserver with its own etcd, for tests of the Kubernetes mode.
//!
//! [`ApiServer::start`] runs etcd and kube-apiserver v1.20.2 (built offline by
//! `e2e/apiserver/build.sh`) as two process groups, optionally inside a network namespace
//! such as a lab's switch namespace, where the lab bridge's address makes the server reachable
//! from every node namespace. Authentication is a static token file: one admin in
//! `system:masters` and one plain user `ferrovip:<node>` per node in group [`AGENT_GROUP`], so
//! RBAC decides what an agent may do exactly as it would for the agent's ServiceAccount.
//!
//! Serving certificates come from a throw-away CA made with the `openssl` CLI; readiness is
//! polled with `curl`; `kubectl` runs as admin inside the namespace. From the namespace the
//! harness itself runs in, [`ApiServer::host_url`] reaches the server through a small TCP
//! relay, so a test can use an ordinary `kube::Client` next to agents in node namespaces.
//!
//! There is no controller manager, scheduler or kubelet: Nodes, EndpointSlices and the like
//! exist only when a test creates them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use ferrovip::lab::LabError;
use ferrovip::lab::netns::{NodeInfo, log_tail, open_netns};

/// The Kubernetes version [`ApiServer`] runs.
pub const APISERVER_VERSION: &str = "v1.20.2-ferrovip1";
/// Group of every node identity ([`node_user`]); bind the agent's ClusterRole to it with
/// [`ApiServer::bind_agent_group`].
pub const AGENT_GROUP: &str = "ferrovip-agents";
/// The admin identity behind [`ApiServer::kubectl`] (group `system:masters`).
pub const ADMIN_USER: &str = "ferrovip-admin";
/// Environment variable naming a kube-apiserver binary to use instead of the cached one.
pub const APISERVER_ENV: &str = "FERROVIP_APISERVER";

const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// First address of the service range: the `kubernetes` Service, named in the certificate
/// so that in-cluster style clients verify it.
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const POLL: Duration = Duration::from_millis(100);
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// On SIGTERM kube-apiserver v1.20 closes its listener at once but keeps serving open watch
/// streams until they end or 60 s pass; an outage test wants those gone too.
const STOP_GRACE: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 30;

static SERVER_SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// The Node object of a lab node as a kubelet would register it: Ready, with its address as
/// InternalIP (what `unicastPeers: auto` uses).
pub fn node_object(node: &NodeInfo) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        // A Node's status may be set on create (kubelets register that way).
        "status": {
            "conditions": [node_ready_condition(true)],
            "addresses": [
                {"type": "InternalIP", "address": node.ipv4.to_string()},
                {"type": "Hostname", "address": node.name},
            ],
        },
    })
}

/// A Node's `Ready` condition as the lab sets it.
pub fn node_ready_condition(ready: bool) -> serde_json::Value {
    serde_json::json!({
        "type": "Ready",
        "status": if ready { "True" } else { "False" },
        "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
        "message": if ready { "lab node is ready" } else { "set not ready by the test" },
    })
}

/// The user name of node `node`'s identity: `ferrovip:<node>`, in group [`AGENT_GROUP`].
pub fn node_user(node: &str) -> String {
    format!("ferrovip:{node}")
}

/// Everything that can go wrong while starting or driving the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("invalid API server options: {0}")]
    InvalidOptions(String),
    #[error("{what} not found ({detail}); run e2e/apiserver/build.sh or set {APISERVER_ENV}")]
    NotInstalled { what: &'static str, detail: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not enter network namespace {netns}")]
    Setns {
        netns: String,
        #[source]
        source: nix::Error,
    },
    #[error("network namespace")]
    Netns(#[source] LabError),
    #[error("could not signal {what} (process group {pgid})")]
    Signal {
        what: &'static str,
        pgid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("{what} exited ({status}) before it was ready; its log ends with:\n{log_tail}")]
    Exited {
        what: &'static str,
        status: ExitStatus,
        log_tail: String,
    },
    #[error("{what} not ready after {waited:?}; its log ends with:\n{log_tail}")]
    NotReady {
        what: &'static str,
        waited: Duration,
        log_tail: String,
    },
}

impl ApiServerError {
    /// A bounded label for metrics and test summaries.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApiServerError::InvalidOptions(_) => "invalid_options",
            ApiServerError::NotInstalled { .. } => "not_installed",
            ApiServerError::Command { .. } => "command",
            ApiServerError::Spawn { .. } => "spawn",
            ApiServerError::Io { .. } => "io",
            ApiServerError::Setns { .. } => "setns",
            ApiServerError::Netns(_) => "netns",
            ApiServerError::Signal { .. } => "signal",
            ApiServerError::Exited { .. } => "exited",
            ApiServerError::NotReady { .. } => "not_ready",
        }
    }
}

impl From<LabError> for ApiServerError {
    fn from(e: LabError) -> Self {
        ApiServerError::Netns(e)
    }
}

/// The issuer of ServiceAccount tokens ([`ApiServer::service_account_key`] signs them).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// An extra token identity ([`ApiServerOptions::users`]), e.g. a kubelet's
/// `system:node:<name>` in `system:nodes`, or a controller manager in `system:masters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUser {
    pub name: String,
    pub groups: Vec<String>,
}

/// How to run the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerOptions {
    /// Run etcd and kube-apiserver inside this network namespace (e.g.
    /// [`ferrovip::lab::Lab::switch_netns`]); `None` runs them where the caller runs.
    pub netns: Option<String>,
    /// Address to serve on; also the advertised address and the one in every kubeconfig.
    /// An unspecified address serves on all interfaces and advertises loopback.
    pub bind: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// Scratch directory (certificates, tokens, kubeconfigs, etcd data, logs). Created; must
    /// be empty or absent, because it is removed on drop.
    pub dir: PathBuf,
    /// Node names to make identities for ([`node_user`], [`ApiServer::node_kubeconfig`]).
    pub node_users: Vec<String>,
    /// Run this (e.g. the repository's `e2e/apiserver/build.sh`) when the binary or etcd is
    /// missing; its last line of output is the binary's path.
    pub build_script: Option<PathBuf>,
    /// How long kube-apiserver may take to report ready.
    pub ready_timeout: Duration,
    /// Record every request at Metadata level (who, verb, resource, response code) in
    /// [`ApiServer::audit_log_path`], one JSON line per request, e.g. to count each node's
    /// writes.
    pub audit_log: bool,
    /// Extra identities, each with a token and a kubeconfig ([`ApiServer::user_kubeconfig`]).
    pub users: Vec<ApiUser>,
    /// Appended to kube-apiserver's flags; a flag given again here replaces the harness's
    /// (e.g. `--authorization-mode=Node,RBAC`, `--enable-admission-plugins=NodeRestriction`,
    /// `--allow-privileged=true`).
    pub extra_args: Vec<String>,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            netns: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 6443,
            dir: std::env::temp_dir().join(format!(
                "ferrovip-apiserver-{}-{}",
                std::process::id(),
                SERVER_SEQUENCE.fetch_add(1, Ordering::Relaxed)
            )),
            node_users: Vec::new(),
            build_script: None,
            ready_timeout: Duration::from_secs(90),
            audit_log: false,
            users: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

/// A process group started by the harness (etcd, kube-apiserver, and the cluster's daemons).
pub(crate) struct Daemon {
    pub(crate) what: &'static str,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Daemon {
    pub(crate) fn spawn(
        what: &'static str,
        netns: Option<&str>,
        program: &OsStr,
        args: &[String],
        log: PathBuf,
    ) -> Result<Daemon, ApiServerError> {
        let mut command = command_in(netns, program);
        command.args(args);
        Daemon::spawn_command(what, command, log)
    }

    /// Spawns `command` as its own process group, stdout and stderr appended to `log`.
    pub(crate) fn spawn_command(
        what: &'static str,
        mut command: Command,
        log: PathBuf,
    ) -> Result<Daemon, ApiServerError> {
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|source| ApiServerError::Io {
                    context: "opening the log",
                    path: log.clone(),
                    source,
                })
        };
        let (out, err) = (open_log()?, open_log()?);
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own group: a Ctrl-C on the test's terminal reaches only the harness, and
            // signals to the group reach anything the server forks.
            .process_group(0)
            .spawn()
            .map_err(|source| ApiServerError::Spawn {
                command: describe(&command),
                source,
            })?;
        Ok(Daemon {
            what,
            child,
            log,
            exit: None,
        })
    }

    pub(crate) fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// A reaped leader no longer counts, so this turns false once the whole group is gone.
    pub(crate) fn group_alive(&mut self) -> bool {
        self.exited();
        killpg(self.pgid(), None).is_ok()
    }

    pub(crate) fn signal(&mut self, signal: Signal) -> Result<(), ApiServerError> {
        if !self.group_alive() {
            return Ok(());
        }
        match killpg(self.pgid(), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(ApiServerError::Signal {
                what: self.what,
                pgid: self.pgid().as_raw(),
                source,
            }),
        }
    }

    /// SIGTERM, then SIGKILL after `grace` (at once for zero); returns once the group is gone.
    pub(crate) fn terminate(&mut self, grace: Duration) -> Result<(), ApiServerError> {
        if !grace.is_zero() {
            self.signal(Signal::SIGTERM)?;
        }
        let deadline = Instant::now() + grace;
        while self.group_alive() {
            if Instant::now() >= deadline {
                if !grace.is_zero() {
                    tracing::info!(what = self.what, ?grace, "still running; killing");
                }
                self.signal(Signal::SIGKILL)?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.wait();
        // Members other than the leader die on their own schedule after SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.group_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }
}

/// A running kube-apiserver and its etcd. Dropping it kills both and removes its directory.
pub struct ApiServer {
    netns: Option<String>,
    advertise: IpAddr,
    port: u16,
    dir: PathBuf,
    binary: PathBuf,
    etcd: Option<Daemon>,
    apiserver: Option<Daemon>,
    apiserver_args: Vec<String>,
    etcd_ports: (u16, u16),
    ready_timeout: Duration,
    ca: PathBuf,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    host_admin_kubeconfig: PathBuf,
    node_kubeconfigs: BTreeMap<String, PathBuf>,
    user_kubeconfigs: BTreeMap<String, PathBuf>,
    relay: Option<Relay>,
    startup_time: Duration,
    keep_dir: AtomicBool,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("url", &self.url())
            .field("netns", &self.netns)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and returns once `/readyz` is `ok` and the `default`
    /// namespace exists. Blocking; takes a few seconds (see [`ApiServer::startup_time`]).
    pub fn start(opts: ApiServerOptions) -> Result<ApiServer, ApiServerError> {
        validate(&opts)?;
        let binary = resolve_binary(opts.build_script.as_deref())?;
        let dir = opts.dir.clone();
        create_empty_dir(&dir)?;
        let advertise = if opts.bind.is_unspecified() {
            match opts.bind {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            }
        } else {
            opts.bind
        };
        let mut server = ApiServer {
            netns: opts.netns.clone(),
            advertise,
            port: opts.port,
            binary,
            etcd: None,
            apiserver: None,
            apiserver_args: Vec::new(),
            etcd_ports: (0, 0),
            ready_timeout: opts.ready_timeout,
            ca: dir.join("pki/ca.crt"),
            admin_token: random_token()?,
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            host_admin_kubeconfig: dir.join("admin.kubeconfig"),
            node_kubeconfigs: BTreeMap::new(),
            user_kubeconfigs: BTreeMap::new(),
            relay: None,
            startup_time: Duration::ZERO,
            keep_dir: AtomicBool::new(false),
            dir,
        };
        // From here on an error drops `server`, which stops whatever already runs.
        server.prepare(&opts)?;
        server.start_etcd()?;
        server.start_apiserver()?;
        if let Some(netns) = server.netns.clone() {
            let relay = Relay::start(netns, SocketAddr::new(server.advertise, server.port))?;
            let url = format!("https://{}", relay.addr());
            server.host_admin_kubeconfig = server.dir.join("admin-host.kubeconfig");
            write_kubeconfig(
                &server.host_admin_kubeconfig,
                &url,
                &server.ca,
                ADMIN_USER,
                &server.admin_token,
            )?;
            server.relay = Some(relay);
        }
        Ok(server)
    }

    /// Namespace setup, ports, certificates, the token file and the kubeconfigs.
    fn prepare(&mut self, opts: &ApiServerOptions) -> Result<(), ApiServerError> {
        let netns = self.netns.clone();
        if let Some(netns) = &netns {
            // etcd listens on loopback, which a fresh namespace has down.
            run_checked(Command::new("ip").args(["-n", netns, "link", "set", "lo", "up"]))?;
        }
        let bind = opts.bind;
        let want_port = opts.port;
        let (etcd_client, etcd_peer, port) = in_netns(netns.as_deref(), move || {
            // All three listeners are held at once so the ports differ.
            let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
            let a = TcpListener::bind(loopback)?;
            let b = TcpListener::bind(loopback)?;
            let port = if want_port == 0 {
                TcpListener::bind(SocketAddr::new(bind, 0))?
                    .local_addr()?
                    .port()
            } else {
                want_port
            };
            Ok::<_, std::io::Error>((a.local_addr()?.port(), b.local_addr()?.port(), port))
        })?
        .map_err(|source| ApiServerError::Io {
            context: "picking free ports",
            path: self.dir.clone(),
            source,
        })?;
        self.port = port;

        let pki = self.dir.join("pki");
        make_dir(&pki)?;
        make_pki(&pki, self.advertise)?;

        let mut tokens = format!(
            "{},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n",
            self.admin_token
        );
        let url = self.url();
        write_kubeconfig(
            &self.admin_kubeconfig,
            &url,
            &self.ca,
            ADMIN_USER,
            &self.admin_token,
        )?;
        for node in &opts.node_users {
            let user = node_user(node);
            let token = random_token()?;
            tokens.push_str(&format!("{token},{user},{user},\"{AGENT_GROUP}\"\n"));
            let path = self.dir.join(format!("{node}.kubeconfig"));
            write_kubeconfig(&path, &url, &self.ca, &user, &token)?;
            self.node_kubeconfigs.insert(node.clone(), path);
        }
        for user in &opts.users {
            let token = random_token()?;
            let groups = user.groups.join(",");
            tokens.push_str(&format!("{token},{0},{0},\"{groups}\"\n", user.name));
            let path = self
                .dir
                .join(format!("user-{}.kubeconfig", user.name.replace(':', "_")));
            write_kubeconfig(&path, &url, &self.ca, &user.name, &token)?;
            self.user_kubeconfigs.insert(user.name.clone(), path);
        }
        let token_file = self.dir.join("tokens.csv");
        write_private(&token_file, &tokens)?;

        self.apiserver_args = apiserver_args(
            &self.dir,
            &token_file,
            etcd_client,
            opts.bind,
            self.advertise,
            port,
        );
        merge_flags(&mut self.apiserver_args, &opts.extra_args);
        if opts.audit_log {
            let policy = self.dir.join("audit-policy.yaml");
            write_file(&policy, AUDIT_POLICY)?;
            self.apiserver_args
                .extend(audit_args(&policy, &self.audit_log_path()));
        }
        self.etcd_ports = (etcd_client, etcd_peer);
        Ok(())
    }

    fn start_etcd(&mut self) -> Result<(), ApiServerError> {
        let (client, peer) = self.etcd_ports;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args = vec![
            "--name=ferrovip".to_owned(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=ferrovip={peer_url}"),
            // Test data: losing it in a host crash is fine, waiting for disks is not.
            "--unsafe-no-fsync".to_owned(),
        ];
        let mut etcd = Daemon::spawn(
            "etcd",
            self.netns.as_deref(),
            OsStr::new("etcd"),
            &args,
            self.dir.join("etcd.log"),
        )?;
        let health = format!("{client_url}/health");
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        let started = Instant::now();
        loop {
            if let Some(status) = etcd.exited() {
                return Err(ApiServerError::Exited {
                    what: "etcd",
                    status,
                    log_tail: etcd.log_tail(),
                });
            }
            let out = self.curl(&["--max-time", "1", &health])?;
            if out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(r#""health":"true""#)
            {
                break;
            }
            if Instant::now() >= deadline {
                let log_tail = etcd.log_tail();
                self.etcd = Some(etcd);
                return Err(ApiServerError::NotReady {
                    what: "etcd",
                    waited: started.elapsed(),
                    log_tail,
                });
            }
            std::thread::sleep(POLL);
        }
        self.etcd = Some(etcd);
        Ok(())
    }

    /// Starts kube-apiserver (etcd must run) and waits until it serves.
    fn start_apiserver(&mut self) -> Result<(), ApiServerError> {
        let started = Instant::now();
        let daemon = Daemon::spawn(
            "kube-apiserver",
            self.netns.as_deref(),
            self.binary.as_os_str(),
            &self.apiserver_args,
            self.dir.join("kube-apiserver.log"),
        )?;
        self.apiserver = Some(daemon);
        let readyz = format!("{}/readyz", self.url());
        // The bootstrap controller creates `default` shortly after /readyz turns ok;
        // Events and namespaced test objects need it.
        let default_ns = format!("{}/api/v1/namespaces/default", self.url());
        let auth = format!("Authorization: Bearer {}", self.admin_token);
        let ca = self.ca.display().to_string();
        let deadline = started + self.ready_timeout;
        let mut readyz_ok = false;
        loop {
            if let Some(daemon) = self.apiserver.as_mut()
                && let Some(status) = daemon.exited()
            {
                return Err(ApiServerError::Exited {
                    what: "kube-apiserver",
                    status,
                    log_tail: daemon.log_tail(),
                });
            }
            let url = if readyz_ok { &default_ns } else { &readyz };
            let out = self.curl(&["--max-time", "2", "--cacert", &ca, "-H", &auth, url])?;
            if out.status.success() {
                if readyz_ok {
                    break;
                }
                readyz_ok = String::from_utf8_lossy(&out.stdout).trim() == "ok";
                continue;
            }
            if Instant::now() >= deadline {
                return Err(ApiServerError::NotReady {
                    what: "kube-apiserver",
                    waited: started.elapsed(),
                    log_tail: self
                        .apiserver
                        .as_ref()
                        .map(Daemon::log_tail)
                        .unwrap_or_default(),
                });
            }
            std::thread::sleep(POLL);
        }
        self.startup_time = started.elapsed();
        tracing::debug!(startup = ?self.startup_time, url = %self.url(), "kube-apiserver ready");
        Ok(())
    }

    /// `curl -sS -f ARGS` inside the server's namespace; a failed request is not an error.
    fn curl(&self, args: &[&str]) -> Result<Output, ApiServerError> {
        let mut command = command_in(self.netns.as_deref(), OsStr::new("curl"));
        command.args(["-sS", "-f"]).args(args).stdin(Stdio::null());
        command.output().map_err(|source| ApiServerError::Spawn {
            command: describe(&command),
            source,
        })
    }

    /// `https://<address>:<port>`, as reachable from inside the server's namespace and,
    /// for a lab's switch namespace, from every node.
    pub fn url(&self) -> String {
        format!("https://{}", SocketAddr::new(self.advertise, self.port))
    }

    /// The URL for the namespace the harness runs in (through a relay when the server runs
    /// in another namespace).
    pub fn host_url(&self) -> String {
        match &self.relay {
            Some(relay) => format!("https://{}", relay.addr()),
            None => self.url(),
        }
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The scratch directory. Removed on drop unless kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep [`ApiServer::dir`] (logs, etcd data) after drop, for post-mortems.
    pub fn keep_dir(&self, keep: bool) {
        self.keep_dir.store(keep, Ordering::Relaxed);
    }

    /// The CA certificate that signed the serving certificate.
    pub fn ca_cert(&self) -> &Path {
        &self.ca
    }

    /// Admin (`system:masters`) kubeconfig with [`ApiServer::url`].
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Admin kubeconfig with [`ApiServer::host_url`], for clients in the harness's namespace.
    pub fn host_admin_kubeconfig(&self) -> &Path {
        &self.host_admin_kubeconfig
    }

    /// Kubeconfig of node `node`'s identity ([`node_user`]) with [`ApiServer::url`].
    ///
    /// Panics when `node` was not in [`ApiServerOptions::node_users`]: the names come from
    /// the options the caller wrote.
    pub fn node_kubeconfig(&self, node: &str) -> &Path {
        match self.node_kubeconfigs.get(node) {
            Some(path) => path,
            None => panic!("{node} is not one of the API server's node users"),
        }
    }

    /// Kubeconfig of an extra identity ([`ApiServerOptions::users`]) with [`ApiServer::url`].
    ///
    /// Panics when `user` was not in the options: the names come from the caller.
    pub fn user_kubeconfig(&self, user: &str) -> &Path {
        match self.user_kubeconfigs.get(user) {
            Some(path) => path,
            None => panic!("{user} is not one of the API server's extra users"),
        }
    }

    /// The private key that signs ServiceAccount tokens (EC P-256, PKCS#8 PEM): what
    /// kube-controller-manager's `--service-account-private-key-file` needs.
    pub fn service_account_key(&self) -> PathBuf {
        self.dir.join("pki/sa.key")
    }

    /// The public half of [`ApiServer::service_account_key`].
    pub fn service_account_public_key(&self) -> PathBuf {
        self.dir.join("pki/sa.pub")
    }

    pub fn apiserver_log(&self) -> PathBuf {
        self.dir.join("kube-apiserver.log")
    }

    pub fn etcd_log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The audit log (JSON lines) when [`ApiServerOptions::audit_log`] is set.
    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// From spawning kube-apiserver to ready, for the latest start or restart.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// Whether kube-apiserver runs (false after [`ApiServer::stop`]).
    pub fn is_running(&mut self) -> bool {
        self.apiserver.as_mut().is_some_and(Daemon::group_alive)
    }

    /// `kubectl --kubeconfig <admin> ARGS` inside the server's namespace. A non-zero exit is
    /// not an error here: the caller reads `Output::status` (e.g. to expect a refusal).
    pub fn kubectl(&self, args: &[&str]) -> Result<Output, ApiServerError> {
        self.kubectl_with(self.netns.as_deref(), &self.admin_kubeconfig, args)
    }

    /// Like [`ApiServer::kubectl`], but a non-zero exit is an error; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, ApiServerError> {
        let out = self.kubectl(args)?;
        checked_stdout(format!("kubectl {}", args.join(" ")), out)
    }

    /// `kubectl` with another kubeconfig (e.g. [`ApiServer::node_kubeconfig`]) inside
    /// `netns` (e.g. a lab node's). Uses a discovery cache of this server's own: kubectl's
    /// default cache is keyed by host and port, which the next test's server reuses.
    pub fn kubectl_with(
        &self,
        netns: Option<&str>,
        kubeconfig: &Path,
        args: &[&str],
    ) -> Result<Output, ApiServerError> {
        let mut command = command_in(netns, OsStr::new("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .stdin(Stdio::null());
        command.output().map_err(|source| ApiServerError::Spawn {
            command: describe(&command),
            source,
        })
    }

    /// Applies a ClusterRoleBinding of `cluster_role` to [`AGENT_GROUP`], so that every node
    /// identity gets the agent's permissions (in a cluster, the agent's ServiceAccount holds
    /// them). Idempotent.
    pub fn bind_agent_group(&self, cluster_role: &str) -> Result<(), ApiServerError> {
        let binding = serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{AGENT_GROUP}-{cluster_role}")},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_role,
            },
            "subjects": [{
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": AGENT_GROUP,
            }],
        });
        let path = self.dir.join(format!("binding-{cluster_role}.json"));
        write_file(&path, &binding.to_string())?;
        self.kubectl_ok(&["apply", "-f", &path.display().to_string()])
            .map(drop)
    }

    /// Stops kube-apiserver with SIGTERM and keeps etcd, for API outage tests. New
    /// connections are refused at once; open watches keep streaming until the process is
    /// gone, which v1.20 delays while any are open, so it is killed after 5 s. Returns how long
    /// the process took to go. Not an error when already stopped.
    pub fn stop(&mut self) -> Result<Duration, ApiServerError> {
        let started = Instant::now();
        if let Some(mut daemon) = self.apiserver.take() {
            daemon.terminate(STOP_GRACE)?;
        }
        Ok(started.elapsed())
    }

    /// Kills kube-apiserver (SIGKILL) and keeps etcd: a crash, every connection drops at once.
    pub fn kill(&mut self) -> Result<(), ApiServerError> {
        if let Some(mut daemon) = self.apiserver.take() {
            daemon.terminate(Duration::ZERO)?;
        }
        Ok(())
    }

    /// Starts kube-apiserver again on the same address, certificates and etcd (stopping it
    /// first if it runs); returns once ready, after [`ApiServer::startup_time`].
    pub fn restart(&mut self) -> Result<Duration, ApiServerError> {
        self.stop()?;
        self.start_apiserver()?;
        Ok(self.startup_time)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Before the server goes, so relayed clients see the connection close, not hang.
        self.relay.take();
        // The data is thrown away, so nothing is gained by a graceful stop.
        for daemon in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut daemon = daemon;
            if let Err(e) = daemon.terminate(Duration::ZERO) {
                tracing::warn!(what = daemon.what, error = %e, "could not stop");
            }
        }
        if !self.keep_dir.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `f` on a thread inside network namespace `netns` (or here, for `None`) and returns
/// its result. Sockets `f` opens stay in that namespace for their whole life, wherever they
/// are used later; a tokio runtime built inside `f` connects from that namespace.
pub fn in_netns<T: Send>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, ApiServerError> {
    let Some(netns) = netns else {
        return Ok(f());
    };
    let handle = open_netns(netns)?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| ApiServerError::Setns {
                netns: netns.to_owned(),
                source,
            })?;
            Ok(f())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn validate(opts: &ApiServerOptions) -> Result<(), ApiServerError> {
    // Token file fields are CSV (groups one quoted field): no quotes, commas or spaces.
    let csv_safe = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_'))
    };
    for user in &opts.users {
        if !csv_safe(&user.name) || !user.groups.iter().all(|g| csv_safe(g)) {
            return Err(ApiServerError::InvalidOptions(format!(
                "user {:?} (groups {:?}): names may hold only letters, digits and - . : _",
                user.name, user.groups
            )));
        }
    }
    for node in &opts.node_users {
        // The token file is CSV and the name becomes a file name.
        let valid = !node.is_empty()
            && node
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid {
            return Err(ApiServerError::InvalidOptions(format!(
                "node name {node:?} is not a DNS-1123 name"
            )));
        }
    }
    if opts.ready_timeout.is_zero() {
        return Err(ApiServerError::InvalidOptions(
            "ready_timeout must be positive".into(),
        ));
    }
    Ok(())
}

fn apiserver_args(
    dir: &Path,
    token_file: &Path,
    etcd_port: u16,
    bind: IpAddr,
    advertise: IpAddr,
    port: u16,
) -> Vec<String> {
    let pki = dir.join("pki");
    let file = |name: &str| pki.join(name).display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        format!("--bind-address={bind}"),
        format!("--advertise-address={advertise}"),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", file("apiserver.crt")),
        format!("--tls-private-key-file={}", file("apiserver.key")),
        // Unused with explicit certificates, but the default is /var/run/kubernetes.
        format!("--cert-dir={}", pki.display()),
        format!("--token-auth-file={}", token_file.display()),
        "--authorization-mode=RBAC".to_owned(),
        // v1.20 refuses to start without an issuer and a signing key (TokenRequest).
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", file("sa.pub")),
        format!("--service-account-signing-key-file={}", file("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        "--profiling=false".to_owned(),
        // As kubeadm and every real cluster: the chart's init container (ferrovip node-setup) is
        // privileged.
        "--allow-privileged=true".to_owned(),
    ]
}

/// Appends `extra` to `args`, dropping the flags of `args` that `extra` gives again: list
/// flags such as `--authorization-mode` accumulate when repeated.
fn merge_flags(args: &mut Vec<String>, extra: &[String]) {
    let name = |flag: &str| flag.split('=').next().unwrap_or(flag).to_owned();
    let replaced: Vec<String> = extra.iter().map(|f| name(f)).collect();
    args.retain(|flag| !replaced.contains(&name(flag)));
    args.extend(extra.iter().cloned());
}

/// Every request at Metadata level. Only the stage after the response is kept, so that each
/// request is one line (long-running watches also log `ResponseStarted`).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
";

fn audit_args(policy: &Path, log: &Path) -> Vec<String> {
    vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", log.display()),
        // The log is read while the server runs: no rotation, no batching delay.
        "--audit-log-maxsize=0".to_owned(),
        "--audit-log-mode=blocking".to_owned(),
    ]
}

/// A CA, a serving certificate it signs (for `advertise`, loopback and the in-cluster
/// names), and the ServiceAccount token key. EC P-256: generated in milliseconds.
fn make_pki(pki: &Path, advertise: IpAddr) -> Result<(), ApiServerError> {
    let mut sans = vec![
        format!("IP:{advertise}"),
        "IP:127.0.0.1".to_owned(),
        "IP:::1".to_owned(),
        format!("IP:{KUBERNETES_SERVICE_IP}"),
        "DNS:localhost".to_owned(),
    ];
    for name in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        sans.push(format!("DNS:{name}"));
    }
    sans.dedup();
    let config = format!(
        "[req]\n\
         distinguished_name = dn\n\
         [dn]\n\
         [ca]\n\
         basicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign,digitalSignature\n\
         subjectKeyIdentifier = hash\n\
         [serving]\n\
         basicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         authorityKeyIdentifier = keyid\n\
         subjectAltName = {}\n",
        sans.join(",")
    );
    write_file(&pki.join("openssl.cnf"), &config)?;
    // Every argument is free of spaces, so each step reads as one command line.
    let openssl = |line: &str| {
        run_checked(
            Command::new("openssl")
                .current_dir(pki)
                .args(line.split_whitespace()),
        )
    };
    let genkey = "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out";
    openssl(&format!("{genkey} ca.key"))?;
    openssl(
        "req -x509 -new -key ca.key -subj /CN=ferrovip-test-ca -days 3650 \
         -config openssl.cnf -extensions ca -out ca.crt",
    )?;
    openssl(&format!("{genkey} apiserver.key"))?;
    openssl(
        "req -new -key apiserver.key -subj /CN=kube-apiserver -config openssl.cnf \
         -out apiserver.csr",
    )?;
    openssl(
        "x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
         -extfile openssl.cnf -extensions serving -out apiserver.crt",
    )?;
    openssl(&format!("{genkey} sa.key"))?;
    openssl("pkey -in sa.key -pubout -out sa.pub")?;
    Ok(())
}

/// JSON is YAML, and serde escapes what a hand-written YAML template would not.
fn write_kubeconfig(
    path: &Path,
    url: &str,
    ca: &Path,
    user: &str,
    token: &str,
) -> Result<(), ApiServerError> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ferrovip", "cluster": {
            "server": url,
            "certificate-authority": ca,
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "ferrovip", "user": user}}],
        "current-context": user,
    });
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    write_private(path, &text)
}

/// Where the cached binary lives: the same place `e2e/apiserver/build.sh` puts it.
fn cached_binary() -> Option<PathBuf> {
    let cache = match std::env::var_os("FERROVIP_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/ferrovip"),
    };
    Some(cache.join(format!("kube-apiserver-{APISERVER_VERSION}")))
}

fn resolve_binary(build_script: Option<&Path>) -> Result<PathBuf, ApiServerError> {
    if let Some(path) = std::env::var_os(APISERVER_ENV) {
        let path = PathBuf::from(path);
        if !is_executable(&path) {
            return Err(ApiServerError::NotInstalled {
                what: "kube-apiserver",
                detail: format!("{APISERVER_ENV}={} is not executable", path.display()),
            });
        }
        if find_on_path("etcd").is_none() {
            return Err(ApiServerError::NotInstalled {
                what: "etcd",
                detail: "not on PATH".into(),
            });
        }
        return Ok(path);
    }
    let cached = cached_binary();
    let have_binary = cached.as_deref().is_some_and(is_executable);
    let have_etcd = find_on_path("etcd").is_some();
    if have_binary && have_etcd {
        return Ok(cached.expect("checked above"));
    }
    let Some(script) = build_script else {
        return Err(ApiServerError::NotInstalled {
            what: if have_binary {
                "etcd"
            } else {
                "kube-apiserver"
            },
            detail: match cached {
                Some(path) if !have_binary => format!("no {}", path.display()),
                _ => "not on PATH".into(),
            },
        });
    };
    tracing::info!(script = %script.display(), "building kube-apiserver (minutes, once)");
    let mut command = Command::new(script);
    // The script's progress goes to our stderr; its stdout is the path.
    command.stdin(Stdio::null()).stderr(Stdio::inherit());
    let out = command.output().map_err(|source| ApiServerError::Spawn {
        command: describe(&command),
        source,
    })?;
    let stdout = checked_stdout(describe(&command), out)?;
    let path = stdout
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .filter(|path| is_executable(path))
        .ok_or_else(|| ApiServerError::NotInstalled {
            what: "kube-apiserver",
            detail: format!("{} printed no executable path", script.display()),
        })?;
    if find_on_path("etcd").is_none() {
        return Err(ApiServerError::NotInstalled {
            what: "etcd",
            detail: format!("not on PATH after {}", script.display()),
        });
    }
    Ok(path)
}

pub(crate) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

/// `program` here, or `ip netns exec NETNS program`.
pub(crate) fn command_in(netns: Option<&str>, program: &OsStr) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

pub(crate) fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn checked_stdout(command: String, out: Output) -> Result<String, ApiServerError> {
    if !out.status.success() {
        return Err(ApiServerError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn run_checked(command: &mut Command) -> Result<String, ApiServerError> {
    command.stdin(Stdio::null());
    let out = command.output().map_err(|source| ApiServerError::Spawn {
        command: describe(command),
        source,
    })?;
    checked_stdout(describe(command), out)
}

fn random_token() -> Result<String, ApiServerError> {
    let mut bytes = [0u8; 16];
    let path = Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| ApiServerError::Io {
            context: "reading random bytes",
            path: path.into(),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn create_empty_dir(dir: &Path) -> Result<(), ApiServerError> {
    make_dir(dir)?;
    let mut entries = std::fs::read_dir(dir).map_err(|source| ApiServerError::Io {
        context: "listing the API server directory",
        path: dir.into(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(ApiServerError::InvalidOptions(format!(
            "{} is not empty (it is removed when the server is dropped)",
            dir.display()
        )));
    }
    Ok(())
}

pub(crate) fn make_dir(dir: &Path) -> Result<(), ApiServerError> {
    std::fs::create_dir_all(dir).map_err(|source| ApiServerError::Io {
        context: "creating a directory",
        path: dir.into(),
        source,
    })
}

pub(crate) fn write_file(path: &Path, text: &str) -> Result<(), ApiServerError> {
    std::fs::write(path, text).map_err(|source| ApiServerError::Io {
        context: "writing a file",
        path: path.into(),
        source,
    })
}

/// Tokens are credentials, even throw-away ones.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), ApiServerError> {
    write_file(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiServerError::Io {
            context: "restricting a file's permissions",
            path: path.into(),
            source,
        }
    })
}

/// Makes a server in another namespace reachable from the harness's: listens on loopback
/// here and connects each client to the target from inside the namespace, one thread per
/// direction. TLS passes through untouched (the certificate names 127.0.0.1).
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<RelayStreams>,
    thread: Option<JoinHandle<()>>,
}

const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Relay {
    fn start(netns: String, target: SocketAddr) -> Result<Relay, ApiServerError> {
        let netns_path = PathBuf::from(format!("/run/netns/{netns}"));
        let io_error = |source| ApiServerError::Io {
            context: "starting the relay to the API server",
            path: netns_path.clone(),
            source,
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_error)?;
        let addr = listener.local_addr().map_err(io_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(BTreeMap::new()));
        let thread = std::thread::Builder::new()
            .name("apiserver-relay".into())
            .spawn({
                let stop = stop.clone();
                let streams = streams.clone();
                move || accept_loop(&listener, &netns, target, &stop, &streams)
            })
            .map_err(io_error)?;
        Ok(Relay {
            addr,
            stop,
            streams,
            thread: Some(thread),
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        for stream in streams.values().flatten() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

type RelayStreams = Mutex<BTreeMap<u64, [TcpStream; 2]>>;

fn accept_loop(
    listener: &TcpListener,
    netns: &str,
    target: SocketAddr,
    stop: &Arc<AtomicBool>,
    streams: &Arc<RelayStreams>,
) {
    let next_id = AtomicU64::new(0);
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                // E.g. out of file descriptors: back off rather than spin.
                tracing::warn!(error = %e, "relay accept failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let netns = netns.to_owned();
        let streams = streams.clone();
        let stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("apiserver-relay-conn".into())
            .spawn(move || relay_connection(client, &netns, target, id, &stop, &streams));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "relay could not start a connection thread");
        }
    }
}

fn relay_connection(
    client: TcpStream,
    netns: &str,
    target: SocketAddr,
    id: u64,
    stop: &AtomicBool,
    streams: &RelayStreams,
) {
    let upstream = match in_netns(Some(netns), || {
        TcpStream::connect_timeout(&target, RELAY_CONNECT_TIMEOUT)
    }) {
        Ok(Ok(upstream)) => upstream,
        // The server is down (an outage test): the client sees its connection close.
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_back), Ok(upstream_back)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    {
        // Checked under the lock the relay's drop takes: either it sees these streams or
        // this sees its flag.
        let mut streams = streams.lock().unwrap_or_else(|p| p.into_inner());
        let (Ok(c), Ok(u)) = (client.try_clone(), upstream.try_clone()) else {
            return;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        streams.insert(id, [c, u]);
    }
    let close_both = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let (mut from, mut to) = (&upstream_back, &client_back);
            let _ = std::io::copy(&mut from, &mut to);
            close_both(&upstream_back, &client_back);
        });
        let (mut from, mut to) = (&client, &upstream);
        let _ = std::io::copy(&mut from, &mut to);
        close_both(&client, &upstream);
    });
    streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(nodes: &[&str]) -> ApiServerOptions {
        ApiServerOptions {
            node_users: nodes.iter().map(|n| n.to_string()).collect(),
            ..ApiServerOptions::default()
        }
    }

    #[test]
    fn node_names_must_be_safe_in_csv_and_file_names() {
        assert!(validate(&opts(&["node-a", "worker-1.example"])).is_ok());
        for bad in ["", "Node-A", "a,b", "a\"b", "../x", "a b"] {
            let err = validate(&opts(&[bad])).unwrap_err();
            assert_eq!(err.metric_label(), "invalid_options", "{bad:?}");
        }
        assert_eq!(node_user("node-a"), "ferrovip:node-a");
    }

    #[test]
    fn kubeconfigs_name_server_ca_and_token() {
        let dir = std::env::temp_dir().join(format!("ferrovip-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node-a.kubeconfig");
        let ca = dir.join("ca \"quoted\".crt");
        write_kubeconfig(
            &path,
            "https://192.0.2.1:6443",
            &ca,
            "ferrovip:node-a",
            "f00d",
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        let config = kube::config::Kubeconfig::read_from(&path).unwrap();
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(config.current_context.as_deref(), Some("ferrovip:node-a"));
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://192.0.2.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), ca.to_str());
        assert_eq!(cluster.insecure_skip_tls_verify, None);
        assert!(config.auth_infos[0].auth_info.is_some());
        assert_eq!(raw["users"][0]["user"]["token"], "f00d");
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn apiserver_flags_wire_etcd_tokens_rbac_and_addresses() {
        let dir = Path::new("/tmp/x");
        let args = apiserver_args(
            dir,
            &dir.join("tokens.csv"),
            23790,
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            6443,
        );
        for want in [
            "--etcd-servers=http://127.0.0.1:23790",
            "--bind-address=0.0.0.0",
            "--advertise-address=127.0.0.1",
            "--secure-port=6443",
            "--token-auth-file=/tmp/x/tokens.csv",
            "--authorization-mode=RBAC",
            "--service-account-signing-key-file=/tmp/x/pki/sa.key",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
    }

    #[test]
    fn extra_flags_replace_the_harness_flags_of_the_same_name() {
        let mut args = vec![
            "--authorization-mode=RBAC".to_owned(),
            "--secure-port=6443".to_owned(),
        ];
        merge_flags(
            &mut args,
            &[
                "--authorization-mode=Node,RBAC".to_owned(),
                "--v=2".to_owned(),
            ],
        );
        assert_eq!(
            args,
            [
                "--secure-port=6443",
                "--authorization-mode=Node,RBAC",
                "--v=2"
            ]
        );
    }

    #[test]
    fn audit_flags_name_the_policy_and_the_log() {
        let args = audit_args(
            Path::new("/tmp/x/policy.yaml"),
            Path::new("/tmp/x/audit.log"),
        );
        assert!(args.contains(&"--audit-policy-file=/tmp/x/policy.yaml".to_owned()));
        assert!(args.contains(&"--audit-log-path=/tmp/x/audit.log".to_owned()));
        assert!(AUDIT_POLICY.contains("level: Metadata"));
        assert!(!ApiServerOptions::default().audit_log);
    }

    #[test]
    fn commands_enter_the_namespace_through_ip_netns_exec() {
        let mut inside = command_in(Some("fvlab1-0-sw"), OsStr::new("etcd"));
        inside.arg("--name=x");
        assert_eq!(describe(&inside), "ip netns exec fvlab1-0-sw etcd --name=x");
        assert_eq!(describe(&command_in(None, OsStr::new("curl"))), "curl");
    }
}
