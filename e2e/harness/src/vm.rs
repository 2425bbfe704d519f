//! qemu VM harness for tests and benchmarks that need a real IPVS kernel.
//!
//! This host's kernel has no IPVS, so the IPVS tests boot a Debian kernel under qemu (TCG) with
//! an initramfs that `e2e/vm/build.sh` builds once and caches: busybox, the network modules,
//! Debian's `ipvsadm`, `ip`, `nft` and `strace`. Each run appends its own small cpio archive
//! (the binaries under test with their shared libraries, and the command) to that cached base,
//! which Linux accepts because concatenated newc archives unpack in order.
//!
//! Host side: [`VmImage::locate`] finds the image, [`VmRun`] boots it with a command and
//! returns the console and the command's exit code ([`VmOutput`]). [`VmNetwork`] gives a run
//! a NIC (virtio-net on a tap device) on a bridge in a host network namespace of its own, where
//! servers the guest must reach (an [`crate::ApiServer`]) run on [`UPLINK_HOST`].
//!
//! Guest side (code running inside the VM, see [`in_guest`]): [`GuestNetns`] and
//! [`GuestBridge`] build topologies of network namespaces, [`attach_uplink`] plugs a namespace
//! into the guest's side of a [`VmNetwork`], [`TcpNameServer`] answers every connection with
//! its name, and [`tcp_request`] / [`tcp_spread`] open connections from a namespace.
//!
//! Inside the guest, scripts run under busybox `sh`, which prefers its own applets to `PATH`:
//! the guest's `/init` defines an `ip` function so that scripts reach iproute2's `ip` (needed
//! for `ip netns`). Programs started with `std::process::Command` find it through `PATH`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sched::{CloneFlags, setns};

/// Overrides where [`VmImage::locate`] looks; `e2e/test.sh` exports it from `build.sh`.
pub const VM_DIR_ENV: &str = "FERROVIP_VM_DIR";
/// Set to `1` for every command run in the guest; see [`in_guest`].
pub const IN_VM_ENV: &str = "FERROVIP_IN_VM";
/// The guest's `/init` prints this, then the command's exit code, on a line of its own.
pub const EXIT_MARKER: &str = "FERROVIP-VM-EXIT=";
/// The guest's `/init` prints a line starting with this once modules are loaded, just
/// before it starts the command.
pub const READY_MARKER: &str = "FERROVIP-VM-READY";
/// Where binaries handed to [`VmRun::binary`] conventionally go in the guest.
pub const GUEST_BIN_DIR: &str = "/ferrovip/bin";
/// The command file the guest's `/init` runs (sourced by busybox `sh`).
const GUEST_COMMAND: &str = "/ferrovip/run.sh";
const QEMU: &str = "qemu-system-x86_64";
const KERNEL_FILE: &str = "vmlinuz";
const BASE_INITRAMFS: &str = "base.cpio";
const READY_STAMP: &str = "ready";
const CONSOLE_TAIL_LINES: usize = 60;
/// `/run/netns` is where `ip netns add` mounts its namespaces (the guest's /init creates it).
const NETNS_DIR: &str = "/run/netns";

/// The subnet shared by the host side of a [`VmNetwork`] and the guest (`100.64.0.0/24`,
/// shared address space that no test topology uses). Each network lives in a namespace of its
/// own, so every run uses the same addresses.
pub const UPLINK_PREFIX_LEN: u8 = 24;
/// The host's address on a [`VmNetwork`]'s bridge: where servers for the guest listen.
pub const UPLINK_HOST: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The guest's own address, on its bridge [`UPLINK_BRIDGE`] (the guest's root namespace).
pub const UPLINK_GUEST: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// The guest's bridge holding the NIC ([`UPLINK_NIC`]); [`attach_uplink`] adds namespaces.
pub const UPLINK_BRIDGE: &str = "up0";
/// The guest's NIC (virtio-net), renamed from `eth0`.
pub const UPLINK_NIC: &str = "nic0";
/// Set to [`UPLINK_BRIDGE`] in the guest when the run has a [`VmNetwork`].
pub const UPLINK_ENV: &str = "FERROVIP_VM_UPLINK";
/// Namespaces of [`VmNetwork`]: `fvm-<pid>-<n>`, reclaimed by [`VmNetwork::cleanup_stale`]
/// once that process is gone.
const NETWORK_STEM: &str = "fvm-";
const HOST_BRIDGE: &str = "br0";
const HOST_TAP: &str = "tap0";
const GUEST_MAC: &str = "52:54:00:fe:00:02";

static SEQUENCE: AtomicU32 = AtomicU32::new(0);
static NETWORK_SEQUENCE: AtomicU32 = AtomicU32::new(0);
static UPLINK_PORTS: AtomicU32 = AtomicU32::new(0);

/// Everything that can go wrong building, booting or driving the VM, on either side.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM image ({detail}); build it with `bash e2e/vm/build.sh` (or set {VM_DIR_ENV})")]
    NoImage { detail: String },
    #[error("invalid VM run: {0}")]
    InvalidRun(String),
    #[error("{context}: {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("the VM did not finish within {timeout:?}; its console ends with:\n{console_tail}")]
    Timeout {
        timeout: Duration,
        console_tail: String,
    },
    #[error(
        "qemu exited ({status}) without the guest reporting an exit code; stderr: {stderr}\nconsole ends with:\n{console_tail}"
    )]
    NoExitMarker {
        status: ExitStatus,
        stderr: String,
        console_tail: String,
    },
    #[error("could not enter network namespace {netns}")]
    Setns {
        netns: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what} in network namespace {netns}")]
    Socket {
        netns: String,
        what: String,
        #[source]
        source: io::Error,
    },
}

impl VmError {
    /// A bounded label for metrics and benchmark summaries.
    pub fn metric_label(&self) -> &'static str {
        match self {
            VmError::NoImage { .. } => "no_image",
            VmError::InvalidRun(_) => "invalid_run",
            VmError::Io { .. } => "io",
            VmError::Spawn { .. } => "spawn",
            VmError::Command { .. } => "command",
            VmError::Timeout { .. } => "timeout",
            VmError::NoExitMarker { .. } => "no_exit_marker",
            VmError::Setns { .. } => "setns",
            VmError::Socket { .. } => "socket",
        }
    }
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VmError {
    let path = path.to_path_buf();
    move |source| VmError::Io {
        context,
        path,
        source,
    }
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

/// A built VM image: a cache directory of `e2e/vm/build.sh` holding `vmlinuz`, `base.cpio`
/// and the `ready` stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmImage {
    dir: PathBuf,
    kernel_version: String,
}

impl VmImage {
    /// `$FERROVIP_VM_DIR` if set, otherwise the most recently built image under
    /// `~/.cache/ferrovip` (or `$FERROVIP_CACHE`, as `build.sh` uses).
    pub fn locate() -> Result<VmImage, VmError> {
        if let Some(dir) = std::env::var_os(VM_DIR_ENV) {
            return VmImage::open(Path::new(&dir));
        }
        let cache = match std::env::var_os("FERROVIP_CACHE") {
            Some(cache) => PathBuf::from(cache),
            None => PathBuf::from(std::env::var_os("HOME").ok_or_else(|| VmError::NoImage {
                detail: "neither FERROVIP_VM_DIR nor HOME is set".into(),
            })?)
            .join(".cache/ferrovip"),
        };
        let entries = fs::read_dir(&cache).map_err(|e| VmError::NoImage {
            detail: format!("cannot read {}: {e}", cache.display()),
        })?;
        let mut newest: Option<(SystemTime, PathBuf)> = None;
        for entry in entries.flatten() {
            let dir = entry.path();
            let is_vm = entry.file_name().to_string_lossy().starts_with("vm-");
            let Ok(stamp) = fs::metadata(dir.join(READY_STAMP)) else {
                continue;
            };
            let built = stamp.modified().unwrap_or(UNIX_EPOCH);
            if is_vm && newest.as_ref().is_none_or(|(time, _)| built > *time) {
                newest = Some((built, dir));
            }
        }
        match newest {
            Some((_, dir)) => VmImage::open(&dir),
            None => Err(VmError::NoImage {
                detail: format!("no ready vm-* directory in {}", cache.display()),
            }),
        }
    }

    /// The image in `dir`, which must hold a finished build.
    pub fn open(dir: &Path) -> Result<VmImage, VmError> {
        for file in [READY_STAMP, KERNEL_FILE, BASE_INITRAMFS] {
            if !dir.join(file).is_file() {
                return Err(VmError::NoImage {
                    detail: format!("{} has no {file}", dir.display()),
                });
            }
        }
        let kernel_version = fs::read_to_string(dir.join("kernel-version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();
        Ok(VmImage {
            dir: dir.to_path_buf(),
            kernel_version,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Debian kernel's release string, e.g. `6.1.0-56-cloud-amd64`.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }

    pub fn base_initramfs(&self) -> PathBuf {
        self.dir.join(BASE_INITRAMFS)
    }
}

/// What a finished VM run left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutput {
    /// Everything qemu printed on the serial console, carriage returns removed.
    pub console: String,
    /// The guest command's exit status (128 + signal when killed by one).
    pub exit_code: i32,
    /// From starting qemu to qemu's exit.
    pub elapsed: Duration,
    /// From starting qemu to the guest announcing [`READY_MARKER`] (kernel booted, modules
    /// loaded, command about to start).
    pub ready_after: Option<Duration>,
}

impl VmOutput {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// The command's own output: the console between the ready line and the exit marker.
    pub fn command_output(&self) -> &str {
        let start = self
            .console
            .find(READY_MARKER)
            .and_then(|at| self.console[at..].find('\n').map(|nl| at + nl + 1))
            .unwrap_or(0);
        let end = self
            .console
            .rfind(&format!("\n{EXIT_MARKER}"))
            .map_or(self.console.len(), |at| at + 1);
        self.console.get(start..end.max(start)).unwrap_or("")
    }
}

/// One boot of the image with files added and a shell command to run.
///
/// ```no_run
/// # use ferrovip_e2e::vm::{VmImage, VmRun, VmError};
/// # fn main() -> Result<(), VmError> {
/// let image = VmImage::locate()?;
/// let out = VmRun::new(&image).run("ipvsadm -Ln")?;
/// assert!(out.success(), "{}", out.console);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct VmRun<'a> {
    image: &'a VmImage,
    binaries: Vec<(PathBuf, String)>,
    files: Vec<(String, Vec<u8>, u32)>,
    env: Vec<(String, String)>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    strip_debug: bool,
    echo_console: bool,
    kernel_args: Vec<String>,
    /// The namespace of a [`VmNetwork`] whose tap device becomes the guest's NIC.
    network: Option<String>,
}

impl<'a> VmRun<'a> {
    /// 1 GiB, 2 CPUs, 5 minutes, debug info stripped, console not echoed.
    pub fn new(image: &'a VmImage) -> Self {
        VmRun {
            image,
            binaries: Vec::new(),
            files: Vec::new(),
            env: Vec::new(),
            memory_mib: 1024,
            cpus: 2,
            timeout: Duration::from_secs(300),
            strip_debug: true,
            echo_console: false,
            kernel_args: Vec::new(),
            network: None,
        }
    }

    /// Copies an executable from the host to `guest_path` (absolute), with the shared
    /// libraries `ldd` reports for it.
    pub fn binary(mut self, host_path: impl Into<PathBuf>, guest_path: &str) -> Self {
        self.binaries
            .push((host_path.into(), guest_path.to_owned()));
        self
    }

    /// A file with the given contents at `guest_path` (absolute), mode 0644.
    pub fn file(mut self, guest_path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files
            .push((guest_path.to_owned(), contents.into(), 0o100_644));
        self
    }

    /// An environment variable exported to the command.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// qemu is killed when the whole run (boot included) takes longer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Strip debug info from [`binary`](Self::binary) copies (default): a debug test binary
    /// shrinks about fourfold, which the guest unpacks into RAM on every boot. Symbols stay,
    /// so backtraces still name functions.
    pub fn strip_debug(mut self, strip: bool) -> Self {
        self.strip_debug = strip;
        self
    }

    /// Also copy the console to this process's stderr as it arrives (long runs show
    /// progress; the output is in [`VmOutput::console`] either way).
    pub fn echo_console(mut self, echo: bool) -> Self {
        self.echo_console = echo;
        self
    }

    /// An extra kernel command-line argument.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_owned());
        self
    }

    /// Gives the guest a NIC on `network`'s bridge: qemu runs in that namespace with its tap
    /// device, and before the command starts the guest renames the NIC [`UPLINK_NIC`] and puts
    /// it into bridge [`UPLINK_BRIDGE`] with address [`UPLINK_GUEST`] ([`attach_uplink`] adds
    /// namespaces).
    pub fn network(mut self, network: &VmNetwork) -> Self {
        self.network = Some(network.netns.clone());
        self
    }

    /// Boots the VM, runs `command` with busybox `sh` in the guest (working directory
    /// `/ferrovip`), and waits for the guest to power off. A non-zero exit code is not an
    /// error: check [`VmOutput::exit_code`].
    pub fn run(&self, command: &str) -> Result<VmOutput, VmError> {
        let work = WorkDir::create()?;
        let initrd = work.path.join("initrd.cpio");
        self.write_initramfs(&work, &initrd, command)?;

        let mut append = String::from("console=ttyS0 quiet panic=-1");
        for arg in &self.kernel_args {
            append.push(' ');
            append.push_str(arg);
        }
        let mut qemu = match &self.network {
            // `ip netns exec` execs qemu, so the child is qemu itself.
            Some(netns) => {
                let mut qemu = Command::new("ip");
                qemu.args(["netns", "exec", netns, QEMU]);
                qemu
            }
            None => Command::new(QEMU),
        };
        if self.network.is_some() {
            qemu.args([
                "-netdev",
                &format!("tap,id=uplink,ifname={HOST_TAP},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-pci,netdev=uplink,mac={GUEST_MAC}"),
            ]);
        }
        qemu.args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-serial", "stdio", "-no-reboot"])
        // Without a display SeaBIOS writes to the serial console too, terminal resets
        // included; this keeps the console to the kernel and the guest.
        .args(["-fw_cfg", "name=etc/sercon-port,string=0"])
        .args(["-m", &self.memory_mib.to_string()])
        .args(["-smp", &self.cpus.to_string()])
        .arg("-kernel")
        .arg(self.image.kernel())
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

        let started = Instant::now();
        let child = qemu.spawn().map_err(|source| VmError::Spawn {
            command: QEMU.into(),
            source,
        })?;
        let mut qemu = QemuProcess(child);
        let stdout = qemu.0.stdout.take().expect("stdout is piped");
        let stderr = qemu.0.stderr.take().expect("stderr is piped");
        let echo = self.echo_console;
        let console_reader = std::thread::spawn(move || read_console(stdout, started, echo));
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = io::BufReader::new(stderr).read_to_string(&mut text);
            text
        });

        let deadline = started + self.timeout;
        let status = loop {
            match qemu.0.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(source) => {
                    return Err(VmError::Spawn {
                        command: QEMU.into(),
                        source,
                    });
                }
            }
        };
        let elapsed = started.elapsed();
        if status.is_none() {
            qemu.kill();
        }
        let (console, ready_after) = console_reader.join().unwrap_or_default();
        let stderr = stderr_reader.join().unwrap_or_default();
        let Some(status) = status else {
            return Err(VmError::Timeout {
                timeout: self.timeout,
                console_tail: tail(&console),
            });
        };
        match parse_exit_code(&console) {
            Some(exit_code) => Ok(VmOutput {
                console,
                exit_code,
                elapsed,
                ready_after,
            }),
            None => Err(VmError::NoExitMarker {
                status,
                stderr: stderr.trim().to_owned(),
                console_tail: tail(&console),
            }),
        }
    }

    fn write_initramfs(&self, work: &WorkDir, initrd: &Path, command: &str) -> Result<(), VmError> {
        let script = self.script(command)?;
        let base = self.image.base_initramfs();
        fs::copy(&base, initrd).map_err(io_error("cannot copy the base initramfs", &base))?;
        let out = fs::OpenOptions::new()
            .append(true)
            .open(initrd)
            .map_err(io_error("cannot open the initramfs", initrd))?;
        let mut archive = NewcWriter::new(io::BufWriter::new(out));

        // The base archive ends with padding to a 512-byte block, so this one starts aligned.
        let mut files: Vec<(String, Source)> = Vec::new();
        let mut libraries = BTreeSet::new();
        for (index, (host, guest)) in self.binaries.iter().enumerate() {
            check_guest_path(guest)?;
            let source = if self.strip_debug {
                let stripped = work.path.join(format!("binary-{index}"));
                run_host(
                    Command::new("objcopy")
                        .arg("--strip-debug")
                        .arg(host)
                        .arg(&stripped),
                )?;
                stripped
            } else {
                host.clone()
            };
            files.push((guest.clone(), Source::File(source, 0o100_755)));
            libraries.extend(shared_libraries(host)?);
        }
        for (host, guest) in libraries {
            files.push((guest, Source::File(host, 0o100_755)));
        }
        for (guest, contents, mode) in &self.files {
            check_guest_path(guest)?;
            files.push((guest.clone(), Source::Bytes(contents.clone(), *mode)));
        }
        files.push((GUEST_COMMAND.into(), Source::Bytes(script, 0o100_644)));

        let mut dirs = BTreeSet::new();
        for (guest, _) in &files {
            let mut parent = Path::new(guest).parent();
            while let Some(dir) = parent.filter(|d| *d != Path::new("/")) {
                dirs.insert(dir.to_string_lossy().into_owned());
                parent = dir.parent();
            }
        }
        let write_error = io_error("cannot write the initramfs", initrd);
        let result = (|| {
            // Parents sort before their children, and the unpacker creates no parents itself.
            for dir in &dirs {
                archive.directory(dir)?;
            }
            for (guest, source) in &files {
                match source {
                    Source::Bytes(bytes, mode) => {
                        archive.file(guest, *mode, bytes.len(), bytes.as_slice())?
                    }
                    Source::File(host, mode) => {
                        let file = File::open(host)?;
                        let len = file.metadata()?.len();
                        let len = usize::try_from(len)
                            .ok()
                            .filter(|len| u32::try_from(*len).is_ok())
                            .ok_or_else(|| io::Error::other("file too large for newc"))?;
                        archive.file(guest, *mode, len, file)?;
                    }
                }
            }
            archive.finish()
        })();
        result.map_err(write_error)
    }

    /// The command file: exports, then the command verbatim. `/init` sources it, so the
    /// command sees the `ip` function that points busybox `sh` at iproute2.
    fn script(&self, command: &str) -> Result<Vec<u8>, VmError> {
        let mut script = format!("export {IN_VM_ENV}=1\n");
        for (key, value) in &self.env {
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(VmError::InvalidRun(format!(
                    "environment variable name {key:?}"
                )));
            }
            script.push_str(&format!("export {key}={}\n", shell_quote(value)));
        }
        if self.network.is_some() {
            // The NIC joins a bridge, so that namespaces can join the host's segment too. It
            // leaves the name eth0 to the tests' namespaces: `ip link add eth0 netns x type
            // veth ...` fails while the root namespace has an eth0.
            let guest = format!("{UPLINK_GUEST}/{UPLINK_PREFIX_LEN}");
            script.push_str(&format!(
                "if ip link set eth0 name {UPLINK_NIC} && ip link add {UPLINK_BRIDGE} type bridge \
                 && ip link set {UPLINK_NIC} master {UPLINK_BRIDGE} \
                 && ip link set {UPLINK_NIC} up && ip link set {UPLINK_BRIDGE} up \
                 && ip addr add {guest} dev {UPLINK_BRIDGE}; then export {UPLINK_ENV}={UPLINK_BRIDGE}; \
                 else echo 'ferrovip-vm: no uplink: the NIC (virtio_net) is missing or could not be set up'; fi\n"
            ));
        }
        script.push_str(command);
        script.push('\n');
        Ok(script.into_bytes())
    }
}

enum Source {
    Bytes(Vec<u8>, u32),
    File(PathBuf, u32),
}

/// Kills qemu when dropped while still running: a panicking or timed-out test leaves no VM.
struct QemuProcess(Child);

impl QemuProcess {
    fn kill(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private scratch directory, removed when dropped.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create() -> Result<WorkDir, VmError> {
        let path = std::env::temp_dir().join(format!(
            "ferrovip-vm-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io_error("cannot create a scratch directory", &path))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A network for [`VmRun::network`]: a host network namespace `fvm-<pid>-<n>` holding bridge
/// `br0` with [`UPLINK_HOST`] and the tap device qemu opens. Run servers for the guest in
/// [`VmNetwork::netns`] (e.g. [`crate::ApiServerOptions::netns`] with `bind` [`UPLINK_HOST`]).
/// Dropping it deletes the namespace, which removes the bridge and the tap with it: drop what
/// runs inside first.
#[derive(Debug)]
pub struct VmNetwork {
    netns: String,
}

impl VmNetwork {
    pub fn create() -> Result<VmNetwork, VmError> {
        let _ = VmNetwork::cleanup_stale();
        let netns = format!(
            "{NETWORK_STEM}{}-{}",
            std::process::id(),
            NETWORK_SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        run_command("ip", &["netns", "add", &netns])?;
        // From here on Drop deletes it, also when the next command fails.
        let network = VmNetwork { netns };
        let host = format!("{UPLINK_HOST}/{UPLINK_PREFIX_LEN}");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", HOST_BRIDGE, "type", "bridge"],
            &["addr", "add", &host, "dev", HOST_BRIDGE],
            &["link", "set", HOST_BRIDGE, "up"],
            &["tuntap", "add", "dev", HOST_TAP, "mode", "tap"],
            &["link", "set", HOST_TAP, "master", HOST_BRIDGE],
            &["link", "set", HOST_TAP, "up"],
        ] {
            network.ip(args)?;
        }
        Ok(network)
    }

    /// The host network namespace of the bridge and the tap.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `ip -n <netns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, VmError> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// Deletes the namespaces of networks whose process is gone (killed before its Drop
    /// ran); returns their names.
    pub fn cleanup_stale() -> Result<Vec<String>, VmError> {
        let dir = Path::new(NETNS_DIR);
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("cannot list network namespaces", dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(NETWORK_STEM)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists()
                && run_command("ip", &["netns", "del", &name]).is_ok()
            {
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        let _ = run_command("ip", &["netns", "del", &self.netns]);
    }
}

/// Reads the console to its end; returns the text (CR removed) and when the ready line came.
fn read_console(mut stdout: impl Read, started: Instant, echo: bool) -> (String, Option<Duration>) {
    let mut bytes = Vec::new();
    let mut ready_after = None;
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stdout.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk: Vec<u8> = chunk[..n].iter().copied().filter(|b| *b != b'\r').collect();
        if echo {
            let mut err = io::stderr().lock();
            let _ = err.write_all(&chunk);
            let _ = err.flush();
        }
        // Search only the part that may hold a marker split across two reads.
        let from = bytes.len().saturating_sub(READY_MARKER.len());
        bytes.extend_from_slice(&chunk);
        if ready_after.is_none()
            && bytes[from..]
                .windows(READY_MARKER.len())
                .any(|w| w == READY_MARKER.as_bytes())
        {
            ready_after = Some(started.elapsed());
        }
    }
    (String::from_utf8_lossy(&bytes).into_owned(), ready_after)
}

/// The exit code from the last marker line; kernel messages may interleave with the command's
/// output, but the marker always starts a line.
fn parse_exit_code(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(EXIT_MARKER))
        .and_then(|code| code.trim().parse().ok())
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Absolute, and every component a plain name: the archive stores names verbatim and the
/// parent directories it creates are derived from them.
fn check_guest_path(path: &str) -> Result<(), VmError> {
    let valid = path.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
    }) && !path.contains('\0');
    if valid {
        Ok(())
    } else {
        Err(VmError::InvalidRun(format!("guest path {path:?}")))
    }
}

fn run_host(command: &mut Command) -> Result<String, VmError> {
    let description = format!("{command:?}");
    let output = command.output().map_err(|source| VmError::Spawn {
        command: description.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(VmError::Command {
            command: description,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `(host path, guest path)` of every library `ldd` lists for `binary`, the dynamic loader
/// included. The guest path is the host's with directory symlinks resolved (the guest's
/// `/lib` and `/lib64` are links into `/usr`, as on the host) and the file name kept, since
/// that is the name the loader asks for.
fn shared_libraries(binary: &Path) -> Result<Vec<(PathBuf, String)>, VmError> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| VmError::Spawn {
            command: format!("ldd {}", binary.display()),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd fails on static executables, which need nothing.
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stdout.contains("statically linked") || stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(VmError::Command {
            command: format!("ldd {}", binary.display()),
            status: output.status,
            stderr: stderr.trim().to_owned(),
        });
    }
    parse_ldd(&stdout)
        .into_iter()
        .map(|host| {
            let name = host.file_name().unwrap_or_default().to_owned();
            let dir = host.parent().unwrap_or(Path::new("/"));
            let dir = fs::canonicalize(dir).map_err(io_error("cannot resolve", dir))?;
            Ok((host.clone(), dir.join(name).to_string_lossy().into_owned()))
        })
        .collect()
}

fn parse_ldd(stdout: &str) -> Vec<PathBuf> {
    stdout
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, target)) => target.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A writer of the SVR4 "newc" cpio format (the one the kernel's initramfs unpacker reads):
/// a 110-byte ASCII header, the NUL-terminated name padded to 4 bytes, the data padded to 4.
struct NewcWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> NewcWriter<W> {
    fn new(out: W) -> Self {
        // Far above the inode numbers of the base archive; only hard links (nlink > 1, which
        // this writer never emits) make the unpacker look at them.
        NewcWriter {
            out,
            written: 0,
            next_inode: 0x4000_0000,
        }
    }

    fn directory(&mut self, path: &str) -> io::Result<()> {
        self.header(path, 0o040_755, 2, 0)
    }

    fn file(&mut self, path: &str, mode: u32, len: usize, mut data: impl Read) -> io::Result<()> {
        self.header(path, mode, 1, len)?;
        let copied = io::copy(&mut (&mut data).take(len as u64), &mut self.out)?;
        if copied != len as u64 {
            return Err(io::Error::other(format!(
                "{path} shrank while being packed"
            )));
        }
        self.written += copied;
        self.pad()
    }

    fn finish(mut self) -> io::Result<()> {
        self.header("TRAILER!!!", 0, 1, 0)?;
        self.out.flush()
    }

    fn header(&mut self, path: &str, mode: u32, nlink: u32, len: usize) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let inode = self.next_inode;
        self.next_inode += 1;
        let mtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        let fields = [
            inode,
            mode,
            0,
            0,
            nlink,
            mtime,
            len as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += header.len() as u64 + name.len() as u64 + 1;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..padding])?;
        self.written += padding as u64;
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------------
// Guest side
// ----------------------------------------------------------------------------------------------

/// Whether this process runs inside the VM (every [`VmRun`] command gets [`IN_VM_ENV`]=1).
pub fn in_guest() -> bool {
    std::env::var_os(IN_VM_ENV).is_some_and(|v| v == "1")
}

/// Runs a program and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<String, VmError> {
    run_host(Command::new(program).args(args))
}

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
pub struct GuestNetns {
    name: String,
}

impl GuestNetns {
    /// Creates the namespace with loopback up. Names are the caller's: the guest is fresh
    /// on every boot, but two live namespaces cannot share one.
    pub fn create(name: &str) -> Result<GuestNetns, VmError> {
        run_command("ip", &["netns", "add", name])?;
        // From here on Drop deletes it, also when the next command fails.
        let netns = GuestNetns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, VmError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// A program run inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, VmError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// Sets a sysctl of this namespace: `key` in dotted form (`net.ipv4.ip_forward`), or as
    /// a path below /proc/sys when a component holds a dot itself (`net/ipv4/conf/eth0.5/..`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), VmError> {
        let relative = if key.contains('/') {
            key.to_owned()
        } else {
            key.replace('.', "/")
        };
        let path = Path::new("/proc/sys").join(relative);
        // /proc/sys/net shows the network namespace of the thread that opens the file.
        self.run(|| fs::write(&path, value))?
            .map_err(io_error("cannot write sysctl", &path))
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created there stay in
    /// this namespace after `f` returns, whichever thread uses them.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, VmError> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let handle = File::open(&path).map_err(io_error("cannot open network namespace", &path))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| VmError::Setns {
                        netns: self.name.clone(),
                        source,
                    })?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Adds `cidr` (`192.0.2.1/24`, `2001:db8::1/64`) to `interface`. IPv6 addresses skip
    /// duplicate address detection, which would keep them unusable for a second or two.
    pub fn add_address(&self, cidr: &str, interface: &str) -> Result<(), VmError> {
        let mut args = vec!["addr", "add", cidr, "dev", interface];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// A veth pair between `local` here and `peer_name` in `peer`, both up.
    pub fn veth(&self, local: &str, peer: &GuestNetns, peer_name: &str) -> Result<(), VmError> {
        run_command(
            "ip",
            &[
                "link", "add", local, "netns", &self.name, "type", "veth", "peer", "name",
                peer_name, "netns", &peer.name,
            ],
        )?;
        self.ip(&["link", "set", local, "up"])?;
        peer.ip(&["link", "set", peer_name, "up"])?;
        Ok(())
    }
}

impl Drop for GuestNetns {
    fn drop(&mut self) {
        let _ = run_command("ip", &["netns", "del", &self.name]);
    }
}

/// A switch: a namespace of its own holding bridge `br0`, to which other namespaces attach
/// with a veth each. Multicast snooping is off so that multicast floods at once.
#[derive(Debug)]
pub struct GuestBridge {
    netns: GuestNetns,
    ports: AtomicU32,
}

impl GuestBridge {
    pub fn create(name: &str) -> Result<GuestBridge, VmError> {
        let netns = GuestNetns::create(name)?;
        netns.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        Ok(GuestBridge {
            netns,
            ports: AtomicU32::new(0),
        })
    }

    /// The namespace holding the bridge.
    pub fn netns(&self) -> &GuestNetns {
        &self.netns
    }

    /// Plugs `netns` in through a new interface `interface` there, with `cidrs` (e.g.
    /// `192.0.2.1/24`) assigned to it.
    pub fn attach(
        &self,
        netns: &GuestNetns,
        interface: &str,
        cidrs: &[&str],
    ) -> Result<(), VmError> {
        let port = format!("port{}", self.ports.fetch_add(1, Ordering::Relaxed));
        netns.veth(interface, &self.netns, &port)?;
        self.netns.ip(&["link", "set", &port, "master", "br0"])?;
        for cidr in cidrs {
            netns.add_address(cidr, interface)?;
        }
        Ok(())
    }
}

/// Plugs `netns` into the guest's uplink (a run with [`VmRun::network`]): a veth `interface`
/// there, its peer a port of [`UPLINK_BRIDGE`] in the guest's root namespace, with `cidr` (in
/// the uplink's subnet, e.g. `100.64.0.11/24`): the namespace then reaches [`UPLINK_HOST`].
pub fn attach_uplink(netns: &GuestNetns, interface: &str, cidr: &str) -> Result<(), VmError> {
    if std::env::var_os(UPLINK_ENV).is_none() {
        return Err(VmError::InvalidRun(
            "the guest has no uplink: the run has no network (VmRun::network), or the guest \
             could not set it up (see the console; an image older than virtio_net?)"
                .into(),
        ));
    }
    let port = format!("upport{}", UPLINK_PORTS.fetch_add(1, Ordering::Relaxed));
    run_command(
        "ip",
        &[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            interface,
            "netns",
            &netns.name,
        ],
    )?;
    run_command("ip", &["link", "set", &port, "master", UPLINK_BRIDGE])?;
    run_command("ip", &["link", "set", &port, "up"])?;
    netns.ip(&["link", "set", interface, "up"])?;
    netns.add_address(cidr, interface)
}

/// A TCP server in a namespace that answers every connection with `<reply>\n` and closes
/// it, recording who connected. Stops when dropped.
#[derive(Debug)]
pub struct TcpNameServer {
    listener: Arc<TcpListener>,
    local_addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpNameServer {
    pub fn start(netns: &GuestNetns, addr: SocketAddr, reply: &str) -> Result<Self, VmError> {
        let listener =
            netns
                .run(|| TcpListener::bind(addr))?
                .map_err(|source| VmError::Socket {
                    netns: netns.name.clone(),
                    what: format!("cannot listen on {addr}"),
                    source,
                })?;
        let local_addr = listener.local_addr().unwrap_or(addr);
        let listener = Arc::new(listener);
        let peers = Arc::new(Mutex::new(Vec::new()));
        let reply = format!("{reply}\n");
        let thread = {
            let listener = Arc::clone(&listener);
            let peers = Arc::clone(&peers);
            std::thread::spawn(move || {
                // Ends when Drop shuts the listener down: accept then fails.
                while let Ok((mut stream, peer)) = listener.accept() {
                    peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                    let _ = stream.write_all(reply.as_bytes());
                    let _ = stream.shutdown(Shutdown::Write);
                }
            })
        };
        Ok(TcpNameServer {
            listener,
            local_addr,
            peers,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The source address of every connection served so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TcpNameServer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket wakes a blocked accept(2) with an error.
        let _ = socket2::SockRef::from(&*self.listener).shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `netns` to `target` and returns the first line the server sends.
pub fn tcp_request(
    netns: &GuestNetns,
    target: SocketAddr,
    timeout: Duration,
) -> Result<String, VmError> {
    netns
        .run(|| request_once(target, timeout))?
        .map_err(|source| VmError::Socket {
            netns: netns.name.clone(),
            what: format!("request to {target}"),
            source,
        })
}

/// Opens `connections` connections one after another from `netns` to `target` and counts
/// the replies (see [`TcpNameServer`]) by text.
pub fn tcp_spread(
    netns: &GuestNetns,
    target: SocketAddr,
    connections: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>, VmError> {
    netns
        .run(|| {
            let mut replies = BTreeMap::new();
            for _ in 0..connections {
                *replies.entry(request_once(target, timeout)?).or_insert(0) += 1;
            }
            Ok(replies)
        })?
        .map_err(|source| VmError::Socket {
            netns: netns.name.clone(),
            what: format!("request to {target}"),
            source,
        })
}

fn request_once(target: SocketAddr, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or("").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_has_aligned_entries_and_a_trailer() {
        let mut out = Vec::new();
        let mut writer = NewcWriter::new(&mut out);
        writer.directory("/ferrovip").unwrap();
        writer
            .file("/ferrovip/run.sh", 0o100_644, 5, &b"true\n"[..])
            .unwrap();
        writer.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("070701").count(), 3);
        // Directory header: mode 040755, nlink 2, size 0, name length 9 ("ferrovip" + NUL).
        assert_eq!(&text[6..14], "40000000");
        assert_eq!(&text[14..22], "000041ed");
        assert_eq!(&text[38..46], "00000002");
        assert_eq!(&text[54..62], "00000000");
        assert_eq!(&text[94..102], "00000009");
        assert_eq!(&text[110..119], "ferrovip\0");
        // Header (110) + name (9) = 119, padded to 120.
        let file = &text[120..];
        assert!(file.starts_with("070701"));
        assert_eq!(&file[54..62], "00000005");
        assert_eq!(&file[94..102], "00000010");
        // 110 + 16 ("ferrovip/run.sh" + NUL) = 126, padded to 128; data 5 padded to 8.
        assert_eq!(&file[110..126], "ferrovip/run.sh\0");
        assert_eq!(&file[128..133], "true\n");
        assert!(file[136..].starts_with("070701"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn ldd_output_yields_library_and_loader_paths() {
        let stdout = "\tlinux-vdso.so.1 (0x00007ffc)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1c)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1c)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f1c)\n";
        assert_eq!(
            parse_ldd(stdout),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn exit_code_comes_from_the_last_marker_line() {
        let console = "FERROVIP-VM-READY uptime=1.9\nsays FERROVIP-VM-EXIT=3 inline\n\
            out\n\nFERROVIP-VM-EXIT=42\n[    2.3] reboot: Power down\n";
        assert_eq!(parse_exit_code(console), Some(42));
        assert_eq!(parse_exit_code("booting\n[ 1.0] Kernel panic\n"), None);
        let output = VmOutput {
            console: console.to_owned(),
            exit_code: 42,
            elapsed: Duration::ZERO,
            ready_after: None,
        };
        assert_eq!(
            output.command_output(),
            "says FERROVIP-VM-EXIT=3 inline\nout\n\n"
        );
    }

    #[test]
    fn guest_paths_must_be_absolute_and_plain() {
        assert!(check_guest_path("/ferrovip/bin/agent").is_ok());
        for bad in [
            "ferrovip/bin",
            "/",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/a/",
            "/a\0b",
        ] {
            assert!(check_guest_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    /// Boots the real image (`bash e2e/vm/build.sh`): files, environment, the exit code and
    /// the command's output make the round trip.
    #[test]
    fn vm_run_returns_the_guest_exit_code_and_output() {
        let image = VmImage::locate().expect("the VM image");
        let output = VmRun::new(&image)
            .file("/ferrovip/data/greeting", "hello from the host\n")
            .env("FERROVIP_TEST_QUOTED", "it's $HOME")
            .cpus(1)
            .timeout(Duration::from_secs(120))
            .run("cat /ferrovip/data/greeting; echo \"[$FERROVIP_TEST_QUOTED] in_vm=$FERROVIP_IN_VM\"; exit 7")
            .expect("the VM runs");
        assert_eq!(output.exit_code, 7, "{}", output.console);
        assert_eq!(
            output.command_output(),
            "hello from the host\n[it's $HOME] in_vm=1\n\n"
        );
        let ready = output.ready_after.expect("the guest announced itself");
        assert!(ready <= output.elapsed);
    }

    /// Boots the real image and kills it at the deadline: the error carries the console, and
    /// no qemu is left behind.
    #[test]
    fn vm_run_kills_qemu_at_the_timeout() {
        let image = VmImage::locate().expect("the VM image");
        // Tells this run's qemu apart from those of tests running alongside.
        let tag = format!("ferrovip.timeout-test={}", std::process::id());
        let err = VmRun::new(&image)
            .cpus(1)
            .kernel_arg(&tag)
            .timeout(Duration::from_secs(15))
            .run("echo sleeping; sleep 600")
            .map(|_| ())
            .expect_err("the run must time out");
        assert_eq!(err.metric_label(), "timeout");
        assert!(err.to_string().contains("sleeping"), "{err}");
        let left = processes_with_argument(&tag);
        assert!(left.is_empty(), "qemu still running: {left:?}");
    }

    /// The command lines of the processes that have `argument` in theirs.
    fn processes_with_argument(argument: &str) -> Vec<String> {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| fs::read(entry.path().join("cmdline")).ok())
            .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
            .filter(|cmdline| cmdline.contains(argument))
            .collect()
    }

    /// Host side only (root): the namespace holds the bridge with the host's address and the
    /// tap as its port; dropping the network removes all of it, and the namespace of a process
    /// that is gone is reclaimed while a live one is left alone.
    #[test]
    fn vm_network_builds_bridge_and_tap_and_leaves_nothing_behind() {
        let network = VmNetwork::create().expect("create the network (needs root)");
        let tap = network.ip(&["-o", "link", "show", HOST_TAP]).unwrap();
        assert!(tap.contains(&format!("master {HOST_BRIDGE}")), "{tap}");
        let addr = network
            .ip(&["-4", "-o", "addr", "show", "dev", HOST_BRIDGE])
            .unwrap();
        assert!(
            addr.contains(&format!("{UPLINK_HOST}/{UPLINK_PREFIX_LEN}")),
            "{addr}"
        );
        // Above any pid_max: never a live process.
        let stale = format!("{NETWORK_STEM}4294967295-0");
        run_command("ip", &["netns", "add", &stale]).unwrap();
        VmNetwork::cleanup_stale().unwrap();
        assert!(!Path::new(NETNS_DIR).join(&stale).exists());
        let name = network.netns().to_owned();
        assert!(Path::new(NETNS_DIR).join(&name).exists());
        drop(network);
        assert!(!Path::new(NETNS_DIR).join(&name).exists());
    }

    #[test]
    fn a_missing_image_names_the_build_script() {
        let err = VmImage::open(Path::new("/nonexistent/ferrovip-vm")).unwrap_err();
        assert_eq!(err.metric_label(), "no_image");
        assert!(err.to_string().contains("e2e/vm/build.sh"), "{err}");
    }
}
