//! The agent's memory release (`node::socket::keep_freed_memory` at start,
//! `release_free_memory` once quiet): memory freed after a burst stays in the process until
//! released, and the release gives it back to the kernel. Its own test binary: it measures
//! the process's resident memory.

use ferrovip::node::socket::{keep_freed_memory, release_free_memory};

const MIB: u64 = 1 << 20;

/// Resident memory of this process (`/proc/self/statm`, 4 KiB pages).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("resident field")
        .parse()
        .expect("a number");
    pages * 4096
}

#[test]
fn memory_freed_after_a_burst_stays_until_released_and_then_goes_back() {
    assert_eq!(keep_freed_memory(), Vec::<String>::new());
    let start = resident();
    // 200 MiB in 4 KiB blocks (a plan's many small allocations), filled so they are resident.
    let blocks: Vec<Vec<u8>> = (0..51_200).map(|_| vec![1u8; 4096]).collect();
    // One block allocated after them keeps them from the heap's top: freed, they are free
    // memory inside the heap, which glibc never returns on its own.
    let pin = vec![1u8; 4096];
    let full = resident();
    assert!(
        full >= start + 190 * MIB,
        "the blocks should be resident: {} → {} MiB",
        start / MIB,
        full / MIB
    );
    drop(blocks);
    let freed = resident();
    assert!(
        freed + 20 * MIB >= full,
        "freed memory stays in the process until released: {} → {} MiB",
        full / MIB,
        freed / MIB
    );
    assert!(release_free_memory(), "malloc_trim released nothing");
    let released = resident();
    assert!(
        released + 180 * MIB <= freed,
        "the release should give back the 200 MiB freed: {} → {} MiB",
        freed / MIB,
        released / MIB
    );
    drop(pin);
}
