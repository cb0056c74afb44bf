//! The `kiln` command line: all of kiln's clap code, and the commands that glue the library
//! crates (scenario, runner, backends, img, diff, guest-build, vmm) together.

pub mod args;
pub mod bench;
pub mod boot_error;
pub mod commands;
pub mod exit;
pub mod nested;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use kiln_disk::DiskSpec;
use kiln_vmm::{ConsoleOutput, ExitReason, ShareConfig, Vm, VmConfig};

use crate::commands::guest::GuestCommand;
use kiln_backends::doctor;

/// kiln: a microVM test harness with its own embedded VMM.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: a microVM test harness with its own embedded VMM"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a kernel in a throwaway VM and print its serial console.
    #[command(
        after_help = "Examples:\n  kiln boot --kernel bzImage --initrd initrd.img --timeout 30\n  kiln boot --kernel guest.elf --disk base.qcow2 --share out=./out --marker KILN_READY"
    )]
    Boot(BootArgs),
    /// Measure kiln against QEMU.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run scenarios, each in its own throwaway VM.
    #[command(
        after_help = "Exit codes: 0 every scenario passed; 1 a scenario failed (with --baseline: \
        only scenarios that failed in the baseline too); 2 usage or configuration error; \
        4 environment drift; 5 regressions (--baseline: a scenario fails that passed there or \
        is new); 130 interrupted.\n\n\
        Examples:\n  kiln run scenarios/\n  kiln run scenarios/ --filter cow-disk --backend kiln --junit junit.xml\n  \
        kiln run scenarios/ --baseline kiln-artifacts --json > run.json"
    )]
    Run(crate::commands::run::RunArgs),
    /// A terminal in the VM of a paused run (`kiln run --pause-before-teardown`, or `--debug`
    /// on a failure): job control, window size and Ctrl-C act in the guest.
    #[command(
        after_help = "Examples:\n  kiln shell boot-smoke\n  kiln shell boot-smoke -- top\n\n\
        Exit code: the guest command's (128 + N when signal N ended it); 3 when no run of that \
        name is paused."
    )]
    Shell(crate::commands::shell::ShellArgs),
    /// Run one command in the VM of a paused run; its stdout, stderr and exit status come back.
    #[command(
        after_help = "Examples:\n  kiln exec boot-smoke -- dmesg\n  tar c out | kiln exec -i boot-smoke -- tar x -C /tmp\n\n\
        Exit code: the command's (128 + N when signal N ended it); 3 when no run of that name \
        is paused."
    )]
    Exec(crate::commands::shell::ExecArgs),
    /// What the artifacts dir holds, and pruning old runs' bundles from it.
    #[command(subcommand)]
    Artifacts(crate::commands::artifacts::ArtifactsCommand),
    /// Work with scenario files.
    #[command(subcommand)]
    Scenario(ScenarioCommand),
    /// Report what this host can run: KVM kind, capabilities, QEMU tools.
    #[command(after_help = "Examples:\n  kiln doctor\n  kiln doctor --environment > gate.toml")]
    Doctor {
        /// Machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print this environment's identity (host, kiln, KILN_ENV_* operator variables) as a
        /// TOML contract for `kiln run --expect-environment` (JSON with --json).
        #[arg(long)]
        environment: bool,
    },
    /// Build, list and locate guest images (kernel + initramfs with kiln-agent).
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Disk images: info, check, map, compare — answers shaped like qemu-img's.
    #[command(subcommand)]
    Img(crate::commands::img::ImgCommand),
    /// Differential checks against the reference tools.
    #[command(subcommand)]
    Diff(crate::commands::diff_img::DiffCommand),
    /// Run a command inside an L1 Linux under QEMU TCG whose /dev/kvm is a real (nested SVM)
    /// KVM: the proving ground for Linux through kiln's VMM on hosts without hardware KVM.
    #[command(
        after_help = "Example:\n  kiln nested --out target/nested -- kiln run scenarios/ --backend kiln\n\n\
        Exit code: the command's; 3 when L1 cannot run it (no QEMU, no SVM, no /dev/kvm)."
    )]
    Nested(NestedArgs),
}

#[derive(Debug, Args)]
struct NestedArgs {
    /// A host directory the command may write to, shared back at the same path (repeatable).
    #[arg(long, value_name = "DIR")]
    out: Vec<PathBuf>,
    /// L1 memory in MiB.
    #[arg(long, default_value_t = 8192, value_name = "MIB")]
    memory: u32,
    /// L1 vCPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    cpus: u32,
    /// Kill L1 after this many seconds (at most a year).
    #[arg(long, default_value_t = 3600, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=kiln_scenario::MAX_DURATION.as_secs()))]
    timeout: u64,
    /// The QEMU binary that runs L1.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu: String,
    /// The command to run in L1 (in the host's root file system, from the current directory).
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn nested(args: NestedArgs) -> i32 {
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let cfg = crate::nested::NestedConfig {
        command: args.command,
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        out: args.out.into_iter().map(absolute).collect(),
        env: crate::nested::inherited_env(),
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
        qemu: args.qemu,
    };
    let progress = |line: &str| eprintln!("kiln: nested: {line}");
    match crate::nested::run(&cfg, &progress) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: nested: {e}");
            exit::UNAVAILABLE
        }
    }
}

#[derive(Debug, Subcommand)]
enum ScenarioCommand {
    /// Validate scenario files without booting anything (exit 0 valid, 2 errors).
    #[command(after_help = "Example:\n  kiln scenario check scenarios/")]
    Check {
        /// Scenario files or directories.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct BootArgs {
    /// Kernel: ELF vmlinux (PVH note → PVH entry, else 64-bit entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initrd / initramfs, placed at the top of low memory.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to kiln's defaults.
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// Kill the VM after this many seconds (exit code 124). 0 means no limit.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    timeout: f64,
    /// Write the console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Print console lines matching REGEX, with their time since start, to stderr.
    #[arg(long, value_name = "REGEX")]
    marker: Vec<String>,
    /// Attach a disk (repeatable; raw or qcow2, detected). Default: a per-run copy-on-write
    /// overlay, deleted afterwards, the image itself never written. `,overlay=PATH` keeps the
    /// overlay at PATH; `,ro` attaches the image read-only; `,in-place` writes the image itself.
    #[arg(long, value_name = "PATH[,ro][,overlay=PATH][,in-place]", value_parser = parse_disk)]
    disk: Vec<DiskSpec>,
    /// Share a host directory over virtio-fs as TAG (repeatable); `,ro` makes it read-only.
    #[arg(long, value_name = "TAG=DIR[,ro]", value_parser = parse_share)]
    share: Vec<ShareConfig>,
    /// Attach a virtio-vsock device behind the Unix socket UDS_PATH (guest CID 3): connect and
    /// send `CONNECT <port>\n` to reach a guest port; the guest reaches host port P at UDS_PATH_P.
    #[arg(long, value_name = "UDS_PATH")]
    vsock: Option<PathBuf>,
    /// Also list the virtio-mmio devices as `virtio_mmio.device=` on the kernel command line.
    #[arg(long)]
    virtio_cmdline: bool,
    /// Do not attach the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
}

/// Parses a `--disk` value; kiln-disk's error, reported against the option.
fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    s.parse::<DiskSpec>()
        .map_err(|e| e.with_option("--disk").to_string())
}

/// A `--share` value that is not `TAG=DIR[,ro]`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not TAG=DIR[,ro]")]
struct ShareSyntaxError(String);

/// Parses `TAG=DIR[,ro]`.
fn parse_share(s: &str) -> Result<ShareConfig, ShareSyntaxError> {
    let bad = || ShareSyntaxError(s.to_string());
    let (tag, rest) = s.split_once('=').ok_or_else(bad)?;
    let (dir, read_only) = match rest.strip_suffix(",ro") {
        Some(dir) => (dir, true),
        None => (rest.strip_suffix(",rw").unwrap_or(rest), false),
    };
    if tag.is_empty() || dir.is_empty() {
        return Err(bad());
    }
    Ok(ShareConfig {
        tag: tag.to_string(),
        dir: dir.into(),
        read_only,
    })
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> std::process::ExitCode {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Bench(what) => bench::main(what),
        Command::Run(args) => crate::commands::run::run(args),
        Command::Shell(args) => crate::commands::shell::shell(args),
        Command::Exec(args) => crate::commands::shell::exec(args),
        Command::Artifacts(cmd) => crate::commands::artifacts::run(cmd),
        Command::Scenario(ScenarioCommand::Check { paths }) => crate::commands::run::check(&paths),
        Command::Doctor { json, environment } => {
            let report = doctor::report();
            if environment {
                let env = crate::commands::run::host_environment(&report);
                if json {
                    match serde_json::to_string_pretty(&env) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("kiln: error: {e}");
                            return exit::to_process(exit::ERROR);
                        }
                    }
                } else {
                    print!("{}", env.to_toml());
                }
            } else if json {
                println!("{}", doctor::render_json(&report));
            } else {
                print!("{}", doctor::render_text(&report));
            }
            exit::SUCCESS
        }
        Command::Guest(command) => crate::commands::guest::run(command),
        Command::Img(cmd) => crate::commands::img::run(cmd),
        Command::Diff(cmd) => crate::commands::diff_img::run(cmd),
        Command::Nested(args) => nested(args),
    };
    exit::to_process(code)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        // A scenario's failures are on its FAIL line and in its harness.log: not twice on stderr.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kiln_runner::execute=error"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // stderr follows KILN_LOG; each run's harness.log always gets info and above.
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let bundles = kiln_runner::tracelog::RunLogLayer
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(bundles)
        .try_init();
}

/// How often `kiln boot` checks for the VM's end, its deadline and Ctrl-C.
const BOOT_POLL: Duration = Duration::from_millis(20);

fn boot(args: BootArgs) -> i32 {
    if !(args.timeout.is_finite() && args.timeout >= 0.0) {
        eprintln!(
            "kiln: error: --timeout {}: must be a number of seconds >= 0",
            args.timeout
        );
        return exit::USAGE;
    }
    let Ok(timeout) = Duration::try_from_secs_f64(args.timeout) else {
        eprintln!(
            "kiln: error: --timeout {}: too large (at most {} seconds)",
            args.timeout,
            u64::MAX
        );
        return exit::USAGE;
    };
    // Say at once what `kiln doctor` knows instead of letting a Linux kernel spin to the timeout.
    if kiln_vmm::boot::is_bzimage(&args.kernel).unwrap_or(false) {
        let probe = kiln_vmm::kvm::probe();
        if !probe.linux_capable() {
            eprintln!(
                "kiln: error: --kernel {} is a Linux kernel, and this host's KVM ({}) cannot boot \
                 Linux guests (see `kiln doctor`); use `kiln nested -- kiln boot …` or \
                 `kiln run --backend qemu`",
                args.kernel.display(),
                probe.kind
            );
            return exit::ERROR;
        }
    }
    let mut config = VmConfig::new(&args.kernel)
        .memory_mib(args.memory)
        .vcpus(args.vcpus)
        .console_output(match &args.console {
            Some(path) => ConsoleOutput::File(path.clone()),
            None => ConsoleOutput::Stdout,
        });
    config.initrd = args.initrd;
    config.cmdline = args.cmdline;
    config.markers = args.marker;
    config.disks = args.disk;
    config.shares = args.share;
    config.vsock = args.vsock;
    config.virtio_cmdline = args.virtio_cmdline;
    config.rng = !args.no_rng;
    // Ctrl-C or SIGTERM: kill the VM and let it clean up (its temporary overlay, its vsock
    // socket), instead of dying with them left behind for the next run to trip over.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        tracing::warn!("no Ctrl-C handler: {e}");
    }
    let mut vm = match Vm::start(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("kiln: error: {}", boot_error::ByOption(&e));
            return exit::ERROR;
        }
    };
    // A limit too far away to add to now is no limit.
    let deadline = (args.timeout > 0.0)
        .then(|| Instant::now().checked_add(timeout))
        .flatten();
    let ended = loop {
        if interrupted.load(Ordering::SeqCst) {
            vm.kill();
            drop(vm);
            eprintln!("kiln: interrupted: killed the VM");
            return exit::INTERRUPTED;
        }
        if vm.exit_reason().is_some() || deadline.is_some_and(|d| Instant::now() >= d) {
            // Ended: this returns at once; past the deadline it kills the VM (a timeout).
            break vm.wait(Duration::ZERO);
        }
        std::thread::sleep(BOOT_POLL);
    };
    let log = vm.console();
    for hit in log.markers() {
        eprintln!("kiln: marker {:>10.3?} {}", hit.at, hit.line);
    }
    if log.dropped_markers() > 0 {
        eprintln!(
            "kiln: {} more marker lines not shown (only the first {} are kept)",
            log.dropped_markers(),
            kiln_devices::console::MAX_MARKER_HITS
        );
    }
    match &ended {
        ExitReason::Timeout => eprintln!("kiln: guest timed out after {}s", args.timeout),
        e if !e.is_guest_initiated() => eprintln!("kiln: error: {e}"),
        _ => {}
    }
    exit::of_vm(&ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_help_ends_with_an_example() {
        use clap::CommandFactory;
        fn leaves(cmd: &clap::Command, path: String, out: &mut Vec<(String, String)>) {
            let subs: Vec<_> = cmd
                .get_subcommands()
                .filter(|c| c.get_name() != "help")
                .collect();
            if subs.is_empty() {
                let help = cmd
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                out.push((path.clone(), help));
            }
            for sub in subs {
                leaves(sub, format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut all = Vec::new();
        leaves(&Cli::command(), "kiln".into(), &mut all);
        let missing: Vec<_> = all
            .iter()
            .filter(|(_, help)| !help.contains("Example"))
            .map(|(path, _)| path.as_str())
            .collect();
        assert!(all.len() >= 20, "{all:?}");
        assert!(missing.is_empty(), "no example in --help of: {missing:?}");
    }

    #[test]
    fn share_syntax() {
        assert_eq!(
            parse_share("fixtures=/tmp/out").unwrap(),
            ShareConfig {
                tag: "fixtures".into(),
                dir: "/tmp/out".into(),
                read_only: false
            }
        );
        assert!(parse_share("src=/code,ro").unwrap().read_only);
        assert!(parse_share("/tmp/out").is_err());
        assert!(parse_share("=/tmp").is_err());
        assert!(parse_share("tag=").is_err());
    }

    /// A bad `--disk` is a usage error naming the option, the value and the problem.
    #[test]
    fn disk_spec_errors_name_the_option() {
        let err = Cli::try_parse_from(["kiln", "boot", "--kernel", "k", "--disk", "a.img,rw"])
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("--disk \"a.img,rw\": unknown option \"rw\""),
            "{msg}"
        );
        let ok = Cli::try_parse_from(["kiln", "boot", "--kernel", "k", "--disk", "a.img,ro"]);
        assert!(ok.is_ok());
    }

    #[test]
    fn vcpus_zero_is_a_usage_error() {
        let err =
            Cli::try_parse_from(["kiln", "boot", "--kernel", "k", "--vcpus", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), exit::USAGE);
        assert!(Cli::try_parse_from(["kiln", "boot", "--kernel", "k", "--vcpus", "2"]).is_ok());
        assert_eq!(
            Cli::try_parse_from(["kiln", "boot"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    /// `kiln nested --timeout` beyond what a deadline can hold is a usage error, not a panic
    /// when the deadline is computed.
    #[test]
    fn nested_timeouts_out_of_range_are_usage_errors() {
        for bad in ["18446744073709551615", "31536001", "0", "-1", "2e19"] {
            let err = Cli::try_parse_from(["kiln", "nested", "--timeout", bad, "--", "true"])
                .expect_err(bad);
            assert_eq!(err.exit_code(), exit::USAGE, "{bad}");
        }
        assert!(Cli::try_parse_from(["kiln", "nested", "--timeout", "60", "--", "true"]).is_ok());
    }

    #[test]
    fn bundle_options_parse_sizes_and_modes() {
        let ok = Cli::try_parse_from([
            "kiln",
            "run",
            "s/",
            "--artifacts-mode",
            "shared",
            "--console-log-limit",
            "1MiB",
            "--fixtures-limit",
            "2GiB",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        for bad in [
            ["--console-log-limit", "lots"],
            ["--fixtures-limit", "-1"],
            ["--artifacts-mode", "public"],
        ] {
            let err = Cli::try_parse_from(["kiln", "run", "s/", bad[0], bad[1]]).expect_err(bad[1]);
            assert_eq!(err.exit_code(), exit::USAGE);
        }
    }
}
