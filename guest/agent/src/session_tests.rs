use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln_agent_proto::client::{Client, ClientError};
use kiln_agent_proto::frame::encode_frame;
use kiln_agent_proto::{
    read_frame, sha256_hex, ExecRequest, Message, PutRequest, MAX_FRAME_LEN, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

use super::*;

type Session = JoinHandle<Result<Outcome, SessionError>>;

fn start(agent: Agent) -> (UnixStream, Session) {
    let (client_end, mut agent_end) = UnixStream::pair().expect("socketpair");
    let session = thread::spawn(move || serve_session(&mut agent_end, &agent));
    (client_end, session)
}

fn client() -> (Client<UnixStream>, Session) {
    let (stream, session) = start(Agent::default());
    (Client::new(stream), session)
}

fn exec(request: ExecRequest) -> kiln_agent_proto::client::Output {
    let (mut client, session) = client();
    let output = client.exec(&request).expect("exec answered");
    assert!(matches!(
        session.join().expect("session thread"),
        Ok(Outcome::Served)
    ));
    output
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// Send hello (with `version`) and then `request` as raw frames, returning the agent's answers.
fn raw_session(version: u32, request: &[u8]) -> (Vec<Message>, Result<Outcome, SessionError>) {
    let (mut stream, session) = start(Agent::default());
    let hello = Message::Hello { version, nonce: 9 };
    stream
        .write_all(&encode_frame(&hello).expect("hello"))
        .expect("send hello");
    let mut answers = Vec::new();
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        let reply = read_frame(&mut stream).expect("hello reply");
        // The agent answers in the client's version, the exact bytes a shared stream looks for.
        assert_eq!(reply, hello);
        answers.push(reply);
        stream.write_all(request).expect("send request");
    }
    while let Ok(message) = read_frame(&mut stream) {
        answers.push(message);
    }
    (answers, session.join().expect("session thread"))
}

fn agent_error(answers: &[Message]) -> String {
    match answers.last() {
        Some(Message::Error { message }) => message.clone(),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[test]
fn exec_echo_streams_stdout_and_exit_code() {
    let out = exec(ExecRequest::new(["echo", "hello", "world"]));
    assert_eq!(out.stdout, b"hello world\n");
    assert!(out.stderr.is_empty());
    assert_eq!(
        (out.code, out.signal, out.timed_out),
        (Some(0), None, false)
    );
    assert!(out.success());
}

#[test]
fn exec_reports_nonzero_exit_code() {
    let out = exec(sh("exit 3"));
    assert_eq!((out.code, out.signal), (Some(3), None));
    assert!(!out.success());
}

#[test]
fn exec_reports_the_killing_signal() {
    let out = exec(sh("kill -TERM $$"));
    assert_eq!((out.code, out.signal), (None, Some(libc::SIGTERM)));
}

#[test]
fn exec_feeds_stdin_and_round_trips_binary_bytes() {
    let mut request = ExecRequest::new(["cat"]);
    request.stdin = (0..=255u8).cycle().take(300_000).collect();
    let out = exec(request.clone());
    assert_eq!(out.stdout, request.stdin);
}

#[test]
fn exec_streams_stderr_separately() {
    let out = exec(sh("echo out; echo err >&2"));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn exec_applies_env_and_cwd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut request = sh("echo \"$KILN_TEST_VAR\"; pwd");
    request.env = vec![("KILN_TEST_VAR".into(), "value 1".into())];
    request.cwd = Some(dir.path().to_string_lossy().into_owned());
    let out = exec(request);
    let expected = format!("value 1\n{}\n", dir.path().display());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn exec_timeout_kills_the_process_group() {
    let mut request = sh("sleep 10 & sleep 10");
    request.timeout_ms = Some(200);
    let started = Instant::now();
    let out = exec(request);
    assert!(out.timed_out);
    assert_eq!((out.code, out.signal), (None, Some(libc::SIGKILL)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn exec_does_not_wait_for_background_processes_holding_the_pipes() {
    let started = Instant::now();
    let out = exec(sh("sleep 3 & echo started"));
    assert_eq!(out.stdout, b"started\n");
    assert_eq!(out.code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn exec_large_output_arrives_whole() {
    let out = exec(sh("head -c 1000000 /dev/zero"));
    assert_eq!(out.stdout.len(), 1_000_000);
}

#[test]
fn exec_missing_binary_bad_cwd_and_empty_argv_are_errors() {
    for (request, needle) in [
        (
            ExecRequest::new(["/nonexistent/kiln-no-such-binary"]),
            "cannot execute",
        ),
        (
            ExecRequest {
                cwd: Some("/nonexistent-kiln-dir".into()),
                ..ExecRequest::new(["true"])
            },
            "is not a directory",
        ),
        (ExecRequest::default(), "argv is empty"),
        (ExecRequest::new(["nul\0byte"]), "cannot execute"),
    ] {
        let (mut client, session) = client();
        match client.exec(&request) {
            Err(ClientError::Agent {
                op: "exec",
                message,
            }) => {
                assert!(message.contains(needle), "{message}")
            }
            other => panic!("expected an agent error for {request:?}, got {other:?}"),
        }
        assert!(matches!(
            session.join().expect("session"),
            Ok(Outcome::Served)
        ));
    }
}

#[test]
fn concurrent_requests_run_in_parallel() {
    let started = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|i| thread::spawn(move || exec(sh(&format!("sleep 0.5; echo {i}")))))
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        let out = handle.join().expect("request thread");
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
    }
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
}

fn agent_in(root: &Path) -> Agent {
    Agent {
        files: FilePolicy::new(&[root.to_path_buf()]),
    }
}

#[test]
fn put_then_get_round_trips_data_and_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/file.bin");
    let path_text = path.to_string_lossy().into_owned();
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();

    let (stream, session) = start(agent_in(dir.path()));
    Client::new(stream)
        .put(&path_text, 0o750, &data)
        .expect("put");
    assert!(matches!(
        session.join().expect("session"),
        Ok(Outcome::Served)
    ));
    assert_eq!(std::fs::read(&path).expect("written"), data);
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o7777, 0o750);

    let (stream, session) = start(agent_in(dir.path()));
    let file = Client::new(stream).get(&path_text, 1 << 20).expect("get");
    assert!(matches!(
        session.join().expect("session"),
        Ok(Outcome::Served)
    ));
    assert_eq!((file.data, file.mode), (data, 0o750));

    let (stream, _session) = start(agent_in(dir.path()));
    let err = Client::new(stream)
        .get(&path_text, 10)
        .expect_err("too large");
    assert!(
        err.to_string().contains("exceed the 10-byte limit"),
        "{err}"
    );
}

#[test]
fn put_with_wrong_sha256_is_rejected_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    let request = Message::Put(PutRequest {
        path: path.to_string_lossy().into_owned(),
        mode: 0o644,
        data: b"payload".to_vec(),
        sha256: sha256_hex(b"other"),
    });
    let (answers, outcome) = raw_session(1, &encode_frame(&request).expect("encodes"));
    assert!(
        agent_error(&answers).contains("sha256 mismatch"),
        "{answers:?}"
    );
    assert!(matches!(outcome, Ok(Outcome::Served)));
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

#[test]
fn put_and_get_outside_the_allowed_roots_are_rejected() {
    let allowed = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(other.path(), allowed.path().join("escape")).expect("symlink");
    std::fs::write(other.path().join("secret"), b"s").expect("write");
    let outside = other.path().join("f").to_string_lossy().into_owned();
    let via_link = allowed
        .path()
        .join("escape/f")
        .to_string_lossy()
        .into_owned();
    let dotdot = format!("{}/../x", allowed.path().display());

    for (path, needle) in [
        (outside.as_str(), "outside the allowed roots"),
        (via_link.as_str(), "outside the allowed roots"),
        (dotdot.as_str(), "must be absolute"),
        ("relative/path", "must be absolute"),
    ] {
        let (stream, _s) = start(agent_in(allowed.path()));
        let err = Client::new(stream)
            .put(path, 0o644, b"x")
            .expect_err("refused");
        assert!(err.to_string().contains(needle), "put {path}: {err}");
    }
    assert!(!other.path().join("f").exists());
    let secret = allowed
        .path()
        .join("escape/secret")
        .to_string_lossy()
        .into_owned();
    let (stream, _s) = start(agent_in(allowed.path()));
    let err = Client::new(stream).get(&secret, 100).expect_err("refused");
    assert!(
        err.to_string().contains("outside the allowed roots"),
        "{err}"
    );
}

#[test]
fn get_of_a_directory_or_missing_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, needle) in [
        (dir.path().to_path_buf(), "not a regular file"),
        (dir.path().join("missing"), "resolving the path"),
    ] {
        let (stream, _s) = start(agent_in(dir.path()));
        let err = Client::new(stream)
            .get(&path.to_string_lossy(), 100)
            .expect_err("refused");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn oversize_frame_is_rejected_with_an_error_reply() {
    let mut request = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    request.extend_from_slice(b"{}");
    let (answers, outcome) = raw_session(1, &request);
    assert!(
        agent_error(&answers).contains("exceeds the 16777216-byte limit"),
        "{answers:?}"
    );
    let err = outcome.expect_err("session failed");
    assert!(!err.stream_in_sync());
}

#[test]
fn unknown_protocol_version_is_rejected() {
    let (answers, outcome) = raw_session(3, b"");
    assert_eq!(answers.len(), 1);
    assert!(
        agent_error(&answers).contains("unsupported protocol version 3; this agent speaks 1 to 2")
    );
    assert!(matches!(outcome, Err(SessionError::Version { got: 3 })));
}

#[test]
fn a_version_1_client_is_still_served() {
    let request = encode_frame(&Message::Exec(ExecRequest::new(["echo", "v1"]))).expect("encodes");
    let (answers, outcome) = raw_session(1, &request);
    assert!(
        answers.contains(&Message::Stdout {
            data: b"v1\n".to_vec()
        }),
        "{answers:?}"
    );
    assert!(matches!(outcome, Ok(Outcome::Served)));
}

#[test]
fn request_without_hello_is_rejected() {
    let (mut stream, session) = start(Agent::default());
    stream
        .write_all(&encode_frame(&Message::Shutdown { reboot: false }).expect("encodes"))
        .expect("send");
    let answer = read_frame(&mut stream).expect("answer");
    assert_eq!(
        answer,
        Message::Error {
            message: "expected hello first, got shutdown".into()
        }
    );
    assert!(matches!(
        session.join().expect("session"),
        Err(SessionError::NotHello { .. })
    ));
}

#[test]
fn bad_utf8_in_argv_is_a_protocol_error() {
    let payload = b"{\"type\":\"exec\",\"argv\":[\"ech\xffo\"]}";
    let mut request = (payload.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(payload);
    let (answers, outcome) = raw_session(1, &request);
    assert!(
        agent_error(&answers).contains("malformed frame"),
        "{answers:?}"
    );
    assert!(outcome.expect_err("refused").stream_in_sync());
}

#[test]
fn a_non_request_message_is_answered_with_an_error() {
    let (answers, outcome) = raw_session(1, &encode_frame(&Message::Ok).expect("encodes"));
    assert!(agent_error(&answers)
        .contains("expected exec, pty_exec, put, get, resume or shutdown, got ok"));
    assert!(matches!(outcome, Ok(Outcome::Served)));
}

#[test]
fn shutdown_is_acknowledged_and_handed_to_the_caller() {
    let (mut client, session) = client();
    client.shutdown(true).expect("acknowledged");
    assert!(matches!(
        session.join().expect("session"),
        Ok(Outcome::Shutdown { reboot: true })
    ));
}

#[test]
fn shared_stream_serves_requests_in_sequence_and_survives_bad_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut client_end, mut agent_end) = UnixStream::pair().expect("socketpair");
    let agent = agent_in(dir.path());
    let server = thread::spawn(move || serve_stream(&mut agent_end, &agent));

    // A garbage frame at a frame boundary: answered with an error, the stream goes on.
    let garbage = b"\x00\x00\x00\x03abc";
    client_end.write_all(garbage).expect("garbage");
    assert!(matches!(
        read_frame(&mut client_end),
        Ok(Message::Error { .. })
    ));

    let mut client = Client::new_shared(client_end);
    let path = dir.path().join("f").to_string_lossy().into_owned();
    client.put(&path, 0o600, b"data").expect("put");
    assert_eq!(client.get(&path, 100).expect("get").data, b"data");
    assert_eq!(client.exec(&sh("echo 1")).expect("exec").stdout, b"1\n");
    drop(client);
    assert_eq!(server.join().expect("server"), Outcome::Closed);
}

#[test]
fn shared_stream_stops_at_shutdown() {
    let (client_end, mut agent_end) = UnixStream::pair().expect("socketpair");
    let server = thread::spawn(move || serve_stream(&mut agent_end, &Agent::default()));
    let mut client = Client::new_shared(client_end);
    assert_eq!(client.exec(&sh("exit 4")).expect("exec").code, Some(4));
    client.shutdown(false).expect("shutdown");
    assert_eq!(
        server.join().expect("server"),
        Outcome::Shutdown { reboot: false }
    );
}

#[test]
fn a_resume_with_a_bad_boot_id_is_refused_before_anything_changes() {
    let request = Message::Resume(kiln_agent_proto::ResumeRequest {
        entropy: vec![7; 64],
        unix_secs: 1,
        unix_nanos: 0,
        boot_id: "two words".into(),
        shares: Vec::new(),
    });
    let (answers, outcome) = raw_session(1, &encode_frame(&request).expect("encodes"));
    assert!(agent_error(&answers).contains("bad boot id"), "{answers:?}");
    assert!(matches!(outcome, Ok(Outcome::Served)));
}
