//! Child processes and the reaper.
//!
//! As PID 1 the agent inherits every orphan and must reap them, but a plain `waitpid(-1)` loop
//! would also steal the exit status of the commands it runs. So one reaper thread peeks at the
//! next exited child with `waitid(WNOWAIT)`, then, holding the registry lock that [`spawn`] holds
//! while it starts a child and registers it, reaps that child and hands the status to the
//! registered callback — or drops it when the child is an orphan nobody waits for.
//! Every child of the agent must be started through [`spawn`].

use std::collections::BTreeMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

/// Called with the raw `waitpid` status once the child has been reaped.
type OnExit = Box<dyn FnOnce(libc::c_int) + Send>;

struct State {
    waiters: BTreeMap<libc::pid_t, OnExit>,
    /// Bumped on every spawn so a reaper that saw "no children" notices new ones.
    generation: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    waiters: BTreeMap::new(),
    generation: 0,
});
static SPAWNED: Condvar = Condvar::new();
static REAPER: OnceLock<Result<(), String>> = OnceLock::new();

fn lock() -> MutexGuard<'static, State> {
    // A panicking callback cannot leave the map half-updated, so a poisoned lock is still usable.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Start the reaper thread once (PID 1 does this at boot so orphans never pile up as zombies).
pub fn start_reaper() -> io::Result<()> {
    REAPER
        .get_or_init(|| {
            thread::Builder::new()
                .name("reaper".into())
                .spawn(reap_forever)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| io::Error::other(format!("cannot start the reaper thread: {e}")))
}

/// Spawn `command` and call `on_exit` with its raw wait status once it has exited and been reaped.
/// Never call `wait` on the returned child: the reaper owns reaping.
pub fn spawn(
    command: &mut Command,
    on_exit: impl FnOnce(libc::c_int) + Send + 'static,
) -> io::Result<Child> {
    start_reaper()?;
    let mut state = lock();
    let child = command.spawn()?;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::other(format!("child pid {} out of range", child.id())))?;
    state.waiters.insert(pid, Box::new(on_exit));
    state.generation = state.generation.wrapping_add(1);
    SPAWNED.notify_all();
    Ok(child)
}

fn reap_forever() {
    loop {
        let generation = lock().generation;
        match peek_exited_child() {
            Ok(pid) => reap(pid),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                // Sleep until a spawn; the timeout only bounds the cost of a missed wakeup.
                let _ = SPAWNED.wait_timeout_while(lock(), Duration::from_secs(1), |s| {
                    s.generation == generation
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                eprintln!("kiln-agent: waitid failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Block until some child has exited and return its pid, leaving it a zombie (`WNOWAIT`).
fn peek_exited_child() -> io::Result<libc::pid_t> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value for waitid to overwrite.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded with WEXITED, so the kernel filled in the SIGCHLD fields.
    Ok(unsafe { info.si_pid() })
}

fn reap(pid: libc::pid_t) {
    let mut state = lock();
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid out-pointer; WNOHANG because std may already have reaped a
    // child whose exec failed (it waits for those inside `spawn`, under our lock).
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    let waiter = if rc == pid {
        state.waiters.remove(&pid)
    } else {
        None
    };
    drop(state);
    if let Some(on_exit) = waiter {
        on_exit(status);
    }
}

/// Split a raw wait status into (exit code, signal).
pub fn decode_status(status: libc::c_int) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}
