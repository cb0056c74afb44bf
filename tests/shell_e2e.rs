//! `kiln shell` and `kiln exec` into a VM that `kiln run --pause-before-teardown` keeps, on the
//! QEMU backend (TCG here, the agent on virtio-serial) and on kiln's own VMM (the agent over
//! vsock; with a KVM that boots Linux, so in CI's nested stage): the pause message says how to
//! get in; `kiln exec` passes a command's
//! output, stdin and exit status through; `kiln shell` gives a real terminal (its size, a resize,
//! Ctrl-C to the guest's foreground command, the shell's exit status) through a host pty, as a
//! person at a terminal would use it; after Enter the run tears down and passes, and the run is
//! no longer reachable.
//!
//! The guest is the default one with this tree's agent laid over its `/init` (an appended
//! initramfs segment): a cached default guest may predate protocol version 2.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use kiln::guest::{agent, default_guest, GuestError};

/// How long a step of the test waits for the guest (TCG boots take seconds, more on a busy host).
const WAIT: Duration = Duration::from_secs(240);

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn");
    cmd
}

/// The default guest's kernel, and its initrd with this tree's static agent as `/init`.
fn guest_with_this_agent(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    common::qemu()?;
    let guest = match default_guest() {
        Ok(guest) => guest,
        Err(GuestError::Invalid(message))
            if message.contains("apt-get") || message.contains("cannot run dpkg-deb") =>
        {
            return common::ci_requires(format!("cannot build the default guest here: {message}"))
        }
        Err(e) => panic!("building the default guest failed: {e}"),
    };
    let (_, agent) = agent::agent_binary(&|line: &str| eprintln!("{line}"))
        .unwrap_or_else(|e| panic!("building the static agent failed: {e}"));
    let mut initrd = fs::read(guest.dir.join("initrd.img")).expect("default initrd");
    // The kernel unpacks concatenated archives in order, later files replacing earlier ones;
    // each archive starts 4-byte aligned (zero bytes between are skipped).
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    let mut overlay = kiln_guest::Initramfs::new();
    overlay.file("init", 0o755, agent);
    overlay.write_gzip(&mut initrd).expect("overlay packs");
    let path = dir.join("initrd-this-agent.img");
    fs::write(&path, initrd).expect("initrd written");
    Ok((guest.dir.join("kernel"), path))
}

/// A `kiln run --pause-before-teardown` waiting at its pause, with the scenario `shell`.
struct PausedRun {
    child: Child,
    enter: ChildStdin,
    stderr: Receiver<String>,
    artifacts: PathBuf,
}

impl PausedRun {
    /// `guest` is the scenario's `[guest]` kernel (and initrd) lines.
    fn start(dir: &Path, backend: &str, guest: &str) -> PausedRun {
        let scenario = dir.join("shell.toml");
        fs::write(
            &scenario,
            format!(
                "id = \"shell\"\ntimeout = \"10m\"\n\
                 [guest]\n{guest}memory = 256\n\
                 [readiness]\ntimeout = \"4m\"\n\
                 [[steps]]\nname = \"leave a mark\"\nshell = \"echo from-step > /tmp/mark\"\n"
            ),
        )
        .expect("scenario written");
        let artifacts = dir.join("artifacts");
        let mut child = kiln()
            .arg("run")
            .arg(&scenario)
            .args([
                "--backend",
                backend,
                "--pause-before-teardown",
                "--artifacts",
            ])
            .arg(&artifacts)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln run starts");
        let enter = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, stderr) = mpsc::channel();
        thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        PausedRun {
            child,
            enter,
            stderr,
            artifacts,
        }
    }

    /// Stderr lines up to and including the first that contains `needle`.
    fn wait_for(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            match self
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!(
                    "kiln run never printed {needle:?}; stderr so far:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    fn run(&self, sub: &str, args: &[&str], stdin: Stdio) -> Output {
        kiln()
            .arg(sub)
            .arg("shell")
            .arg("--artifacts")
            .arg(&self.artifacts)
            .args(args)
            .stdin(stdin)
            .output()
            .expect("kiln runs")
    }
}

impl Drop for PausedRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_paused_run_is_reachable_with_kiln_exec_and_kiln_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kernel, initrd) = or_skip!(guest_with_this_agent(dir.path()));
    let guest = format!("kernel = {kernel:?}\ninitrd = {initrd:?}\n");
    reach_a_paused_run(dir.path(), "qemu", &guest);
}

/// The same on kiln's VMM: the default guest (whose agent CI builds from this tree), restored
/// from its snapshot, reached over vsock.
#[test]
fn a_paused_run_on_the_kiln_backend_is_reachable_with_kiln_exec_and_kiln_shell() {
    or_skip!(common::hardware_kvm());
    let dir = tempfile::tempdir().expect("tempdir");
    reach_a_paused_run(dir.path(), "kiln", "kernel = \"default\"\n");
}

fn reach_a_paused_run(dir: &Path, backend: &str, guest: &str) {
    let mut run = PausedRun::start(dir, backend, guest);
    let seen = run.wait_for("press Enter to tear down");
    assert!(
        seen.iter().any(|l| l.contains(&format!(
            "kiln: paused; reach the VM with: kiln shell shell --artifacts {0}  |  kiln exec shell --artifacts {0} -- CMD",
            run.artifacts.display()
        ))),
        "{}",
        seen.join("\n")
    );

    // kiln exec: output, a failing status and stderr, stdin.
    let out = run.run("exec", &["--", "cat", "/tmp/mark"], Stdio::null());
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "from-step\n".into()),
        "{}",
        text(&out.stderr)
    );
    let out = run.run(
        "exec",
        &["--", "sh", "-c", "echo oops >&2; exit 5"],
        Stdio::null(),
    );
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(5), "oops\n".into())
    );
    let mut child = kiln()
        .args(["exec", "-i", "shell", "--artifacts"])
        .arg(&run.artifacts)
        .args(["--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("kiln exec -i");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"through stdin\n")
        .expect("stdin written");
    let out = child.wait_with_output().expect("kiln exec -i ends");
    assert_eq!(text(&out.stdout), "THROUGH STDIN\n");

    // kiln shell without a terminal: still a guest pty, of the classic size.
    let out = run.run(
        "shell",
        &["--", "sh", "-c", "stty size; tty; exit 4"],
        Stdio::null(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("24 80") && shown.contains("/dev/pts/"),
        "{shown}"
    );

    interactive_shell(&run.artifacts);

    // Enter: the run tears the VM down and passes; nothing is paused any more.
    run.enter.write_all(b"\n").expect("Enter");
    let status = run.child.wait().expect("kiln run ends");
    assert_eq!(status.code(), Some(0));
    let latest = run.artifacts.join("shell/latest");
    assert!(latest.join("result.json").is_file());
    assert!(
        !latest.join("paused.json").exists(),
        "paused.json reached the bundle"
    );
    let out = run.run("exec", &["--", "true"], Stdio::null());
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        text(&out.stderr),
        "kiln exec: scenario `shell` is not paused (no live run has paused.json there)\n"
    );
}

/// `kiln shell` on a host pty of 50x132: the guest sees that size and its change, Ctrl-C
/// interrupts the guest's `sleep` (not kiln), and the shell's exit status is kiln's.
fn interactive_shell(artifacts: &Path) {
    let (master, slave) = openpty(50, 132);
    let io = || Stdio::from(slave.try_clone().expect("slave fd"));
    let mut child = kiln()
        .args(["shell", "shell", "--artifacts"])
        .arg(artifacts)
        .stdin(io())
        .stdout(io())
        .stderr(io())
        .spawn()
        .expect("kiln shell starts");
    drop(slave);
    let mut term = Terminal::new(master);
    term.send(b"stty size\n");
    term.expect("50 132");
    term.send(b"echo sle''eping; sleep 100\n");
    term.expect("sleeping");
    // Ctrl-C reaches the guest's foreground command: `sleep` ends by SIGINT (status 130), where
    // running out its 100 s would give 0. No time limit beyond `expect`'s: on a busy CI host a
    // TCG guest once took over 30 s from the Ctrl-C to the next command's output.
    term.send(&[3]);
    term.send(b"echo after-$?\n");
    term.expect("after-130");
    term.resize(30, 100);
    // SAFETY: kill(2) sends SIGWINCH, as the terminal does, to the kiln shell process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGWINCH) };
    thread::sleep(Duration::from_millis(500));
    term.send(b"stty size\n");
    term.expect("30 100");
    term.send(b"exit 3\n");
    let status = child.wait().expect("kiln shell ends");
    assert_eq!(status.code(), Some(3));
}

fn openpty(rows: u16, cols: u16) -> (OwnedFd, fs::File) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds; the name pointer may be null; termios null, size valid.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and ours.
    unsafe {
        (
            OwnedFd::from_raw_fd(master),
            fs::File::from(OwnedFd::from_raw_fd(slave)),
        )
    }
}

/// The host side of the pty `kiln shell` runs on.
struct Terminal {
    master: fs::File,
    output: Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Terminal {
    fn new(master: OwnedFd) -> Terminal {
        let master = fs::File::from(master);
        let mut reader = master.try_clone().expect("master fd");
        let (tx, output) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Terminal {
            master,
            output,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("typed");
    }

    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points at `size`.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    }

    fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let shown = text(&self.seen);
            if let Some(at) = shown.find(needle) {
                self.seen = shown.as_bytes()[at + needle.len()..].to_vec();
                return;
            }
            match self
                .output
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => panic!("the terminal never showed {needle:?}; it showed {shown:?}"),
            }
        }
    }
}

#[test]
fn shell_and_exec_name_what_is_not_paused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = dir.path().join("artifacts");
    let finished = artifacts.join("boot").join("20261206T100000.000Z-p1-a1");
    fs::create_dir_all(&finished).expect("a finished bundle");
    let cases = [
        (
            "exec",
            "nope".to_string(),
            format!(
                "kiln exec: no scenario `nope` under {} and no directory of that name\n",
                artifacts.display()
            ),
        ),
        (
            "shell",
            "boot".to_string(),
            "kiln shell: scenario `boot` is not paused (no live run has paused.json there)\n"
                .to_string(),
        ),
        (
            "shell",
            finished.display().to_string(),
            format!(
                "kiln shell: {} is not paused (no live run has paused.json there)\n",
                finished.display()
            ),
        ),
    ];
    for (sub, target, expected) in cases {
        let out = kiln()
            .arg(sub)
            .arg(&target)
            .arg("--artifacts")
            .arg(&artifacts)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs");
        assert_eq!(out.status.code(), Some(3), "kiln {sub} {target}");
        assert_eq!(text(&out.stderr), expected, "kiln {sub} {target}");
        assert!(out.stdout.is_empty());
    }
}
