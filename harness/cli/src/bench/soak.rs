//! `kiln bench soak`: many tiny-guest VMs in one process, one after another and all at once,
//! checking that the process gives back every fd, thread and (within a tolerance) byte of
//! memory that a VM took.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_vmm::{ExitReason, Vm, VmConfig};
use serde::Serialize;

use super::{build_guest, mib, status_field_kib, BenchError, GUEST_LINE};

/// VMs booted before the baseline sample: the process-wide things a first VM sets up (the
/// vCPU kick signal handler, glibc's malloc arenas, lazily mapped code) are not per-VM growth.
const WARMUP_VMS: u32 = 50;
/// How long a VM may run before it counts as a failure.
const VM_DEADLINE: Duration = Duration::from_secs(10);
/// How long a sample waits for counts above the baseline to come back down: a VM whose
/// teardown took longer than `kiln_vmm::TEARDOWN_WAIT` finishes on a short-lived background
/// thread. A leaked fd or thread stays, so it still shows after this.
const SETTLE: Duration = Duration::from_secs(2);

/// Options of `kiln bench soak`.
#[derive(Debug, Args)]
pub struct SoakBenchArgs {
    /// VMs booted one after another, in each of the two sequential runs (the first 50 of the
    /// first run, or all if fewer, are the warm-up before the baseline sample).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    sequential: u32,
    /// VMs booted at once, each on its own thread, between the two sequential runs.
    #[arg(long, value_name = "P", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    parallel: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..))]
    memory: u64,
    /// RSS growth over the baseline (MiB) still counted as no leak. The default 8 MiB: the
    /// parallel run's threads make glibc create malloc arenas that stay with the process after
    /// the threads end (a one-off, bounded by 8 per core), while a leak of 4 KiB per VM over
    /// the 2,000-odd VMs after the baseline already exceeds it. fds and threads get no
    /// tolerance: one left behind fails.
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    rss_tolerance: u64,
    /// Machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the process held at one point of the soak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// When it was taken ("before", "baseline", ...).
    pub at: String,
    /// Entries of /proc/self/fd.
    pub fds: u64,
    /// `Threads:` of /proc/self/status.
    pub threads: u64,
    /// `VmRSS:` of /proc/self/status (KiB).
    pub rss_kib: u64,
}

/// One run of VMs.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// "sequential 1", "parallel", "sequential 2".
    pub name: String,
    pub vms: u32,
    pub seconds: f64,
    pub vms_per_s: f64,
}

/// Growth after the baseline: the largest value of any later sample minus the baseline's.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Deltas {
    pub fds: i64,
    pub threads: i64,
    pub rss_kib: i64,
}

/// Everything `kiln bench soak` measured.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub kernel: String,
    pub memory_mib: u64,
    pub sequential: u32,
    pub parallel: u32,
    /// VMs of the first sequential run booted before the baseline sample.
    pub warmup: u32,
    /// Every VM booted, warm-up included.
    pub total_vms: u64,
    pub samples: Vec<Sample>,
    pub phases: Vec<Phase>,
    pub deltas: Deltas,
    pub rss_tolerance_kib: u64,
    /// "pass" or "fail".
    pub verdict: &'static str,
    /// Why it failed, one line each; empty on a pass.
    pub failures: Vec<String>,
}

/// Runs `kiln bench soak` and returns the process exit code.
pub fn main(args: &SoakBenchArgs) -> i32 {
    let report = match soak(args) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            return crate::exit::ERROR;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("kiln: error: cannot serialize the report: {e}");
                return crate::exit::ERROR;
            }
        }
    } else {
        print!("{}", render_text(&report));
    }
    if report.failures.is_empty() {
        crate::exit::SUCCESS
    } else {
        for f in &report.failures {
            eprintln!("kiln: error: {f}");
        }
        crate::exit::ERROR
    }
}

/// Why a soak VM is not a good run.
fn vm_error(what: &str, reason: impl std::fmt::Display) -> BenchError {
    BenchError::Soak(format!("{what}: {reason}"))
}

/// Boots the guest once, runs it to its end and checks it ended as it should.
fn boot_one(kernel: &Path, memory: u64, what: &str) -> Result<(), BenchError> {
    let mut vm = Vm::start(VmConfig::new(kernel).memory_mib(memory))
        .map_err(|e| vm_error(what, format!("cannot start: {e}")))?;
    let ended = vm.wait(VM_DEADLINE);
    let text = vm.console().text();
    drop(vm);
    if ended != ExitReason::ExitPort(0) {
        return Err(vm_error(
            what,
            format!("ended with {ended:?}, expected exit port status 0"),
        ));
    }
    if !text.contains(GUEST_LINE) {
        return Err(vm_error(
            what,
            format!("console {text:?} does not contain {GUEST_LINE:?}"),
        ));
    }
    Ok(())
}

/// `count` VMs one after another; the first VM is numbered `first`.
fn sequential(
    kernel: &Path,
    memory: u64,
    run: &str,
    first: u32,
    count: u32,
) -> Result<(), BenchError> {
    for i in first..first + count {
        boot_one(kernel, memory, &format!("{run}, VM {i}"))?;
    }
    Ok(())
}

/// `count` VMs at once, each on its own thread, released together by a barrier.
fn parallel(kernel: &Path, memory: u64, count: u32) -> Result<(), BenchError> {
    let barrier = Barrier::new(count as usize);
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..=count)
            .map(|i| {
                let barrier = &barrier;
                std::thread::Builder::new()
                    .name(format!("soak-{i}"))
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        boot_one(kernel, memory, &format!("parallel, VM {i}"))
                    })
            })
            .collect();
        let mut first_error = None;
        for h in handles {
            let result = match h {
                // A thread that did not start leaves the others waiting on the barrier for
                // ever; every thread is started before any waits, so report it and stop.
                Err(e) => {
                    return Err(BenchError::Soak(format!(
                        "cannot start a parallel thread: {e}"
                    )))
                }
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(BenchError::Soak("a VM thread panicked".into()))),
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

fn count_dir(dir: &str) -> u64 {
    fs::read_dir(dir).map_or(0, |d| d.count() as u64)
}

/// Reads the fds, threads and RSS of this process.
fn sample(at: &str) -> Sample {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
    };
    Sample {
        at: at.to_string(),
        // read_dir's own fd is open while it counts: one more than the process holds.
        fds: count_dir("/proc/self/fd").saturating_sub(1),
        threads: field("Threads").unwrap_or(0),
        rss_kib: status_field_kib(&status, "VmRSS").unwrap_or(0),
    }
}

/// A sample after a run, taken once fds and threads are back to the baseline or [`SETTLE`]
/// has passed.
fn settled_sample(at: &str, baseline: &Sample) -> Sample {
    let deadline = Instant::now() + SETTLE;
    loop {
        let s = sample(at);
        if (s.fds <= baseline.fds && s.threads <= baseline.threads) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Times `f`, which boots `vms` VMs.
fn timed(
    name: &str,
    vms: u32,
    f: impl FnOnce() -> Result<(), BenchError>,
) -> Result<Phase, BenchError> {
    let start = Instant::now();
    f()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Phase {
        name: name.to_string(),
        vms,
        seconds,
        vms_per_s: if seconds > 0.0 {
            f64::from(vms) / seconds
        } else {
            0.0
        },
    })
}

/// Runs the soak and judges it.
pub fn soak(args: &SoakBenchArgs) -> Result<SoakReport, BenchError> {
    let kernel: PathBuf = build_guest()?;
    let memory = args.memory;
    let n = args.sequential;
    let warmup = n.min(WARMUP_VMS);

    let before = sample("before");
    let start = Instant::now();
    sequential(&kernel, memory, "sequential 1", 1, warmup)?;
    let warmup_seconds = start.elapsed();
    let baseline = sample("baseline (after warm-up)");
    let rest = timed("sequential 1 (after warm-up)", n - warmup, || {
        sequential(&kernel, memory, "sequential 1", warmup + 1, n - warmup)
    })?;
    // The first run's rate over all its VMs, warm-up included.
    let seq1 = Phase {
        name: "sequential 1".into(),
        vms: n,
        seconds: warmup_seconds.as_secs_f64() + rest.seconds,
        vms_per_s: f64::from(n) / (warmup_seconds.as_secs_f64() + rest.seconds).max(f64::EPSILON),
    };
    let after_seq1 = settled_sample("after sequential 1", &baseline);
    let par = timed("parallel", args.parallel, || {
        parallel(&kernel, memory, args.parallel)
    })?;
    let after_par = settled_sample("after parallel", &baseline);
    let seq2 = timed("sequential 2", n, || {
        sequential(&kernel, memory, "sequential 2", 1, n)
    })?;
    let after_seq2 = settled_sample("after sequential 2", &baseline);

    let later = [&after_seq1, &after_par, &after_seq2];
    let growth = |f: fn(&Sample) -> u64| {
        later
            .iter()
            .map(|s| f(s) as i64 - f(&baseline) as i64)
            .max()
            .unwrap_or(0)
    };
    let deltas = Deltas {
        fds: growth(|s| s.fds),
        threads: growth(|s| s.threads),
        rss_kib: growth(|s| s.rss_kib),
    };
    let rss_tolerance_kib = args.rss_tolerance * 1024;
    let failures = judge(&baseline, &later, rss_tolerance_kib);
    Ok(SoakReport {
        kernel: kernel.display().to_string(),
        memory_mib: memory,
        sequential: n,
        parallel: args.parallel,
        warmup,
        total_vms: 2 * u64::from(n) + u64::from(args.parallel),
        samples: vec![
            before,
            baseline.clone(),
            after_seq1.clone(),
            after_par.clone(),
            after_seq2.clone(),
        ],
        phases: vec![seq1, par, seq2],
        deltas,
        rss_tolerance_kib,
        verdict: if failures.is_empty() { "pass" } else { "fail" },
        failures,
    })
}

/// One line per sample that holds more than the baseline: any fd or thread, or RSS beyond the
/// tolerance.
fn judge(baseline: &Sample, later: &[&Sample], rss_tolerance_kib: u64) -> Vec<String> {
    let mut failures = Vec::new();
    for s in later {
        if s.fds > baseline.fds {
            failures.push(format!(
                "{}: {} fds open, {} more than the baseline",
                s.at,
                s.fds,
                s.fds - baseline.fds
            ));
        }
        if s.threads > baseline.threads {
            failures.push(format!(
                "{}: {} threads, {} more than the baseline",
                s.at,
                s.threads,
                s.threads - baseline.threads
            ));
        }
        if s.rss_kib > baseline.rss_kib + rss_tolerance_kib {
            failures.push(format!(
                "{}: RSS {:.1} MiB, {:.1} MiB over the baseline (tolerance {:.1} MiB)",
                s.at,
                mib(s.rss_kib),
                mib(s.rss_kib - baseline.rss_kib),
                mib(rss_tolerance_kib)
            ));
        }
    }
    failures
}

/// The human-readable report.
pub fn render_text(r: &SoakReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kiln bench soak: {} sequential, {} parallel, {} sequential ({} VMs, {} MiB guests, warm-up {})",
        r.sequential, r.parallel, r.sequential, r.total_vms, r.memory_mib, r.warmup
    );
    let _ = writeln!(s, "guest: {}", r.kernel);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<26} {:>6} {:>8} {:>10}",
        "sample", "fds", "threads", "RSS (MiB)"
    );
    for x in &r.samples {
        let _ = writeln!(
            s,
            "{:<26} {:>6} {:>8} {:>10.1}",
            x.at,
            x.fds,
            x.threads,
            mib(x.rss_kib)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<26} {:>6} {:>8} {:>10}", "run", "VMs", "s", "VMs/s");
    for p in &r.phases {
        let _ = writeln!(
            s,
            "{:<26} {:>6} {:>8.2} {:>10.1}",
            p.name, p.vms, p.seconds, p.vms_per_s
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "growth over the baseline: fds {:+}, threads {:+}, RSS {:+.1} MiB (tolerance {:.1} MiB)",
        r.deltas.fds,
        r.deltas.threads,
        r.deltas.rss_kib as f64 / 1024.0,
        mib(r.rss_tolerance_kib)
    );
    let _ = writeln!(s, "verdict: {}", r.verdict);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(fds: u64, threads: u64, rss_kib: u64) -> Sample {
        Sample {
            at: "x".into(),
            fds,
            threads,
            rss_kib,
        }
    }

    #[test]
    fn any_fd_or_thread_over_the_baseline_fails() {
        let base = at(10, 3, 10_000);
        assert!(judge(&base, &[&at(10, 3, 10_000), &at(9, 2, 9_000)], 8192).is_empty());
        assert_eq!(judge(&base, &[&at(11, 3, 10_000)], 8192).len(), 1);
        assert_eq!(judge(&base, &[&at(10, 4, 10_000)], 8192).len(), 1);
    }

    #[test]
    fn rss_may_grow_up_to_the_tolerance() {
        let base = at(10, 3, 10_000);
        assert!(judge(&base, &[&at(10, 3, 18_192)], 8192).is_empty());
        let f = judge(&base, &[&at(10, 3, 18_193)], 8192);
        assert!(f.len() == 1 && f[0].contains("RSS"), "{f:?}");
    }

    #[test]
    fn samples_read_this_process() {
        let s = sample("now");
        assert!(s.fds >= 3 && s.threads >= 1 && s.rss_kib > 0, "{s:?}");
    }
}
