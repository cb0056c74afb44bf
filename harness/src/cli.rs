//! The `kiln` command line: a thin layer over kiln-vmm and the harness modules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kiln_vmm::{ConsoleOutput, ExitReason, Vm, VmConfig};

use crate::doctor;

/// kiln: a microVM test harness with its own embedded VMM.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a kernel in a throwaway VM and print its serial console.
    Boot(BootArgs),
    /// Report what this host can run: KVM kind, capabilities, QEMU tools.
    Doctor {
        /// Machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Disk images: info, check, map, compare — answers shaped like qemu-img's.
    #[command(subcommand)]
    Img(crate::img::cmd::ImgCommand),
    /// Differential checks against the reference tools.
    #[command(subcommand)]
    Diff(crate::diff::cmd::DiffCommand),
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
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Doctor { json } => {
            let report = doctor::report();
            if json {
                println!("{}", doctor::render_json(&report));
            } else {
                print!("{}", doctor::render_text(&report));
            }
            0
        }
        Command::Img(cmd) => crate::img::cmd::run(cmd),
        Command::Diff(cmd) => crate::diff::cmd::run(cmd),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn boot(args: BootArgs) -> i32 {
    if !(args.timeout.is_finite() && args.timeout >= 0.0) {
        eprintln!(
            "kiln: error: --timeout {}: must be a number of seconds >= 0",
            args.timeout
        );
        return 2;
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
    let mut vm = match Vm::start(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            return 1;
        }
    };
    let exit = if args.timeout > 0.0 {
        vm.wait(Duration::from_secs_f64(args.timeout))
    } else {
        vm.wait_forever()
    };
    for hit in vm.console().markers() {
        eprintln!("kiln: marker {:>10.3?} {}", hit.at, hit.line);
    }
    match &exit {
        ExitReason::Timeout => eprintln!("kiln: guest timed out after {}s", args.timeout),
        e if !e.is_guest_initiated() => eprintln!("kiln: error: {e}"),
        _ => {}
    }
    exit.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_zero_is_a_usage_error() {
        let err =
            Cli::try_parse_from(["kiln", "boot", "--kernel", "k", "--vcpus", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(Cli::try_parse_from(["kiln", "boot", "--kernel", "k", "--vcpus", "2"]).is_ok());
        assert_eq!(
            Cli::try_parse_from(["kiln", "boot"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }
}
