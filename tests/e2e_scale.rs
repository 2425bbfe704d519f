//! The scale lab behind `ferrovip lab --vips N` (root, network namespaces, `dumpcap`): many
//! VIPs in three sharing groups spread over three nodes; stopping the master of one group
//! moves that group only, and every one of its addresses is configured on the new master and
//! announced on the wire. The 10,000-VIP figures come from `cargo bench --bench scale`; this
//! checks the behaviour and the measurement at a size CI affords.

use std::time::Duration;

use ferrovip::lab::{Daemon, ScaleOptions, run_scale};

const AGENT: &str = env!("CARGO_BIN_EXE_ferrovip");

#[test]
fn netns_scale_lab_moves_one_group_and_every_address_of_it() {
    let report = run_scale(&ScaleOptions {
        nodes: 3,
        interval: Duration::from_millis(100),
        vips: 1_500,
        ipv6: false,
        groups: 3,
        crash_rounds: 1,
        graceful_rounds: 1,
        idle_window: Some(Duration::from_secs(2)),
        daemon: Daemon::Ferrovip {
            binary: AGENT.into(),
            extra_args: Vec::new(),
        },
        quiet: true,
        keep_logs: false,
    })
    .expect("scale lab");
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
    assert_eq!(report.idle.len(), 3);
    for cost in &report.idle {
        assert_eq!(cost.masters, 1, "{cost:?}");
        assert!(cost.rss_mib > 1.0, "{cost:?}");
    }
    assert_eq!(report.rounds.len(), 2);
    for round in &report.rounds {
        assert_eq!(round.addresses, 500, "{round:?}");
        // Group 0 prefers node-a, then node-b.
        assert_eq!(round.stopped, "node-a");
        assert_eq!(round.new_master.as_deref(), Some("node-b"), "{round:?}");
        assert_eq!(
            (round.not_configured, round.not_announced),
            (0, 0),
            "{round:?}"
        );
        assert!(round.others_moved.is_empty(), "{round:?}");
        assert!(round.reachable, "{round:?}");
        let takeover = round.takeover.expect("takeover seen on the wire");
        let configured = round.configured.expect("configured");
        let announced = round.announced.expect("announced");
        // The timer decides when (within the advert phase at the kill); everything else follows
        // within a bound that is loose for a busy CI machine.
        assert!(
            takeover <= round.expected + Duration::from_millis(150),
            "{round:?}"
        );
        assert!(
            configured.first + Duration::from_millis(5)
                >= takeover.saturating_sub(Duration::from_millis(5)),
            "{round:?}"
        );
        assert!(
            configured.last <= takeover + Duration::from_millis(500),
            "{round:?}"
        );
        assert!(announced.first >= configured.first, "{round:?}");
        assert!(
            announced.last <= takeover + Duration::from_millis(1_000),
            "{round:?}"
        );
        assert!(round.announcement_frames >= 500, "{round:?}");
    }
}
