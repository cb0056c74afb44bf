//! The kiln guest agent protocol: length-prefixed JSON frames, the message set, the readiness
//! record the agent prints on the serial console, and the host-side client.
//!
//! The wire format is specified in `guest/PROTOCOL.md`; this crate is its reference implementation
//! and is shared by the agent (guest side) and the harness (host side).

pub mod client;
pub mod frame;
pub mod message;
pub mod readiness;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};
pub use message::{
    ExecRequest, GetRequest, Message, PtyExecRequest, PutRequest, ResumeRequest, ResumeShare,
    MAX_FILE_LEN,
};
pub use readiness::{ReadyRecord, Transport};

/// The highest protocol version this crate speaks: 2 added `pty_exec`, `stdin` and `resize`.
pub const PROTOCOL_VERSION: u32 = 2;

/// The lowest protocol version the agent still serves (a client built before version 2).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const VSOCK_PORT: u32 = 1024;

/// The name of the virtio-serial port the agent serves (QEMU `virtserialport,name=...`).
pub const SERIAL_PORT_NAME: &str = "org.kiln.agent.0";

/// Lower-case hex SHA-256 of `data`, the form used in `Put`/`FileData` messages.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data);
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_input_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
