//! A backend without VMs: each "machine" plays a scripted console and answers exec/put/get from
//! a script, so the runner's logic (readiness, steps, timeouts, failure classes, teardown,
//! Ctrl-C, reports) is tested without KVM or QEMU. It counts live machines so tests can prove
//! every one was torn down.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// What a fake exec does.
#[derive(Debug, Clone)]
pub enum FakeExec {
    /// Returns this output.
    Output(Output),
    /// Never answers: returns at the deadline (timeout) or when killed.
    Hang,
    /// Never answers and ignores the deadline: returns only when killed (a guest that only
    /// the runner's watchdog stops).
    HangUntilKilled,
    /// Prints this line on the console as a kernel panic, and the VM dies.
    KernelPanic(String),
    /// The harness itself panics inside exec (tests the worker's catch_unwind).
    HarnessPanic,
}

impl FakeExec {
    /// An exit with `code` and this stdout.
    pub fn exit(code: i32, stdout: &str) -> FakeExec {
        FakeExec::Output(Output {
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
            code: Some(code),
            signal: None,
            timed_out: false,
        })
    }
}

/// What a fake exec handler sees of its machine.
pub struct FakeView<'a> {
    /// The plan the machine was booted with (shares' host dirs, cmdline).
    pub plan: &'a RunPlan,
    /// The console, to print lines as the guest.
    pub console: &'a Console,
}

/// Handles exec requests for one fake guest.
pub type ExecHandler = Box<dyn FnMut(&ExecRequest, &FakeView<'_>) -> FakeExec + Send>;

/// One fake guest's script.
pub struct FakeGuest {
    /// Console lines and when (since boot) they appear.
    pub boot_lines: Vec<(Duration, String)>,
    /// When set, `boot` fails with this message.
    pub boot_error: Option<String>,
    /// When set, `boot` panics (tests the worker's catch_unwind before a VM exists).
    pub boot_panic: bool,
    /// How long the kill switch blocks before the machine dies (a VMM stuck in teardown).
    pub kill_delay: Duration,
    /// The machine's own version, when it differs from the backend's (a fallback).
    pub version: Option<String>,
    /// Answers exec requests.
    pub exec: ExecHandler,
    /// Where another process could reach this guest's agent while a run is paused (what
    /// `release_agent` reports); none by default, as a fake has no agent.
    pub agent: Option<AgentTransport>,
}

impl FakeGuest {
    /// A guest that prints the agent's record at once and runs every command successfully.
    pub fn ready() -> FakeGuest {
        FakeGuest {
            boot_lines: vec![
                (Duration::ZERO, "Linux version 6.1.0-fake".into()),
                (
                    Duration::from_millis(5),
                    "KILN_READY v=1 boot=fake transport=serial:org.kiln.agent.0 t=5".into(),
                ),
            ],
            boot_error: None,
            boot_panic: false,
            kill_delay: Duration::ZERO,
            version: None,
            exec: Box::new(|_, _| FakeExec::exit(0, "")),
            agent: None,
        }
    }

    /// This guest with another exec handler.
    pub fn with_exec(
        mut self,
        exec: impl FnMut(&ExecRequest, &FakeView<'_>) -> FakeExec + Send + 'static,
    ) -> FakeGuest {
        self.exec = Box::new(exec);
        self
    }
}

/// Makes the fake guest for each plan.
pub type GuestScript = Arc<dyn Fn(&RunPlan) -> FakeGuest + Send + Sync>;

/// The fake backend.
pub struct FakeBackend {
    kind: BackendKind,
    script: GuestScript,
    live: Arc<AtomicUsize>,
    booted: Arc<AtomicUsize>,
}

impl FakeBackend {
    /// A fake backend standing in for `kind`, scripting guests with `script`.
    pub fn new(
        kind: BackendKind,
        script: impl Fn(&RunPlan) -> FakeGuest + Send + Sync + 'static,
    ) -> FakeBackend {
        FakeBackend {
            kind,
            script: Arc::new(script),
            live: Arc::new(AtomicUsize::new(0)),
            booted: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Machines booted and not yet torn down.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Machines booted in total.
    pub fn booted(&self) -> usize {
        self.booted.load(Ordering::SeqCst)
    }
}

impl Backend for FakeBackend {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn name(&self) -> &str {
        "fake"
    }

    fn version(&self) -> String {
        "fake 1".into()
    }

    fn boot(&self, plan: &RunPlan, run_dir: &Path) -> Result<Box<dyn Machine>, BackendError> {
        let guest = (self.script)(plan);
        if guest.boot_panic {
            panic!("fake backend: scripted panic in boot");
        }
        if let Some(message) = guest.boot_error {
            return Err(BackendError {
                backend: "fake".into(),
                message,
            });
        }
        if !run_dir.is_dir() {
            return Err(BackendError {
                backend: "fake".into(),
                message: format!("run dir {} does not exist", run_dir.display()),
            });
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&plan.console_log)
            .map_err(|e| BackendError {
                backend: "fake".into(),
                message: format!("cannot open {}: {e}", plan.console_log.display()),
            })?;
        let console = Console::with_limits(
            Some(log),
            crate::console::ConsoleLimits {
                log_bytes: plan.console_log_limit,
                ..Default::default()
            },
        );
        let killed = Arc::new((Mutex::new(false), Condvar::new()));
        spawn_console_player(console.clone(), guest.boot_lines, killed.clone());
        self.live.fetch_add(1, Ordering::SeqCst);
        self.booted.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeMachine {
            plan: plan.clone(),
            console,
            exec: guest.exec,
            files: BTreeMap::new(),
            killed,
            kill_delay: guest.kill_delay,
            version: guest.version,
            live: Some(self.live.clone()),
            agent: guest.agent,
        }))
    }
}

type Killed = Arc<(Mutex<bool>, Condvar)>;

fn is_killed(k: &Killed) -> bool {
    *k.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps until `deadline` or until killed; returns whether it was killed.
fn sleep_unless_killed(k: &Killed, deadline: Instant) -> bool {
    let mut dead = k.0.lock().unwrap_or_else(|p| p.into_inner());
    while !*dead {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        dead = match k.1.wait_timeout(dead, deadline - now) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
    true
}

fn spawn_console_player(console: Console, lines: Vec<(Duration, String)>, killed: Killed) {
    let start = Instant::now();
    std::thread::spawn(move || {
        for (at, line) in lines {
            if sleep_unless_killed(&killed, start + at) {
                return;
            }
            console.push(format!("{line}\n").as_bytes());
        }
    });
}

struct FakeMachine {
    plan: RunPlan,
    console: Console,
    exec: ExecHandler,
    files: BTreeMap<String, Vec<u8>>,
    killed: Killed,
    kill_delay: Duration,
    version: Option<String>,
    live: Option<Arc<AtomicUsize>>,
    agent: Option<AgentTransport>,
}

impl FakeMachine {
    fn check_alive(&self) -> Result<(), MachineError> {
        if is_killed(&self.killed) || self.console.is_closed() {
            return Err(Gone::Stopped {
                vm: "fake VM",
                during: None,
            }
            .into());
        }
        Ok(())
    }
}

impl Machine for FakeMachine {
    fn console(&self) -> &Console {
        &self.console
    }

    fn agent_transport(&self) -> Option<Transport> {
        Some(Transport::Serial(kiln_agent_proto::SERIAL_PORT_NAME.into()))
    }

    fn version(&self) -> Option<String> {
        self.version.clone()
    }

    fn exec(&mut self, request: &ExecRequest, deadline: Instant) -> Result<Output, MachineError> {
        self.check_alive()?;
        let view = FakeView {
            plan: &self.plan,
            console: &self.console,
        };
        match (self.exec)(request, &view) {
            FakeExec::Output(out) => Ok(out),
            FakeExec::Hang => {
                let agent_deadline = request
                    .timeout_ms
                    .map(|ms| Instant::now() + Duration::from_millis(ms));
                let until = agent_deadline.map_or(deadline, |a| a.min(deadline));
                if sleep_unless_killed(&self.killed, until) {
                    return Err(Gone::Killed { vm: "fake VM" }.into());
                }
                if agent_deadline.is_some_and(|a| a <= deadline) {
                    // The agent kills the command at its timeout and says so.
                    return Ok(Output {
                        stdout: Vec::new(),
                        stderr: Vec::new(),
                        code: None,
                        signal: Some(9),
                        timed_out: true,
                    });
                }
                Err(MachineError::Timeout {
                    what: format!("exec {:?}", request.argv),
                    after: None,
                })
            }
            FakeExec::HangUntilKilled => {
                sleep_unless_killed(&self.killed, Instant::now() + Duration::from_secs(3600));
                Err(Gone::Killed { vm: "fake VM" }.into())
            }
            FakeExec::KernelPanic(line) => {
                self.console.push(format!("{line}\n").as_bytes());
                self.console.close();
                Err(Gone::Exited { vm: "fake VM" }.into())
            }
            FakeExec::HarnessPanic => panic!("fake backend: scripted harness panic"),
        }
    }

    fn put(&mut self, path: &str, _mode: u32, data: &[u8], _: Instant) -> Result<(), MachineError> {
        self.check_alive()?;
        self.files.insert(path.to_string(), data.to_vec());
        Ok(())
    }

    fn get(&mut self, path: &str, max: u64, _: Instant) -> Result<Vec<u8>, MachineError> {
        self.check_alive()?;
        match self.files.get(path) {
            Some(d) if d.len() as u64 <= max => Ok(d.clone()),
            // What the agent answers.
            Some(d) => Err(AgentError::Refused(format!(
                "get {path}: {} bytes exceeds {max}",
                d.len()
            ))
            .into()),
            None => Err(AgentError::Refused(format!("get {path}: no such file")).into()),
        }
    }

    fn shutdown(&mut self, _timeout: Duration) -> Result<(), MachineError> {
        self.kill();
        Ok(())
    }

    fn kill(&mut self) {
        (self.kill_switch())();
        self.console.close();
        if let Some(live) = self.live.take() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn release_agent(&mut self) -> Option<AgentTransport> {
        self.agent.clone()
    }

    fn kill_switch(&self) -> KillSwitch {
        let killed = self.killed.clone();
        let delay = self.kill_delay;
        Arc::new(move || {
            std::thread::sleep(delay);
            *killed.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            killed.1.notify_all();
        })
    }
}

impl Drop for FakeMachine {
    fn drop(&mut self) {
        self.kill();
    }
}
