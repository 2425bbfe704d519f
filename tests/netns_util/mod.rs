//! Network namespaces for tests that need root: created with `ip`, entered per thread with
//! setns(2), and deleted by a guard even when the test fails.

#![allow(dead_code)]

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists as long as this guard does.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace, unique per process and call, with loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "fvn-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        // From here on Drop cleans up, also when the next command panics.
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// `ip -n <ns> <args>`; panics with the error output when it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip -n <ns> <args>`, returning whether it succeeded.
    pub fn ip_ok(&self, args: &[&str]) -> bool {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A sysctl file's value as seen from inside the namespace.
    pub fn read_proc(&self, path: &str) -> String {
        self.exec(&["cat", path]).trim().to_owned()
    }

    /// The solicited-node multicast groups joined on `dev` (`/proc/net/igmp6` of the
    /// namespace), by their low 24 bits.
    pub fn solicited_groups(&self, dev: &str) -> Vec<u32> {
        self.read_proc("/proc/net/igmp6")
            .lines()
            .filter_map(|line| {
                let columns: Vec<&str> = line.split_whitespace().collect();
                let group = columns.get(2)?.strip_prefix("ff0200000000000000000001ff")?;
                (columns.get(1) == Some(&dev)).then(|| u32::from_str_radix(group, 16).ok())?
            })
            .collect()
    }

    /// Runs `f` on a new thread that has entered this namespace: sockets it opens, and
    /// `/proc/sys/net` as it sees it, belong to the namespace. Panics are passed on.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let file = File::open(&path).expect("open netns file");
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// [`enter`](Self::enter) with a current-thread tokio runtime driving `f`'s future.
    pub fn block_on<T: Send, F: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce() -> F + Send,
    ) -> T {
        self.enter(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes every link in it; veth peers elsewhere go too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command and returns its standard output; panics with its error output on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Interface index inside the namespace, from `ip -o link show`.
pub fn ifindex(netns: &Netns, name: &str) -> u32 {
    let line = netns.ip(&["-o", "link", "show", "dev", name]);
    line.split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index in {line:?}"))
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
