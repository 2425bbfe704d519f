//! What the wire says: who is master, how long a takeover took, and what RFC 5798 says it
//! should take.
//!
//! The analyses are pure functions over captured [`Event`]s (unit-tested with synthetic
//! timelines); `measure_*` only add the waiting.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::LabError;
use super::sniffer::Sniffer;
use super::wire::{Event, SeenAdvert};

/// After a takeover, how long to keep waiting for its gratuitous ARP / NA before concluding
/// that none was sent.
const ANNOUNCE_GRACE: Duration = Duration::from_secs(1);

/// Skew_Time = ((256 − Priority) × Master_Adver_Interval) / 256, computed in microseconds.
pub fn skew_time(priority: u8, interval: Duration) -> Duration {
    let micros = (256 - u128::from(priority)) * interval.as_micros() / 256;
    Duration::from_micros(micros as u64)
}

/// Master_Down_Interval = 3 × Master_Adver_Interval + Skew_Time.
pub fn master_down_interval(priority: u8, interval: Duration) -> Duration {
    3 * interval + skew_time(priority, interval)
}

fn live_advert(event: &Event, vrid: u8) -> Option<&SeenAdvert> {
    event
        .advert()
        .filter(|advert| advert.vrid == vrid && advert.priority > 0)
}

/// Sources of adverts with priority > 0 for `vrid` received at or after `since`, in order of
/// first appearance. More than one means a split brain or a takeover inside the window.
pub fn masters_since(events: &[Event], vrid: u8, since: Instant) -> Vec<IpAddr> {
    let mut masters = Vec::new();
    for advert in events
        .iter()
        .filter(|e| e.at >= since)
        .filter_map(|e| live_advert(e, vrid))
    {
        if !masters.contains(&advert.source) {
            masters.push(advert.source);
        }
    }
    masters
}

/// The source of the most recent advert with priority > 0 for `vrid` within the last
/// `window` (both address families count).
pub fn current_master(sniffer: &Sniffer, vrid: u8, window: Duration) -> Option<IpAddr> {
    let since = Instant::now()
        .checked_sub(window)
        .unwrap_or(sniffer.started_at());
    sniffer
        .events_since(since)
        .iter()
        .rev()
        .find_map(|e| live_advert(e, vrid))
        .map(|advert| advert.source)
}

/// What to look for after stopping a master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverQuery {
    pub vrid: u8,
    /// The stopped master's primary address (the source of its adverts).
    pub old_master: IpAddr,
    /// Taken just before the signal was sent.
    pub stopped_at: Instant,
    /// The virtual address whose gratuitous ARP / NA marks the end of the takeover.
    pub vip: Option<IpAddr>,
}

impl FailoverQuery {
    fn is_takeover(&self, event: &Event) -> bool {
        event.at >= self.stopped_at
            && live_advert(event, self.vrid).is_some_and(|a| a.source != self.old_master)
    }

    fn is_announcement(&self, event: &Event) -> bool {
        event.at >= self.stopped_at && self.vip.is_some() && event.announced() == self.vip
    }
}

/// Timings of one takeover, all measured from the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub new_master: IpAddr,
    /// Priority in the new master's first advert.
    pub new_master_priority: u8,
    /// Master_Adver_Interval the backups had learned: the old master's advertised interval.
    pub advert_interval: Duration,
    /// From the stop signal to the new master's first advert.
    pub death_to_advert: Duration,
    /// From the stop signal to the first gratuitous ARP / NA for the VIP.
    pub death_to_garp: Option<Duration>,
    /// From the old master's last advert (priority 0 included) to the new master's first:
    /// what the backup's timer measured, so Master_Down_Interval after a crash and Skew_Time
    /// after a priority-0 release. `None` if the capture missed the old master entirely.
    pub last_advert_to_takeover: Option<Duration>,
    /// From the stop signal to the old master's priority-0 advert (graceful shutdown only).
    pub death_to_release: Option<Duration>,
}

impl Failover {
    /// What RFC 5798 says `last_advert_to_takeover` should be: Skew_Time when the old master
    /// released with priority 0, Master_Down_Interval otherwise.
    pub fn expected_gap(&self) -> Duration {
        if self.death_to_release.is_some() {
            skew_time(self.new_master_priority, self.advert_interval)
        } else {
            master_down_interval(self.new_master_priority, self.advert_interval)
        }
    }
}

/// The takeover after `query.stopped_at`, if the events contain one.
pub fn analyze_failover(events: &[Event], query: &FailoverQuery) -> Option<Failover> {
    let takeover = events.iter().find(|e| query.is_takeover(e))?;
    let new = takeover.advert()?;
    let old_adverts = || {
        events
            .iter()
            .filter(|e| e.at <= takeover.at)
            .filter_map(|e| Some((e.at, e.advert()?)))
            .filter(|(_, a)| a.vrid == query.vrid && a.source == query.old_master)
    };
    let last_old = old_adverts().next_back();
    let release = old_adverts().find(|(at, a)| *at >= query.stopped_at && a.priority == 0);
    let announcement = events.iter().find(|e| query.is_announcement(e));
    let since_stop = |at: Instant| at.saturating_duration_since(query.stopped_at);
    Some(Failover {
        new_master: new.source,
        new_master_priority: new.priority,
        advert_interval: last_old.map_or(new.interval, |(_, a)| a.interval),
        death_to_advert: since_stop(takeover.at),
        death_to_garp: announcement.map(|e| since_stop(e.at)),
        last_advert_to_takeover: last_old.map(|(at, _)| takeover.at.duration_since(at)),
        death_to_release: release.map(|(at, _)| since_stop(at)),
    })
}

/// Waits (blocking) for a backup to take over after the master was stopped, then for its
/// announcement, and returns the timings.
pub fn measure_failover(
    sniffer: &Sniffer,
    query: &FailoverQuery,
    timeout: Duration,
) -> Result<Failover, LabError> {
    let takeover = sniffer
        .wait_for(|e| query.is_takeover(e), timeout)
        .ok_or_else(|| no_takeover(sniffer, query, timeout))?;
    if query.vip.is_some() {
        let grace = (takeover.at + ANNOUNCE_GRACE).saturating_duration_since(Instant::now());
        sniffer.wait_for(|e| query.is_announcement(e), grace);
    }
    analyze_failover(&sniffer.events(), query).ok_or_else(|| no_takeover(sniffer, query, timeout))
}

/// [`measure_failover`] for async callers.
pub async fn measure_failover_async(
    sniffer: &Sniffer,
    query: &FailoverQuery,
    timeout: Duration,
) -> Result<Failover, LabError> {
    let takeover = sniffer
        .wait_for_async(|e| query.is_takeover(e), timeout)
        .await
        .ok_or_else(|| no_takeover(sniffer, query, timeout))?;
    if query.vip.is_some() {
        let grace = (takeover.at + ANNOUNCE_GRACE).saturating_duration_since(Instant::now());
        sniffer
            .wait_for_async(|e| query.is_announcement(e), grace)
            .await;
    }
    analyze_failover(&sniffer.events(), query).ok_or_else(|| no_takeover(sniffer, query, timeout))
}

fn no_takeover(sniffer: &Sniffer, query: &FailoverQuery, timeout: Duration) -> LabError {
    match sniffer.failure() {
        Some(failure) => LabError::SnifferDied(failure),
        None => LabError::NoTakeover {
            vrid: query.vrid,
            old_master: query.old_master,
            timeout,
        },
    }
}

/// A restarted node reclaiming mastership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preemption {
    /// From the restart to the node's first advert with priority > 0 (includes the agent's
    /// start-up and, per RFC 5798, one Master_Down_Interval in Backup).
    pub restart_to_master: Duration,
    pub priority: u8,
}

/// The first advert with priority > 0 from `node` for `vrid` after `restarted_at`.
pub fn analyze_preemption(
    events: &[Event],
    vrid: u8,
    node: IpAddr,
    restarted_at: Instant,
) -> Option<Preemption> {
    events
        .iter()
        .filter(|e| e.at >= restarted_at)
        .find_map(|e| Some((e.at, live_advert(e, vrid).filter(|a| a.source == node)?)))
        .map(|(at, advert)| Preemption {
            restart_to_master: at.duration_since(restarted_at),
            priority: advert.priority,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::wire::{EventKind, MacAddr};

    const VRID: u8 = 51;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    struct Timeline {
        origin: Instant,
        events: Vec<Event>,
    }

    impl Timeline {
        fn new() -> Self {
            Timeline {
                origin: Instant::now(),
                events: Vec::new(),
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.origin + Duration::from_millis(ms)
        }

        fn advert(&mut self, ms: u64, source: &str, priority: u8) {
            self.events.push(Event {
                at: self.at(ms),
                src_mac: MacAddr::zero(),
                kind: EventKind::Advert(SeenAdvert {
                    source: ip(source),
                    destination: ip("224.0.0.18"),
                    ttl: 255,
                    version: 3,
                    vrid: VRID,
                    priority,
                    interval: Duration::from_millis(100),
                    addresses: vec![ip("192.0.2.100")],
                }),
            });
        }

        fn garp(&mut self, ms: u64, sender: &str) {
            self.events.push(Event {
                at: self.at(ms),
                src_mac: MacAddr::zero(),
                kind: EventKind::GratuitousArp {
                    sender_ip: sender.parse().unwrap(),
                    sender_mac: MacAddr::zero(),
                },
            });
        }
    }

    #[test]
    fn timers_follow_rfc_5798() {
        // vectors.md: priority 100 at 1 s → skew 0.609 s, down 3.609 s; at 100 ms → 0.361 s.
        assert_eq!(
            skew_time(100, Duration::from_secs(1)),
            Duration::from_micros(609_375)
        );
        assert_eq!(
            master_down_interval(100, Duration::from_secs(1)),
            Duration::from_micros(3_609_375)
        );
        assert_eq!(
            master_down_interval(100, Duration::from_millis(100)),
            Duration::from_micros(360_937)
        );
        assert_eq!(
            skew_time(255, Duration::from_millis(100)),
            Duration::from_micros(390)
        );
    }

    #[test]
    fn crash_takeover_is_measured_from_the_last_advert() {
        let mut t = Timeline::new();
        for ms in (0..=300).step_by(100) {
            t.advert(ms, "192.0.2.11", 150);
        }
        t.garp(10, "192.0.2.100"); // the old master's own announcement, before the crash
        // Crash at 350; node-b (140) times out 3 × 100 + 45.3 ms after the last advert.
        t.advert(645, "192.0.2.12", 140);
        t.garp(646, "192.0.2.100");
        let query = FailoverQuery {
            vrid: VRID,
            old_master: ip("192.0.2.11"),
            stopped_at: t.at(350),
            vip: Some(ip("192.0.2.100")),
        };
        let failover = analyze_failover(&t.events, &query).unwrap();
        assert_eq!(
            failover,
            Failover {
                new_master: ip("192.0.2.12"),
                new_master_priority: 140,
                advert_interval: Duration::from_millis(100),
                death_to_advert: Duration::from_millis(295),
                death_to_garp: Some(Duration::from_millis(296)),
                last_advert_to_takeover: Some(Duration::from_millis(345)),
                death_to_release: None,
            }
        );
        assert_eq!(failover.expected_gap(), Duration::from_micros(345_312));
    }

    #[test]
    fn graceful_takeover_is_measured_from_the_priority_zero_advert() {
        let mut t = Timeline::new();
        t.advert(0, "192.0.2.11", 150);
        t.advert(100, "192.0.2.11", 150);
        t.advert(102, "192.0.2.11", 0);
        t.advert(150, "192.0.2.12", 140);
        let query = FailoverQuery {
            vrid: VRID,
            old_master: ip("192.0.2.11"),
            stopped_at: t.at(101),
            vip: Some(ip("192.0.2.100")),
        };
        let failover = analyze_failover(&t.events, &query).unwrap();
        assert_eq!(failover.death_to_release, Some(Duration::from_millis(1)));
        assert_eq!(
            failover.last_advert_to_takeover,
            Some(Duration::from_millis(48))
        );
        assert_eq!(failover.death_to_garp, None);
        assert_eq!(
            failover.expected_gap(),
            skew_time(140, Duration::from_millis(100))
        );
    }

    #[test]
    fn no_takeover_until_another_source_advertises() {
        let mut t = Timeline::new();
        t.advert(0, "192.0.2.11", 150);
        t.advert(100, "192.0.2.11", 150);
        t.advert(200, "192.0.2.12", 0); // a backup leaving is not a takeover
        let query = FailoverQuery {
            vrid: VRID,
            old_master: ip("192.0.2.11"),
            stopped_at: t.at(50),
            vip: None,
        };
        assert_eq!(analyze_failover(&t.events, &query), None);
    }

    #[test]
    fn masters_and_preemption_from_the_timeline() {
        let mut t = Timeline::new();
        t.advert(0, "192.0.2.12", 140);
        t.advert(100, "192.0.2.12", 140);
        t.advert(380, "192.0.2.11", 150);
        t.advert(400, "192.0.2.12", 0);
        assert_eq!(
            masters_since(&t.events, VRID, t.at(0)),
            vec![ip("192.0.2.12"), ip("192.0.2.11")]
        );
        assert_eq!(
            masters_since(&t.events, VRID, t.at(200)),
            vec![ip("192.0.2.11")]
        );
        assert!(masters_since(&t.events, VRID + 1, t.at(0)).is_empty());
        assert_eq!(
            analyze_preemption(&t.events, VRID, ip("192.0.2.11"), t.at(20)),
            Some(Preemption {
                restart_to_master: Duration::from_millis(360),
                priority: 150
            })
        );
        assert_eq!(
            analyze_preemption(&t.events, VRID, ip("192.0.2.13"), t.at(20)),
            None
        );
    }
}
