//! `kiln bench boot`: start-up time and memory of kiln's VMM beside QEMU, booting the same tiny
//! PVH guest, each run a fresh process timed from just before it is spawned. `kiln bench soak`
//! ([`soak`]): thousands of VMs of that guest in one process, checking nothing leaks.

pub mod soak;

use std::fmt::Write as _;
use std::fs;
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kiln_vmm::kvm::{KvmAccess, KvmKind};
use serde::Serialize;

use kiln_backends::doctor::QEMU_SYSTEM;

/// Source of the built-in benchmark guest.
const GUEST_SOURCE: &str = include_str!("bench_guest.S");
/// Linker script of the built-in benchmark guest.
const GUEST_LINKER_SCRIPT: &str = include_str!("bench_guest.ld");
/// The line the built-in guest prints.
const GUEST_LINE: &str = "kiln bench guest";
/// A run that has not ended after this long is killed and reported as a failure.
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// Guest memory of the second kiln RSS measurement (the first uses --memory).
const LARGE_GUEST_MIB: u64 = 2048;

/// What `kiln bench` measures.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot time and RSS of kiln's VMM vs QEMU for a tiny PVH guest.
    #[command(after_help = "Example:\n  kiln bench boot --runs 20")]
    Boot(BootBenchArgs),
    /// Thousands of tiny-guest VMs in one process, one after another and 64 at once: fails
    /// when fds, threads or RSS grow.
    #[command(after_help = "Example:\n  kiln bench soak --sequential 1000 --parallel 64")]
    Soak(soak::SoakBenchArgs),
}

/// Options of `kiln bench boot`.
#[derive(Debug, Args)]
pub struct BootBenchArgs {
    /// PVH ELF to boot; it must print to COM1 and write 0 to port 0x501. Default: a built-in
    /// guest assembled with `as`/`ld` into ~/.cache/kiln/bench.
    #[arg(long, value_name = "PVH_ELF")]
    kernel: Option<PathBuf>,
    /// Timed runs per engine (at least 20).
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(20..))]
    runs: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..))]
    memory: u64,
    /// Measure kiln only.
    #[arg(long)]
    no_qemu: bool,
    /// Machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Why a benchmark could not produce numbers.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("`{tool}` not found on PATH: install binutils to build the benchmark guest, or pass --kernel")]
    ToolMissing { tool: &'static str },
    #[error("building the benchmark guest: {step} failed: {detail}")]
    GuestBuild { step: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{QEMU_SYSTEM}` not found on PATH: apt-get install qemu-system-x86, or pass --no-qemu"
    )]
    QemuMissing,
    #[error("--kernel {0}: no such file")]
    KernelMissing(PathBuf),
    #[error("cannot find the kiln executable to benchmark: {0}")]
    CurrentExe(io::Error),
    #[error("{engine} run {run}: cannot start `{program}`: {source}")]
    Spawn {
        engine: String,
        run: u32,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{engine} run {run}: {reason}")]
    BadRun {
        engine: String,
        run: u32,
        reason: BadRun,
    },
    #[error("soak {0}")]
    Soak(String),
}

/// Why a run is not a data point.
#[derive(Debug, thiserror::Error)]
pub enum BadRun {
    /// It ended another way than a good run does.
    #[error(
        "ended with {}, expected {want} (stderr: {last_err:?})",
        code.map_or("a signal".to_string(), |c| c.to_string())
    )]
    Status {
        /// Its exit code, `None` for a signal.
        code: Option<i32>,
        /// What a good run ends with.
        want: &'static str,
        /// Its last line on stderr.
        last_err: String,
    },
    /// The guest did not print the line it prints.
    #[error("output {stdout:?} does not contain {line:?}")]
    MissingLine {
        /// What it printed.
        stdout: String,
        /// What it should have printed.
        line: &'static str,
    },
    /// The guest printed nothing.
    #[error("the guest printed nothing")]
    NoOutput,
    /// No run was timed.
    #[error("no timed runs")]
    NoTimedRuns,
}

/// Runs a `kiln bench` command and returns the process exit code.
pub fn main(command: BenchCommand) -> i32 {
    match command {
        BenchCommand::Boot(args) => match boot(&args) {
            Ok(report) => {
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
                crate::exit::SUCCESS
            }
            Err(e) => {
                eprintln!("kiln: error: {e}");
                crate::exit::ERROR
            }
        },
        BenchCommand::Soak(args) => soak::main(&args),
    }
}

/// Everything `kiln bench boot` measured.
#[derive(Debug, Serialize)]
pub struct BootReport {
    /// The PVH ELF booted by every run.
    pub kernel: String,
    /// Timed runs per engine.
    pub runs: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// KVM kind from the probe ("pvm", "hardware", ...).
    pub kvm_kind: KvmKind,
    /// kiln booting the guest.
    pub kiln: EngineStats,
    /// QEMU booting the same guest, unless --no-qemu.
    pub qemu: Option<EngineStats>,
    /// QEMU median / kiln median, to first output and to exit.
    pub ratio_first_output: Option<f64>,
    pub ratio_exit: Option<f64>,
    /// Where kiln's resident memory goes.
    pub kiln_rss: RssBreakdown,
}

/// One engine's timings (milliseconds) and memory over all runs.
#[derive(Debug, Serialize)]
pub struct EngineStats {
    /// "kiln", or "qemu (kvm)" / "qemu (tcg)".
    pub engine: String,
    /// The command of one run.
    pub command: String,
    /// From spawn to the first byte on the child's stdout.
    pub first_output_ms: Summary,
    /// From spawn to the child's exit.
    pub exit_ms: Summary,
    /// Median of the child's peak RSS (KiB).
    pub max_rss_kib_median: u64,
}

/// kiln's peak RSS in three situations, each the median over the runs (KiB).
#[derive(Debug, Serialize)]
pub struct RssBreakdown {
    /// `kiln --version`: the process with no VM.
    pub baseline_kib: u64,
    /// `kiln boot` with the benchmark's --memory.
    pub boot_kib: u64,
    /// `kiln boot` with a 2048 MiB guest: shows that untouched guest memory is not resident.
    pub boot_large_kib: u64,
    /// Guest memory of `boot_large_kib`.
    pub large_memory_mib: u64,
    /// boot − baseline: what the VMM and the guest's touched pages add.
    pub vmm_overhead_kib: i64,
    /// The benchmark process's own anonymous RSS. A forked child starts with a copy of those
    /// pages, so no child's peak RSS can read below this: values above it are the child's own.
    pub spawner_anon_kib: Option<u64>,
}

/// Order statistics of one series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
}

impl Summary {
    /// Summarizes `values`; `None` when there are none or one is NaN.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        if sorted.iter().any(|v| v.is_nan()) {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            median: percentile(&sorted, 50.0)?,
            p10: percentile(&sorted, 10.0)?,
            p90: percentile(&sorted, 90.0)?,
            min: *sorted.first()?,
        })
    }
}

/// The `p`th percentile (0..=100) of sorted values, interpolating linearly between the two
/// nearest ranks (numpy's default); `None` for no values or `p` out of range.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lower = rank.floor() as usize;
    let upper = rank.ceil() as usize;
    let weight = rank - lower as f64;
    Some(sorted[lower] + (sorted[upper] - sorted[lower]) * weight)
}

/// Median of integers (the lower middle one for an even count, so it is a measured value).
pub fn median_u64(values: &[u64]) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

/// `numerator / denominator`, or `None` when that is not a finite positive number.
pub fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    let r = numerator / denominator;
    (r.is_finite() && r > 0.0).then_some(r)
}

/// A ratio for people: "12.3×", "0.85×", "n/a".
pub fn format_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 10.0 => format!("{r:.1}×"),
        Some(r) => format!("{r:.2}×"),
        None => "n/a".to_string(),
    }
}

/// The guest's status byte from QEMU's exit code: isa-debug-exit makes QEMU exit with
/// `(value << 1) | 1`, so only odd codes come from the guest; anything else (0: QEMU quit on its
/// own, a signal: `None`) did not.
pub fn decode_qemu_status(exit_code: Option<i32>) -> Option<u8> {
    match exit_code {
        Some(code) if (1..=511).contains(&code) && code & 1 == 1 => u8::try_from(code >> 1).ok(),
        _ => None,
    }
}

/// What one finished run looked like.
#[derive(Debug)]
struct RunResult {
    first_output: Option<Duration>,
    exit: Duration,
    /// Exit code, `None` when killed by a signal.
    code: Option<i32>,
    max_rss_kib: u64,
    stdout: String,
    stderr: String,
}

/// Measures `kiln bench boot`.
pub fn boot(args: &BootBenchArgs) -> Result<BootReport, BenchError> {
    let kernel = match &args.kernel {
        Some(path) if !path.is_file() => return Err(BenchError::KernelMissing(path.clone())),
        Some(path) => path.clone(),
        None => build_guest()?,
    };
    let expect = args.kernel.is_none().then_some(GUEST_LINE);
    let kiln_exe = std::env::current_exe().map_err(BenchError::CurrentExe)?;
    let probe = kiln_vmm::kvm::probe();
    let qemu_accel = if probe.access == KvmAccess::Ok {
        "kvm"
    } else {
        "tcg"
    };

    let kiln_cmd = |memory: u64| {
        let mut c = Command::new(&kiln_exe);
        c.arg("boot")
            .arg("--kernel")
            .arg(&kernel)
            .arg("--memory")
            .arg(memory.to_string())
            .args(["--timeout", "10"]);
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new(QEMU_SYSTEM);
        c.args(["-M", "microvm,acpi=off", "-accel", qemu_accel, "-m"])
            .arg(args.memory.to_string())
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio"])
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
            .arg("-kernel")
            .arg(&kernel);
        c
    };
    let kiln_check = |r: &RunResult| check_run(r, expect, r.code == Some(0), "exit code 0");
    let qemu_check = |r: &RunResult| {
        let ok = decode_qemu_status(r.code) == Some(0);
        check_run(r, expect, ok, "exit code 1 (guest status 0)")
    };

    // One untimed run each first, so every timed run finds the binaries in the page cache.
    let mut kiln = Series::new("kiln", kiln_cmd(args.memory));
    let mut qemu =
        (!args.no_qemu).then(|| Series::new(&format!("qemu ({qemu_accel})"), qemu_cmd()));
    kiln.run(0, &kiln_check, false)?;
    if let Some(q) = qemu.as_mut() {
        q.run(0, &qemu_check, false)?;
    }
    // Alternate the engines so drifting machine load affects both alike.
    for run in 1..=args.runs {
        kiln.run(run, &kiln_check, true)?;
        if let Some(q) = qemu.as_mut() {
            q.run(run, &qemu_check, true)?;
        }
    }

    let mut large = Series::new("kiln (large guest)", kiln_cmd(LARGE_GUEST_MIB));
    let mut version = Series::new("kiln --version", {
        let mut c = Command::new(&kiln_exe);
        c.arg("--version");
        c
    });
    let version_check = |r: &RunResult| check_run(r, Some("kiln"), r.code == Some(0), "exit 0");
    for run in 1..=args.runs {
        large.run(run, &kiln_check, true)?;
        version.run(run, &version_check, true)?;
    }

    let kiln = kiln.stats()?;
    let qemu = qemu.map(|q| q.stats()).transpose()?;
    let ratio_of = |f: fn(&EngineStats) -> f64| qemu.as_ref().and_then(|q| ratio(f(q), f(&kiln)));
    let boot_kib = kiln.max_rss_kib_median;
    let baseline_kib = version.rss_median()?;
    Ok(BootReport {
        kernel: kernel.display().to_string(),
        runs: args.runs,
        memory_mib: args.memory,
        kvm_kind: probe.kind,
        ratio_first_output: ratio_of(|e| e.first_output_ms.median),
        ratio_exit: ratio_of(|e| e.exit_ms.median),
        kiln_rss: RssBreakdown {
            baseline_kib,
            boot_kib,
            boot_large_kib: large.rss_median()?,
            large_memory_mib: LARGE_GUEST_MIB,
            vmm_overhead_kib: boot_kib as i64 - baseline_kib as i64,
            spawner_anon_kib: fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| status_field_kib(&s, "RssAnon")),
        },
        kiln,
        qemu,
    })
}

/// A run is a data point only when the guest said what it should and ended as it should.
fn check_run(
    r: &RunResult,
    expect: Option<&'static str>,
    status_ok: bool,
    want: &'static str,
) -> Result<(), BadRun> {
    if !status_ok {
        return Err(BadRun::Status {
            code: r.code,
            want,
            last_err: r.stderr.lines().last().unwrap_or("").to_string(),
        });
    }
    match expect {
        Some(line) if !r.stdout.contains(line) => Err(BadRun::MissingLine {
            stdout: r.stdout.clone(),
            line,
        }),
        _ if r.first_output.is_none() => Err(BadRun::NoOutput),
        _ => Ok(()),
    }
}

/// The runs of one command.
struct Series {
    engine: String,
    command: Command,
    first_output: Vec<f64>,
    exit: Vec<f64>,
    max_rss_kib: Vec<u64>,
}

impl Series {
    fn new(engine: &str, command: Command) -> Self {
        Self {
            engine: engine.to_string(),
            command,
            first_output: Vec::new(),
            exit: Vec::new(),
            max_rss_kib: Vec::new(),
        }
    }

    /// Runs the command once; `record` false makes it a warm-up run.
    fn run(
        &mut self,
        run: u32,
        check: &dyn Fn(&RunResult) -> Result<(), BadRun>,
        record: bool,
    ) -> Result<(), BenchError> {
        let program = self.command.get_program().to_string_lossy().into_owned();
        let result = measure(&mut self.command).map_err(|source| {
            if program == QEMU_SYSTEM && source.kind() == ErrorKind::NotFound {
                return BenchError::QemuMissing;
            }
            BenchError::Spawn {
                engine: self.engine.clone(),
                run,
                program,
                source,
            }
        })?;
        check(&result).map_err(|reason| BenchError::BadRun {
            engine: self.engine.clone(),
            run,
            reason,
        })?;
        if record {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            self.first_output
                .push(result.first_output.map_or(f64::NAN, ms));
            self.exit.push(ms(result.exit));
            self.max_rss_kib.push(result.max_rss_kib);
        }
        Ok(())
    }

    fn no_data(&self) -> BenchError {
        BenchError::BadRun {
            engine: self.engine.clone(),
            run: 0,
            reason: BadRun::NoTimedRuns,
        }
    }

    fn rss_median(&self) -> Result<u64, BenchError> {
        median_u64(&self.max_rss_kib).ok_or_else(|| self.no_data())
    }

    fn stats(self) -> Result<EngineStats, BenchError> {
        let (Some(first_output_ms), Some(exit_ms)) =
            (Summary::of(&self.first_output), Summary::of(&self.exit))
        else {
            return Err(self.no_data());
        };
        Ok(EngineStats {
            max_rss_kib_median: self.rss_median()?,
            command: command_line(&self.command),
            engine: self.engine,
            first_output_ms,
            exit_ms,
        })
    }
}

fn command_line(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Spawns `command` and times it: to the first byte on its stdout and to its exit, with its
/// peak RSS from `wait4`.
fn measure(command: &mut Command) -> io::Result<RunResult> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the hook does nothing, so it is async-signal-safe. Its only purpose is to make std
    // fork instead of posix_spawn/vfork: a vfork child shares this process's memory until exec,
    // and exec carries the peak RSS of the memory it leaves into the child's ru_maxrss, so every
    // child would read at least this process's whole peak (binary pages included). A forked
    // child carries only the copied anonymous pages (`spawner_anon_kib`), below any child here.
    unsafe {
        command.pre_exec(|| Ok(()));
    }
    let start = Instant::now();
    let mut child = command.spawn()?;
    let deadline = start + RUN_DEADLINE;
    let (stdout, stderr) = match (child.stdout.take(), child.stderr.take()) {
        (Some(out), Some(err)) => (out, err),
        _ => return Err(io::Error::other("child pipes missing")),
    };
    let drained = drain(stdout, stderr, start, deadline);
    let (first_output, stdout, stderr) = match drained {
        Ok(d) => d,
        Err(e) => {
            let _ = child.kill();
            let _ = reap(&child);
            return Err(e);
        }
    };
    let (status, rusage) = reap(&child)?;
    let exit = start.elapsed();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok(RunResult {
        first_output,
        exit,
        code,
        max_rss_kib: u64::try_from(rusage.ru_maxrss).unwrap_or(0),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Reads the child's stdout and stderr until both close; returns when the first stdout byte came.
fn drain(
    mut stdout: ChildStdout,
    mut stderr: ChildStderr,
    start: Instant,
    deadline: Instant,
) -> io::Result<(Option<Duration>, Vec<u8>, Vec<u8>)> {
    let mut first = None;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut buf = [0u8; 4096];
    while out_open || err_open {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("no exit after {}s", RUN_DEADLINE.as_secs()),
            ));
        }
        let mut fds = [
            pollfd(out_open.then(|| stdout.as_raw_fd())),
            pollfd(err_open.then(|| stderr.as_raw_fd())),
        ];
        let timeout_ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                out_open = false;
            } else {
                first.get_or_insert_with(|| start.elapsed());
                out.extend_from_slice(&buf[..n]);
            }
        }
        if fds[1].revents != 0 {
            let n = stderr.read(&mut buf)?;
            if n == 0 {
                err_open = false;
            } else {
                err.extend_from_slice(&buf[..n]);
            }
        }
    }
    Ok((first, out, err))
}

/// A pollfd waiting for input on `fd`; a negative fd (closed stream) is ignored by poll.
fn pollfd(fd: Option<i32>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// A `Name:   123 kB` field of /proc/<pid>/status, in KiB.
fn status_field_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Waits for the child with `wait4`, which also reports its resource usage.
fn reap(child: &Child) -> io::Result<(i32, libc::rusage)> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    let mut status = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers and timevals).
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `rusage` are valid for writes; `pid` is our own unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Assembles the built-in guest into the cache directory (once per source version).
fn build_guest() -> Result<PathBuf, BenchError> {
    let dir = cache_dir();
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Io { path, source }
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let key = fnv1a(GUEST_SOURCE.as_bytes()) ^ fnv1a(GUEST_LINKER_SCRIPT.as_bytes()).rotate_left(1);
    let elf = dir.join(format!("bench-guest-{key:016x}.elf"));
    if elf.is_file() {
        return Ok(elf);
    }
    // Process-unique names and a final rename: concurrent benchmarks never see a partial file.
    let tmp = |ext: &str| dir.join(format!("bench-guest.{}.{ext}", std::process::id()));
    let (source, script, object, partial) = (tmp("S"), tmp("ld"), tmp("o"), tmp("elf"));
    fs::write(&source, GUEST_SOURCE).map_err(io_err(&source))?;
    fs::write(&script, GUEST_LINKER_SCRIPT).map_err(io_err(&script))?;
    let mut assemble = Command::new("as");
    assemble.arg("--64").arg("-o").arg(&object).arg(&source);
    let mut link = Command::new("ld");
    link.args(["-static", "-nostdlib", "-z", "noexecstack", "-T"])
        .arg(&script)
        .arg("-o")
        .arg(&partial)
        .arg(&object);
    let built = run_tool("as", assemble).and_then(|()| run_tool("ld", link));
    for f in [&source, &script, &object] {
        let _ = fs::remove_file(f);
    }
    built?;
    fs::rename(&partial, &elf).map_err(io_err(&elf))?;
    Ok(elf)
}

fn run_tool(tool: &'static str, mut command: Command) -> Result<(), BenchError> {
    let output = command.output().map_err(|e| match e.kind() {
        ErrorKind::NotFound => BenchError::ToolMissing { tool },
        _ => BenchError::GuestBuild {
            step: tool.to_string(),
            detail: e.to_string(),
        },
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(BenchError::GuestBuild {
        step: command_line(&command),
        detail: stderr.lines().next().unwrap_or("no message").to_string(),
    })
}

/// `$XDG_CACHE_HOME/kiln/bench`, else `~/.cache/kiln/bench`, else the temp dir.
fn cache_dir() -> PathBuf {
    let non_empty = |var| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    non_empty("XDG_CACHE_HOME")
        .or_else(|| non_empty("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln")
        .join("bench")
}

/// FNV-1a: a stable cache key for the guest source (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The human-readable report.
pub fn render_text(r: &BootReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kiln bench boot: {} runs per engine, {} MiB guest",
        r.runs, r.memory_mib
    );
    let _ = writeln!(s, "guest: {}", r.kernel);
    let kind = serde_json::to_value(r.kvm_kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let _ = writeln!(s, "KVM: {kind}");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<12} {:>34}   {:>34}   {:>8}",
        "", "first output (ms)", "exit (ms)", "max RSS"
    );
    let _ = writeln!(
        s,
        "{:<12} {:>8} {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8} {:>8}   {:>8}",
        "engine", "median", "p10", "p90", "min", "median", "p10", "p90", "min", "median"
    );
    for e in std::iter::once(&r.kiln).chain(r.qemu.as_ref()) {
        let f = &e.first_output_ms;
        let x = &e.exit_ms;
        let _ = writeln!(
            s,
            "{:<12} {:>8.2} {:>8.2} {:>8.2} {:>8.2}   {:>8.2} {:>8.2} {:>8.2} {:>8.2}   {:>4.1} MiB",
            e.engine,
            f.median,
            f.p10,
            f.p90,
            f.min,
            x.median,
            x.p10,
            x.p90,
            x.min,
            mib(e.max_rss_kib_median)
        );
    }
    if r.qemu.is_some() {
        let _ = writeln!(
            s,
            "QEMU/kiln: first output {}, exit {}",
            format_ratio(r.ratio_first_output),
            format_ratio(r.ratio_exit)
        );
    }
    let m = &r.kiln_rss;
    let _ = writeln!(s);
    let _ = writeln!(s, "kiln peak RSS (median):");
    let _ = writeln!(
        s,
        "  kiln --version (no VM)     {:>6.1} MiB",
        mib(m.baseline_kib)
    );
    let _ = writeln!(
        s,
        "  boot, --memory {:<5}       {:>6.1} MiB",
        r.memory_mib,
        mib(m.boot_kib)
    );
    let _ = writeln!(
        s,
        "  boot, --memory {:<5}       {:>6.1} MiB",
        m.large_memory_mib,
        mib(m.boot_large_kib)
    );
    let _ = writeln!(
        s,
        "  VMM overhead (boot − baseline, {} MiB guest): {:.1} MiB",
        r.memory_mib,
        m.vmm_overhead_kib as f64 / 1024.0
    );
    if let Some(floor) = m.spawner_anon_kib {
        let _ = writeln!(
            s,
            "  (floor: no child reads below this process's {:.1} MiB of anonymous memory)",
            mib(floor)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(5.0));
        assert_eq!(percentile(&v, 10.0), Some(1.4));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 101.0), None);
    }

    #[test]
    fn summary_sorts_and_rejects_nan() {
        let s = Summary::of(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min), (3.0, 1.0));
        assert_eq!(s.p90, 4.6);
        assert!(Summary::of(&[1.0, f64::NAN]).is_none());
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn integer_median_is_a_measured_value() {
        assert_eq!(median_u64(&[30, 10, 20]), Some(20));
        assert_eq!(median_u64(&[40, 10, 30, 20]), Some(20));
        assert_eq!(median_u64(&[]), None);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(50.0, 10.0), Some(5.0));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(0.0, 1.0), None);
        assert_eq!(format_ratio(Some(12.345)), "12.3×");
        assert_eq!(format_ratio(Some(4.999)), "5.00×");
        assert_eq!(format_ratio(Some(0.5)), "0.50×");
        assert_eq!(format_ratio(None), "n/a");
    }

    #[test]
    fn qemu_status_comes_from_odd_exit_codes() {
        assert_eq!(decode_qemu_status(Some(1)), Some(0));
        assert_eq!(decode_qemu_status(Some(3)), Some(1));
        assert_eq!(decode_qemu_status(Some(255)), Some(127));
        assert_eq!(decode_qemu_status(Some(0)), None);
        assert_eq!(decode_qemu_status(Some(2)), None);
        assert_eq!(decode_qemu_status(None), None);
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tkiln\nVmHWM:\t    4200 kB\nRssAnon:\t     812 kB\n";
        assert_eq!(status_field_kib(status, "RssAnon"), Some(812));
        assert_eq!(status_field_kib(status, "VmHWM"), Some(4200));
        assert_eq!(status_field_kib(status, "Rss"), None);
        assert_eq!(status_field_kib(status, "Name"), None);
    }

    #[test]
    fn fnv1a_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn run_checks() {
        let run = |code, out: &str| RunResult {
            first_output: (!out.is_empty()).then(|| Duration::from_millis(1)),
            exit: Duration::from_millis(2),
            code,
            max_rss_kib: 1,
            stdout: out.to_string(),
            stderr: "boom\n".to_string(),
        };
        let ok = run(Some(0), "kiln bench guest\n");
        assert!(check_run(&ok, Some(GUEST_LINE), true, "0").is_ok());
        let err = check_run(&ok, Some(GUEST_LINE), false, "exit code 0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected exit code 0") && err.contains("boom"),
            "{err}"
        );
        assert!(check_run(&run(Some(0), "other"), Some(GUEST_LINE), true, "0").is_err());
        assert!(check_run(&run(Some(0), ""), None, true, "0").is_err());
    }
}
