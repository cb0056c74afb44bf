//! Command-line spellings of library choices. The library enums know nothing of clap; these
//! carry the `--help` text and convert into them.

use clap::ValueEnum;
use kiln_backends::BackendChoice;
use kiln_runner::KeepPolicy;

/// `--artifacts`' default: bundles go under `./kiln-artifacts`.
pub const DEFAULT_ARTIFACTS: &str = "kiln-artifacts";

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

/// `--artifacts-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArtifactsModeArg {
    /// Bundles readable by their owner only (directories 0700, files 0600/0700).
    Owner,
    /// Bundles readable by everyone (directories 0755, files 0644/0755).
    Shared,
}

impl From<ArtifactsModeArg> for kiln_runner::ArtifactsMode {
    fn from(arg: ArtifactsModeArg) -> Self {
        match arg {
            ArtifactsModeArg::Owner => kiln_runner::ArtifactsMode::Private,
            ArtifactsModeArg::Shared => kiln_runner::ArtifactsMode::Shared,
        }
    }
}

/// Parses a size option: bytes or "512MiB", "1GiB", ….
pub fn parse_size(s: &str) -> Result<u64, String> {
    kiln_scenario::parse_size(s)
}

/// The bundle options `kiln run` and `kiln diff run` share.
#[derive(Debug, Clone, clap::Args)]
pub struct BundleArgs {
    /// Who may read bundles: they hold what guests wrote, so by default only their owner.
    #[arg(long, value_enum, default_value_t = ArtifactsModeArg::Owner)]
    pub artifacts_mode: ArtifactsModeArg,
    /// Most bytes of console.log per run (bytes or "64MiB"); a note marks the cut.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub console_log_limit: u64,
    /// Most bytes copied from each run's shares into its bundle, overriding every scenario's
    /// `fixtures_limit` (default 1GiB); past it the scenario fails.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub fixtures_limit: Option<u64>,
}

impl BundleArgs {
    /// Sets these options on `opts`.
    pub fn apply(&self, opts: &mut kiln_runner::RunOptions) {
        opts.artifacts_mode = self.artifacts_mode.into();
        opts.console_log_limit = self.console_log_limit;
        opts.fixtures_limit = self.fixtures_limit;
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
