//! The nftables rules the IPVS NAT return path needs.
//!
//! With masquerade (NAT) forwarding, IPVS rewrites the destination to a backend but keeps the
//! client as the source, so the backend would answer the client directly and the client would
//! drop the reply. As kube-proxy does in IPVS mode, the agent source-NATs (masquerades) the
//! connections IPVS forwards, so that replies come back through the director. The match is on
//! the connection's ORIGINAL destination (the VIP, protocol and port the client used), which
//! conntrack keeps after IPVS changed the packet; that needs `net.ipv4.vs.conntrack=1`, which
//! the IPVS dataplane sets.
//!
//! This module owns exactly one table, `table inet ferrovip`, and never touches anything else.
//! Every change is one atomic `nft -f -` transaction that deletes and re-creates that table, so
//! what the kernel holds is exactly what [`render`] produced, with no window where the rules are
//! half there. nft runs as a child process, like kube-proxy's nftables mode (knftables).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::debug;

/// The table's family and name.
pub const TABLE: &str = "inet ferrovip";

/// The longest an nft run may take; a hung nft must not stall the dataplane forever.
const NFT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of nft's error output an error keeps.
const STDERR_LIMIT: usize = 2048;
/// How much of an offending script line an error keeps.
const EXCERPT_LIMIT: usize = 200;

/// The transport protocol of a virtual service (the VirtualIP's `protocol` field).
pub use crate::model::service::ServiceProtocol as Protocol;

/// The IP protocol number. Rendered as a number because nft resolves names through
/// /etc/protocols, which minimal images (the test VM's initramfs) lack.
fn number(p: Protocol) -> u8 {
    match p {
        Protocol::TCP => 6,
        Protocol::UDP => 17,
        Protocol::SCTP => 132,
    }
}

/// nft's name, which also gives `ct original proto-dst` its type (see [`render`]).
fn nft_name(p: Protocol) -> &'static str {
    match p {
        Protocol::TCP => "tcp",
        Protocol::UDP => "udp",
        Protocol::SCTP => "sctp",
    }
}

const ALL_PROTOCOLS: [Protocol; 3] = [Protocol::TCP, Protocol::UDP, Protocol::SCTP];

/// Connections to masquerade: those originally sent to a virtual service, or carrying the
/// firewall mark of a fwmark service. Only masquerade-forwarded services belong here; direct
/// routing and tunnelling must keep the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MasqueradeMatch {
    Service {
        addr: IpAddr,
        protocol: Protocol,
        port: u16,
    },
    Fwmark(u32),
}

/// Errors running nft.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program:?} (is nftables installed?): {source}")]
    Missing {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("nft failed ({status}): {stderr} [script line: {excerpt}]")]
    Failed {
        status: ExitStatus,
        stderr: String,
        /// The script line nft complained about (or the first one), shortened.
        excerpt: String,
    },
    #[error("nft did not finish within {0:?}")]
    Timeout(Duration),
    /// Mark 0 is every unmarked packet: masquerading it would NAT all traffic the node forwards.
    #[error("fwmark 0 cannot select a virtual service")]
    ZeroFwmark,
}

impl NftError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            NftError::Missing { .. } => "nft_missing",
            NftError::Spawn { .. } => "nft_spawn",
            NftError::Failed { .. } => "nft_failed",
            NftError::Timeout(_) => "nft_timeout",
            NftError::ZeroFwmark => "zero_fwmark",
        }
    }
}

/// The whole nft script that converges the table to `wanted`: the one place the ruleset is
/// written. An empty `wanted` deletes the table, so a node without NAT services keeps no nat
/// hook registered for nothing.
///
/// - `add table` before `delete table` makes the delete succeed when the table is absent
///   (nft 1.0.6 has no `destroy`); deleting and re-creating it in one transaction replaces
///   everything in it atomically, including anything someone added by hand.
/// - nft 1.0.6 cannot type `ct original proto-dst` in a concatenation without a protocol in
///   context ("can not use variable sized data types"), hence one rule per protocol, each
///   preceded by `meta l4proto <proto>`. The chain runs only for a connection's first packet.
/// - `ct original ip daddr` does not match IPv6 connections (the kernel's ct expression
///   breaks on a family mismatch), so the IPv4 rules never look at IPv6 traffic.
pub fn render(wanted: &BTreeSet<MasqueradeMatch>) -> String {
    let mut script = String::with_capacity(512 + 40 * wanted.len());
    script.push_str("add table inet ferrovip\ndelete table inet ferrovip\n");
    if wanted.is_empty() {
        return script;
    }
    let (mut v4, mut v6, mut marks) = (Vec::new(), Vec::new(), Vec::new());
    for item in wanted {
        match *item {
            MasqueradeMatch::Service {
                addr,
                protocol,
                port,
            } => {
                let element = format!("{addr} . {} . {port}", number(protocol));
                match addr {
                    IpAddr::V4(_) => v4.push(element),
                    IpAddr::V6(_) => v6.push(element),
                }
            }
            MasqueradeMatch::Fwmark(mark) => marks.push(format!("{mark:#x}")),
        }
    }
    script.push_str("table inet ferrovip {\n");
    render_set(
        &mut script,
        "services_v4",
        "ipv4_addr . inet_proto . inet_service",
        &v4,
    );
    render_set(
        &mut script,
        "services_v6",
        "ipv6_addr . inet_proto . inet_service",
        &v6,
    );
    render_set(&mut script, "fwmarks", "mark", &marks);
    script.push_str(
        "\tchain nat_postrouting {\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n",
    );
    for (ip, set) in [("ip", "services_v4"), ("ip6", "services_v6")] {
        for protocol in ALL_PROTOCOLS {
            let _ = writeln!(
                script,
                "\t\tmeta l4proto {proto} ct original {ip} daddr . meta l4proto . \
                 ct original proto-dst @{set} masquerade",
                proto = nft_name(protocol),
            );
        }
    }
    script.push_str("\t\tmeta mark @fwmarks masquerade\n\t}\n}\n");
    script
}

fn render_set(script: &mut String, name: &str, key: &str, elements: &[String]) {
    let _ = writeln!(script, "\tset {name} {{\n\t\ttype {key}");
    // nft rejects `elements = { }`: an empty set is declared without the line.
    if let Some((last, rest)) = elements.split_last() {
        script.push_str("\t\telements = {\n");
        for element in rest {
            let _ = writeln!(script, "\t\t\t{element},");
        }
        let _ = writeln!(script, "\t\t\t{last}\n\t\t}}");
    }
    script.push_str("\t}\n");
}

/// Runs nft to keep `table inet ferrovip` equal to the wanted masquerade matches.
#[derive(Debug)]
pub struct NftRules {
    binary: PathBuf,
    /// Program and arguments nft runs under (`ip netns exec <ns>` in tests).
    prefix: Vec<OsString>,
    /// What the table holds, when known; `None` until the first successful run.
    applied: Option<BTreeSet<MasqueradeMatch>>,
    invocations: u64,
}

impl NftRules {
    /// `binary` is the nft executable (`"nft"` looks it up in `PATH`).
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            prefix: Vec::new(),
            applied: None,
            invocations: 0,
        }
    }

    /// Runs nft under a wrapper command, e.g. `["nsenter", "--net=/proc/1/ns/net"]`.
    pub fn with_command_prefix<I, S>(mut self, prefix: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.prefix = prefix.into_iter().map(Into::into).collect();
        self
    }

    /// Runs nft in the named network namespace (`ip netns exec <name> nft ...`).
    pub fn in_netns(self, name: &str) -> Self {
        self.with_command_prefix(["ip", "netns", "exec", name])
    }

    /// Converges the table to `wanted` (an empty set removes it). Makes no nft call when
    /// `wanted` equals what the last successful call applied; the first call always runs.
    /// Returns whether nft ran. A failed run leaves the table as it was (the transaction is
    /// atomic) and forgets what was applied, so the next call runs again.
    pub async fn apply(&mut self, wanted: &BTreeSet<MasqueradeMatch>) -> Result<bool, NftError> {
        if wanted.contains(&MasqueradeMatch::Fwmark(0)) {
            return Err(NftError::ZeroFwmark);
        }
        if self.applied.as_ref() == Some(wanted) {
            return Ok(false);
        }
        let script = render(wanted);
        let started = Instant::now();
        self.applied = None;
        self.run(&["-f", "-"], &script).await?;
        debug!(
            matches = wanted.len(),
            elapsed = ?started.elapsed(),
            "nftables masquerade rules applied"
        );
        self.applied = Some(wanted.clone());
        Ok(true)
    }

    /// Deletes the table if it is there.
    pub async fn remove(&mut self) -> Result<(), NftError> {
        self.applied = None;
        self.run(&["-f", "-"], &render(&BTreeSet::new())).await?;
        self.applied = Some(BTreeSet::new());
        Ok(())
    }

    /// Checks that nft runs and that the kernel accepts the ruleset (nf_tables with nat,
    /// conntrack and masquerade), without changing anything: `nft --check` takes the
    /// transaction through the kernel and aborts it.
    pub async fn available(&self) -> Result<(), NftError> {
        let probe = BTreeSet::from([
            MasqueradeMatch::Service {
                addr: IpAddr::from([192, 0, 2, 1]),
                protocol: Protocol::TCP,
                port: 80,
            },
            MasqueradeMatch::Fwmark(1),
        ]);
        self.run_checked(&["--check", "-f", "-"], &render(&probe))
            .await
    }

    /// Forgets what was applied, so the next [`apply`](Self::apply) rewrites the table even
    /// if nothing changed (a periodic resync repairs changes made behind the agent's back).
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// How many times nft ran (including failed runs and checks).
    pub fn invocations(&self) -> u64 {
        self.invocations
    }

    async fn run(&mut self, args: &[&str], script: &str) -> Result<(), NftError> {
        self.invocations += 1;
        self.run_checked(args, script).await
    }

    async fn run_checked(&self, args: &[&str], script: &str) -> Result<(), NftError> {
        self.run_output(args, script).await.map(drop)
    }

    /// Runs nft with `script` on its standard input; returns its standard output.
    async fn run_output(&self, args: &[&str], script: &str) -> Result<String, NftError> {
        let mut command = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A timed-out run is killed when its future is dropped.
            .kill_on_drop(true);
        let program = PathBuf::from(
            self.prefix
                .first()
                .cloned()
                .unwrap_or_else(|| self.binary.clone().into_os_string()),
        );
        let mut child = command.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NftError::Missing {
                program: program.clone(),
                source,
            },
            _ => NftError::Spawn {
                program: program.clone(),
                source,
            },
        })?;
        let mut stdin = child.stdin.take().ok_or_else(|| NftError::Spawn {
            program: program.clone(),
            source: io::Error::other("no pipe to nft's standard input"),
        })?;
        let feed = async move {
            let written = stdin.write_all(script.as_bytes()).await;
            // Closing stdin is what tells nft the script is complete.
            drop(stdin);
            written
        };
        let (written, output) = tokio::time::timeout(NFT_TIMEOUT, async {
            tokio::join!(feed, child.wait_with_output())
        })
        .await
        .map_err(|_| NftError::Timeout(NFT_TIMEOUT))?;
        let output = output.map_err(|source| NftError::Spawn {
            program: program.clone(),
            source,
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(NftError::Failed {
                status: output.status,
                stderr: truncate(stderr.trim(), STDERR_LIMIT),
                excerpt: excerpt(script, &stderr),
            });
        }
        // nft succeeded yet did not take the whole script: it cannot have applied it.
        written.map_err(|source| NftError::Spawn { program, source })?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The table as nft lists it (`nft list table inet ferrovip`), `None` when there is none.
    /// A read: it changes nothing.
    pub async fn listing(&self) -> Result<Option<String>, NftError> {
        match self
            .run_output(&["list", "table", "inet", "ferrovip"], "")
            .await
        {
            Ok(listing) => Ok(Some(listing)),
            // "No such file or directory": no table.
            Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes over the table an earlier run left, without writing, when it is exactly what
    /// that run recorded (`recorded`: the script it applied and the listing it read back)
    /// and that script is the one `wanted` renders. Returns whether it adopted; if not, the
    /// next [`apply`](Self::apply) writes as usual.
    pub async fn adopt(
        &mut self,
        wanted: &BTreeSet<MasqueradeMatch>,
        recorded: &NftRecord,
    ) -> Result<bool, NftError> {
        if recorded.script != render(wanted) {
            return Ok(false);
        }
        let now = self.listing().await?;
        let adopted = match (&now, &recorded.listing) {
            (Some(now), Some(then)) => now == then,
            // No table, and none was wanted.
            (None, None) => wanted.is_empty(),
            _ => false,
        };
        if adopted {
            self.applied = Some(wanted.clone());
        }
        Ok(adopted)
    }

    /// What a later run needs to adopt the table as it is now: the script for `wanted` and
    /// the table's listing (one read).
    pub async fn record(&self, wanted: &BTreeSet<MasqueradeMatch>) -> Result<NftRecord, NftError> {
        Ok(NftRecord {
            script: render(wanted),
            listing: self.listing().await?,
        })
    }
}

/// The table as this dataplane left it: the script applied and nft's listing after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRecord {
    pub script: String,
    pub listing: Option<String>,
}

/// Separates the script from the listing in [`NftRecord::to_text`].
const RECORD_SEPARATOR: &str = "\n#### listing ####\n";
/// Stands for "no table" in a record.
const NO_TABLE: &str = "(no table)";

impl NftRecord {
    pub fn to_text(&self) -> String {
        format!(
            "{}{RECORD_SEPARATOR}{}",
            self.script,
            self.listing.as_deref().unwrap_or(NO_TABLE)
        )
    }

    pub fn from_text(text: &str) -> Option<NftRecord> {
        let (script, listing) = text.split_once(RECORD_SEPARATOR)?;
        Some(NftRecord {
            script: script.to_owned(),
            listing: (listing != NO_TABLE).then(|| listing.to_owned()),
        })
    }
}

/// The script line nft's error names (`/dev/stdin:LINE:COLUMNS: Error: ...`), else the first.
fn excerpt(script: &str, stderr: &str) -> String {
    let line_number = stderr
        .split("/dev/stdin:")
        .nth(1)
        .and_then(|rest| rest.split(':').next().and_then(|n| n.parse::<usize>().ok()));
    let line = line_number
        .and_then(|n| script.lines().nth(n.checked_sub(1)?))
        .or_else(|| script.lines().next())
        .unwrap_or_default();
    truncate(line.trim(), EXCERPT_LIMIT)
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(addr: &str, protocol: Protocol, port: u16) -> MasqueradeMatch {
        MasqueradeMatch::Service {
            addr: addr.parse().unwrap(),
            protocol,
            port,
        }
    }

    #[test]
    fn renders_sets_and_one_rule_per_family_and_protocol() {
        let wanted = BTreeSet::from([
            service("192.0.2.10", Protocol::TCP, 80),
            service("192.0.2.10", Protocol::UDP, 53),
            service("198.51.100.1", Protocol::SCTP, 3868),
            service("2001:db8::10", Protocol::TCP, 443),
            MasqueradeMatch::Fwmark(16),
        ]);
        let expected = "\
add table inet ferrovip
delete table inet ferrovip
table inet ferrovip {
\tset services_v4 {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = {
\t\t\t192.0.2.10 . 6 . 80,
\t\t\t192.0.2.10 . 17 . 53,
\t\t\t198.51.100.1 . 132 . 3868
\t\t}
\t}
\tset services_v6 {
\t\ttype ipv6_addr . inet_proto . inet_service
\t\telements = {
\t\t\t2001:db8::10 . 6 . 443
\t\t}
\t}
\tset fwmarks {
\t\ttype mark
\t\telements = {
\t\t\t0x10
\t\t}
\t}
\tchain nat_postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta l4proto tcp ct original ip daddr . meta l4proto . ct original proto-dst @services_v4 masquerade
\t\tmeta l4proto udp ct original ip daddr . meta l4proto . ct original proto-dst @services_v4 masquerade
\t\tmeta l4proto sctp ct original ip daddr . meta l4proto . ct original proto-dst @services_v4 masquerade
\t\tmeta l4proto tcp ct original ip6 daddr . meta l4proto . ct original proto-dst @services_v6 masquerade
\t\tmeta l4proto udp ct original ip6 daddr . meta l4proto . ct original proto-dst @services_v6 masquerade
\t\tmeta l4proto sctp ct original ip6 daddr . meta l4proto . ct original proto-dst @services_v6 masquerade
\t\tmeta mark @fwmarks masquerade
\t}
}
";
        assert_eq!(render(&wanted), expected);
    }

    #[test]
    fn empty_sets_have_no_elements_line_and_nothing_wanted_deletes_the_table() {
        let only_v6 = render(&BTreeSet::from([service("2001:db8::1", Protocol::UDP, 53)]));
        assert!(only_v6.contains(
            "\tset services_v4 {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t}\n"
        ));
        assert!(only_v6.contains("\tset fwmarks {\n\t\ttype mark\n\t}\n"));
        assert!(only_v6.contains("\t\t\t2001:db8::1 . 17 . 53\n"));
        assert_eq!(
            render(&BTreeSet::new()),
            "add table inet ferrovip\ndelete table inet ferrovip\n"
        );
    }

    #[test]
    fn excerpt_picks_the_line_nft_names() {
        let script = "add table inet ferrovip\nbogus line here\nthird\n";
        let stderr =
            "/dev/stdin:2:1-5: Error: syntax error, unexpected string\nbogus line here\n^^^^^";
        assert_eq!(excerpt(script, stderr), "bogus line here");
        assert_eq!(
            excerpt(script, "Error: Operation not permitted"),
            "add table inet ferrovip"
        );
        assert_eq!(
            excerpt(script, "/dev/stdin:99:1: Error"),
            "add table inet ferrovip"
        );
        let long = "é".repeat(300);
        let cut = excerpt(&long, "");
        assert!(cut.len() <= EXCERPT_LIMIT + "…".len() && cut.ends_with('…'));
    }

    /// A stand-in for nft: `sh -c` gets the binary path as `$0`, so each fake writes what it
    /// was given next to that path.
    struct Fake {
        base: PathBuf,
    }

    impl Fake {
        fn new(tag: &str) -> Self {
            let base =
                std::env::temp_dir().join(format!("ferrovip-nft-{tag}-{}", std::process::id()));
            Self { base }
        }

        fn rules(&self, shell: &str) -> NftRules {
            NftRules::new(&self.base).with_command_prefix(["sh", "-c", shell])
        }

        fn read(&self, suffix: &str) -> String {
            let mut path = self.base.clone().into_os_string();
            path.push(suffix);
            std::fs::read_to_string(path).unwrap_or_default()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            for suffix in [".script", ".log"] {
                let mut path = self.base.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    const RECORDER: &str = r#"cat > "$0.script"; echo "$@" >> "$0.log""#;

    #[tokio::test]
    async fn apply_runs_nft_only_when_the_wanted_set_changes() {
        let fake = Fake::new("record");
        let mut rules = fake.rules(RECORDER);
        let first = BTreeSet::from([service("192.0.2.10", Protocol::TCP, 80)]);
        assert!(rules.apply(&first).await.unwrap());
        assert_eq!(fake.read(".script"), render(&first));
        assert!(!rules.apply(&first).await.unwrap());
        assert_eq!(rules.invocations(), 1);

        let second = BTreeSet::from([
            service("192.0.2.10", Protocol::TCP, 80),
            MasqueradeMatch::Fwmark(7),
        ]);
        assert!(rules.apply(&second).await.unwrap());
        assert!(fake.read(".script").contains("\t\t\t0x7\n"));
        rules.forget();
        assert!(rules.apply(&second).await.unwrap());
        assert_eq!(rules.invocations(), 3);

        rules.remove().await.unwrap();
        assert_eq!(fake.read(".script"), render(&BTreeSet::new()));
        // The table is known to be gone: asking for nothing needs no run.
        assert!(!rules.apply(&BTreeSet::new()).await.unwrap());

        rules.available().await.unwrap();
        assert!(fake.read(".script").contains("192.0.2.1 . 6 . 80"));
        assert_eq!(rules.invocations(), 4, "checks are not counted as writes");
        assert_eq!(fake.read(".log"), "-f -\n-f -\n-f -\n-f -\n--check -f -\n");
    }

    #[tokio::test]
    async fn failures_are_typed_and_retried() {
        let fake = Fake::new("fail");
        let mut rules = fake.rules(
            "cat > /dev/null; echo '/dev/stdin:3:1-5: Error: Could not process rule' >&2; exit 1",
        );
        let wanted = BTreeSet::from([service("192.0.2.10", Protocol::TCP, 80)]);
        let error = rules.apply(&wanted).await.unwrap_err();
        assert_eq!(error.metric_label(), "nft_failed");
        let NftError::Failed {
            status,
            stderr,
            excerpt,
        } = &error
        else {
            panic!("{error:?}");
        };
        assert_eq!(status.code(), Some(1));
        assert!(stderr.contains("Could not process rule"));
        assert_eq!(excerpt, "table inet ferrovip {");
        assert!(rules.apply(&wanted).await.is_err());
        assert_eq!(rules.invocations(), 2, "a failed apply is retried");

        let missing = NftRules::new("/nonexistent/ferrovip/nft")
            .available()
            .await
            .unwrap_err();
        assert_eq!(missing.metric_label(), "nft_missing");
        assert!(missing.to_string().contains("/nonexistent/ferrovip/nft"));

        let zero = rules
            .apply(&BTreeSet::from([MasqueradeMatch::Fwmark(0)]))
            .await
            .unwrap_err();
        assert_eq!(zero.metric_label(), "zero_fwmark");
        assert_eq!(rules.invocations(), 2);
    }
}
