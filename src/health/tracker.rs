//! The rise/fall hysteresis of one check, pure: probe results in, state changes out.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckState {
    /// No result yet. Not a failure (see the module docs of [`crate::health`]).
    Unknown,
    Passing,
    Failing,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Unknown => "unknown",
            CheckState::Passing => "passing",
            CheckState::Failing => "failing",
        }
    }
}

impl fmt::Display for CheckState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts consecutive results and changes state only when a run reaches the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTracker {
    rise: u32,
    fall: u32,
    state: CheckState,
    consecutive_successes: u32,
    consecutive_failures: u32,
}

impl CheckTracker {
    /// A tracker with no result yet. Thresholds below 1 count as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self::resume(rise, fall, CheckState::Unknown)
    }

    /// A tracker that continues from `state`, e.g. after a check's timing changed but its
    /// target did not: the new thresholds apply to the runs that follow.
    pub fn resume(rise: u32, fall: u32, state: CheckState) -> Self {
        CheckTracker {
            rise: rise.max(1),
            fall: fall.max(1),
            state,
            consecutive_successes: 0,
            consecutive_failures: 0,
        }
    }

    /// Records one probe result; returns the new state if it changed.
    pub fn record(&mut self, success: bool) -> Option<CheckState> {
        let next = if success {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            match self.state {
                CheckState::Unknown => CheckState::Passing,
                CheckState::Failing if self.consecutive_successes >= self.rise => {
                    CheckState::Passing
                }
                state => state,
            }
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            match self.state {
                CheckState::Unknown => CheckState::Failing,
                CheckState::Passing if self.consecutive_failures >= self.fall => {
                    CheckState::Failing
                }
                state => state,
            }
        };
        if next == self.state {
            None
        } else {
            self.state = next;
            Some(next)
        }
    }

    pub fn state(&self) -> CheckState {
        self.state
    }

    pub fn consecutive_successes(&self) -> u32 {
        self.consecutive_successes
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

#[cfg(test)]
mod tests {
    use super::CheckState::{Failing as F, Passing as P, Unknown as U};
    use super::*;

    /// Runs `results` ('+' success, '-' failure) and returns the state after each.
    fn run(tracker: &mut CheckTracker, results: &str) -> Vec<CheckState> {
        results
            .chars()
            .map(|c| {
                let before = tracker.state();
                let change = tracker.record(c == '+');
                let after = tracker.state();
                assert_eq!(change, (after != before).then_some(after));
                after
            })
            .collect()
    }

    #[test]
    fn rise_and_fall_table() {
        // (rise, fall, starting state, results, state after each result)
        let cases: [(u32, u32, CheckState, &str, &[CheckState]); 9] = [
            // The first result decides, whatever the thresholds.
            (3, 3, U, "+", &[P]),
            (3, 3, U, "-", &[F]),
            // Failing needs `fall` failures in a row; a success resets the run.
            (2, 3, U, "+--+---", &[P, P, P, P, P, P, F]),
            // Passing again needs `rise` successes in a row; a failure resets the run.
            (2, 3, U, "-+-++", &[F, F, F, F, P]),
            // rise = fall = 1 follows every result.
            (1, 1, U, "+-+-", &[P, F, P, F]),
            // Zero thresholds act as 1.
            (0, 0, U, "+-", &[P, F]),
            // A resumed tracker keeps its state and starts counting afresh.
            (2, 2, F, "+", &[F]),
            (2, 2, F, "++", &[F, P]),
            (2, 2, P, "-+--", &[P, P, P, F]),
        ];
        for (rise, fall, start, results, states) in cases {
            let mut tracker = CheckTracker::resume(rise, fall, start);
            assert_eq!(
                run(&mut tracker, results),
                states,
                "{rise}/{fall} from {start}: {results}"
            );
        }
    }

    #[test]
    fn counts_are_consecutive_runs() {
        let mut tracker = CheckTracker::new(2, 2);
        run(&mut tracker, "+++");
        assert_eq!(
            (
                tracker.consecutive_successes(),
                tracker.consecutive_failures()
            ),
            (3, 0)
        );
        run(&mut tracker, "-");
        assert_eq!(
            (
                tracker.consecutive_successes(),
                tracker.consecutive_failures()
            ),
            (0, 1)
        );
    }

    #[test]
    fn new_tracker_is_unknown() {
        assert_eq!(CheckTracker::new(1, 1).state(), U);
        assert_eq!(U.to_string(), "unknown");
    }
}
