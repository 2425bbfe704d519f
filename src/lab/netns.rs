//! The namespaces, links and processes of one lab.
//!
//! Layout: a switch namespace `<prefix>sw` holds bridge `br0` (multicast snooping and STP
//! off, so VRRP multicast floods at once) with one port `port-<x>` per node; the peer of each
//! port is `eth0` in node namespace `<prefix>node-<x>`. Interface names are fixed and short
//! because each lives in its own namespace; only namespace names carry the unique prefix.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use pnet_datalink::MacAddr;
use socket2::{Domain, Protocol, Socket, Type};

use super::LabError;

/// Every namespace of a lab created with the default prefix starts with this, followed by
/// the creating process id: that is how [`Lab::cleanup_stale`] recognises orphans.
const DEFAULT_PREFIX_STEM: &str = "fvlab";
const NETNS_DIR: &str = "/run/netns";
/// Node addresses start at .11 so that low host numbers stay free for gateways and VIPs.
const FIRST_HOST: u32 = 11;
const MAX_NODES: usize = 26;
/// Unique local /64 shared by every lab; labs are separate L2 domains, so no clash.
const ULA_PREFIX: [u16; 4] = [0xfd66, 0x7670, 0, 0];
const BRIDGE: &str = "br0";
const NODE_INTERFACE: &str = "eth0";
const TERM_GRACE: Duration = Duration::from_millis(1500);
/// The node index [`Lab::proc_info`] gives a process started with [`Lab::spawn_switch`].
pub const SWITCH: usize = usize::MAX;

static LAB_SEQUENCE: AtomicUsize = AtomicUsize::new(0);
/// Sequence numbers of the lab's ICMP echo requests, so a late reply never answers a later one.
static ECHO_SEQUENCE: AtomicU16 = AtomicU16::new(0);

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Namespace name prefix. `None` picks `fvlab<pid>-<n>-`, which [`Lab::cleanup_stale`]
    /// can reclaim once this process is gone; a custom prefix is never reclaimed.
    pub prefix: Option<String>,
    pub nodes: usize,
    /// Node `i` gets host address 11 + i in this subnet.
    pub subnet_v4: Ipv4Net,
    /// Give every node a ULA /64 address and a usable link-local; otherwise IPv6 is disabled
    /// on the nodes, which keeps the wire quiet.
    pub ipv6: bool,
    /// An address for the bridge itself, so that the node namespaces can reach a server
    /// running in the switch namespace (an API server). Must not be a node's address.
    pub bridge_ipv4: Option<Ipv4Net>,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            prefix: None,
            nodes: 3,
            subnet_v4: Ipv4Net::new(Ipv4Addr::new(192, 0, 2, 0), 24).expect("valid prefix"),
            ipv6: true,
            bridge_ipv4: None,
        }
    }
}

/// One node of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub index: usize,
    /// `node-a`, `node-b`, …: also the name passed to the agent as `--node-name`.
    pub name: String,
    pub netns: String,
    /// Always `eth0`.
    pub interface: String,
    pub mac: MacAddr,
    pub ipv4: Ipv4Addr,
    pub ipv4_prefix_len: u8,
    pub ipv6: Option<Ipv6Addr>,
    pub ipv6_ll: Option<Ipv6Addr>,
}

impl NodeInfo {
    /// `true` when `addr` is one of this node's own addresses (how adverts map to nodes).
    pub fn owns(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(v4) => v4 == self.ipv4,
            IpAddr::V6(v6) => Some(v6) == self.ipv6 || Some(v6) == self.ipv6_ll,
        }
    }
}

/// A process started by [`Lab::spawn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcId(u64);

impl std::fmt::Display for ProcId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

struct Proc {
    node: usize,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Reaps the leader if it exited. Its process group may outlive it (daemons that fork),
    /// which is why signals go to the group.
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    fn group(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn group_alive(&mut self) -> bool {
        self.poll_exit();
        killpg(self.group(), None).is_ok()
    }
}

/// A running lab. Dropping it stops every process it started and deletes its namespaces.
pub struct Lab {
    prefix: String,
    switch_netns: String,
    bridge_ifindex: u32,
    bridge_ipv4: Option<Ipv4Net>,
    nodes: Vec<NodeInfo>,
    dir: PathBuf,
    /// Namespaces that exist, in creation order, so a half-built lab can be torn down.
    namespaces: Vec<String>,
    procs: Mutex<BTreeMap<ProcId, Proc>>,
    next_proc: AtomicU64,
    keep_dir: AtomicBool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("nodes", &self.nodes)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Builds the switch, the nodes and their links. Blocking (runs `ip` a few dozen times).
    pub fn create(spec: LabSpec) -> Result<Lab, LabError> {
        if !effective_uid_is_root() {
            return Err(LabError::NotRoot);
        }
        require_ip()?;
        if spec.nodes == 0 || spec.nodes > MAX_NODES {
            return Err(LabError::InvalidSpec(format!(
                "nodes must be 1..={MAX_NODES}, got {}",
                spec.nodes
            )));
        }
        let hosts = node_ipv4s(spec.subnet_v4, spec.nodes)?;
        if let Some(bridge) = spec.bridge_ipv4
            && hosts.contains(&bridge.addr())
        {
            return Err(LabError::InvalidSpec(format!(
                "bridge address {bridge} is also a node's address"
            )));
        }
        let prefix = match spec.prefix {
            Some(prefix) => prefix,
            None => format!(
                "{DEFAULT_PREFIX_STEM}{}-{}-",
                std::process::id(),
                LAB_SEQUENCE.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let dir = lab_dir_root().join(prefix.trim_end_matches('-'));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            context: "creating the lab directory",
            path: dir.clone(),
            source,
        })?;
        let mut lab = Lab {
            switch_netns: format!("{prefix}sw"),
            prefix,
            bridge_ifindex: 0,
            bridge_ipv4: spec.bridge_ipv4,
            nodes: Vec::with_capacity(spec.nodes),
            dir,
            namespaces: Vec::new(),
            procs: Mutex::new(BTreeMap::new()),
            next_proc: AtomicU64::new(1),
            keep_dir: AtomicBool::new(false),
        };
        // From here on an error drops `lab`, which removes whatever was already built.
        lab.build_switch()?;
        for (index, ipv4) in hosts.into_iter().enumerate() {
            lab.build_node(index, ipv4, spec.subnet_v4.prefix_len(), spec.ipv6)?;
        }
        if spec.ipv6 {
            lab.learn_link_locals()?;
        }
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), LabError> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    fn build_switch(&mut self) -> Result<(), LabError> {
        let sw = self.switch_netns.clone();
        self.add_netns(&sw)?;
        // The switch only forwards; an IPv6 stack on the bridge would add MLD and router
        // solicitations to every capture.
        sysctl(
            &sw,
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &sw, "link", "set", BRIDGE, "up"])?;
        if let Some(addr) = self.bridge_ipv4 {
            ip(&["-n", &sw, "addr", "add", &addr.to_string(), "dev", BRIDGE])?;
        }
        let details = ip_json(&["-n", &sw, "-d", "-j", "link", "show", BRIDGE])?;
        let link = &details[0];
        if link["linkinfo"]["info_data"]["mcast_snooping"].as_u64() != Some(0) {
            return Err(LabError::Output {
                command: format!("ip -n {sw} -d link show {BRIDGE}"),
                detail: "multicast snooping is still on; VRRP multicast would not flood".into(),
            });
        }
        self.bridge_ifindex = ifindex_of(link, &sw)?;
        Ok(())
    }

    fn build_node(
        &mut self,
        index: usize,
        ipv4: Ipv4Addr,
        prefix_len: u8,
        ipv6: bool,
    ) -> Result<(), LabError> {
        let letter = char::from(b'a' + index as u8);
        let name = format!("node-{letter}");
        let netns = format!("{}{name}", self.prefix);
        let port = format!("port-{letter}");
        let host = ipv4.octets()[3];
        let mac = MacAddr::new(0x02, 0x66, 0x76, 0, 0, host);
        self.add_netns(&netns)?;
        // Set before eth0 exists so that it inherits them from `default`: with DAD off the
        // link-local and ULA are usable the moment the link is up.
        let sysctls: &[(&str, &str)] = if ipv6 {
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ]
        } else {
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ]
        };
        sysctl(&netns, sysctls)?;
        let sw = self.switch_netns.clone();
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_INTERFACE,
            "netns",
            &netns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", BRIDGE, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "link",
            "set",
            NODE_INTERFACE,
            "address",
            &mac.to_string(),
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ipv4}/{prefix_len}"),
            "dev",
            NODE_INTERFACE,
        ])?;
        let ula = ipv6.then(|| ula_for_host(host));
        if let Some(ula) = ula {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ula}/64"),
                "dev",
                NODE_INTERFACE,
                "nodad",
            ])?;
        }
        ip(&["-n", &netns, "link", "set", NODE_INTERFACE, "up"])?;
        self.nodes.push(NodeInfo {
            index,
            name,
            netns,
            interface: NODE_INTERFACE.to_owned(),
            mac,
            ipv4,
            ipv4_prefix_len: prefix_len,
            ipv6: ula,
            ipv6_ll: None,
        });
        Ok(())
    }

    /// The kernel assigns the link-local when the link comes up; read it back rather than
    /// assume the EUI-64 form (addr_gen_mode may differ).
    fn learn_link_locals(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(3);
        for i in 0..self.nodes.len() {
            let netns = self.nodes[i].netns.clone();
            loop {
                let addrs = ip_json(&[
                    "-n",
                    &netns,
                    "-6",
                    "-j",
                    "addr",
                    "show",
                    "dev",
                    NODE_INTERFACE,
                    "scope",
                    "link",
                ])?;
                let found = addrs
                    .as_array()
                    .and_then(|links| links.first())
                    .and_then(|link| link["addr_info"].as_array())
                    .and_then(|infos| {
                        infos
                            .iter()
                            .filter(|info| info["tentative"].as_bool() != Some(true))
                            .find_map(|info| info["local"].as_str()?.parse::<Ipv6Addr>().ok())
                    });
                if let Some(ll) = found {
                    self.nodes[i].ipv6_ll = Some(ll);
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LabError::Output {
                        command: format!("ip -n {netns} -6 addr show dev {NODE_INTERFACE}"),
                        detail: "no usable link-local address after 3 s".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Removes the namespaces (and log directories) of labs whose creating process is gone,
    /// killing whatever still runs inside them. Labs of live processes are left alone, so
    /// this is safe while other labs run. Returns the namespaces removed.
    pub fn cleanup_stale() -> Result<Vec<String>, LabError> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(NETNS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(source) => {
                return Err(LabError::Io {
                    context: "listing network namespaces",
                    path: NETNS_DIR.into(),
                    source,
                });
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| stale_creator(name).is_some())
            .collect();
        names.sort();
        for name in names {
            kill_everything_in(&name);
            ip(&["netns", "del", &name])?;
            removed.push(name);
        }
        if let Ok(dirs) = std::fs::read_dir(lab_dir_root()) {
            for dir in dirs.filter_map(Result::ok) {
                let name = dir.file_name().to_string_lossy().into_owned();
                if stale_creator(&format!("{name}-")).is_some() {
                    let _ = std::fs::remove_dir_all(dir.path());
                }
            }
        }
        Ok(removed)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Panics when `index` is out of range: node indexes come from the spec the caller wrote.
    pub fn node(&self, index: usize) -> &NodeInfo {
        &self.nodes[index]
    }

    /// The node owning `addr` (an advert's source), if any.
    pub fn node_by_addr(&self, addr: IpAddr) -> Option<&NodeInfo> {
        self.nodes.iter().find(|node| node.owns(addr))
    }

    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    pub fn bridge(&self) -> &str {
        BRIDGE
    }

    pub fn bridge_ifindex(&self) -> u32 {
        self.bridge_ifindex
    }

    /// The bridge's own address ([`LabSpec::bridge_ipv4`]), reachable from every node.
    pub fn bridge_ipv4(&self) -> Option<Ipv4Addr> {
        self.bridge_ipv4.map(|net| net.addr())
    }

    /// The lab's scratch directory (logs, manifests). Removed on drop unless kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep [`Lab::dir`] after drop (for post-mortems of a failed run).
    pub fn keep_dir(&self, keep: bool) {
        self.keep_dir.store(keep, Ordering::Relaxed);
    }

    /// Starts `args[0]` with `args[1..]` inside node `node`, stdout and stderr appended to
    /// `log_path` (relative paths are under [`Lab::dir`]). The process leads its own
    /// process group: a terminal Ctrl-C reaches only the harness, which then stops the lab in
    /// order, and [`Lab::kill`] reaches any children it forks.
    pub fn spawn(
        &self,
        node: usize,
        args: &[&str],
        log_path: impl AsRef<Path>,
    ) -> Result<ProcId, LabError> {
        self.spawn_in(node, &self.node(node).netns, args, log_path.as_ref())
    }

    /// [`Lab::spawn`] in the switch namespace (a capture on the bridge, a server); its
    /// [`Lab::proc_info`] node is [`SWITCH`].
    pub fn spawn_switch(
        &self,
        args: &[&str],
        log_path: impl AsRef<Path>,
    ) -> Result<ProcId, LabError> {
        self.spawn_in(SWITCH, &self.switch_netns, args, log_path.as_ref())
    }

    /// Node `node`'s state directory for the agents it runs (`FERROVIP_STATE_DIR` of every
    /// process [`Lab::spawn`] starts there): `<lab dir>/<node name>.state`, kept across
    /// restarts within the lab, removed with it.
    pub fn state_dir(&self, node: usize) -> PathBuf {
        let name = match node {
            SWITCH => "switch",
            n => &self.node(n).name,
        };
        self.dir.join(format!("{name}.state"))
    }

    fn spawn_in(
        &self,
        node: usize,
        netns: &str,
        args: &[&str],
        log_path: &Path,
    ) -> Result<ProcId, LabError> {
        if args.is_empty() {
            return Err(LabError::InvalidSpec("spawn needs a program".into()));
        }
        let log = self.dir.join(log_path);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| LabError::Io {
                context: "opening the process log",
                path: log.clone(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| LabError::Io {
            context: "opening the process log",
            path: log.clone(),
            source,
        })?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            // An agent's state (its address record) per node, inside the lab's directory: the
            // default /run/ferrovip would be shared by every node, and the records of agents
            // killed in a lab would outlive it there. `--state-dir` still wins.
            .env("FERROVIP_STATE_DIR", self.state_dir(node))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: format!("ip netns exec {netns} {}", args.join(" ")),
                source,
            })?;
        let id = ProcId(self.next_proc.fetch_add(1, Ordering::Relaxed));
        self.procs().insert(
            id,
            Proc {
                node,
                child,
                log,
                exit: None,
            },
        );
        Ok(id)
    }

    /// Starts Debian's keepalived in node `node` (VRRP only, in the foreground, logging to
    /// `log_path`) with configuration `conf`; its pid files sit next to `conf`. Stale pid
    /// files of a SIGKILLed predecessor are removed first (keepalived refuses to start while
    /// one names a live process, and its group has been waited for).
    pub fn spawn_keepalived(
        &self,
        node: usize,
        conf: &Path,
        log_path: impl AsRef<Path>,
    ) -> Result<ProcId, LabError> {
        let pid = conf.with_extension("pid");
        let vrrp_pid = conf.with_extension("vrrp.pid");
        let _ = std::fs::remove_file(&pid);
        let _ = std::fs::remove_file(&vrrp_pid);
        let [conf, pid, vrrp_pid] =
            [conf, &pid, &vrrp_pid].map(|p| p.to_string_lossy().into_owned());
        self.spawn(
            node,
            &[
                "keepalived",
                "--dont-fork",
                // Without --log-detail: keepalived would log every gratuitous ARP it sends, a
                // cost the agent does not pay.
                "--log-console",
                "--vrrp",
                "-f",
                &conf,
                "-p",
                &pid,
                "-r",
                &vrrp_pid,
            ],
            log_path,
        )
    }

    /// The last `lines` lines of the logs of `ids`, each under a `--- node ---` heading.
    pub fn log_tails(&self, ids: impl IntoIterator<Item = ProcId>, lines: usize) -> String {
        let mut text = String::new();
        for id in ids {
            if let Ok((node, path)) = self.proc_info(id) {
                let name = match node {
                    SWITCH => "switch",
                    n => self.node(n).name.as_str(),
                };
                text.push_str(&format!("--- {name} ---\n{}\n", log_tail(&path, lines)));
            }
        }
        text
    }

    /// Sends `signal` to the process group of `id`. Not an error if it already exited.
    pub fn kill(&self, id: ProcId, signal: Signal) -> Result<(), LabError> {
        let mut procs = self.procs();
        let proc = procs.get_mut(&id).ok_or(LabError::UnknownProcess(id))?;
        proc.poll_exit();
        match killpg(proc.group(), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(LabError::Signal {
                pid: proc.group().as_raw(),
                source,
            }),
        }
    }

    /// The exit status of `id` if it has exited (non-blocking).
    pub fn exit_status(&self, id: ProcId) -> Result<Option<ExitStatus>, LabError> {
        let mut procs = self.procs();
        let proc = procs.get_mut(&id).ok_or(LabError::UnknownProcess(id))?;
        Ok(proc.poll_exit())
    }

    /// Waits up to `timeout` for `id` and every process of its group to exit (a restarted
    /// daemon must not find its predecessor's children still around). Returns the leader's
    /// exit status, or `None` on timeout.
    pub fn wait(&self, id: ProcId, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut procs = self.procs();
                let proc = procs.get_mut(&id).ok_or(LabError::UnknownProcess(id))?;
                if let Some(status) = proc.poll_exit()
                    && !proc.group_alive()
                {
                    return Ok(Some(status));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The OS process id of `id` (also its process group id).
    pub fn pid(&self, id: ProcId) -> Result<u32, LabError> {
        let procs = self.procs();
        let proc = procs.get(&id).ok_or(LabError::UnknownProcess(id))?;
        Ok(proc.child.id())
    }

    /// The node and log file of `id`.
    pub fn proc_info(&self, id: ProcId) -> Result<(usize, PathBuf), LabError> {
        let procs = self.procs();
        let proc = procs.get(&id).ok_or(LabError::UnknownProcess(id))?;
        Ok((proc.node, proc.log.clone()))
    }

    /// Runs `args` inside node `node` to completion. A non-zero exit is not an error here:
    /// the caller reads `Output::status` (arping, ping and friends use it to report).
    /// The program must be installed: the lab's own checks use [`Lab::ping`] instead.
    pub fn exec(&self, node: usize, args: &[&str]) -> Result<Output, LabError> {
        exec_in(&self.node(node).netns, args)
    }

    /// Like [`Lab::exec`], in the switch namespace.
    pub fn exec_switch(&self, args: &[&str]) -> Result<Output, LabError> {
        exec_in(&self.switch_netns, args)
    }

    /// Sends one ICMP echo request from node `node` to `target` and waits up to `timeout` for
    /// its reply: `Ok(true)` when it came, `Ok(false)` when it did not or the target is
    /// unreachable (as `ping` would exit non-zero). The lab's own echo, not the `ping`
    /// binary, which a fresh machine may lack. An IPv6 link-local target is reached through
    /// the node's `eth0`.
    pub fn ping(&self, node: usize, target: IpAddr, timeout: Duration) -> Result<bool, LabError> {
        let netns = &self.node(node).netns;
        on_thread_in(netns, || {
            echo(target, timeout).map_err(|source| LabError::Icmp {
                netns: netns.clone(),
                source,
            })
        })
    }

    /// Whether node `node` holds `addr` (as the kernel reports it): configured on its `eth0`,
    /// or local through one of the agent's bulk-set routes on `eth0` (`local` routes in table
    /// main, protocol 0x46: sets larger than `--bulk-threshold`).
    pub fn has_address(&self, node: usize, addr: IpAddr) -> Result<bool, LabError> {
        let configured = self.configured_addresses(node)?.contains(&addr);
        if configured || addr.is_ipv6() {
            return Ok(configured);
        }
        let IpAddr::V4(addr) = addr else {
            return Ok(false);
        };
        Ok(self.bulk_routes(node)?.iter().any(|(net, len)| {
            u32::from(addr) & prefix_mask(*len) == u32::from(*net) & prefix_mask(*len)
        }))
    }

    /// Every IPv4 address node `node` holds on its `eth0` ([`Lab::has_address`]'s two kinds,
    /// bulk-set routes expanded; its own address included).
    pub fn held_ipv4(&self, node: usize) -> Result<HashSet<Ipv4Addr>, LabError> {
        let mut held: HashSet<Ipv4Addr> = self
            .configured_addresses(node)?
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        // Covers of VIP ranges; never wider than a /8 (which would be 16 M addresses).
        for (net, len) in self.bulk_routes(node)?.into_iter().filter(|(_, l)| *l >= 8) {
            let first = u32::from(net) & prefix_mask(len);
            let count = 1u64 << (32 - len);
            held.extend((0..count).map(|i| Ipv4Addr::from(first + i as u32)));
        }
        Ok(held)
    }

    /// The addresses configured on node `node`'s `eth0`.
    fn configured_addresses(&self, node: usize) -> Result<Vec<IpAddr>, LabError> {
        let netns = &self.node(node).netns;
        let links = ip_json(&["-n", netns, "-j", "addr", "show", "dev", NODE_INTERFACE])?;
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|link| link["addr_info"].as_array())
            .flatten()
            .filter_map(|info| info["local"].as_str()?.parse::<IpAddr>().ok())
            .collect())
    }

    /// The agent's bulk-set routes on node `node`'s `eth0`, as (network, prefix length).
    fn bulk_routes(&self, node: usize) -> Result<Vec<(Ipv4Addr, u32)>, LabError> {
        let netns = &self.node(node).netns;
        let routes = ip_json(&[
            "-n",
            netns,
            "-j",
            "route",
            "show",
            "table",
            "main",
            "type",
            "local",
            "proto",
            "0x46",
            "dev",
            NODE_INTERFACE,
        ])?;
        Ok(routes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|route| route["dst"].as_str())
            .filter_map(|dst| match dst.split_once('/') {
                Some((net, len)) => Some((net.parse::<Ipv4Addr>().ok()?, len.parse().ok()?)),
                None => Some((dst.parse::<Ipv4Addr>().ok()?, 32)),
            })
            .filter(|(_, len)| *len <= 32)
            .collect())
    }

    /// Sends one raw Ethernet frame out of node `node`'s `eth0` (playing a peer in tests).
    pub fn send_frame(&self, node: usize, frame: &[u8]) -> Result<(), LabError> {
        let netns = &self.node(node).netns;
        let links = ip_json(&["-n", netns, "-j", "link", "show", NODE_INTERFACE])?;
        let ifindex = ifindex_of(&links[0], netns)?;
        send_frame(netns, NODE_INTERFACE, ifindex, frame)
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, BTreeMap<ProcId, Proc>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts
        // and field updates), and teardown must still run.
        self.procs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stop_processes(&self) {
        let mut procs = self.procs();
        for proc in procs.values_mut() {
            if proc.group_alive() {
                let _ = killpg(proc.group(), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        while procs.values_mut().any(Proc::group_alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for proc in procs.values_mut() {
            if proc.group_alive() {
                tracing::warn!(
                    pid = proc.child.id(),
                    "lab process ignored SIGTERM; killing"
                );
                let _ = killpg(proc.group(), Signal::SIGKILL);
            }
            let _ = proc.child.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_processes();
        // Anything that left our process groups (a daemon that double-forked, a stray exec)
        // would keep its namespace alive after `ip netns del`.
        for netns in self.namespaces.iter().rev() {
            kill_everything_in(netns);
            if let Err(e) = ip(&["netns", "del", netns]) {
                tracing::warn!(netns, error = %e, "could not delete lab namespace");
            }
        }
        if !self.keep_dir.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// From /proc: nix's `geteuid` sits behind a feature this crate does not enable.
fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

fn lab_dir_root() -> PathBuf {
    std::env::temp_dir().join("ferrovip-lab")
}

/// `Some(pid)` when `name` belongs to a default-prefixed lab whose creator is dead.
fn stale_creator(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(DEFAULT_PREFIX_STEM)?;
    let (pid, _) = rest.split_once('-')?;
    let pid: i32 = pid.parse().ok()?;
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => Some(pid),
        _ => None,
    }
}

fn kill_everything_in(netns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn node_ipv4s(subnet: Ipv4Net, nodes: usize) -> Result<Vec<Ipv4Addr>, LabError> {
    let base = u32::from(subnet.network());
    let last = u32::from(subnet.broadcast());
    let hosts: Vec<Ipv4Addr> = (0..nodes as u32)
        .map(|i| base + FIRST_HOST + i)
        .take_while(|host| *host < last)
        .map(Ipv4Addr::from)
        .collect();
    if hosts.len() < nodes {
        return Err(LabError::InvalidSpec(format!(
            "{subnet} has no room for {nodes} nodes starting at host .{FIRST_HOST}"
        )));
    }
    Ok(hosts)
}

/// `fd66:7670::11` for host .11: the IPv6 address reads like the IPv4 one.
fn ula_for_host(host: u8) -> Ipv6Addr {
    let digits = u16::from(host / 100) << 8 | u16::from(host / 10 % 10) << 4 | u16::from(host % 10);
    let [a, b, c, d] = ULA_PREFIX;
    Ipv6Addr::new(a, b, c, d, 0, 0, 0, digits)
}

fn ifindex_of(link: &serde_json::Value, netns: &str) -> Result<u32, LabError> {
    link["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| LabError::Output {
            command: format!("ip -n {netns} -j link show"),
            detail: "no ifindex".into(),
        })
}

fn exec_in(netns: &str, args: &[&str]) -> Result<Output, LabError> {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: format!("ip netns exec {netns} {}", args.join(" ")),
            source,
        })
}

/// Sets `(key, value)` sysctls of namespace `netns` through /proc/sys, from a thread inside
/// it (the `sysctl` binary, from procps, is not on every machine).
fn sysctl(netns: &str, settings: &[(&str, &str)]) -> Result<(), LabError> {
    on_thread_in(netns, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).map_err(|source| LabError::Io {
                context: "writing a sysctl in a lab namespace",
                path,
                source,
            })?;
        }
        Ok(())
    })
}

/// Checks for the one program the lab runs, iproute2's `ip`, before anything is built, so
/// that a machine without it is told which package to install (busybox's `ip` has no
/// `netns`, hence the version check).
pub(crate) fn require_ip() -> Result<(), LabError> {
    let missing = LabError::MissingTool {
        program: "ip",
        package: "iproute2",
    };
    match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("iproute2") => Ok(()),
        Ok(_) => Err(missing),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing),
        Err(source) => Err(LabError::Spawn {
            command: "ip -V".into(),
            source,
        }),
    }
}

/// Runs `ip ARGS`, returning stdout, or an error carrying stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json(args: &[&str]) -> Result<serde_json::Value, LabError> {
    let text = ip(args)?;
    serde_json::from_str(&text).map_err(|e| LabError::Output {
        command: format!("ip {}", args.join(" ")),
        detail: e.to_string(),
    })
}

/// Runs `work` on a short-lived thread that alone enters namespace `netns` (`setns` moves
/// only the calling thread, so the rest of the process stays where it was).
fn on_thread_in<T: Send>(
    netns: &str,
    work: impl FnOnce() -> Result<T, LabError> + Send,
) -> Result<T, LabError> {
    let handle = open_netns(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Setns {
                    netns: netns.to_owned(),
                    source,
                })?;
                work()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Sends one raw Ethernet frame out of `interface` (index `ifindex`) in namespace `netns`. For
/// tests that play a VRRP peer or inject a rogue announcement.
fn send_frame(netns: &str, interface: &str, ifindex: u32, frame: &[u8]) -> Result<(), LabError> {
    on_thread_in(netns, || {
        let config = pnet_datalink::Config {
            promiscuous: false,
            ..pnet_datalink::Config::default()
        };
        let (mut tx, _rx) = ethernet_channel(netns, interface, ifindex, config)?;
        tx.send_to(frame, None)
            .unwrap_or_else(|| Err(std::io::Error::other("no send buffer")))
            .map_err(|source| LabError::PacketSocket {
                netns: netns.to_owned(),
                interface: interface.to_owned(),
                source,
            })
    })
}

/// The sending and receiving halves of an AF_PACKET channel.
pub(crate) type EthernetChannel = (
    Box<dyn pnet_datalink::DataLinkSender>,
    Box<dyn pnet_datalink::DataLinkReceiver>,
);

/// An AF_PACKET channel on `interface` (index `ifindex`) of the namespace the calling thread
/// is in (`netns` names it in errors). The interface is described by hand: pnet's interface
/// listing would need the namespace's /sys, and only the index matters for binding.
pub(crate) fn ethernet_channel(
    netns: &str,
    interface: &str,
    ifindex: u32,
    config: pnet_datalink::Config,
) -> Result<EthernetChannel, LabError> {
    let iface = pnet_datalink::NetworkInterface {
        name: interface.to_owned(),
        description: String::new(),
        index: ifindex,
        mac: None,
        ips: Vec::new(),
        flags: 0,
    };
    let error = |source| LabError::PacketSocket {
        netns: netns.to_owned(),
        interface: interface.to_owned(),
        source,
    };
    match pnet_datalink::channel(&iface, config).map_err(error)? {
        pnet_datalink::Channel::Ethernet(tx, rx) => Ok((tx, rx)),
        _ => Err(error(std::io::Error::other(
            "AF_PACKET channel is not Ethernet",
        ))),
    }
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ECHO_PAYLOAD: &[u8] = b"ferrovip lab echo";

/// One ICMP echo from the calling thread's namespace. An error is the harness's (no socket);
/// a target that cannot be reached or does not answer in time is `Ok(false)`.
fn echo(target: IpAddr, timeout: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let (domain, protocol, request, reply) = match target {
        IpAddr::V4(_) => (
            Domain::IPV4,
            Protocol::ICMPV4,
            ICMP_ECHO_REQUEST,
            ICMP_ECHO_REPLY,
        ),
        IpAddr::V6(_) => (
            Domain::IPV6,
            Protocol::ICMPV6,
            ICMPV6_ECHO_REQUEST,
            ICMPV6_ECHO_REPLY,
        ),
    };
    // Raw, not an unprivileged ping socket: a new namespace starts with
    // net.ipv4.ping_group_range empty. The kernel fills in the ICMPv6 checksum.
    let mut socket = Socket::new(domain, Type::RAW, Some(protocol))?;
    let to = match target {
        IpAddr::V4(v4) => SocketAddr::from((v4, 0)),
        IpAddr::V6(v6) => {
            let scope = if v6.is_unicast_link_local() {
                nix::net::if_::if_nametoindex(NODE_INTERFACE).map_err(std::io::Error::from)?
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(v6, 0, 0, scope))
        }
    };
    let identifier = std::process::id() as u16;
    let sequence = ECHO_SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let message = echo_message(request, identifier, sequence, target.is_ipv4());
    // Connected, the socket receives only what `target` sends, and reads need no unsafe.
    if socket.connect(&to.into()).is_err() || socket.send(&message).is_err() {
        return Ok(false);
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket.set_read_timeout(Some(left))?;
        let len = match socket.read(&mut buf) {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Timed out, or an ICMP error (unreachable) reported on the socket.
            Err(_) => return Ok(false),
        };
        // An IPv4 raw socket hands over the IP header too; an IPv6 one does not.
        let received = match target {
            IpAddr::V4(_) => without_ipv4_header(&buf[..len]),
            IpAddr::V6(_) => Some(&buf[..len]),
        };
        if received.is_some_and(|m| is_echo_reply(m, reply, identifier, sequence)) {
            return Ok(true);
        }
    }
}

/// An echo request: type, code 0, checksum, identifier, sequence, payload. The checksum is
/// filled in for ICMPv4 only (the kernel computes ICMPv6's, which covers a pseudo-header).
fn echo_message(kind: u8, identifier: u16, sequence: u16, checksum: bool) -> Vec<u8> {
    let mut message = vec![kind, 0, 0, 0];
    message.extend_from_slice(&identifier.to_be_bytes());
    message.extend_from_slice(&sequence.to_be_bytes());
    message.extend_from_slice(ECHO_PAYLOAD);
    if checksum {
        let sum = internet_checksum(&message);
        message[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    message
}

/// RFC 1071: the one's complement of the one's complement sum of 16-bit words.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn without_ipv4_header(packet: &[u8]) -> Option<&[u8]> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    packet.get(usize::from(first & 0x0f) * 4..)
}

fn is_echo_reply(message: &[u8], reply: u8, identifier: u16, sequence: u16) -> bool {
    message.len() >= 8
        && message[0] == reply
        && message[1] == 0
        && message[4..6] == identifier.to_be_bytes()
        && message[6..8] == sequence.to_be_bytes()
}

/// Opens a handle on network namespace `netns` (a name under `/run/netns`) for `setns`.
pub fn open_netns(netns: &str) -> Result<File, LabError> {
    let path = Path::new(NETNS_DIR).join(netns);
    File::open(&path).map_err(|source| LabError::Io {
        context: "opening the network namespace",
        path,
        source,
    })
}

/// The IPv4 netmask of a prefix length (0-32).
fn prefix_mask(len: u32) -> u32 {
    u32::MAX.checked_shl(32 - len).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_start_at_eleven_and_must_fit() {
        let subnet: Ipv4Net = "192.0.2.0/24".parse().unwrap();
        assert_eq!(
            node_ipv4s(subnet, 3).unwrap(),
            vec![
                Ipv4Addr::new(192, 0, 2, 11),
                Ipv4Addr::new(192, 0, 2, 12),
                Ipv4Addr::new(192, 0, 2, 13)
            ]
        );
        let small: Ipv4Net = "10.0.0.0/28".parse().unwrap();
        assert_eq!(node_ipv4s(small, 4).unwrap().len(), 4);
        assert!(matches!(
            node_ipv4s(small, 5),
            Err(LabError::InvalidSpec(_))
        ));
    }

    #[test]
    fn ula_reads_like_the_ipv4_host() {
        assert_eq!(
            ula_for_host(11),
            "fd66:7670::11".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ula_for_host(136),
            "fd66:7670::136".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_are_matched() {
        let request = echo_message(ICMP_ECHO_REQUEST, 0x1234, 7, true);
        assert_eq!(&request[..2], [8, 0]);
        assert_eq!(&request[4..8], [0x12, 0x34, 0, 7]);
        assert_eq!(&request[8..], ECHO_PAYLOAD);
        // Summing a message with its checksum in place gives 0 (RFC 1071).
        assert_eq!(internet_checksum(&request), 0);
        assert_eq!(internet_checksum(&[0x45, 0x00, 0x00, 0x1c, 0xff]), 0xbbe2);
        let v6 = echo_message(ICMPV6_ECHO_REQUEST, 0x1234, 7, false);
        assert_eq!(&v6[..4], [128, 0, 0, 0]);

        let mut reply = request.clone();
        reply[0] = ICMP_ECHO_REPLY;
        assert!(is_echo_reply(&reply, ICMP_ECHO_REPLY, 0x1234, 7));
        assert!(!is_echo_reply(&reply, ICMP_ECHO_REPLY, 0x1234, 8));
        assert!(!is_echo_reply(&reply, ICMP_ECHO_REPLY, 0x4321, 7));
        assert!(!is_echo_reply(&request, ICMP_ECHO_REPLY, 0x1234, 7));
        assert!(!is_echo_reply(&reply[..7], ICMP_ECHO_REPLY, 0x1234, 7));

        let mut packet = vec![0x46, 0, 0, 0];
        packet.extend_from_slice(&[0; 20]);
        packet.extend_from_slice(&reply);
        assert_eq!(without_ipv4_header(&packet), Some(&reply[..]));
        assert_eq!(without_ipv4_header(&[0x60, 0, 0, 0]), None);
        assert_eq!(without_ipv4_header(&[]), None);
    }

    #[test]
    fn only_default_prefixed_labs_of_dead_creators_are_stale() {
        let me = std::process::id();
        assert_eq!(stale_creator(&format!("fvlab{me}-0-sw")), None);
        assert_eq!(stale_creator("custom-node-a"), None);
        assert_eq!(stale_creator("fvlabxyz-0-sw"), None);
        // Above the kernel's pid_max ceiling (2^22), so never a live process.
        assert_eq!(stale_creator("fvlab99999999-0-sw"), Some(99_999_999));
    }
}
