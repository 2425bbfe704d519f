//! Which addresses on the node's interfaces are ferrovip's: the kernel's mark where the kernel
//! keeps it, and a record in the state directory that works on every kernel.
//!
//! Linux 6.1 added the address protocol (`IFA_PROTO`); older kernels accept the attribute and
//! drop it silently, so the mark alone would make a demoted master on a 5.x kernel unable to
//! find (and remove) its own address. [`OwnershipMode::detect`] learns at start which kind of
//! kernel this is: the address manager adds a marked probe address to `lo` and reads it back.
//!
//! The record (`<state dir>/addresses-<netns inode>`, one line per address: interface index,
//! address, and for a restart hold the wall-clock instant until which it is held) is kept in
//! both modes. It is what a restarted agent trusts: a held address is adopted only when the
//! record says it was held and the hold has not run out; every other recorded (or, with the
//! mark, marked) address is a leftover of a crash and is removed. The file name carries the
//! network namespace's inode so that agents of several namespaces sharing one state directory
//! (the lab, tests) never read each other's records. Written aside and renamed, like the IPVS
//! dataplane's `ipvs-services`: a crash never leaves half a list.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

/// How the agent recognises its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnershipMode {
    /// `IFA_PROTO` marks them (Linux ≥ 6.1) and the record lists them.
    KernelMark,
    /// Only the record: the kernel drops the mark (before 6.1), or the operator forced it.
    StateDir,
}

impl OwnershipMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnershipMode::KernelMark => "kernel-mark",
            OwnershipMode::StateDir => "state-dir",
        }
    }
}

/// What one record line says about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordEntry {
    /// Held for the next agent until this wall-clock time (milliseconds since the epoch).
    pub held_until_ms: Option<u64>,
}

/// The addresses this agent (or its predecessor) added, as kept in the state directory.
#[derive(Debug, Default)]
pub struct AddressRecord {
    path: Option<PathBuf>,
    entries: BTreeMap<(u32, IpNet), RecordEntry>,
    dirty: bool,
}

impl AddressRecord {
    /// A record kept only in memory (tools and tests that rely on the kernel's mark).
    pub fn in_memory() -> AddressRecord {
        AddressRecord::default()
    }

    /// The record of this network namespace under `state_dir`, as the last agent left it
    /// (empty when there is none or it cannot be read).
    pub fn load(state_dir: &Path) -> AddressRecord {
        let path = state_dir.join(format!("addresses-{}", netns_id()));
        let entries = std::fs::read_to_string(&path)
            .map(|text| parse(&text))
            .unwrap_or_default();
        AddressRecord {
            path: Some(path),
            entries,
            dirty: false,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn contains(&self, index: u32, net: IpNet) -> bool {
        self.entries.contains_key(&(index, net))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&(u32, IpNet), &RecordEntry)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records an address as ours (clearing any hold on it).
    pub fn insert(&mut self, index: u32, net: IpNet) {
        let entry = RecordEntry::default();
        if self.entries.insert((index, net), entry) != Some(entry) {
            self.dirty = true;
        }
    }

    pub fn remove(&mut self, index: u32, net: IpNet) -> bool {
        let removed = self.entries.remove(&(index, net)).is_some();
        self.dirty |= removed;
        removed
    }

    /// Forgets every address of an interface (deleted with it).
    pub fn remove_interface(&mut self, index: u32) {
        let before = self.entries.len();
        self.entries.retain(|(i, _), _| *i != index);
        self.dirty |= self.entries.len() != before;
    }

    /// Marks a recorded address as held for the next agent until `now + hold`.
    pub fn hold(&mut self, index: u32, net: IpNet, now: SystemTime, hold: Duration) {
        if let Some(entry) = self.entries.get_mut(&(index, net)) {
            entry.held_until_ms = Some(unix_ms(now + hold));
            self.dirty = true;
        }
    }

    /// Whether the record says `index`/`net` is held at `now`.
    pub fn held_at(&self, index: u32, net: IpNet, now: SystemTime) -> bool {
        self.entries
            .get(&(index, net))
            .and_then(|e| e.held_until_ms)
            .is_some_and(|until| until > unix_ms(now))
    }

    /// Writes the record if it changed. A record without a path (in memory) never writes.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else {
            self.dirty = false;
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        if self.entries.is_empty() {
            // Nothing of ours left: no file (an agent that left cleanly leaves nothing).
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            write_atomically(path, &format(&self.entries))?;
        }
        self.dirty = false;
        Ok(())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The inode of the calling thread's network namespace: constant for the host's namespace
/// (4026531840 on every boot) and unique among the namespaces that exist at one time.
fn netns_id() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .map(|m| m.ino().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn format(entries: &BTreeMap<(u32, IpNet), RecordEntry>) -> String {
    let mut text = String::from("# ferrovip addresses: ifindex address [held-until-unix-ms]\n");
    for ((index, net), entry) in entries {
        match entry.held_until_ms {
            Some(until) => text.push_str(&std::format!("{index} {net} {until}\n")),
            None => text.push_str(&std::format!("{index} {net}\n")),
        }
    }
    text
}

fn parse(text: &str) -> BTreeMap<(u32, IpNet), RecordEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let index: u32 = fields.next()?.parse().ok()?;
            let net: IpNet = fields.next()?.parse().ok()?;
            let held_until_ms = match fields.next() {
                Some(until) => Some(until.parse().ok()?),
                None => None,
            };
            Some(((index, net), RecordEntry { held_until_ms }))
        })
        .collect()
}

/// Written aside and renamed, so a crash never leaves half a file.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_record_round_trips_through_its_file_with_holds() {
        let dir = std::env::temp_dir().join(std::format!("fv-record-{}", std::process::id()));
        let now = SystemTime::now();
        let mut record = AddressRecord::load(&dir);
        assert!(record.is_empty());
        record.insert(2, net("192.0.2.100/24"));
        record.insert(2, net("2001:db8::100/64"));
        record.insert(3, net("198.51.100.1/32"));
        record.hold(2, net("192.0.2.100/24"), now, Duration::from_secs(6));
        record.flush().unwrap();
        let path = record.path().unwrap().to_path_buf();
        assert!(path.starts_with(&dir));

        let mut again = AddressRecord::load(&dir);
        assert_eq!(again.len(), 3);
        assert!(again.contains(2, net("2001:db8::100/64")));
        assert!(again.held_at(2, net("192.0.2.100/24"), now));
        assert!(!again.held_at(2, net("192.0.2.100/24"), now + Duration::from_secs(7)));
        assert!(!again.held_at(3, net("198.51.100.1/32"), now));
        // Adopting (recording again) clears the hold.
        again.insert(2, net("192.0.2.100/24"));
        again.remove_interface(3);
        assert!(again.remove(2, net("2001:db8::100/64")));
        again.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 1);
        assert!(text.contains("2 192.0.2.100/24\n"), "{text}");
        // An empty record is no file.
        again.remove(2, net("192.0.2.100/24"));
        again.flush().unwrap();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_lines_are_ignored_and_memory_records_never_write() {
        let parsed = parse("# header\n2 192.0.2.1/24\nnonsense\n3 x/24\n4 192.0.2.9/32 12\n");
        assert_eq!(parsed.len(), 2);
        let mut record = AddressRecord::in_memory();
        record.insert(1, net("192.0.2.1/32"));
        record.flush().unwrap();
        assert!(record.path().is_none());
    }
}
