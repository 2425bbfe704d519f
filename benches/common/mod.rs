//! What both benchmarks share: interruption handling, phases that may fail, statistics, the
//! wire during an idle window, the report table.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrovip::lab::{Event, Lab, Sniffer, masters_since};
use serde::Serialize;

pub const AGENT_BINARY: &str = env!("CARGO_BIN_EXE_ferrovip");

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A phase that fails is reported and the others still run: one daemon misbehaving must not
/// throw away the figures of the other. An interruption still stops everything.
pub fn note_failure<T>(
    errors: &mut Vec<String>,
    phase: &str,
    outcome: anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    match outcome {
        Ok(value) => Ok(Some(value)),
        Err(e) => {
            check_interrupted()?;
            eprintln!("  {phase} failed: {e:#}");
            errors.push(format!("{phase}: {e:#}"));
            Ok(None)
        }
    }
}

/// SIGINT/SIGTERM set a flag instead of killing the benchmark, so that the lab in progress is
/// dropped (agents stopped, namespaces deleted) at the next check.
pub fn watch_for_interrupts() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let handlers = signal(SignalKind::interrupt())
                    .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
                let (mut interrupt, mut terminate) = match handlers {
                    Ok(handlers) => {
                        let _ = ready_tx.send(Ok(()));
                        handlers
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                    eprintln!("interrupted: stopping the lab");
                    INTERRUPTED.store(true, Ordering::Relaxed);
                }
            })
        })
        .context("starting the signal thread")?;
    ready_rx
        .recv()
        .context("the signal thread ended early")?
        .context("installing the SIGINT/SIGTERM handlers")
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in short steps so that Ctrl-C is honoured promptly.
pub fn sleep(duration: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub n: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
        let mut values: Vec<f64> = values.into_iter().collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Stats {
            n,
            median_ms: round3(median),
            min_ms: values[0],
            max_ms: values[n - 1],
        })
    }
}

pub fn stats_cell(stats: Option<&Stats>) -> String {
    match stats {
        Some(s) => format!("{:.1} [{:.1}–{:.1}]", s.median_ms, s.min_ms, s.max_ms),
        None => "—".into(),
    }
}

/// Milliseconds to the microsecond: finer digits would be noise in the JSON.
/// The middle value (the upper one of an even count).
pub fn median<T: Ord + Copy>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

/// `--rounds N` from the command line, else `default`.
pub fn rounds_arg(default: usize) -> usize {
    let mut rounds = default;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--rounds" {
            rounds = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--rounds N");
        }
    }
    rounds
}

pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.1}"))
}

/// The lab node holding `addr`, by name, or the address itself for a stranger.
pub fn node_name(lab: &Lab, addr: IpAddr) -> String {
    lab.node_by_addr(addr)
        .map_or_else(|| addr.to_string(), |n| n.name.clone())
}

/// What the capture saw during a measurement window.
pub struct WireWindow {
    /// Every event from the window's start to its end.
    pub events: Vec<Event>,
    /// Adverts with priority > 0 per second over the window, by source node.
    pub adverts_per_second: BTreeMap<String, f64>,
}

impl WireWindow {
    pub fn capture(sniffer: &Sniffer, lab: &Lab, start: Instant, end: Instant) -> WireWindow {
        let events: Vec<Event> = sniffer
            .events_since(start)
            .into_iter()
            .filter(|e| e.at <= end)
            .collect();
        let mut adverts: BTreeMap<String, u64> = BTreeMap::new();
        for advert in events.iter().filter_map(|e| e.advert()) {
            if advert.priority > 0 {
                *adverts.entry(node_name(lab, advert.source)).or_default() += 1;
            }
        }
        let span = end.duration_since(start).as_secs_f64();
        let adverts_per_second = adverts
            .into_iter()
            .map(|(name, count)| (name, round3(count as f64 / span)))
            .collect();
        WireWindow {
            events,
            adverts_per_second,
        }
    }

    /// The VRIDs among `vrids` whose masters since `since` were not `expected` alone, with
    /// the nodes that did advertise (none, or several), in order.
    pub fn unstable_vrids(
        &self,
        lab: &Lab,
        vrids: impl IntoIterator<Item = u8>,
        since: Instant,
        expected: IpAddr,
    ) -> BTreeMap<u8, Vec<String>> {
        vrids
            .into_iter()
            .map(|vrid| (vrid, masters_since(&self.events, vrid, since)))
            .filter(|(_, masters)| masters[..] != [expected])
            .map(|(vrid, masters)| {
                let names = masters.into_iter().map(|ip| node_name(lab, ip)).collect();
                (vrid, names)
            })
            .collect()
    }
}

/// Fixed-width text table: a label column, then one column per implementation or variant.
pub struct Table {
    pub out: String,
    cell: usize,
}

impl Table {
    const LABEL: usize = 44;

    /// A table whose value columns are `cell` characters wide.
    pub fn new(cell: usize) -> Table {
        Table {
            out: String::new(),
            cell,
        }
    }

    /// A title line, then the column names (none: the title alone).
    pub fn heading(&mut self, title: &str, columns: &[&str]) {
        use std::fmt::Write;
        let _ = writeln!(self.out, "{title}");
        if !columns.is_empty() {
            let _ = write!(self.out, "{:<width$}", "", width = Table::LABEL);
            for column in columns {
                let _ = write!(self.out, "{column:>width$}", width = self.cell);
            }
            self.out.push('\n');
        }
    }

    pub fn row<T>(&mut self, label: &str, items: &[T], cell: impl Fn(&T) -> String) {
        use std::fmt::Write;
        let _ = write!(self.out, "{label:<width$}", width = Table::LABEL);
        for item in items {
            let _ = write!(self.out, "{:>width$}", cell(item), width = self.cell);
        }
        self.out.push('\n');
    }
}
