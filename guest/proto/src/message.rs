//! The protocol's messages. Every frame carries exactly one [`Message`], tagged by `"type"`.

use serde::{Deserialize, Serialize};

/// The largest file `Put`/`Get` carry: base64 grows data by 4/3, and the rest of a 16 MiB frame
/// leaves room for the JSON envelope and the path.
pub const MAX_FILE_LEN: u64 = 12 * 1024 * 1024 - 64 * 1024;

/// One protocol message; see `guest/PROTOCOL.md` for which side sends which and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First message in each direction of a session: the protocol version, and a nonce the agent
    /// echoes so a client on a shared byte stream (virtio-serial) can find the start of its reply.
    Hello {
        /// Protocol version the sender speaks.
        version: u32,
        /// Client-chosen value echoed by the agent; 0 when unused.
        #[serde(default)]
        nonce: u64,
    },
    /// Run a command.
    Exec(ExecRequest),
    /// A chunk of the command's standard output.
    Stdout {
        /// The bytes, base64 on the wire.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A chunk of the command's standard error.
    Stderr {
        /// The bytes, base64 on the wire.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The command ended: the last message of an exec.
    Exited {
        /// Exit code when it exited normally.
        code: Option<i32>,
        /// Signal number when a signal killed it.
        signal: Option<i32>,
        /// Whether the agent killed it because its timeout passed.
        timed_out: bool,
    },
    /// Write a file in the guest.
    Put(PutRequest),
    /// Read a file from the guest.
    Get(GetRequest),
    /// The answer to `Get`.
    FileData {
        /// File contents, base64 on the wire.
        #[serde(with = "b64")]
        data: Vec<u8>,
        /// Permission bits (`st_mode & 0o7777`).
        mode: u32,
        /// Lower-case hex SHA-256 of `data`.
        sha256: String,
    },
    /// Run a command on a new pseudo-terminal (protocol version 2): interactive shells.
    PtyExec(PtyExecRequest),
    /// Bytes typed into a `PtyExec` command's terminal (Ctrl-C is byte 3).
    Stdin {
        /// The bytes, base64 on the wire.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The host terminal changed size; the agent resizes the `PtyExec` terminal.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Power the guest off (or reboot it); answered with `Ok` before the agent acts.
    Shutdown {
        /// Reboot instead of powering off.
        reboot: bool,
    },
    /// Make a guest restored from a snapshot a fresh one: reseed the kernel's RNG, set the
    /// clock, mount the shares, take the new boot id; then the agent prints a new readiness
    /// record carrying that id. Answered with `Ok` once done.
    Resume(ResumeRequest),
    /// Success without data (answers `Put`, `Shutdown` and `Resume`).
    Ok,
    /// The request failed; the message says what and why.
    Error {
        /// One line naming what failed.
        message: String,
    },
}

impl Message {
    /// The message's wire tag, for error messages ("expected exited, got ok").
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Exec(_) => "exec",
            Message::Stdout { .. } => "stdout",
            Message::Stderr { .. } => "stderr",
            Message::Exited { .. } => "exited",
            Message::Put(_) => "put",
            Message::Get(_) => "get",
            Message::FileData { .. } => "file_data",
            Message::PtyExec(_) => "pty_exec",
            Message::Stdin { .. } => "stdin",
            Message::Resize { .. } => "resize",
            Message::Shutdown { .. } => "shutdown",
            Message::Resume(_) => "resume",
            Message::Ok => "ok",
            Message::Error { .. } => "error",
        }
    }

    /// The lowest protocol version that has this message; a client says it in its hello, so
    /// requests an older agent knows still work with it.
    pub fn min_version(&self) -> u32 {
        match self {
            Message::PtyExec(_) | Message::Stdin { .. } | Message::Resize { .. } => 2,
            _ => 1,
        }
    }
}

/// A command to run on a pseudo-terminal: its output (stdout and stderr together, as a terminal
/// shows them) comes back as `Stdout` chunks, input goes in as `Stdin`, then `Exited`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those in) the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's (`/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The terminal's initial rows (0: the kernel's default).
    #[serde(default)]
    pub rows: u16,
    /// The terminal's initial columns (0: the kernel's default).
    #[serde(default)]
    pub cols: u16,
}

/// What a restored guest needs to be a fresh one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// Host random bytes mixed into the kernel's pool (and credited), base64 on the wire.
    #[serde(with = "b64")]
    pub entropy: Vec<u8>,
    /// The host's wall clock: seconds since the Unix epoch.
    pub unix_secs: u64,
    /// Nanoseconds past `unix_secs`.
    pub unix_nanos: u32,
    /// The boot id the readiness record carries from now on.
    pub boot_id: String,
    /// Shares to mount now (a snapshot is taken before any is mounted).
    #[serde(default)]
    pub shares: Vec<ResumeShare>,
}

/// One share to mount after a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeShare {
    /// The virtio-fs / 9p tag.
    pub tag: String,
    /// Absolute mount point.
    pub mountpoint: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those in) the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's (`/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes fed to the command's standard input, which is then closed.
    #[serde(default, with = "b64")]
    pub stdin: Vec<u8>,
    /// Kill the command's process group after this many milliseconds; no limit when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request running `argv` with no stdin, environment changes, cwd or timeout.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }
}

/// Write `data` to `path` in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// Absolute path in the guest; missing parent directories are created.
    pub path: String,
    /// Permission bits for the file.
    pub mode: u32,
    /// File contents, base64 on the wire.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Lower-case hex SHA-256 of `data`; the agent refuses the file when it does not match.
    pub sha256: String,
}

/// Read `path` from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Refuse files larger than this many bytes.
    pub max_size: u64,
}

/// Serde adapter carrying `Vec<u8>` as a base64 string (JSON arrays of numbers would be 4x larger).
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format_args!("invalid base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_json() {
        let all = vec![
            Message::Hello {
                version: 1,
                nonce: 7,
            },
            Message::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "cat".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: vec![0, 1, 2, 255],
                timeout_ms: Some(5),
            }),
            Message::Stdout {
                data: b"out".to_vec(),
            },
            Message::Stderr { data: vec![] },
            Message::Exited {
                code: None,
                signal: Some(9),
                timed_out: true,
            },
            Message::Put(PutRequest {
                path: "/a".into(),
                mode: 0o644,
                data: b"x".to_vec(),
                sha256: "00".into(),
            }),
            Message::Get(GetRequest {
                path: "/a".into(),
                max_size: 10,
            }),
            Message::FileData {
                data: b"y".to_vec(),
                mode: 0o600,
                sha256: "11".into(),
            },
            Message::PtyExec(PtyExecRequest {
                argv: vec!["sh".into()],
                env: vec![("TERM".into(), "xterm".into())],
                cwd: None,
                rows: 24,
                cols: 80,
            }),
            Message::Stdin { data: vec![3] },
            Message::Resize {
                rows: 50,
                cols: 132,
            },
            Message::Shutdown { reboot: false },
            Message::Ok,
            Message::Error {
                message: "no".into(),
            },
        ];
        for message in all {
            let json = serde_json::to_string(&message).expect("serializes");
            assert!(
                json.contains(&format!("\"type\":\"{}\"", message.kind())),
                "{json}"
            );
            let back: Message = serde_json::from_str(&json).expect("deserializes");
            assert_eq!(back, message);
        }
    }

    #[test]
    fn bytes_travel_as_base64() {
        let json = serde_json::to_string(&Message::Stdout {
            data: b"hi".to_vec(),
        })
        .expect("serializes");
        assert_eq!(json, r#"{"type":"stdout","data":"aGk="}"#);
    }

    #[test]
    fn exec_defaults_optional_fields() {
        let m: Message =
            serde_json::from_str(r#"{"type":"exec","argv":["true"]}"#).expect("parses");
        assert_eq!(m, Message::Exec(ExecRequest::new(["true"])));
    }

    #[test]
    fn only_the_pty_messages_need_version_2() {
        assert_eq!(Message::Exec(ExecRequest::new(["true"])).min_version(), 1);
        assert_eq!(Message::Shutdown { reboot: false }.min_version(), 1);
        assert_eq!(Message::PtyExec(PtyExecRequest::default()).min_version(), 2);
        assert_eq!(Message::Resize { rows: 1, cols: 1 }.min_version(), 2);
    }

    #[test]
    fn invalid_base64_is_a_decode_error() {
        let r = serde_json::from_str::<Message>(r#"{"type":"stdout","data":"!!"}"#);
        assert!(r.is_err());
    }
}
