use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

/// ferrovip: highly available virtual IPs for bare-metal clusters (VRRP failover).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "FERROVIP_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (standalone with --manifests).
    Agent(ferrovip::agent::AgentArgs),
    /// Run the Service controller alone (addresses for Services of type LoadBalancer; one
    /// leader per cluster through a Lease): for tests, benchmarks and deployments that run it
    /// apart from the agents (`ferrovip agent --service-controller=false`).
    Controller(ferrovip::agent::ControllerArgs),
    /// Build a multi-node VRRP lab in network namespaces, kill the master, measure failover.
    Lab(LabArgs),
    /// Remove what the agent put in this node's kernel (IPVS services, its nftables table,
    /// changed sysctls, its addresses): for a node that stops running ferrovip. Stop the
    /// agent first.
    Cleanup {
        /// The agent's --state-dir.
        #[arg(long, env = "FERROVIP_STATE_DIR", default_value = "/run/ferrovip")]
        state_dir: PathBuf,
    },
    /// Set, with privilege and once per boot, the sysctls the agent needs for the features
    /// named (the chart's privileged init container): the agent itself then runs with a
    /// read-only /proc/sys. Records the values found in the state directory, for `ferrovip
    /// cleanup`. Idempotent; prints one line per sysctl.
    NodeSetup {
        /// The agent's --state-dir.
        #[arg(long, env = "FERROVIP_STATE_DIR", default_value = "/run/ferrovip")]
        state_dir: PathBuf,
        /// The IPVS dataplane's sysctls: net.ipv4.vs.expire_nodest_conn,
        /// net.ipv4.vs.expire_quiescent_template, net.ipv4.vs.conntrack, net.ipv4.ip_forward.
        #[arg(long)]
        ipvs: bool,
        /// IPv6 forwarding, for IPv6 services that masquerade (interfaces with accept_ra=1
        /// get 2, so that they keep accepting router advertisements).
        #[arg(long)]
        ipv6_forwarding: bool,
        /// An interface VirtualIPs use (repeatable): net.ipv4.conf.<name>.promote_secondaries.
        #[arg(long = "interface")]
        interfaces: Vec<String>,
        /// net.ipv4.conf.all.promote_secondaries, which covers every interface (for a
        /// DaemonSet that cannot know which interfaces VirtualIPs name).
        #[arg(long)]
        promote_secondaries: bool,
    },
    /// Print a static pod manifest (for /etc/kubernetes/manifests) running the standalone
    /// agent for a control-plane VIP, or the VirtualIP manifest it reads.
    StaticPod(ferrovip::staticpod::StaticPodArgs),
    /// Wait until the API server serves the VirtualIP and LoadBalancerPool kinds (the chart's
    /// post-install hook, before Helm creates the initial objects of freshly created CRDs).
    /// Exits 1 naming what is still missing after --timeout.
    WaitForCrds {
        /// How long to wait.
        #[arg(long, default_value = "120s")]
        timeout: String,
    },
    /// Print the CustomResourceDefinitions (or check that a file matches them).
    Crdgen {
        /// Write one file per CRD (`<group>_<plural>.yaml`) into this directory instead of
        /// printing them all.
        #[arg(long, conflicts_with = "check")]
        write: Option<PathBuf>,
        /// Compare this directory's CRD files with the generated ones; exits 1 when one
        /// differs, is missing, or when the directory holds a CRD file that is not generated.
        #[arg(long)]
        check: Option<PathBuf>,
    },
    /// Write the RBAC manifests of config/rbac and the Helm chart's rule lists from the one
    /// table in src/crd/rbac.rs (or check that they match it).
    Rbacgen {
        /// The repository's root: write `config/rbac/*.yaml` and
        /// `charts/ferrovip/files/rbac/*.rules.yaml` under it.
        #[arg(long, conflicts_with = "check")]
        write: Option<PathBuf>,
        /// The repository's root: exit 1 when a generated file there differs or is missing.
        #[arg(long)]
        check: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct LabArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// VRRP advertisement interval.
    #[arg(long, default_value = "100ms")]
    interval: String,
    /// How many times to kill the master.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Leave the namespaces running at the end (until Ctrl-C).
    #[arg(long)]
    keep: bool,
    /// Scale mode: this many VIPs in `--groups` sharing groups, spread over the nodes; each
    /// round stops group 0's master and shows when every address was configured on the new
    /// master and announced on the wire (needs `dumpcap`, Debian package tshark).
    #[arg(long, default_value_t = 1)]
    vips: usize,
    /// Scale mode: sharing groups (one VRRP instance each; group g prefers node g mod N).
    #[arg(long, default_value_t = 3)]
    groups: usize,
    /// Scale mode: IPv6 VIPs instead of IPv4.
    #[arg(long)]
    ipv6: bool,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERROVIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Crdgen { write, check } => {
            let files = ferrovip::crd::crd_files().context("serializing the CRDs")?;
            if let Some(dir) = write {
                for (name, yaml) in &files {
                    std::fs::write(dir.join(name), yaml)
                        .with_context(|| format!("writing {}", dir.join(name).display()))?;
                }
            } else if let Some(dir) = check {
                let mut problems = Vec::new();
                for (name, yaml) in &files {
                    let path = dir.join(name);
                    match std::fs::read_to_string(&path) {
                        Ok(committed) if committed == *yaml => {}
                        Ok(_) => problems.push(format!("{} differs", path.display())),
                        Err(e) => problems.push(format!("{}: {e}", path.display())),
                    }
                }
                for entry in
                    std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
                {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".yaml") && !files.iter().any(|(n, _)| *n == name) {
                        problems.push(format!("{name} is not generated from src/crd"));
                    }
                }
                if !problems.is_empty() {
                    anyhow::bail!(
                        "the CRDs in {} are not those generated from src/crd ({}): run `ferrovip crdgen --write {}` and commit them",
                        dir.display(),
                        problems.join("; "),
                        dir.display()
                    );
                }
            } else {
                print!(
                    "{}",
                    ferrovip::crd::crds_yaml().context("serializing the CRDs")?
                );
            }
            Ok(())
        }
        Cmd::Rbacgen { write, check } => {
            let files = ferrovip::crd::rbac::rbac_files();
            if let Some(root) = write {
                for (name, text) in &files {
                    let path = root.join(name);
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            } else if let Some(root) = check {
                let problems: Vec<String> = files
                    .iter()
                    .filter_map(|(name, text)| {
                        let path = root.join(name);
                        match std::fs::read_to_string(&path) {
                            Ok(committed) if committed == *text => None,
                            Ok(_) => Some(format!("{} differs", path.display())),
                            Err(e) => Some(format!("{}: {e}", path.display())),
                        }
                    })
                    .collect();
                if !problems.is_empty() {
                    anyhow::bail!(
                        "the RBAC files are not those generated from src/crd/rbac.rs ({}): run `ferrovip rbacgen --write {}` and commit them",
                        problems.join("; "),
                        root.display()
                    );
                }
            } else {
                for (name, text) in &files {
                    print!("# {name}\n{text}");
                }
            }
            Ok(())
        }
        Cmd::Agent(args) => {
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            // The main thread computes (plans, snapshots, allocation passes) and the runtime
            // runs beside it: see `source::offload`.
            ferrovip::source::offload::serve_compute_while(move || {
                runtime.block_on(ferrovip::agent::run(args))
            })?;
            Ok(())
        }
        Cmd::Controller(args) => {
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            ferrovip::source::offload::serve_compute_while(move || {
                runtime.block_on(ferrovip::agent::run_controller(args))
            })?;
            Ok(())
        }
        Cmd::Cleanup { state_dir } => {
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            for line in runtime.block_on(ferrovip::agent::cleanup(state_dir))? {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::NodeSetup {
            state_dir,
            ipvs,
            ipv6_forwarding,
            interfaces,
            promote_secondaries,
        } => {
            init_logging(cli.log_format);
            let setup = ferrovip::dataplane::setup::NodeSetup {
                state_dir,
                ipvs,
                ipv6_forwarding,
                interfaces,
                promote_secondaries,
            };
            for line in ferrovip::dataplane::setup::run(&setup)? {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::WaitForCrds { timeout } => {
            init_logging(cli.log_format);
            let timeout = ferrovip::crd::parse_duration(&timeout).context("--timeout")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let took = runtime.block_on(async {
                let client = ferrovip::source::cluster::client()
                    .await
                    .context("connecting to the API server")?;
                ferrovip::k8s::served::wait_for_crds(&client, timeout).await
            })?;
            println!(
                "ferrovip.io/v1alpha1 virtualips and loadbalancerpools served (waited {took:?})"
            );
            Ok(())
        }
        Cmd::StaticPod(args) => {
            print!("{}", ferrovip::staticpod::render(&args)?);
            Ok(())
        }
        Cmd::Lab(args) => {
            init_logging(cli.log_format);
            let interval = ferrovip::crd::parse_duration(&args.interval).context("--interval")?;
            let binary = std::env::current_exe().context("locating the ferrovip binary")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            if args.vips > 1 || args.ipv6 {
                let opts = ferrovip::lab::ScaleOptions {
                    nodes: args.nodes,
                    interval,
                    vips: args.vips,
                    ipv6: args.ipv6,
                    groups: args.groups.min(args.vips),
                    crash_rounds: args.rounds,
                    graceful_rounds: 1,
                    idle_window: Some(std::time::Duration::from_secs(10)),
                    daemon: ferrovip::lab::Daemon::Ferrovip {
                        binary,
                        extra_args: Vec::new(),
                    },
                    quiet: false,
                    keep_logs: args.keep,
                };
                let report = ferrovip::lab::run_scale(&opts)?;
                if !report.warnings.is_empty() {
                    anyhow::bail!("the lab finished with warnings (see above)");
                }
                return Ok(());
            }
            let opts = ferrovip::lab::LabOptions {
                nodes: args.nodes,
                interval,
                binary,
                keep: args.keep,
                rounds: args.rounds,
                ..Default::default()
            };
            let report = runtime.block_on(ferrovip::lab::run_lab(opts))?;
            if !report.is_clean() {
                anyhow::bail!("the lab finished with warnings (see above)");
            }
            Ok(())
        }
    }
}
