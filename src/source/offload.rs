//! Work off the agent's runtime thread.

use std::sync::OnceLock;
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on the agent's compute thread (`ferrovip-compute`) and gives its result (a panic
/// in `f` goes on here). The agent's runtime is one thread that also serves the watches, the
/// status writes and the Service controller's writes: work that grows with the cluster (a
/// snapshot, a plan, an allocation pass over 10,000 Services: tens of milliseconds each) must
/// not hold it, or every answer from the API server waits behind it (the controller allocated
/// ~110 Services/s while the API server answered in ~25 ms).
///
/// One thread for all of it, not tokio's blocking pool: each thread that allocates gets a
/// glibc arena of its own, and each arena keeps up to `M_TRIM_THRESHOLD` (64 MiB, see
/// `node::socket::keep_freed_memory`) of freed memory; with the pool's several threads the
/// leader's peak while 10,000 Services settled went from 177 to 262 MiB. The jobs run one at
/// a time, in the order given.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    if compute_thread().send(job).is_err() {
        unreachable!("the compute thread lives as long as the process");
    }
    match rx.await {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => unreachable!("the compute thread runs every job it is given"),
    }
}

fn compute_thread() -> &'static mpsc::Sender<Job> {
    static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ferrovip-compute".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawning the compute thread");
        tx
    })
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
        assert_eq!(name.as_deref(), Some("ferrovip-compute"));
        let caught = tokio::spawn(off_runtime(|| -> u8 { panic!("planner bug") })).await;
        let panic = caught.expect_err("the panic goes on in the caller");
        assert!(panic.is_panic());
        // The thread survives a job's panic.
        assert_eq!(off_runtime(|| 3).await, 3);
    }
}
