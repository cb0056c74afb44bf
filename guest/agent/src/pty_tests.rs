//! `pty_exec` for real on the host: the agent's session over a socket pair, a shell on a pty.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln_agent_proto::client::{Client, ClientError, ExitInfo, PtyEvent, PtyInput};
use kiln_agent_proto::PtyExecRequest;

use crate::session::{serve_session, Agent, Outcome, SessionError};

/// How long a test waits for output it expects.
const WAIT: Duration = Duration::from_secs(10);

/// A running pty session: its input, its events (read on a thread) and the agent's session.
struct Pty {
    input: PtyInput,
    events: Receiver<Result<PtyEvent, ClientError>>,
    seen: Vec<u8>,
    session: JoinHandle<Result<Outcome, SessionError>>,
}

fn pty(argv: &[&str], rows: u16, cols: u16) -> Pty {
    let (client_end, mut agent_end) = UnixStream::pair().expect("socketpair");
    let session = thread::spawn(move || serve_session(&mut agent_end, &Agent::default()));
    let request = PtyExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        // A fixed prompt and no rc files, whatever the host's shell is.
        env: vec![
            ("PS1".into(), "$ ".into()),
            ("ENV".into(), "/dev/null".into()),
        ],
        cwd: None,
        rows,
        cols,
    };
    let mut reader = Client::new(client_end)
        .pty_exec(&request)
        .expect("pty_exec sent");
    let input = reader.input().expect("input half");
    let (tx, events) = mpsc::channel();
    thread::spawn(move || loop {
        let event = reader.next_event();
        let last = !matches!(event, Ok(PtyEvent::Output(_)));
        if tx.send(event).is_err() || last {
            return;
        }
    });
    Pty {
        input,
        events,
        seen: Vec::new(),
        session,
    }
}

impl Pty {
    fn send(&mut self, text: &[u8]) {
        self.input.send(text).expect("input sent");
    }

    /// Wait until the output holds `needle` after what earlier waits consumed.
    fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&self.seen);
            if let Some(at) = text.find(needle) {
                let rest = text[at + needle.len()..].as_bytes().to_vec();
                self.seen = rest;
                return;
            }
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Ok(PtyEvent::Output(data))) => self.seen.extend_from_slice(&data),
                other => panic!("waiting for {needle:?} in {text:?}, got {other:?}"),
            }
        }
    }

    /// Wait for the exit status, then for the agent's session to end.
    fn exited(self) -> ExitInfo {
        let deadline = Instant::now() + WAIT;
        let exit = loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Ok(PtyEvent::Output(_))) => {}
                Ok(Ok(PtyEvent::Exited(exit))) => break exit,
                other => panic!("waiting for the exit status, got {other:?}"),
            }
        };
        assert!(matches!(
            self.session.join().expect("session thread"),
            Ok(Outcome::Served)
        ));
        exit
    }
}

#[test]
fn the_shell_sees_a_terminal_of_the_requested_size_and_follows_resizes() {
    let mut sh = pty(&["sh"], 24, 80);
    sh.expect("$ ");
    // `stty size` fails without a terminal: these answers come from the pty's window size.
    sh.send(b"stty size\n");
    sh.expect("24 80");
    sh.input.resize(50, 132).expect("resize sent");
    sh.send(b"stty size\n");
    sh.expect("50 132");
    sh.send(b"exit 7\n");
    let exit = sh.exited();
    assert_eq!(
        (exit.code, exit.signal, exit.timed_out),
        (Some(7), None, false)
    );
}

#[test]
fn ctrl_c_interrupts_the_foreground_command_and_the_shell_goes_on() {
    let mut sh = pty(&["sh"], 24, 80);
    sh.expect("$ ");
    let started = Instant::now();
    // The quotes keep the echoed command line from matching what the shell prints.
    sh.send(b"echo sle''eping; sleep 100\n");
    sh.expect("sleeping");
    sh.send(&[3]);
    sh.send(b"echo after-$?\n");
    sh.expect("after-130");
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
    sh.send(b"exit\n");
    assert_eq!(sh.exited().code, Some(0));
}

#[test]
fn the_command_runs_on_a_terminal_it_controls() {
    let mut cmd = pty(
        &[
            "sh",
            "-c",
            "tty; test -t 0 && test -t 1 && test -t 2 && echo all-ttys",
        ],
        0,
        0,
    );
    cmd.expect("/dev/pts/");
    cmd.expect("all-ttys");
    assert_eq!(cmd.exited().code, Some(0));
}

#[test]
fn a_signal_that_ends_the_command_is_reported() {
    let cmd = pty(&["sh", "-c", "kill -TERM $$"], 0, 0);
    let exit = cmd.exited();
    assert_eq!((exit.code, exit.signal), (None, Some(libc::SIGTERM)));
}

#[test]
fn a_missing_program_is_an_error_reply() {
    let (client_end, mut agent_end) = UnixStream::pair().expect("socketpair");
    let session = thread::spawn(move || serve_session(&mut agent_end, &Agent::default()));
    let mut reader = Client::new(client_end)
        .pty_exec(&PtyExecRequest {
            argv: vec!["/nonexistent/kiln-shell".into()],
            ..PtyExecRequest::default()
        })
        .expect("sent");
    let err = reader.next_event().expect_err("refused");
    assert!(
        err.to_string()
            .contains("cannot execute \"/nonexistent/kiln-shell\""),
        "{err}"
    );
    assert!(matches!(
        session.join().expect("session"),
        Ok(Outcome::Served)
    ));
}

#[test]
fn the_command_is_killed_when_the_client_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; echo rea''dy; sleep 100", pid_file.display());
    let mut cmd = pty(&["sh", "-c", &script], 0, 0);
    cmd.expect("ready");
    let pid: libc::pid_t = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    cmd.input.hang_up();
    let session = cmd.session;
    let err = session
        .join()
        .expect("session thread")
        .expect_err("client gone");
    assert!(
        err.to_string().contains("client went away") || err.to_string().contains("closed"),
        "{err}"
    );
    let deadline = Instant::now() + WAIT;
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            Instant::now() < deadline,
            "pid {pid} still runs after the client left"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
