//! What a `ping -D -O` run says: requests sent, replies received, and when the unanswered
//! ones went out, so a test that must lose nothing can say *when* it lost something.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// The command line of a ping every `interval` to `target` whose output [`PingTally::parse`]
/// reads: numeric, timestamped (`-D`), reporting each request still unanswered when the next
/// one goes (`-O`), a reply counting for 1 s (`-W 1`).
pub fn ping_command(interval: Duration, target: IpAddr) -> Vec<String> {
    ["ping", "-n", "-D", "-O", "-W", "1", "-i"]
        .into_iter()
        .map(String::from)
        .chain([format!("{:.3}", interval.as_secs_f64()), target.to_string()])
        .collect()
}

/// A ping run's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct PingTally {
    pub sent: u64,
    pub received: u64,
    /// Unanswered requests: (icmp_seq, when ping noticed, in seconds since the Unix epoch).
    pub unanswered: Vec<(u64, f64)>,
}

impl PingTally {
    /// Reads ping's output: the "N packets transmitted, M received" summary (required), and
    /// with `-D -O` the "no answer yet for icmp_seq=N" lines of requests no reply followed.
    pub fn parse(text: &str) -> Option<PingTally> {
        let summary = text.lines().find(|l| l.contains("packets transmitted"))?;
        let mut numbers = summary
            .split(',')
            .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok());
        let (sent, received) = (numbers.next()?, numbers.next()?);
        let mut pending = BTreeMap::new();
        let mut answered = BTreeSet::new();
        for line in text.lines() {
            let Some(seq) = field(line, "icmp_seq=") else {
                continue;
            };
            if line.contains("no answer yet") {
                let at = line
                    .strip_prefix('[')
                    .and_then(|rest| rest.split(']').next())
                    .and_then(|t| t.parse::<f64>().ok())
                    .unwrap_or(0.0);
                pending.entry(seq).or_insert(at);
            } else if line.contains("bytes from") {
                answered.insert(seq);
            }
        }
        let unanswered = pending
            .into_iter()
            .filter(|(seq, _)| !answered.contains(seq))
            .collect();
        Some(PingTally {
            sent,
            received,
            unanswered,
        })
    }

    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    /// The unanswered requests as runs of consecutive sequence numbers, each as
    /// "N from +a s to +b s" after `origin`: where in a test's timeline the losses were.
    pub fn loss_windows(&self, origin: SystemTime) -> String {
        let origin = origin
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut runs: Vec<(u64, f64, f64)> = Vec::new();
        let mut last_seq = None;
        for &(seq, at) in &self.unanswered {
            match runs.last_mut() {
                Some(run) if last_seq == Some(seq.wrapping_sub(1)) => {
                    run.0 += 1;
                    run.2 = at;
                }
                _ => runs.push((1, at, at)),
            }
            last_seq = Some(seq);
        }
        let mut out = String::new();
        for (count, first, last) in runs {
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(
                out,
                "{count} from +{:.2}s to +{:.2}s",
                first - origin,
                last - origin
            );
        }
        out
    }
}

/// The number after `key` in `line` (`icmp_seq=17 ttl=64` → 17).
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "PING 192.0.2.100 (192.0.2.100) 56(84) bytes of data.
[1700000000.000100] 64 bytes from 192.0.2.100: icmp_seq=1 ttl=64 time=0.051 ms
[1700000000.020200] no answer yet for icmp_seq=2
[1700000000.040300] no answer yet for icmp_seq=3
[1700000000.041000] 64 bytes from 192.0.2.100: icmp_seq=3 ttl=64 time=21.0 ms
[1700000000.060400] no answer yet for icmp_seq=4
[1700000000.080500] 64 bytes from 192.0.2.100: icmp_seq=5 ttl=64 time=0.049 ms
[1700000001.000600] no answer yet for icmp_seq=50
[1700000001.020700] 64 bytes from 192.0.2.100: icmp_seq=51 ttl=64 time=0.049 ms

--- 192.0.2.100 ping statistics ---
51 packets transmitted, 48 received, 5.88235% packet loss, time 1020ms
";

    #[test]
    fn a_late_reply_is_not_a_loss_and_losses_come_in_runs() {
        let tally = PingTally::parse(OUTPUT).expect("a summary");
        assert_eq!((tally.sent, tally.received, tally.lost()), (51, 48, 3));
        let seqs: Vec<u64> = tally.unanswered.iter().map(|u| u.0).collect();
        assert_eq!(seqs, [2, 4, 50], "seq 3 was answered late");
        let origin = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            tally.loss_windows(origin),
            "1 from +0.02s to +0.02s; 1 from +0.06s to +0.06s; 1 from +1.00s to +1.00s"
        );
    }

    #[test]
    fn consecutive_losses_are_one_window_and_the_summary_is_required() {
        let text = "[10.5] no answer yet for icmp_seq=7\n[10.6] no answer yet for icmp_seq=8\n\
                    9 packets transmitted, 7 received, 22% packet loss\n";
        let tally = PingTally::parse(text).expect("a summary");
        assert_eq!(
            tally.loss_windows(SystemTime::UNIX_EPOCH + Duration::from_secs(10)),
            "2 from +0.50s to +0.60s"
        );
        assert_eq!(
            PingTally::parse("[10.5] no answer yet for icmp_seq=7\n"),
            None
        );
        assert_eq!(
            ping_command(Duration::from_millis(20), "192.0.2.1".parse().unwrap()).join(" "),
            "ping -n -D -O -W 1 -i 0.020 192.0.2.1"
        );
    }
}
