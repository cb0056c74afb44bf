//! The real `kiln-agent` binary on the host (not PID 1): it prints its readiness record and
//! serves the protocol on `--listen-unix`. Shutdown is not exercised here: outside a VM it would
//! ask systemd to power off the machine running the tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_agent_proto::client::{connect_unix, Client};
use kiln_agent_proto::{ExecRequest, ReadyRecord, Transport};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_binary_prints_readiness_and_serves_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .arg("--files")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("agent starts"),
    );
    let stdout = agent.0.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("readiness line");
    let record = ReadyRecord::parse(&line).unwrap_or_else(|| panic!("not a record: {line:?}"));
    assert_eq!(record.version, 1);
    assert!(record
        .transports
        .contains(&Transport::Unix(socket.display().to_string())));

    let mut request = ExecRequest::new(["sh", "-c", "cat; exit 7"]);
    request.stdin = b"through the agent".to_vec();
    let stream = connect_unix(&socket).expect("connects");
    let output = Client::new(stream)
        .io_timeout(Some(Duration::from_secs(10)))
        .exec(&request)
        .expect("exec");
    assert_eq!(output.stdout, b"through the agent");
    assert_eq!(output.code, Some(7));

    let path = dir.path().join("put/file.txt").display().to_string();
    Client::new(connect_unix(&socket).expect("connects"))
        .put(&path, 0o640, b"hello")
        .expect("put");
    let file = Client::new(connect_unix(&socket).expect("connects"))
        .get(&path, 1024)
        .expect("get");
    assert_eq!((file.data.as_slice(), file.mode), (&b"hello"[..], 0o640));

    let err = Client::new(connect_unix(&socket).expect("connects"))
        .put("/etc/kiln-agent-test", 0o644, b"x")
        .expect_err("outside --files");
    assert!(
        err.to_string().contains("outside the allowed roots"),
        "{err}"
    );
}

#[test]
fn agent_binary_rejects_unknown_arguments() {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--bogus")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown argument \"--bogus\""));
}
