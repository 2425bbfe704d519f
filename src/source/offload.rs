//! Work off the agent's runtime thread.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

enum Message {
    Run(Job),
    /// The runtime the thread served has ended ([`serve_compute_while`]).
    Stop,
}

static JOBS: OnceLock<mpsc::Sender<Message>> = OnceLock::new();

/// Runs `f` on the agent's compute thread and gives its result (a panic in `f` goes on here).
/// The agent's runtime is one thread that also serves the watches, the status writes and the
/// Service controller's writes: work that grows with the cluster (a snapshot, a plan, an
/// allocation pass over 10,000 Services: tens of milliseconds each) must not hold it, or every
/// answer from the API server waits behind it (the controller allocated ~110-150 Services/s
/// while the API server answered in ~25 ms). The jobs run one at a time, in the order given.
///
/// One thread for all of it, not tokio's blocking pool, and the process's main thread where
/// [`serve_compute_while`] made it so: glibc gives every other thread that allocates an arena
/// of its own, and `malloc_trim` (`node::socket::release_free_memory`) cannot hand back the
/// top of such an arena's heap, where what a plan frees ends up; while the agent is busy, with
/// the trim threshold at 64 MiB (`keep_freed_memory`), nothing else does either. With the blocking pool the leader
/// peaked at 262 MiB while 10,000 Services settled; with one thread of its own, 10,000
/// VirtualIPs left the master at 131-146 MiB where it held 120 MiB before.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
    });
    if jobs().send(Message::Run(job)).is_err() {
        unreachable!("the compute thread serves as long as the runtime runs");
    }
    match rx.await {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => unreachable!("the compute thread runs every job it is given"),
    }
}

/// The compute thread's queue: the one [`serve_compute_while`] serves, or else a thread of
/// its own (tests, the lab, a second agent in one process).
fn jobs() -> &'static mpsc::Sender<Message> {
    JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ferrovip-work".into())
            .spawn(move || serve(&rx))
            .expect("spawning the compute thread");
        tx
    })
}

fn serve(rx: &mpsc::Receiver<Message>) {
    for message in rx {
        match message {
            Message::Run(job) => job(),
            Message::Stop => return,
        }
    }
}

/// Runs `runtime` (the agent's `block_on`) on a thread of its own (`ferrovip-io`: thread names
/// show in `/proc` cut to 15 bytes, so both are shorter) while
/// the calling thread, the process's main thread, runs [`off_runtime`]'s jobs; returns what
/// `runtime` returns (its panic goes on here). When the compute queue exists already, runs
/// `runtime` here.
pub fn serve_compute_while<T: Send + 'static>(runtime: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    if JOBS.set(tx).is_err() {
        return runtime();
    }
    let stop = JOBS.get().expect("set above").clone();
    let thread = std::thread::Builder::new()
        .name("ferrovip-io".into())
        .spawn(move || {
            let out = std::panic::catch_unwind(AssertUnwindSafe(runtime));
            let _ = stop.send(Message::Stop);
            out
        })
        .expect("spawning the runtime thread");
    serve(&rx);
    match thread.join() {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) | Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_off_the_caller_in_order_and_panics_reach_the_caller() {
        let here = std::thread::current().id();
        let (a, b) = tokio::join!(
            off_runtime(move || (std::thread::current().id(), 1)),
            off_runtime(|| 2)
        );
        assert_ne!(a.0, here);
        assert_eq!((a.1, b), (1, 2));
        let name = off_runtime(|| std::thread::current().name().map(str::to_owned)).await;
        assert_eq!(name.as_deref(), Some("ferrovip-work"));
        let caught = tokio::spawn(off_runtime(|| -> u8 { panic!("planner bug") })).await;
        let panic = caught.expect_err("the panic goes on in the caller");
        assert!(panic.is_panic());
        // The thread survives a job's panic.
        assert_eq!(off_runtime(|| 3).await, 3);
        // With the queue in place, a runtime given to serve_compute_while runs here.
        assert_eq!(serve_compute_while(|| std::thread::current().id()), here);
    }
}
