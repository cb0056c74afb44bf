//! Why a VM ended, and the latch through which vCPUs, devices and the host report it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kiln_devices::{ExitRequester, GuestExit};

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest reset the machine (i8042 `reboot=k`, ACPI reset register).
    Reset,
    /// The guest powered off (ACPI S5).
    Shutdown,
    /// The guest wrote this byte to kiln's exit port.
    ExitPort(u8),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not run the guest (emulation failure, failed entry); with the registers.
    InternalError(String),
    /// The host's timeout expired; the VM was killed.
    Timeout,
    /// The host killed the VM.
    Killed,
    /// The VMM itself failed while the guest ran (a KVM ioctl error).
    VmmError(String),
}

impl ExitReason {
    /// This ending as a process status, the one `kiln boot` exits with (kiln-cli's exit codes
    /// agree, checked there): 0 for a guest-initiated reset or power-off, the guest's byte for
    /// the exit port, 124 for a timeout, 137 when killed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Shutdown => 0,
            ExitReason::ExitPort(code) => i32::from(*code),
            ExitReason::Timeout => 124,
            ExitReason::Killed => 137,
            ExitReason::TripleFault | ExitReason::InternalError(_) | ExitReason::VmmError(_) => 1,
        }
    }

    /// Whether the guest ended the VM on its own terms (reset, power-off, exit port).
    pub fn is_guest_initiated(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::Shutdown | ExitReason::ExitPort(_)
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::Shutdown => write!(f, "guest powered off"),
            ExitReason::ExitPort(c) => write!(f, "guest wrote {c} to the exit port"),
            ExitReason::TripleFault => write!(f, "guest triple-faulted"),
            ExitReason::InternalError(d) => write!(f, "KVM internal error: {d}"),
            ExitReason::Timeout => write!(f, "timed out"),
            ExitReason::Killed => write!(f, "killed by the host"),
            ExitReason::VmmError(d) => write!(f, "VMM error: {d}"),
        }
    }
}

impl From<GuestExit> for ExitReason {
    fn from(e: GuestExit) -> Self {
        match e {
            GuestExit::Reset => ExitReason::Reset,
            GuestExit::Shutdown => ExitReason::Shutdown,
            GuestExit::Status(c) => ExitReason::ExitPort(c),
        }
    }
}

/// Holds the first exit reason reported; later reports are ignored. Waiters block on it.
#[derive(Default)]
pub struct ExitLatch {
    reason: Mutex<Option<(ExitReason, Instant)>>,
    cond: Condvar,
    // Lets vCPU loops check for an exit on every KVM exit without taking the lock.
    set: AtomicBool,
}

impl ExitLatch {
    /// Records `reason` unless one is already recorded; returns whether it was first.
    pub fn set(&self, reason: ExitReason) -> bool {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_some() {
            return false;
        }
        *r = Some((reason, Instant::now()));
        self.set.store(true, Ordering::Release);
        self.cond.notify_all();
        true
    }

    /// Whether a reason is recorded (lock-free).
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// The recorded reason, if any.
    pub fn get(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(r, _)| r.clone())
    }

    /// When the reason was recorded.
    pub fn at(&self) -> Option<Instant> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, t)| *t)
    }

    /// Waits until a reason is recorded or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((reason, _)) = r.as_ref() {
                return Some(reason.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            r = self
                .cond
                .wait_timeout(r, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl ExitRequester for ExitLatch {
    fn request_exit(&self, exit: GuestExit) {
        self.set(exit.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins_and_wakes_waiters() {
        let latch = Arc::new(ExitLatch::default());
        assert_eq!(latch.wait(Duration::from_millis(10)), None);
        assert!(!latch.is_set());
        let l2 = latch.clone();
        let t = std::thread::spawn(move || l2.wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        latch.request_exit(GuestExit::Status(3));
        assert!(!latch.set(ExitReason::Timeout));
        assert_eq!(t.join().unwrap(), Some(ExitReason::ExitPort(3)));
        assert_eq!(latch.get(), Some(ExitReason::ExitPort(3)));
        assert!(latch.is_set());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::Shutdown.exit_code(), 0);
        assert_eq!(ExitReason::ExitPort(7).exit_code(), 7);
        assert_eq!(ExitReason::Timeout.exit_code(), 124);
        assert_eq!(ExitReason::TripleFault.exit_code(), 1);
        assert_eq!(ExitReason::InternalError("x".into()).exit_code(), 1);
    }
}
