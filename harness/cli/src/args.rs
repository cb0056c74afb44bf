//! Command-line spellings of library choices. The library enums know nothing of clap; these
//! carry the `--help` text and convert into them.

use clap::ValueEnum;
use kiln_backends::BackendChoice;
use kiln_runner::KeepPolicy;

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// kiln's VMM where hardware KVM is usable, else QEMU.
    Auto,
    /// kiln's own VMM.
    Kiln,
    /// qemu-system-x86_64.
    Qemu,
}

impl From<BackendArg> for BackendChoice {
    fn from(arg: BackendArg) -> Self {
        match arg {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Kiln => BackendChoice::Kiln,
            BackendArg::Qemu => BackendChoice::Qemu,
        }
    }
}

/// `--keep-artifacts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeepArg {
    /// Every run's bundle.
    Always,
    /// Only failed runs' bundles.
    Failed,
    /// None (reports only).
    Never,
}

impl From<KeepArg> for KeepPolicy {
    fn from(arg: KeepArg) -> Self {
        match arg {
            KeepArg::Always => KeepPolicy::Always,
            KeepArg::Failed => KeepPolicy::Failed,
            KeepArg::Never => KeepPolicy::Never,
        }
    }
}
