//! The runner of VM test binaries (harness = false): on the host it boots the VM image with
//! this very binary and the agent inside and reruns itself there; in the guest it runs the
//! cases one by one and prints PASS/FAIL with timings.
//!
//! A VM test binary is `mod vm;` plus a case table:
//! ```ignore
//! const CASES: &[vm::Case] = &[("ipvsadm_smoke", ipvsadm_smoke)];
//! fn main() -> std::process::ExitCode { vm::main(CASES) }
//! ```
//! Arguments select cases by substring (`cargo test --test vm_ipvs -- nat`); `--list` lists
//! them; other flags (cargo's `--test-threads=1`, ...) are ignored.

#![allow(dead_code)]

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferrovip_e2e::vm::{GUEST_BIN_DIR, VmImage, VmRun, in_guest};

/// What a case returns: any error, or a message (`Err("...".into())`).
pub type CaseError = Box<dyn Error + Send + Sync>;
pub type CaseResult = Result<(), CaseError>;
pub type Case = (&'static str, fn() -> CaseResult);

/// Where the agent binary is in the guest; cases read it from this variable.
pub const AGENT_ENV: &str = "FERROVIP_AGENT";
/// The case filter, handed from the host run to the guest run.
const FILTER_ENV: &str = "FERROVIP_VM_CASES";
/// The whole VM run, boot included, on the TCG emulator.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// The agent's path inside the guest.
pub fn agent() -> String {
    std::env::var(AGENT_ENV).unwrap_or_else(|_| format!("{GUEST_BIN_DIR}/ferrovip"))
}

/// Fails the case with `message` unless `condition` holds.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> CaseResult {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

pub fn main(cases: &[Case]) -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in cases {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if in_guest() {
        let filters: Vec<String> = std::env::var(FILTER_ENV)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        return run_guest(cases, &filters);
    }
    let filters: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
    run_host(&filters)
}

fn selected(name: &str, filters: &[String]) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

fn run_guest(cases: &[Case], filters: &[String]) -> ExitCode {
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases.iter().filter(|(name, _)| selected(name, filters)) {
        println!("---- {name}");
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(case);
        let took = started.elapsed();
        match outcome {
            Ok(Ok(())) => {
                passed += 1;
                println!("PASS {name} ({took:.2?})");
            }
            Ok(Err(error)) => {
                failed += 1;
                let mut message = error.to_string();
                let mut cause = error.source();
                while let Some(inner) = cause {
                    message.push_str(&format!(": {inner}"));
                    cause = inner.source();
                }
                println!("FAIL {name} ({took:.2?}): {message}");
            }
            Err(_) => {
                failed += 1;
                println!("FAIL {name} ({took:.2?}): panicked");
            }
        }
    }
    println!("guest: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_host(filters: &[String]) -> ExitCode {
    let started = Instant::now();
    let outcome = boot(filters);
    let total = started.elapsed();
    match outcome {
        Ok(output) => {
            let summary = output
                .console
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("guest: "))
                .unwrap_or("0 passed, 1 failed")
                .to_owned();
            println!(
                "vm: kernel ready after {}, qemu ran {:.2?}, whole test {total:.2?}, guest exit code {}",
                output
                    .ready_after
                    .map_or("(never)".to_owned(), |d| format!("{d:.2?}")),
                output.elapsed,
                output.exit_code
            );
            println!("{summary}");
            if output.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("vm: {error}");
            println!("0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

fn boot(filters: &[String]) -> Result<ferrovip_e2e::vm::VmOutput, Box<dyn Error>> {
    let image = VmImage::locate()?;
    let me = std::env::current_exe()?;
    let name = me
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("test binary has no name")?
        .to_owned();
    let guest_me = format!("{GUEST_BIN_DIR}/{name}");
    let guest_agent = format!("{GUEST_BIN_DIR}/ferrovip");
    eprintln!(
        "vm: booting {} ({}) with {name}",
        image.dir().display(),
        image.kernel_version()
    );
    let output = VmRun::new(&image)
        .binary(&me, &guest_me)
        .binary(env!("CARGO_BIN_EXE_ferrovip"), &guest_agent)
        .env(AGENT_ENV, &guest_agent)
        .env(FILTER_ENV, &filters.join(" "))
        .env("RUST_BACKTRACE", "1")
        .timeout(VM_TIMEOUT)
        .echo_console(true)
        .run(&guest_me)?;
    Ok(output)
}
