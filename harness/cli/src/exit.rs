//! Every exit code of the `kiln` command, in one place (like nextest's `NextestExitCode`), and
//! the functions that turn what a library reports (a run's outcome, a diff report, how a VM
//! ended) into one. The README's "Exit codes" table lists the same.
//!
//! One integer type throughout: `i32`, what `std::process::exit` takes and
//! `std::process::ExitStatus::code` gives; [`to_process`] turns it into the process's status
//! (0..=255) at the very end of `main`. Codes that share a number keep separate names because
//! they mean different things.
//!
//! Besides these, some commands pass a status through: `kiln boot` exits with the byte the guest
//! wrote to the exit port, `kiln nested`, `kiln shell` and `kiln exec` with the command's own
//! status, and `kiln img` with qemu-img's statuses ([`img`]).

use std::process::ExitCode;

use kiln_diff::scenarios::report::RunDiffReport;
use kiln_runner::baseline::Comparison;
use kiln_runner::RunOutcome;
use kiln_vmm::ExitReason;

/// Everything went as asked: every scenario passed, nothing DIVERGENT, the guest reset or
/// powered off (`kiln boot`), the command finished.
pub const SUCCESS: i32 = 0;

/// The command worked and found failures: `kiln run`, a scenario failed (or was not run after
/// `--fail-fast`; with `--baseline`, only scenarios that failed in the baseline too);
/// `kiln diff`, a DIVERGENT result.
pub const FAILURES: i32 = 1;

/// The command could not do its work: a VMM error, triple fault or KVM internal error under
/// `kiln boot` (or a Linux kernel on a KVM that cannot boot Linux), a failed `kiln guest` or
/// `kiln bench` (`kiln bench soak` also when fds, threads or RSS grew), a `kiln diff img --log`
/// that could not be written. One line on stderr says why.
pub const ERROR: i32 = 1;

/// A usage, scenario or configuration error: nothing was booted. clap's own usage errors exit
/// with the same code; so does `kiln diff img --profile` naming another version's profile than
/// the qemu-img's, and `kiln run --enforce-budget` when the artifacts dir is already over its
/// budget.
pub const USAGE: i32 = 2;

/// Something the command needs is not available on this host, so nothing ran: a backend of
/// `kiln diff run` (e.g. a KVM that cannot boot Linux), qemu-img for `kiln diff img` (or one of a
/// version kiln has no profile for), L1 for `kiln nested` (no QEMU, no SVM, no /dev/kvm in
/// L1, a failed download), or a paused run for `kiln shell`/`kiln exec`.
pub const UNAVAILABLE: i32 = 3;

/// `kiln run --expect-environment`: this host, kiln or operator identity is not the one the
/// contract pins; one line per differing field on stderr, and nothing was booted.
pub const ENVIRONMENT_DRIFT: i32 = 4;

/// `kiln run --baseline`: a scenario fails that did not fail in the baseline (it passed there,
/// or is new). Failures the baseline already had alone exit with FAILURES.
pub const REGRESSIONS: i32 = 5;

/// `kiln boot --timeout` ran out before the guest ended (as `timeout(1)`).
pub const TIMEOUT: i32 = 124;

/// Ctrl-C: `kiln run` and `kiln diff run` tore down what was running (128 + SIGINT).
pub const INTERRUPTED: i32 = 130;

/// `kiln boot`: the host killed the VM (128 + SIGKILL).
pub const KILLED: i32 = 137;

/// `kiln img`'s statuses: qemu-img's, which `kiln diff img` compares with qemu-img's own, so
/// they are defined by the image layer that answers like qemu-img.
pub use kiln_img::status as img;

/// `kiln run`'s code for how the run ended.
pub fn of_run(outcome: RunOutcome) -> i32 {
    match outcome {
        RunOutcome::Passed => SUCCESS,
        RunOutcome::Failed => FAILURES,
        RunOutcome::Interrupted => INTERRUPTED,
    }
}

/// `kiln run --baseline`'s code: as [`of_run`], but REGRESSIONS when a scenario regressed
/// (Ctrl-C still wins: an interrupted run compares only what it got to).
pub fn of_run_against(outcome: RunOutcome, comparison: &Comparison) -> i32 {
    match outcome {
        RunOutcome::Interrupted => INTERRUPTED,
        _ if comparison.has_regressions() => REGRESSIONS,
        outcome => of_run(outcome),
    }
}

/// `kiln diff run`'s code for a finished comparison: FAILURES when any scenario is DIVERGENT.
pub fn of_diff_run(report: &RunDiffReport) -> i32 {
    if report.has_divergent() {
        FAILURES
    } else {
        SUCCESS
    }
}

/// `kiln boot`'s code for how the VM ended: the guest's exit-port byte, TIMEOUT, KILLED, or
/// ERROR when the VM failed rather than the guest ending it. The same numbers as
/// [`ExitReason::exit_code`], the VMM's own status for library users.
pub fn of_vm(exit: &ExitReason) -> i32 {
    match exit {
        ExitReason::Reset | ExitReason::Shutdown => SUCCESS,
        ExitReason::ExitPort(byte) => i32::from(*byte),
        ExitReason::Timeout => TIMEOUT,
        ExitReason::Killed => KILLED,
        ExitReason::TripleFault | ExitReason::InternalError(_) | ExitReason::VmmError(_) => ERROR,
    }
}

/// The process status for `code`: codes outside 0..=255 (a pass-through status) are clamped.
pub fn to_process(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbers_do_not_change() {
        assert_eq!(
            [
                SUCCESS,
                FAILURES,
                ERROR,
                USAGE,
                UNAVAILABLE,
                ENVIRONMENT_DRIFT,
                REGRESSIONS
            ],
            [0, 1, 1, 2, 3, 4, 5]
        );
        assert_eq!([TIMEOUT, INTERRUPTED, KILLED], [124, 130, 137]);
        assert_eq!(
            [img::CHECK_FAILED, img::CHECK_CORRUPT, img::CHECK_LEAKS],
            [1, 2, 3]
        );
        assert_eq!([img::DIFFERENT, img::COMPARE_ERROR], [1, 2]);
        assert_eq!(img::CHECK_UNSUPPORTED, 63);
    }

    #[test]
    fn run_outcomes() {
        assert_eq!(of_run(RunOutcome::Passed), 0);
        assert_eq!(of_run(RunOutcome::Failed), 1);
        assert_eq!(of_run(RunOutcome::Interrupted), 130);
    }

    #[test]
    fn vm_endings_match_the_vmm_status() {
        let endings = [
            ExitReason::Reset,
            ExitReason::Shutdown,
            ExitReason::ExitPort(7),
            ExitReason::Timeout,
            ExitReason::Killed,
            ExitReason::TripleFault,
            ExitReason::InternalError("x".into()),
            ExitReason::VmmError("x".into()),
        ];
        for e in &endings {
            assert_eq!(of_vm(e), e.exit_code(), "{e:?}");
        }
        assert_eq!(of_vm(&ExitReason::ExitPort(7)), 7);
        assert_eq!(of_vm(&ExitReason::Timeout), 124);
    }

    #[test]
    fn clap_usage_errors_share_usage() {
        use clap::Parser;
        let err = crate::Cli::try_parse_from(["kiln", "boot"]).unwrap_err();
        assert_eq!(err.exit_code(), USAGE);
    }
}
