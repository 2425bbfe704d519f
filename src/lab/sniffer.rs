//! Packet capture on the lab bridge.
//!
//! A dedicated thread enters the switch namespace (`setns` changes only the calling thread's
//! namespace, so the rest of the process stays where it was), opens an AF_PACKET socket on
//! `br0` and stamps each frame with [`Instant::now`] as soon as `recv` returns. Seen from the
//! bridge, every node's frame is one hop away, so the stamps order the nodes' actions
//! fairly. Only frames [`parse_frame`] recognises are kept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use pnet_datalink::Config;

use super::netns::{ethernet_channel, open_netns};
use super::wire::{Event, parse_frame};
use super::{Lab, LabError};

/// How often the capture thread looks at its stop flag.
const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Bounded so that a lab kept running for hours does not grow without limit; at 100 ms
/// adverts this is days of history.
const MAX_EVENTS: usize = 1_000_000;

/// Captured events plus how many were dropped from the front, so that waiters can keep an
/// absolute position while the buffer slides.
#[derive(Default)]
struct Buffer {
    events: VecDeque<Event>,
    dropped: u64,
}

impl Buffer {
    fn push(&mut self, event: Event) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Absolute sequence number one past the newest event.
    fn end(&self) -> u64 {
        self.dropped + self.events.len() as u64
    }

    /// The oldest event at or after absolute position `from` that matches; advances `from`
    /// past everything looked at, so a wait loop examines each event once.
    fn first_match(&self, from: &mut u64, pred: &impl Fn(&Event) -> bool) -> Option<Event> {
        let start = from.saturating_sub(self.dropped) as usize;
        *from = self.end();
        self.events
            .range(start.min(self.events.len())..)
            .find(|e| pred(e))
            .cloned()
    }
}

#[derive(Default)]
struct Shared {
    events: Mutex<Buffer>,
    arrived: Condvar,
    arrived_async: tokio::sync::Notify,
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn events(&self) -> MutexGuard<'_, Buffer> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running capture on the lab's bridge. Dropping it stops the capture thread.
pub struct Sniffer {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    started_at: Instant,
}

impl std::fmt::Debug for Sniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sniffer")
            .field("started_at", &self.started_at)
            .field("events", &self.shared.events().events.len())
            .finish_non_exhaustive()
    }
}

impl Sniffer {
    /// Starts capturing on the lab's bridge. Returns once the socket is open, so every frame
    /// sent after this returns is seen.
    pub fn start(lab: &Lab) -> Result<Sniffer, LabError> {
        Sniffer::start_on(lab.switch_netns(), lab.bridge(), lab.bridge_ifindex())
    }

    /// Starts capturing on interface `interface` (index `ifindex`) of namespace `netns`.
    pub fn start_on(netns: &str, interface: &str, ifindex: u32) -> Result<Sniffer, LabError> {
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            let netns = netns.to_owned();
            let interface = interface.to_owned();
            std::thread::Builder::new()
                .name("lab-sniffer".into())
                .spawn(move || capture(&netns, &interface, ifindex, &shared, &stop, ready_tx))
                .map_err(|source| LabError::Spawn {
                    command: "sniffer thread".into(),
                    source,
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Sniffer {
                shared,
                stop,
                thread: Some(thread),
                started_at: Instant::now(),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(LabError::SnifferDied(
                    "capture thread ended before opening its socket".into(),
                ))
            }
        }
    }

    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Every event captured so far, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.shared.events().events.iter().cloned().collect()
    }

    /// Events received at or after `since`, oldest first.
    pub fn events_since(&self, since: Instant) -> Vec<Event> {
        let buffer = self.shared.events();
        let start = buffer.events.partition_point(|e| e.at < since);
        buffer.events.range(start..).cloned().collect()
    }

    /// Why the capture stopped, if it did (the socket failed).
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The oldest captured event matching `pred`, waiting up to `timeout` for one to arrive.
    /// Already captured events count, so a reaction that came before the call is not missed;
    /// put a time bound in the predicate (`e.at >= t`) to look only at later ones. Blocking.
    pub fn wait_for(&self, pred: impl Fn(&Event) -> bool, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut buffer = self.shared.events();
        let mut checked = 0;
        loop {
            if let Some(found) = buffer.first_match(&mut checked, &pred) {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline || self.failure().is_some() {
                return None;
            }
            buffer = self
                .shared
                .arrived
                .wait_timeout(buffer, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// [`Sniffer::wait_for`] for async callers: the same semantics without blocking a
    /// runtime thread.
    pub async fn wait_for_async(
        &self,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut checked = 0;
        loop {
            // Registered before looking, so an event pushed in between still wakes us.
            let arrived = self.shared.arrived_async.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(found) = self.shared.events().first_match(&mut checked, &pred) {
                return Some(found);
            }
            if self.failure().is_some() || tokio::time::timeout_at(deadline, arrived).await.is_err()
            {
                return None;
            }
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn capture(
    netns: &str,
    interface: &str,
    ifindex: u32,
    shared: &Shared,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), LabError>>,
) {
    let mut rx = match open_capture(netns, interface, ifindex) {
        Ok(rx) => {
            let _ = ready.send(Ok(()));
            rx
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match rx.next() {
            Ok(frame) => {
                let at = Instant::now();
                if let Some((src_mac, kind)) = parse_frame(frame) {
                    shared.events().push(Event { at, src_mac, kind });
                    shared.arrived.notify_all();
                    shared.arrived_async.notify_waiters();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                shared.arrived.notify_all();
                shared.arrived_async.notify_waiters();
                return;
            }
        }
    }
}

fn open_capture(
    netns: &str,
    interface: &str,
    ifindex: u32,
) -> Result<Box<dyn pnet_datalink::DataLinkReceiver>, LabError> {
    let handle = open_netns(netns)?;
    setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Setns {
        netns: netns.to_owned(),
        source,
    })?;
    let config = Config {
        read_timeout: Some(READ_TIMEOUT),
        // Unicast between two nodes does not reach br0 itself otherwise.
        promiscuous: true,
        ..Config::default()
    };
    let (_tx, rx) = ethernet_channel(netns, interface, ifindex, config)?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::wire::{EventKind, MacAddr};

    fn garp(at: Instant, last_octet: u8) -> Event {
        Event {
            at,
            src_mac: MacAddr::zero(),
            kind: EventKind::GratuitousArp {
                sender_ip: std::net::Ipv4Addr::new(192, 0, 2, last_octet),
                sender_mac: MacAddr::zero(),
            },
        }
    }

    fn octet(e: &Event) -> u8 {
        e.announced()
            .map(|ip| match ip {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .unwrap()
    }

    #[test]
    fn waiters_keep_their_place_when_the_full_buffer_slides() {
        let now = Instant::now();
        let mut buffer = Buffer::default();
        for i in 0..MAX_EVENTS {
            buffer.push(garp(now, (i % 200) as u8));
        }
        let mut cursor = 0;
        assert_eq!(buffer.first_match(&mut cursor, &|e| octet(e) == 250), None);
        assert_eq!(cursor, MAX_EVENTS as u64);
        // Full: each push now drops the oldest, and the waiter must still see the new ones.
        buffer.push(garp(now, 250));
        buffer.push(garp(now, 251));
        assert_eq!(buffer.dropped, 2);
        let found = buffer
            .first_match(&mut cursor, &|e| octet(e) >= 250)
            .unwrap();
        assert_eq!(octet(&found), 250);
        assert_eq!(cursor, MAX_EVENTS as u64 + 2);
        assert_eq!(buffer.first_match(&mut cursor, &|_| true), None);
    }
}
